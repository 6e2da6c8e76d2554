//! Nodes: registration with address allocation, the map's view of them,
//! administration (list, rename, remove), liveness, and reaping.
//!
//! Addresses are drawn at random from 100.64.0.0/10 and inserted with
//! `ON CONFLICT DO NOTHING`; a collision (with another node, or with a
//! replica allocating at the same moment) just draws again. The IPv6 address
//! is the network's ULA /48 with the IPv4 address in its last 32 bits, so it
//! is unique exactly when the IPv4 one is. A node re-registering with the
//! same node key keeps its id, name and addresses.
//!
//! A node is online while it has a map stream open on some replica
//! (`conns > 0`). Streams refresh `last_seen_ms` at each keepalive, so the
//! reaper can tell a replica that died with streams open from a live one.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sqlx::any::AnyRow;
use sqlx::{Any, Row as _, Transaction};
use warren::control::{Endpoint, EndpointsReport, Peer};
use warren::keys::NodeKey;
use warren::traversal::NatSummary;

use super::{now_ms, ChangeKind, Store, StoreError};

/// A node row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRecord {
    pub id: i64,
    pub key: NodeKey,
    pub disco_key: NodeKey,
    pub name: String,
    pub hostname: String,
    pub os: String,
    pub version: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ephemeral: bool,
    /// The tags its join token granted.
    pub tags: Vec<String>,
    /// The tags the node advertises (`warren up --advertise-tags`).
    pub advertised_tags: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    pub netcheck: Option<serde_json::Value>,
    pub online: bool,
    pub last_seen_ms: i64,
    pub created_ms: i64,
    /// What the node's NAT does, from its last endpoint report.
    pub nat: NatSummary,
    /// The relay region the node said it is reachable at.
    pub home_relay: Option<u16>,
    /// The user whose token joined it (`None`: a token of no user).
    pub user_id: Option<i64>,
    /// The routes it advertises (`warren up --advertise-routes`, both
    /// default routes as an exit node), sorted.
    pub advertised_routes: Vec<IpNet>,
    /// The routes approved for it (`route approve`, `autoApprovers`),
    /// sorted; they may include some it no longer advertises.
    pub approved_routes: Vec<IpNet>,
}

impl NodeRecord {
    /// A node for unit tests: key bytes and address from `id`, online.
    #[cfg(test)]
    pub(crate) fn for_test(id: i64) -> NodeRecord {
        NodeRecord {
            id,
            key: NodeKey([id as u8; 32]),
            disco_key: NodeKey([(id as u8).wrapping_add(100); 32]),
            name: format!("n{id}"),
            hostname: format!("n{id}"),
            os: String::new(),
            version: String::new(),
            ipv4: [100, 64, (id >> 8) as u8, id as u8].into(),
            ipv6: format!("fd00:1:2::{id}").parse().expect("an IPv6 address"),
            ephemeral: false,
            tags: vec![],
            advertised_tags: vec![],
            endpoints: vec![],
            netcheck: None,
            online: true,
            last_seen_ms: 0,
            created_ms: 0,
            nat: Default::default(),
            home_relay: None,
            user_id: None,
            advertised_routes: vec![],
            approved_routes: vec![],
        }
    }

    /// The routes it serves: advertised and approved.
    pub fn served_routes(&self) -> Vec<IpNet> {
        self.advertised_routes
            .iter()
            .filter(|r| self.approved_routes.contains(r))
            .copied()
            .collect()
    }

