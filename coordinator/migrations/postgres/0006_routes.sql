-- The routes a node advertises (warren up --advertise-routes, both
-- default routes for --advertise-exit-node) and those an admin or the
-- policy's autoApprovers approved; it serves the ones in both. JSON lists
-- of prefixes, like the tags.
ALTER TABLE nodes ADD COLUMN advertised_routes TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN approved_routes TEXT NOT NULL DEFAULT '[]';
