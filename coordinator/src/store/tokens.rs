//! Join tokens: creation, listing, revocation, and spending at registration.
//!
//! A token is `wrn_<id>_<secret>`: the id is public (it names the token in
//! `token list` and `token revoke`), the secret is 32 random bytes. Only the
//! SHA-256 of the whole string is stored, so a leaked database does not leak
//! usable tokens; the secret's entropy makes a plain hash sufficient (no
//! password stretching is needed for random 256-bit values).
//!
//! Spending is one conditional `UPDATE` inside the registration
//! transaction, so a one-off token used by two registrations at once (even
//! on two replicas) admits exactly one of them.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use sqlx::{Any, Transaction};

use super::{now_ms, Store, StoreError};

/// What `token create` is asked for.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub reusable: bool,
    pub ephemeral: bool,
    pub expires_in: Option<std::time::Duration>,
    pub tags: Vec<String>,
    /// The user its nodes belong to (`token create --user`).
    pub user_id: Option<i64>,
}

/// A token as `token list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
    pub uses: i64,
    pub user_id: Option<i64>,
}

/// What a spent token grants the node that spent it.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub id: String,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub user_id: Option<i64>,
}

fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.trim().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

type TokenRow = (
    String,
    i64,
    i64,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    Option<i64>,
);

fn info(row: TokenRow) -> Result<TokenInfo, StoreError> {
    let (id, reusable, ephemeral, tags, created_ms, expires_ms, revoked, uses, user_id) = row;
    let tags = serde_json::from_str(&tags)
        .map_err(|e| StoreError::corrupt(format!("token {id} tags"), e))?;
    Ok(TokenInfo {
        id,
        reusable: reusable != 0,
        ephemeral: ephemeral != 0,
        tags,
        created_ms,
        expires_ms,
        revoked: revoked != 0,
        uses,
        user_id,
    })
}

const COLUMNS: &str =
    "id, reusable, ephemeral, tags, created_ms, expires_ms, revoked, uses, user_id";

impl Store {
    /// Creates a token; returns its id and the token string (shown once).
    pub async fn create_token(&self, spec: &NewToken) -> Result<(String, String), StoreError> {
        for tag in &spec.tags {
            let ok = !tag.is_empty()
                && tag.len() <= 64
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
            if !ok {
                return Err(StoreError::Invalid(format!(
                    "bad tag {tag:?} (letters, digits, - _ : . only)"
                )));
            }
        }
        let id_bytes: [u8; 5] = rand::random();
        let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let secret: [u8; 32] = rand::random();
        let token = format!(
            "wrn_{id}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let now = now_ms();
        let expires = spec.expires_in.map(|d| now + d.as_millis() as i64);
        sqlx::query(
            "INSERT INTO tokens (id, hash, reusable, ephemeral, tags, created_ms, expires_ms, user_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(hash(&token))
        .bind(i64::from(spec.reusable))
        .bind(i64::from(spec.ephemeral))
        .bind(serde_json::to_string(&spec.tags).unwrap_or_else(|_| "[]".into()))
        .bind(now)
        .bind(expires)
        .bind(spec.user_id)
        .execute(self.pool())
        .await?;
        Ok((id, token))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows: Vec<TokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tokens ORDER BY created_ms, id"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(info).collect()
    }

    /// Revokes a token: it can register no more nodes. Nodes that already
    /// joined with it stay (remove them with `node remove`).
    pub async fn revoke_token(&self, id: &str) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE tokens SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NoSuchToken(id.to_owned()));
        }
        Ok(())
    }

    /// Spends one use of `token` inside the registration transaction.
    ///
    /// One statement when the token is good: the use is counted by an
    /// `UPDATE … RETURNING` whose condition is the token's validity. Only a
    /// refused token is read again, to say why (each statement on SQLite
    /// is a round trip to sqlx's worker thread, and registrations are
    /// bound by them: issue 19).
    pub(crate) async fn spend_token(
        tx: &mut Transaction<'static, Any>,
        token: &str,
    ) -> Result<Grant, StoreError> {
        let spent: Option<TokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE tokens SET uses = uses + 1 WHERE hash = $1 AND revoked = 0 \
             AND (reusable = 1 OR uses = 0) AND (expires_ms IS NULL OR expires_ms > $2) \
             RETURNING {COLUMNS}"
        )))
        .bind(hash(token))
        .bind(now_ms())
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = spent {
            let t = info(row)?;
            return Ok(Grant {
                id: t.id,
                ephemeral: t.ephemeral,
                tags: t.tags,
                user_id: t.user_id,
            });
        }
        Err(Self::why_refused(tx, token).await?)
    }

    /// Why `token` cannot be spent now.
    async fn why_refused(
        tx: &mut Transaction<'static, Any>,
        token: &str,
    ) -> Result<StoreError, StoreError> {
        let row: Option<TokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tokens WHERE hash = $1"
        )))
        .bind(hash(token))
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else {
            return Ok(StoreError::InvalidToken);
        };
        let t = info(row)?;
        Ok(if t.revoked {
            StoreError::TokenRevoked
        } else if t.expires_ms.is_some_and(|e| e <= now_ms()) {
            StoreError::TokenExpired
        } else {
            // Single use and used (perhaps a moment ago, by a concurrent
            // registration).
            StoreError::TokenUsed
        })
    }
}
