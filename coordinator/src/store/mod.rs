//! The coordinator's store: tokens, nodes, seen nonces, change notes.
//!
//! One code base serves both backends through sqlx's `Any` driver with
//! runtime queries (`$1` placeholders work on both), so no database is
//! needed at build time. SQLite (a single file in the data directory) is
//! the default; a `postgres://` URL selects PostgreSQL, which several
//! replicas can share.
//!
//! Every change to a node is *noted* inside the transaction that makes it,
//! so a note exists exactly when the change committed: on SQLite as a row
//! in `changes` (the hub polls it; SQLite commits serially, so ids appear in
//! order), on PostgreSQL as a `NOTIFY` (delivered at commit, to every
//! replica). That is also how administration commands, which run in their
//! own process, reach connected agents.
//!
//! The SQLite pool has a single connection: SQLite has one writer anyway,
//! and one connection rules out the "database is locked" failures of
//! deferred transactions upgrading to writers.

mod nodes;
mod schema;
mod tokens;
pub mod users;

use std::net::Ipv6Addr;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, Transaction};
use warren::control::ErrorCode;
use warren::keys::NodeKey;

pub use nodes::{NodeRecord, RegisterInput, Registered};
pub use tokens::{NewToken, TokenInfo};
pub use users::UserRecord;

/// The PostgreSQL channel that carries change notes.
pub const PG_CHANNEL: &str = "warren_changes";

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("unsupported database URL {0:?} (want sqlite://… or postgres://…)")]
    BadUrl(String),
    #[error("the token is not valid")]
    InvalidToken,
    #[error("the token has expired")]
    TokenExpired,
    #[error("the token was revoked")]
    TokenRevoked,
    #[error("the token was already used (it is not reusable)")]
    TokenUsed,
    #[error("no such node: {0}")]
    NoSuchNode(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("no such token: {0}")]
    NoSuchToken(String),
    #[error("the request was already seen (replay)")]
    Replayed,
    #[error("this disco key belongs to another node")]
    DiscoKeyTaken,
    #[error("{0}")]
    Invalid(String),
    #[error("could not allocate {0} after many tries")]
    Exhausted(&'static str),
    #[error("stored data is corrupt: {what}: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The task that batches writes (`api::presence`) is gone: the
    /// server is shutting down.
    #[error("the store's writer has stopped")]
    Closed,
    #[error("encoding {what} for the database: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Stored data that did not decode: what it was, and why.
    pub(crate) fn corrupt(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The protocol error code an API answer carries for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::InvalidToken => ErrorCode::InvalidToken,
            StoreError::TokenExpired => ErrorCode::TokenExpired,
            StoreError::TokenRevoked => ErrorCode::TokenRevoked,
            StoreError::TokenUsed => ErrorCode::TokenUsed,
            StoreError::NoSuchNode(_) => ErrorCode::UnknownNode,
            StoreError::Replayed => ErrorCode::Replayed,
            StoreError::Invalid(_) => ErrorCode::BadRequest,
            StoreError::DiscoKeyTaken => ErrorCode::Conflict,
            _ => ErrorCode::Internal,
        }
    }
}

/// What kind of change a note records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Upsert,
    Removed,
    /// Users or the policy changed (node id 0): recompile the policy.
    Access,
}

impl ChangeKind {
    fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Upsert => "upsert",
            ChangeKind::Removed => "removed",
            ChangeKind::Access => "access",
        }
    }
}

/// A change note as the hub reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub node_id: i64,
    pub node_key: NodeKey,
    pub kind: ChangeKind,
}

impl Change {
    /// Parses a NOTIFY payload (`kind:node_id:key`).
    pub fn parse(payload: &str) -> Option<Change> {
        let mut parts = payload.splitn(3, ':');
        let kind = match parts.next()? {
            "upsert" => ChangeKind::Upsert,
            "removed" => ChangeKind::Removed,
            "access" => ChangeKind::Access,
            _ => return None,
        };
        let node_id = parts.next()?.parse().ok()?;
        let node_key = parts.next()?.parse().ok()?;
        Some(Change {
            node_id,
            node_key,
            kind,
        })
    }
}

