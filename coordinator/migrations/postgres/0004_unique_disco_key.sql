-- A disco key belongs to one node (issue 15: a node re-registering with a
-- victim's disco key took its disco). Duplicates already stored keep the
-- oldest registration's key; the others get their own node key in its
-- place, which no peer can open, until they register again (every agent
-- does at its next start, with a fresh disco key).
UPDATE nodes SET disco_key = node_key
    WHERE id NOT IN (SELECT MIN(id) FROM nodes GROUP BY disco_key);
CREATE UNIQUE INDEX nodes_disco_key ON nodes (disco_key);
