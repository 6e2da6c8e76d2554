-- The tags a node advertises itself (warren up --advertise-tags), apart
-- from those its token granted (tags): re-registering replaces these and
-- never touches the granted ones.
ALTER TABLE nodes ADD COLUMN advertised_tags TEXT NOT NULL DEFAULT '[]';
