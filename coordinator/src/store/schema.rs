//! The database schema and its migrations, for SQLite and PostgreSQL.
//!
//! Migrations are a numbered list applied in order at start, each in its own
//! transaction and recorded in `warren_migrations`. They are kept in code
//! rather than in sqlx's migration files because the two backends need
//! different DDL (`AUTOINCREMENT` against `BIGSERIAL`), and one list with
//! both dialects side by side is easier to keep in step than two folders.
//! On PostgreSQL an advisory lock serialises replicas starting together.
//! Flags are `BIGINT` 0/1 on both backends: sqlx's `Any` driver cannot
//! decode SQLite's `BOOLEAN` affinity.

use sqlx::AnyPool;

use super::{Backend, StoreError};

/// One migration: its version and the statements for each backend.
struct Migration {
    version: i64,
    sqlite: &'static [&'static str],
    postgres: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[
    Migration {
    version: 1,
    sqlite: &[
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE tokens (
            id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
            reusable BIGINT NOT NULL, ephemeral BIGINT NOT NULL,
            tags TEXT NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT,
            revoked BIGINT NOT NULL DEFAULT 0, uses BIGINT NOT NULL DEFAULT 0)",
        "CREATE TABLE nodes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            node_key TEXT NOT NULL UNIQUE, disco_key TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE, hostname TEXT NOT NULL,
            os TEXT NOT NULL, version TEXT NOT NULL,
            ipv4 TEXT NOT NULL UNIQUE, ipv6 TEXT NOT NULL UNIQUE,
            ephemeral BIGINT NOT NULL, tags TEXT NOT NULL, token_id TEXT,
            endpoints TEXT NOT NULL DEFAULT '[]', netcheck TEXT,
            conns BIGINT NOT NULL DEFAULT 0,
            last_seen_ms BIGINT NOT NULL, created_ms BIGINT NOT NULL)",
        "CREATE TABLE nonces (nonce TEXT PRIMARY KEY, node_key TEXT NOT NULL, ts BIGINT NOT NULL)",
        "CREATE INDEX nonces_ts ON nonces (ts)",
        "CREATE TABLE changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT, node_id BIGINT NOT NULL,
            node_key TEXT NOT NULL, kind TEXT NOT NULL, at_ms BIGINT NOT NULL)",
    ],
    postgres: &[
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE tokens (
            id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
            reusable BIGINT NOT NULL, ephemeral BIGINT NOT NULL,
            tags TEXT NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT,
            revoked BIGINT NOT NULL DEFAULT 0, uses BIGINT NOT NULL DEFAULT 0)",
        "CREATE TABLE nodes (
            id BIGSERIAL PRIMARY KEY,
            node_key TEXT NOT NULL UNIQUE, disco_key TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE, hostname TEXT NOT NULL,
            os TEXT NOT NULL, version TEXT NOT NULL,
            ipv4 TEXT NOT NULL UNIQUE, ipv6 TEXT NOT NULL UNIQUE,
            ephemeral BIGINT NOT NULL, tags TEXT NOT NULL, token_id TEXT,
            endpoints TEXT NOT NULL DEFAULT '[]', netcheck TEXT,
            conns BIGINT NOT NULL DEFAULT 0,
            last_seen_ms BIGINT NOT NULL, created_ms BIGINT NOT NULL)",
        "CREATE TABLE nonces (nonce TEXT PRIMARY KEY, node_key TEXT NOT NULL, ts BIGINT NOT NULL)",
        "CREATE INDEX nonces_ts ON nonces (ts)",
        // Unused on PostgreSQL (changes travel by NOTIFY), kept so both
        // backends have the same tables and the same tests.
        "CREATE TABLE changes (
            id BIGSERIAL PRIMARY KEY, node_id BIGINT NOT NULL,
            node_key TEXT NOT NULL, kind TEXT NOT NULL, at_ms BIGINT NOT NULL)",
    ],
    },
    // What the node's NAT does (a `NatSummary` as JSON) and its home relay
    // region, both from its endpoint reports, for its peers' maps.
    Migration {
        version: 2,
        sqlite: &[
            "ALTER TABLE nodes ADD COLUMN nat TEXT",
            "ALTER TABLE nodes ADD COLUMN home_relay BIGINT",
        ],
        postgres: &[
            "ALTER TABLE nodes ADD COLUMN nat TEXT",
            "ALTER TABLE nodes ADD COLUMN home_relay BIGINT",
        ],
    },
    // The tags a node advertises itself (`warren up --advertise-tags`),
    // apart from those its token granted (`tags`): re-registering replaces
    // these and never touches the granted ones.
    Migration {
        version: 3,
        sqlite: &["ALTER TABLE nodes ADD COLUMN advertised_tags TEXT NOT NULL DEFAULT '[]'"],
        postgres: &["ALTER TABLE nodes ADD COLUMN advertised_tags TEXT NOT NULL DEFAULT '[]'"],
    },
];

/// An arbitrary constant naming the migration advisory lock.
const PG_LOCK_ID: i64 = 0x7761_7272_656e; // "warren"

/// Brings the schema up to the newest version.
pub(super) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PG_LOCK_ID)
            .execute(&mut *conn)
            .await?;
    }
    let result = apply(&mut conn, backend).await;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PG_LOCK_ID)
            .execute(&mut *conn)
            .await?;
    }
    result
}

async fn apply(conn: &mut sqlx::AnyConnection, backend: Backend) -> Result<(), StoreError> {
    use sqlx::Connection as _;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS warren_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM warren_migrations")
        .fetch_one(&mut *conn)
        .await?;
    let current = current.unwrap_or(0);
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let mut tx = conn.begin().await?;
        let statements = match backend {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        for sql in statements {
            sqlx::query(*sql).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO warren_migrations (version, applied_ms) VALUES ($1, $2)")
            .bind(m.version)
            .bind(super::now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, "applied migration");
    }
    Ok(())
}
