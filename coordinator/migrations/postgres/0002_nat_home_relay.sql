-- What the node's NAT does (a NatSummary as JSON) and its home relay
-- region, both from its endpoint reports, for its peers' maps.
ALTER TABLE nodes ADD COLUMN nat TEXT;
ALTER TABLE nodes ADD COLUMN home_relay BIGINT;
