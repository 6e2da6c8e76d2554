-- Users, the owners of nodes (issue 16): a token may belong to a user, and
-- the nodes joined with it are that user's unless they are tagged. The
-- policy is one HuJSON text per network, kept as written (comments too).
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE, email TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '', created_ms BIGINT NOT NULL);
ALTER TABLE tokens ADD COLUMN user_id BIGINT;
ALTER TABLE nodes ADD COLUMN user_id BIGINT;
CREATE TABLE policy (id BIGINT PRIMARY KEY, text TEXT NOT NULL, updated_ms BIGINT NOT NULL);
