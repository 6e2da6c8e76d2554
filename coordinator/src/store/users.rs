//! Users and the network's policy in the store (issue 16).
//!
//! A user owns the nodes joined with one of their tokens, unless a node is
//! tagged: then its tags own it, as in Tailscale. The policy is kept as the
//! HuJSON text the administrator wrote, comments included, so `policy get`
//! gives back their file; it was parsed, checked and its `tests` run before
//! it was stored (`admin::policy_set`), and every replica compiles it again
//! from the text (`hub`). Both kinds of change are noted as an `access`
//! change, which makes every replica's hub recompile and push the result.

use sqlx::{Any, Transaction};
use warren::keys::NodeKey;
use warren::policy::{Inventory, InventoryNode, InventoryUser};

use super::{now_ms, ChangeKind, NodeRecord, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserRecord {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub display_name: String,
    pub created_ms: i64,
}

/// The note every replica's hub turns into a recompilation.
const ACCESS_KEY: NodeKey = NodeKey([0; 32]);

/// A user's email, as Tailscale's policy names users: one `@`, printable,
/// no spaces, at most 254 bytes.
pub fn check_email(email: &str) -> Result<(), StoreError> {
    let ok = email.len() <= 254
        && email.split('@').count() == 2
        && !email.starts_with('@')
        && !email.ends_with('@')
        && email.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{email:?} is not an email address (name@domain, no spaces)"
        )))
    }
}

/// The short name a user gets when none is given: the email's local part,
/// lower-cased, with anything but letters, digits, `.`, `_` and `-` as `-`.
pub fn default_name(email: &str) -> String {
    let local = email.split('@').next().unwrap_or(email);
    local
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

type UserRow = (i64, String, String, String, i64);

fn user(row: UserRow) -> UserRecord {
    let (id, name, email, display_name, created_ms) = row;
    UserRecord {
        id,
        name,
        email,
        display_name,
        created_ms,
    }
}

impl Store {
    async fn note_access(&self, tx: &mut Transaction<'static, Any>) -> Result<(), StoreError> {
        self.note_change(tx, 0, &ACCESS_KEY, ChangeKind::Access)
            .await
    }

    pub async fn create_user(
        &self,
        email: &str,
        name: Option<&str>,
        display_name: &str,
    ) -> Result<UserRecord, StoreError> {
        check_email(email)?;
        let name = name.map_or_else(|| default_name(email), str::to_owned);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(StoreError::Invalid(format!("bad user name {name:?}")));
        }
        if !display_name.chars().all(|c| !c.is_control()) {
            return Err(StoreError::Invalid(
                "the display name has control characters".into(),
            ));
        }
        let mut tx = self.begin().await?;
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT id FROM users WHERE lower(email) = lower($1) OR name = $2")
                .bind(email)
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_some() {
            return Err(StoreError::Invalid(format!(
                "a user with the email {email:?} or the name {name:?} exists"
            )));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO users (name, email, display_name, created_ms) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&name)
        .bind(email)
        .bind(display_name)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        self.note_access(&mut tx).await?;
        tx.commit().await?;
        self.user_by_id(id)
            .await?
            .ok_or_else(|| StoreError::NoSuchUser(email.to_owned()))
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT id, name, email, display_name, created_ms FROM users ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(user).collect())
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, name, email, display_name, created_ms FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(user))
    }

    /// A user by email (any case) or by name.
    pub async fn find_user(&self, which: &str) -> Result<UserRecord, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, name, email, display_name, created_ms FROM users WHERE lower(email) = lower($1) OR name = $1",
        )
        .bind(which)
        .fetch_optional(self.pool())
        .await?;
        row.map(user)
            .ok_or_else(|| StoreError::NoSuchUser(which.to_owned()))
    }

    /// Removes a user. Refused while they own nodes, unless `force`, which
    /// removes those nodes too (they are returned). Their tokens are
    /// revoked, so no node can join as a user who is gone.
    pub async fn remove_user(
        &self,
        which: &str,
        force: bool,
    ) -> Result<(UserRecord, Vec<NodeRecord>), StoreError> {
        let u = self.find_user(which).await?;
        let owned: Vec<NodeRecord> = self
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.user_id == Some(u.id))
            .collect();
        if !owned.is_empty() && !force {
            return Err(StoreError::Invalid(format!(
                "{} owns {} node(s) ({}); remove them first, or use --force to remove them with the user",
                u.email,
                owned.len(),
                owned.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut tx = self.begin().await?;
        for n in &owned {
            self.delete_in(&mut tx, n).await?;
        }
        sqlx::query("UPDATE tokens SET revoked = 1 WHERE user_id = $1")
            .bind(u.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(u.id)
            .execute(&mut *tx)
            .await?;
        self.note_access(&mut tx).await?;
        tx.commit().await?;
        Ok((u, owned))
    }

    /// The stored policy text; `None`: no policy (everything allowed).
    pub async fn policy_text(&self) -> Result<Option<String>, StoreError> {
        let text: Option<String> = sqlx::query_scalar("SELECT text FROM policy WHERE id = 1")
            .fetch_optional(self.pool())
            .await?;
        Ok(text)
    }

    /// Stores (or, with `None`, removes) the policy. The caller has
    /// validated it.
    pub async fn set_policy_text(&self, text: Option<&str>) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM policy WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        if let Some(text) = text {
            sqlx::query("INSERT INTO policy (id, text, updated_ms) VALUES (1, $1, $2)")
                .bind(text)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        self.note_access(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The network as the policy sees it, from the store's users and nodes.
pub fn inventory<'a>(
    users: &[UserRecord],
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
) -> Inventory {
    let name_of = |id: i64| users.iter().find(|u| u.id == id).map(|u| u.name.clone());
    Inventory {
        users: users
            .iter()
            .map(|u| InventoryUser {
                name: u.name.clone(),
                email: u.email.clone(),
            })
            .collect(),
        nodes: nodes
            .into_iter()
            .map(|n| inventory_node(n, &name_of))
            .collect(),
    }
}

pub fn inventory_node(n: &NodeRecord, name_of: &impl Fn(i64) -> Option<String>) -> InventoryNode {
    let tags = n.all_tags();
    InventoryNode {
        name: n.name.clone(),
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        // A tag replaces the user's identity.
        user: if tags.is_empty() {
            n.user_id.and_then(name_of)
        } else {
            None
        },
        tags,
        advertised_routes: n.advertised_routes.clone(),
        approved_routes: n.approved_routes.clone(),
    }
}
