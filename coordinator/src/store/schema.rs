//! The database schema and its migrations, for SQLite and PostgreSQL.
//!
//! The migrations are SQL files, one folder per backend
//! (`coordinator/migrations/sqlite/`, `coordinator/migrations/postgres/`),
//! named `NNNN_what.sql` and compiled into the binary. The two backends need
//! different DDL (`AUTOINCREMENT` against `BIGSERIAL`), hence two folders;
//! a test checks that they hold the same versions. They are applied in
//! order at start, each in its own transaction, and recorded in
//! `warren_migrations` (the table every deployed store already has, which
//! is why this is not sqlx's `_sqlx_migrations` migrator). On PostgreSQL an
//! advisory lock serialises replicas starting together. Flags are `BIGINT`
//! 0/1 on both backends: sqlx's `Any` driver cannot decode SQLite's
//! `BOOLEAN` affinity.

use sqlx::AnyPool;

use super::{Backend, StoreError};

/// One migration: its version and its SQL for each backend.
struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

/// Both backends' file of one version, side by side.
macro_rules! migration {
    ($version:literal, $file:literal) => {
        Migration {
            version: $version,
            sqlite: include_str!(concat!("../../migrations/sqlite/", $file)),
            postgres: include_str!(concat!("../../migrations/postgres/", $file)),
        }
    };
}

const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_init.sql"),
    migration!(2, "0002_nat_home_relay.sql"),
    migration!(3, "0003_advertised_tags.sql"),
    migration!(4, "0004_unique_disco_key.sql"),
    migration!(5, "0005_users_policy.sql"),
    migration!(6, "0006_routes.sql"),
];

/// The statements of a migration file: `--` comment lines dropped, split
/// at `;`. The files hold DDL only, never a `;` inside a literal.
fn statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .map(|l| format!("{l}\n"))
        .collect();
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

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
        // Claim the version first: the write takes SQLite's write lock
        // before anything is read, so a second process migrating the same
        // file at the same moment (the admin CLI while `serve` starts)
        // waits for it, then finds the version taken and skips it, instead
        // of running its DDL twice. PostgreSQL has the advisory lock too.
        let claimed =
            sqlx::query("INSERT INTO warren_migrations (version, applied_ms) VALUES ($1, $2)")
                .bind(m.version)
                .bind(super::now_ms())
                .execute(&mut *tx)
                .await;
        match claimed {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                tx.rollback().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let statements_of = match backend {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        for sql in statements(statements_of) {
            // Compiled-in migration files, never user input.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        tracing::info!(version = m.version, "applied migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_in_order_and_both_backends_have_each() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "versions are 1, 2, 3, …");
            let (a, b) = (statements(m.sqlite).len(), statements(m.postgres).len());
            assert!(
                a > 0 && a == b,
                "version {}: {a} vs {b} statements",
                m.version
            );
        }
    }

    #[test]
    fn comments_and_blank_lines_are_not_statements() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x TEXT);\n\n  -- another\nCREATE INDEX i ON a (x);\n";
        assert_eq!(
            statements(sql),
            ["CREATE TABLE a (x TEXT)", "CREATE INDEX i ON a (x)"]
        );
    }
}