/// A handle on the database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Transactions begun through [`Store::begin`]: on SQLite each one
    /// holds the only connection, so tests count them (`tests/storm.rs`).
    begun: Arc<AtomicU64>,
    backend: Backend,
    url: String,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, opts) = if url.starts_with("sqlite:") {
            let opts = AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        use sqlx::Executor as _;
                        conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000")
                            .await?;
                        Ok(())
                    })
                });
            (Backend::Sqlite, opts)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Backend::Postgres, AnyPoolOptions::new().max_connections(16))
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let pool = opts
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        schema::migrate(&pool, backend).await?;
        Ok(Store {
            pool,
            begun: Arc::default(),
            backend,
            url: url.to_owned(),
        })
    }

    /// The URL of an SQLite file in `dir`.
    pub fn sqlite_url(dir: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join("coordinator.db").display())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn begin(&self) -> Result<Transaction<'static, Any>, StoreError> {
        self.begun.fetch_add(1, Ordering::Relaxed);
        Ok(self.pool.begin().await?)
    }

    /// How many transactions [`Store::begin`] has opened so far.
    pub fn transactions_begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// Reads a setting, writing `default()` first if it is absent. Racing
    /// replicas agree: the first insert wins and everyone reads it back.
    pub async fn setting_or_init(
        &self,
        name: &str,
        default: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(default())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The network's IPv6 ULA /48 (RFC 4193: `fd` + 40 random bits), made
    /// once and kept.
    pub async fn ula_prefix(&self) -> Result<Ipv6Addr, StoreError> {
        let text = self
            .setting_or_init("ula_prefix", || {
                let g: [u8; 5] = rand::random();
                let mut b = [0u8; 16];
                b[0] = 0xfd;
                b[1..6].copy_from_slice(&g);
                Ipv6Addr::from(b).to_string()
            })
            .await?;
        Ipv6Addr::from_str(&text)
            .map_err(|e| StoreError::corrupt(format!("ula_prefix {text:?}"), e))
    }

    /// Records that `key` (not yet seen) was used; `Replayed` otherwise.
    pub async fn consume_nonce(
        tx: &mut Transaction<'static, Any>,
        nonce: &str,
        node: &NodeKey,
        ts: i64,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("INSERT INTO nonces (nonce, node_key, ts) VALUES ($1, $2, $3) ON CONFLICT (nonce) DO NOTHING")
            .bind(nonce)
            .bind(node.to_string())
            .bind(ts)
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Replayed)
        }
    }

    /// Notes a change inside the transaction that makes it.
    pub async fn note_change(
        &self,
        tx: &mut Transaction<'static, Any>,
        node_id: i64,
        key: &NodeKey,
        kind: ChangeKind,
    ) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => {
                sqlx::query(
                    "INSERT INTO changes (node_id, node_key, kind, at_ms) VALUES ($1, $2, $3, $4)",
                )
                .bind(node_id)
                .bind(key.to_string())
                .bind(kind.as_str())
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
            }
            Backend::Postgres => {
                let payload = format!("{}:{node_id}:{key}", kind.as_str());
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(PG_CHANNEL)
                    .bind(payload)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// SQLite only: the change notes after `after`, oldest first.
    pub async fn changes_since(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Change)>, StoreError> {
        let rows: Vec<(i64, i64, String, String)> = sqlx::query_as(
            "SELECT id, node_id, node_key, kind FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, node_id, key, kind)| {
                Change::parse(&format!("{kind}:{node_id}:{key}")).map(|c| (id, c))
            })
            .collect())
    }

    /// SQLite only: the newest change note id (0 when there is none).
    pub async fn last_change_id(&self) -> Result<i64, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(id.unwrap_or(0))
    }

    /// Forgets nonces too old to be accepted again and old change notes.
    pub async fn prune(&self, nonce_horizon_secs: i64) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query("DELETE FROM nonces WHERE ts < $1")
            .bind(now / 1000 - nonce_horizon_secs)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM changes WHERE at_ms < $1")
            .bind(now - 600_000)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Row counts of every table, for tests that assert "nothing changed".
    pub async fn row_counts(&self) -> Result<Vec<(&'static str, i64)>, StoreError> {
        let mut out = Vec::new();
        for table in ["tokens", "nodes", "nonces", "settings"] {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                    .fetch_one(&self.pool)
                    .await?;
            out.push((table, n));
        }
        Ok(out)
    }
}
