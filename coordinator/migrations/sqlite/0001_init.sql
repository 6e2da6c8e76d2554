-- The first schema: settings, join tokens, nodes, the nonces of signed
-- requests (replays are refused by the primary key), and the change log.
-- Flags are BIGINT 0/1: sqlx's Any driver cannot decode SQLite's BOOLEAN.

CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
    reusable BIGINT NOT NULL, ephemeral BIGINT NOT NULL,
    tags TEXT NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT,
    revoked BIGINT NOT NULL DEFAULT 0, uses BIGINT NOT NULL DEFAULT 0);

CREATE TABLE nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_key TEXT NOT NULL UNIQUE, disco_key TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE, hostname TEXT NOT NULL,
    os TEXT NOT NULL, version TEXT NOT NULL,
    ipv4 TEXT NOT NULL UNIQUE, ipv6 TEXT NOT NULL UNIQUE,
    ephemeral BIGINT NOT NULL, tags TEXT NOT NULL, token_id TEXT,
    endpoints TEXT NOT NULL DEFAULT '[]', netcheck TEXT,
    conns BIGINT NOT NULL DEFAULT 0,
    last_seen_ms BIGINT NOT NULL, created_ms BIGINT NOT NULL);

CREATE TABLE nonces (nonce TEXT PRIMARY KEY, node_key TEXT NOT NULL, ts BIGINT NOT NULL);

CREATE INDEX nonces_ts ON nonces (ts);

CREATE TABLE changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, node_id BIGINT NOT NULL,
    node_key TEXT NOT NULL, kind TEXT NOT NULL, at_ms BIGINT NOT NULL);