    /// Granted and advertised tags together, sorted, each once.
    pub fn all_tags(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .tags
            .iter()
            .chain(&self.advertised_tags)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The node as its peers see it.
    pub fn to_peer(&self) -> Peer {
        Peer {
            node_id: self.id,
            key: self.key,
            disco_key: self.disco_key,
            name: self.name.clone(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            endpoints: self.endpoints.clone(),
            online: self.online,
            last_seen_ms: self.last_seen_ms,
            tags: self.all_tags(),
            os: self.os.clone(),
            version: self.version.clone(),
            nat: self.nat,
            home_relay: self.home_relay,
            routes: self.served_routes(),
        }
    }
}

/// What a registration carries into the store.
#[derive(Debug, Clone)]
pub struct RegisterInput {
    pub token: Option<String>,
    pub node_key: NodeKey,
    pub disco_key: NodeKey,
    pub hostname: String,
    pub os: String,
    pub version: String,
    /// Advertised tags, already validated; `None` keeps the stored ones.
    pub tags: Option<Vec<String>>,
    /// Advertised routes, already validated; `None` keeps the stored ones.
    pub routes: Option<Vec<IpNet>>,
}

/// The outcome of a registration.
#[derive(Debug, Clone)]
pub struct Registered {
    pub node: NodeRecord,
    /// False when the node key was already registered.
    pub created: bool,
}

const COLUMNS: &str = "id, node_key, disco_key, name, hostname, os, version, ipv4, ipv6, ephemeral, tags, advertised_tags, endpoints, netcheck, conns, last_seen_ms, created_ms, nat, home_relay, user_id, advertised_routes, approved_routes";

/// Decodes a row selected with [`COLUMNS`]. By column name rather than as a
/// tuple: sqlx decodes tuples of at most sixteen columns, and names keep the
/// order of `COLUMNS` from mattering.
fn record(r: &AnyRow) -> Result<NodeRecord, StoreError> {
    let id: i64 = r.try_get("id")?;
    let bad = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        StoreError::corrupt(format!("node {id} {what}"), e)
    };
    let text = |col: &str| r.try_get::<String, _>(col);
    let json = |col: &str| -> Result<Option<serde_json::Value>, StoreError> {
        match r.try_get::<Option<String>, _>(col)? {
            Some(t) => Ok(Some(
                serde_json::from_str(&t).map_err(|e| bad(col, e.into()))?,
            )),
            None => Ok(None),
        }
    };
    let nat = match json("nat")? {
        Some(v) => serde_json::from_value(v).map_err(|e| bad("nat", e.into()))?,
        None => NatSummary::default(),
    };
    let home_relay = match r.try_get::<Option<i64>, _>("home_relay")? {
        Some(n) => Some(u16::try_from(n).map_err(|e| bad("home_relay", e.into()))?),
        None => None,
    };
    Ok(NodeRecord {
        id,
        key: text("node_key")?
            .parse::<NodeKey>()
            .map_err(|e| bad("node_key", e.into()))?,
        disco_key: text("disco_key")?
            .parse::<NodeKey>()
            .map_err(|e| bad("disco_key", e.into()))?,
        name: text("name")?,
        hostname: text("hostname")?,
        os: text("os")?,
        version: text("version")?,
        ipv4: text("ipv4")?
            .parse::<Ipv4Addr>()
            .map_err(|e| bad("ipv4", e.into()))?,
        ipv6: text("ipv6")?
            .parse::<Ipv6Addr>()
            .map_err(|e| bad("ipv6", e.into()))?,
        ephemeral: r.try_get::<i64, _>("ephemeral")? != 0,
        tags: serde_json::from_str(&text("tags")?).map_err(|e| bad("tags", e.into()))?,
        advertised_tags: serde_json::from_str(&text("advertised_tags")?)
            .map_err(|e| bad("advertised_tags", e.into()))?,
        endpoints: serde_json::from_str(&text("endpoints")?)
            .map_err(|e| bad("endpoints", e.into()))?,
        netcheck: json("netcheck")?,
        online: r.try_get::<i64, _>("conns")? > 0,
        last_seen_ms: r.try_get("last_seen_ms")?,
        created_ms: r.try_get("created_ms")?,
        user_id: r.try_get("user_id")?,
        nat,
        home_relay,
        advertised_routes: serde_json::from_str(&text("advertised_routes")?)
            .map_err(|e| bad("advertised_routes", e.into()))?,
        approved_routes: serde_json::from_str(&text("approved_routes")?)
            .map_err(|e| bad("approved_routes", e.into()))?,
    })
}

fn tags_json(tags: &[String]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

fn routes_json(routes: &[IpNet]) -> String {
    serde_json::to_string(routes).unwrap_or_else(|_| "[]".into())
}

/// A DNS-label-shaped name from whatever hostname a node sent.
pub fn sanitize_name(hostname: &str) -> String {
    let mut s: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(58);
    let s = s.trim_matches('-');
    if s.is_empty() {
        "node".to_owned()
    } else {
        s.to_owned()
    }
}

fn random_ipv4() -> Ipv4Addr {
    loop {
        let host = rand::random::<u32>() & 0x003f_ffff;
        let ip = Ipv4Addr::from(0x6440_0000 | host);
        let last = ip.octets()[3];
        // .0 and .255 confuse people and some software; 100.100.100.100
        // is kept free for a future resolver.
        if last != 0 && last != 255 && ip != Ipv4Addr::new(100, 100, 100, 100) {
            return ip;
        }
    }
}

/// The IPv6 address paired with `v4` inside the ULA /48 `prefix`.
pub fn ipv6_for(prefix: Ipv6Addr, v4: Ipv4Addr) -> Ipv6Addr {
    let mut b = prefix.octets();
    b[6..12].fill(0);
    b[12..16].copy_from_slice(&v4.octets());
    Ipv6Addr::from(b)
}

impl Store {
    async fn node_where(
        tx: &mut Transaction<'static, Any>,
        clause: &str,
        arg: String,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes WHERE {clause}"
        )))
        .bind(arg)
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// The node registered with `key`, inside a transaction.
    pub async fn node_by_key_tx(
        tx: &mut Transaction<'static, Any>,
        key: &NodeKey,
    ) -> Result<Option<NodeRecord>, StoreError> {
        Self::node_where(tx, "node_key = $1", key.to_string()).await
    }

    pub async fn node_by_key(&self, key: &NodeKey) -> Result<Option<NodeRecord>, StoreError> {
        let mut tx = self.begin().await?;
        let n = Self::node_by_key_tx(&mut tx, key).await?;
        tx.commit().await?;
        Ok(n)
    }

    pub async fn node_by_id(&self, id: i64) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// Finds a node by id, name or key, as an administrator names it.
    pub async fn find_node(&self, which: &str) -> Result<NodeRecord, StoreError> {
        let nodes = self.list_nodes().await?;
        nodes
            .into_iter()
            .find(|n| n.id.to_string() == which || n.name == which || n.key.to_string() == which)
            .ok_or_else(|| StoreError::NoSuchNode(which.to_owned()))
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes ORDER BY id"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(record).collect()
    }

    /// The nodes with these ids (those that still exist), a few hundred
    /// per query: the hub's way to load a batch of changed nodes without
    /// reading the whole network (`hub.rs`).
    pub async fn nodes_by_ids(&self, ids: &[i64]) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            // Numbers the store gave out, formatted here: nothing from a
            // request reaches the SQL text.
            let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM nodes WHERE id IN ({})",
                list.join(",")
            )))
            .fetch_all(self.pool())
            .await?;
            for row in &rows {
                out.push(record(row)?);
            }
        }
        Ok(out)
    }

    async fn free_name(
        tx: &mut Transaction<'static, Any>,
        base: &str,
    ) -> Result<String, StoreError> {
        let mut candidate = base.to_owned();
        for _ in 0..16 {
            let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM nodes WHERE name = $1")
                .bind(&candidate)
                .fetch_optional(&mut **tx)
                .await?;
            if taken.is_none() {
                return Ok(candidate);
            }
            candidate = format!("{base}-{:04x}", rand::random::<u16>());
        }
        Err(StoreError::Exhausted("a free node name"))
    }

    /// Registers a node (or refreshes a known one) inside `tx`, whose
    /// caller commits it and so decides whether anything happened at all.
    pub async fn register(
        &self,
        tx: &mut Transaction<'static, Any>,
        input: &RegisterInput,
        ula: Ipv6Addr,
    ) -> Result<Registered, StoreError> {
        if input.hostname.len() > 255 {
            return Err(StoreError::Invalid("hostname longer than 255 bytes".into()));
        }
        // One read for both questions: is the key registered, and is the
        // disco key another node's? A disco key names whose disco a peer
        // opens: taking a victim's would credit its pings to us and keep it
        // off direct paths (issue 15); the unique index backs this check
        // up. (Statements are what registrations on SQLite are bound by,
        // each a round trip to sqlx's worker thread: issue 19.)
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes WHERE node_key = $1 OR disco_key = $2"
        )))
        .bind(input.node_key.to_string())
        .bind(input.disco_key.to_string())
        .fetch_all(&mut **tx)
        .await?;
        let mut known = None;
        for row in &rows {
            let node = record(row)?;
            if node.key != input.node_key {
                return Err(StoreError::DiscoKeyTaken);
            }
            known = Some(node);
        }
        let now = now_ms();
        for _ in 0..32 {
            if let Some(node) = known.take() {
                sqlx::query("UPDATE nodes SET disco_key = $1, hostname = $2, os = $3, version = $4, last_seen_ms = $5 WHERE id = $6")
                    .bind(input.disco_key.to_string())
                    .bind(&input.hostname)
                    .bind(&input.os)
                    .bind(&input.version)
                    .bind(now)
                    .bind(node.id)
                    .execute(&mut **tx)
                    .await?;
                // The name follows the host's name only when that changed
                // (`up --hostname new --reconfigure`): a restart re-sends
                // the same hostname and so keeps an admin's `node rename`.
                let wanted = sanitize_name(&input.hostname);
                if input.hostname != node.hostname && wanted != node.name {
                    let name = Self::free_name(tx, &wanted).await?;
                    sqlx::query("UPDATE nodes SET name = $1 WHERE id = $2")
                        .bind(&name)
                        .bind(node.id)
                        .execute(&mut **tx)
                        .await?;
                }
                if let Some(tags) = &input.tags {
                    sqlx::query("UPDATE nodes SET advertised_tags = $1 WHERE id = $2")
                        .bind(tags_json(tags))
                        .bind(node.id)
                        .execute(&mut **tx)
                        .await?;
                }
                if let Some(routes) = &input.routes {
                    sqlx::query("UPDATE nodes SET advertised_routes = $1 WHERE id = $2")
                        .bind(routes_json(routes))
                        .bind(node.id)
                        .execute(&mut **tx)
                        .await?;
                }
                self.note_change(tx, node.id, &node.key, ChangeKind::Upsert)
                    .await?;
                let node = Self::node_by_key_tx(tx, &input.node_key)
                    .await?
                    .ok_or_else(|| StoreError::NoSuchNode(input.node_key.to_string()))?;
                return Ok(Registered {
                    node,
                    created: false,
                });
            }
            let token = input.token.as_deref().ok_or(StoreError::InvalidToken)?;
            let grant = Self::spend_token(tx, token).await?;
            // The host's own name is tried by the insert itself: a name
            // taken is a conflict like an address taken, and only then is
            // a free one looked for.
            let mut name = sanitize_name(&input.hostname);
            for tries in 0.. {
                // Bounded: a conflict that drawing again cannot solve (a
                // disco key taken by a concurrent registration on another
                // replica) must not spin.
                if tries == 16 {
                    return Err(StoreError::Exhausted("a free name and overlay address"));
                }
                if tries > 0 {
                    name = Self::free_name(tx, &sanitize_name(&input.hostname)).await?;
                }
                let v4 = random_ipv4();
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO nodes (node_key, disco_key, name, hostname, os, version, ipv4, ipv6, ephemeral, tags, token_id, last_seen_ms, created_ms, advertised_tags, user_id, advertised_routes)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) ON CONFLICT DO NOTHING RETURNING {COLUMNS}",
                )))
                .bind(input.node_key.to_string())
                .bind(input.disco_key.to_string())
                .bind(&name)
                .bind(&input.hostname)
                .bind(&input.os)
                .bind(&input.version)
                .bind(v4.to_string())
                .bind(ipv6_for(ula, v4).to_string())
                .bind(i64::from(grant.ephemeral))
                .bind(tags_json(&grant.tags))
                .bind(&grant.id)
                .bind(now)
                .bind(now)
                .bind(tags_json(input.tags.as_deref().unwrap_or_default()))
                .bind(grant.user_id)
                .bind(routes_json(input.routes.as_deref().unwrap_or_default()))
                .fetch_optional(&mut **tx)
                .await?;
                if let Some(row) = row {
                    let node = record(&row)?;
                    self.note_change(tx, node.id, &input.node_key, ChangeKind::Upsert)
                        .await?;
                    return Ok(Registered {
                        node,
                        created: true,
                    });
                }
                // A conflict: the address or name was taken meanwhile, or
                // the same key registered concurrently (then the outer loop
                // updates that node). Draw again.
                known = Self::node_by_key_tx(tx, &input.node_key).await?;
                if known.is_some() {
                    break;
                }
            }
        }
        Err(StoreError::Exhausted("an overlay address"))
    }

    /// Removes a node; its streams end and peers get a removal delta.
    pub async fn remove_node(&self, id: i64) -> Result<NodeRecord, StoreError> {
        let mut tx = self.begin().await?;
        let node = self.node_by_id_tx(&mut tx, id).await?;
        self.delete_in(&mut tx, &node).await?;
        tx.commit().await?;
        Ok(node)
    }

    /// Deletes `node` and notes it, inside `tx`.
    pub async fn delete_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        node: &NodeRecord,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(node.id)
            .execute(&mut **tx)
            .await?;
        self.note_change(tx, node.id, &node.key, ChangeKind::Removed)
            .await
    }

    /// Sets the routes approved for node `id`, inside `tx`; its peers get
    /// the change (what it serves is in their view of it).
    pub async fn set_approved_routes_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        node: &NodeRecord,
        approved: &[IpNet],
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET approved_routes = $1 WHERE id = $2")
            .bind(routes_json(approved))
            .bind(node.id)
            .execute(&mut **tx)
            .await?;
        self.note_change(tx, node.id, &node.key, ChangeKind::Upsert)
            .await
    }

    /// Approves (`approve`) or rejects routes of node `id`; returns the node
    /// as it is after. Approving a route it does not advertise is allowed
    /// (it serves it once it does), as in Tailscale.
    pub async fn change_routes(
        &self,
        id: i64,
        routes: &[IpNet],
        approve: bool,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.begin().await?;
        let node = self.node_by_id_tx(&mut tx, id).await?;
        let mut approved = node.approved_routes.clone();
        if approve {
            approved.extend_from_slice(routes);
        } else {
            approved.retain(|r| !routes.contains(r));
        }
        approved.sort();
        approved.dedup();
        if approved != node.approved_routes {
            self.set_approved_routes_in(&mut tx, &node, &approved)
                .await?;
        }
        let node = self.node_by_id_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(node)
    }

    pub async fn rename_node(&self, id: i64, new_name: &str) -> Result<NodeRecord, StoreError> {
        let name = sanitize_name(new_name);
        if name != new_name {
            return Err(StoreError::Invalid(format!(
                "{new_name:?} is not a valid name (try {name:?})"
            )));
        }
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE nodes SET name = $1 WHERE id = $2 AND NOT EXISTS (SELECT 1 FROM nodes WHERE name = $1 AND id <> $2)")
            .bind(&name)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Invalid(format!(
                "no node {id}, or the name {name:?} is taken"
            )));
        }
        let node = self.node_by_id_tx(&mut tx, id).await?;
        self.note_change(&mut tx, node.id, &node.key, ChangeKind::Upsert)
            .await?;
        tx.commit().await?;
        Ok(node)
    }

    async fn node_by_id_tx(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: i64,
    ) -> Result<NodeRecord, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM nodes WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        record(&row.ok_or_else(|| StoreError::NoSuchNode(id.to_string()))?)
    }

    /// Stores a node's endpoint report (candidates, netcheck summary, NAT
    /// behaviour, home relay), inside the request's transaction. Always
    /// noted: each field is in the peers' view of the node.
    pub async fn set_endpoints(
        &self,
        tx: &mut Transaction<'static, Any>,
        node: &NodeRecord,
        report: &EndpointsReport,
    ) -> Result<(), StoreError> {
        let encode = |what| move |source| StoreError::Encode { what, source };
        let eps = serde_json::to_string(&report.endpoints).map_err(encode("endpoints"))?;
        let nc = report.netcheck.as_ref().map(|v| v.to_string());
        let nat = serde_json::to_string(&report.nat).map_err(encode("nat"))?;
        sqlx::query(
            "UPDATE nodes SET endpoints = $1, netcheck = $2, nat = $3, home_relay = $4, last_seen_ms = $5 WHERE id = $6",
        )
        .bind(eps)
        .bind(nc)
        .bind(nat)
        .bind(report.home_relay.map(i64::from))
        .bind(now_ms())
        .bind(node.id)
        .execute(&mut **tx)
        .await?;
        self.note_change(tx, node.id, &node.key, ChangeKind::Upsert)
            .await
    }

    /// A map stream opened (`delta` = 1) or closed (-1). Notes a change when
    /// the node's online state flips.
    pub async fn stream_delta(
        &self,
        tx: &mut Transaction<'static, Any>,
        node: &NodeRecord,
        delta: i64,
    ) -> Result<(), StoreError> {
        let before: Option<i64> = sqlx::query_scalar("SELECT conns FROM nodes WHERE id = $1")
            .bind(node.id)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(before) = before else { return Ok(()) };
        let after = (before + delta).max(0);
        sqlx::query("UPDATE nodes SET conns = $1, last_seen_ms = $2 WHERE id = $3")
            .bind(after)
            .bind(now_ms())
            .bind(node.id)
            .execute(&mut **tx)
            .await?;
        if (before > 0) != (after > 0) {
            self.note_change(tx, node.id, &node.key, ChangeKind::Upsert)
                .await?;
        }
        Ok(())
    }

    /// Refreshes `last_seen_ms` for the nodes whose streams this replica holds.
    pub async fn touch(&self, ids: &[i64]) -> Result<(), StoreError> {
        let now = now_ms();
        for chunk in ids.chunks(500) {
            let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE nodes SET last_seen_ms = $1 WHERE id IN ({})",
                list.join(",")
            )))
            .bind(now)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// Marks offline the nodes whose replica stopped refreshing them, and
    /// removes ephemeral nodes offline for longer than `ephemeral_ms`.
    /// Returns how many nodes were changed and removed.
    pub async fn reap(
        &self,
        stale_ms: i64,
        ephemeral_ms: i64,
    ) -> Result<(usize, usize), StoreError> {
        let now = now_ms();
        let stale: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, node_key FROM nodes WHERE conns > 0 AND last_seen_ms < $1")
                .bind(now - stale_ms)
                .fetch_all(self.pool())
                .await?;
        for (id, key) in &stale {
            let Ok(key) = key.parse::<NodeKey>() else {
                continue;
            };
            let mut tx = self.begin().await?;
            let done =
                sqlx::query("UPDATE nodes SET conns = 0 WHERE id = $1 AND last_seen_ms < $2")
                    .bind(id)
                    .bind(now - stale_ms)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() == 1 {
                self.note_change(&mut tx, *id, &key, ChangeKind::Upsert)
                    .await?;
            }
            tx.commit().await?;
        }
        let gone: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, node_key FROM nodes WHERE ephemeral = 1 AND conns = 0 AND last_seen_ms < $1",
        )
        .bind(now - ephemeral_ms)
        .fetch_all(self.pool())
        .await?;
        let mut removed = 0;
        for (id, key) in &gone {
            let Ok(key) = key.parse::<NodeKey>() else {
                continue;
            };
            let mut tx = self.begin().await?;
            let done =
                sqlx::query("DELETE FROM nodes WHERE id = $1 AND conns = 0 AND last_seen_ms < $2")
                    .bind(id)
                    .bind(now - ephemeral_ms)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() == 1 {
                self.note_change(&mut tx, *id, &key, ChangeKind::Removed)
                    .await?;
                removed += 1;
            }
            tx.commit().await?;
        }
        Ok((stale.len(), removed))
    }
}
