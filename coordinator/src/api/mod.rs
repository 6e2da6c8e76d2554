//! The HTTP control API (axum). The protocol itself is documented in
//! `warren::control`.
//!
//! Every signed request is a [`signed::Signed`] extractor: body size, the
//! authentication headers and the MAC are checked (without touching the
//! database) before the handler runs, and the handler's transaction is
//! opened with the nonce consumed in it, so a request that is refused
//! changes nothing, not even the nonce table. See `signed.rs`.

mod map;
pub mod presence;
mod signed;
pub mod streams;

use ipnet::Ipv6Net;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use warren::control::{
    EndpointsReport, ErrorBody, ErrorCode, ReachResponse, RegisterRequest, RegisterResponse,
    RelayMap, ServerKeyResponse, MAX_ENDPOINTS,
};
use warren::keys::PrivateKey;

use crate::hub::Hub;
use crate::store::{RegisterInput, Store, StoreError};
use signed::{NoBody, Signed};

/// Largest request body accepted. Registration and endpoint reports are a
/// few hundred bytes; the netcheck summary is the only thing that grows.
pub const MAX_BODY: usize = 64 * 1024;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub hub: Hub,
    pub key: PrivateKey,
    pub ula: Ipv6Addr,
    pub relay_map: RelayMap,
    /// The network's DNS settings, encoded once for every full map.
    pub dns_json: Arc<str>,
    pub keepalive: Duration,
    /// Whether map streams that ask for zstd frames get them.
    pub compress_maps: bool,
    /// Node id → open map streams on this replica (for liveness refresh).
    pub live: Arc<Mutex<HashMap<i64, usize>>>,
    /// The map streams' caps per node and per address.
    pub streams: streams::MapStreams,
    /// Writes map streams opening and closing in batches.
    pub presence: presence::Presence,
    /// Per source IP, the requests it may make that fail authentication
    /// or name a key the store does not know (`signed.rs`).
    pub failures: Arc<Mutex<crate::ratelimit::RateLimiter>>,
    /// Session keys of nodes whose requests verified, so that a node's
    /// every request does not cost an X25519 (`signed.rs`).
    pub sessions: Arc<Mutex<HashMap<warren::keys::NodeKey, warren::control::auth::SessionKey>>>,
}

impl AppState {
    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, HashMap<i64, usize>> {
        // The map is only ever updated by single inserts/removes, so a
        // poisoned lock still guards a consistent map.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A refused request: a typed `{code, message}` body with its status.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = e.code();
        if code == ErrorCode::Internal {
            tracing::error!(error = %e, "store failure");
            return ApiError::new(code, "internal error");
        }
        ApiError::new(code, e.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.code,
            message: self.message,
        };
        (status, Json(body)).into_response()
    }
}

/// Failed signed requests (bad MAC, unknown key) one source IP may make:
/// a few a second, enough for an agent whose key was just removed to learn
/// it, too few for a flood of self-made keys to keep the store busy.
pub fn failure_limiter() -> crate::ratelimit::RateLimiter {
    crate::ratelimit::RateLimiter::new(5.0, 20.0)
}

/// The router for the control API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/key", get(key))
        .route("/register", post(register))
        .route("/endpoints", post(endpoints))
        .route("/logout", post(logout))
        .route("/map", get(map::map))
        .route("/reach", get(reach))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed here")
        })
        .with_state(state)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn key(State(st): State<AppState>) -> Json<ServerKeyResponse> {
    Json(ServerKeyResponse {
        key: st.key.public(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn register(
    State(st): State<AppState>,
    signed: Signed<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let req = &signed.body;
    if req.node_key != *signed.node_key() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "node_key is not the key that signed the request",
        ));
    }
    if req.os.len() > 64 || req.version.len() > 64 {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "os or version longer than 64 bytes",
        ));
    }
    // These reach every admin's and peer's terminal (`node list`, `warren
    // status`): control characters and bidi overrides are refused here and
    // escaped again on output (warren::text).
    for (field, value) in [
        ("os", &req.os),
        ("version", &req.version),
        ("hostname", &req.hostname),
    ] {
        if !warren::text::is_printable(value) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("{field} must be printable text (no control characters)"),
            ));
        }
    }
    let tags = match &req.tags {
        Some(t) => Some(
            warren::control::types::normalize_tags(t)
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?,
        ),
        None => None,
    };
    let routes = match &req.routes {
        Some(r) => Some(
            warren::control::advertise::check_advertised(r, Ipv6Net::new(st.ula, 48).ok())
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?,
        ),
        None => None,
    };
    let mut tx = signed.begin(&st).await?;
    let input = RegisterInput {
        token: req.token.clone(),
        node_key: req.node_key,
        disco_key: req.disco_key,
        hostname: req.hostname.clone(),
        os: req.os.clone(),
        version: req.version.clone(),
        tags,
        routes,
    };
    let reg = match st.store.register(&mut tx, &input, st.ula).await {
        Ok(reg) => reg,
        Err(e) => {
            // A wrong token is a guess: it spends the address's budget.
            if e.code().is_permanent() {
                signed.failed(&st);
            }
            return Err(e.into());
        }
    };
    check_tags(&st, &reg.node)?;
    auto_approve(&st, &mut tx, &reg.node).await?;
    tx.commit().await?;
    st.hub.wake();
    let n = reg.node;
    tracing::info!(node = %n.key.short(), name = %n.name, ip = %n.ipv4, created = reg.created, "registered");
    Ok(Json(RegisterResponse {
        node_id: n.id,
        name: n.name,
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        ephemeral: n.ephemeral,
        relay_map: st.relay_map.clone(),
    }))
}

async fn endpoints(
    State(st): State<AppState>,
    mut signed: Signed<EndpointsReport>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let source = signed.source_ip();
    vouch_observed(&mut signed.body, source);
    let report = &signed.body;
    if report.endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("more than {MAX_ENDPOINTS} endpoints"),
        ));
    }
    // Every peer probes (and may dial) these: a node must not point them
    // at this host, a link, a multicast group or the overlay itself, nor
    // claim such a NAT mapping (README, "Security model").
    let claimed = report
        .endpoints
        .iter()
        .map(|e| e.addr)
        .chain(report.nat.observed);
    for addr in claimed {
        if !warren::proto::disco::is_candidate_addr(addr) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "{addr} cannot be a candidate: loopback, link-local, multicast, \
                     unspecified, port 0 or an overlay address"
                ),
            ));
        }
    }
    // Peers dial a node's home region to reach it: a region the map does
    // not have would leave them nowhere to go.
    if let Some(id) = report.home_relay {
        if !st.relay_map.regions.iter().any(|r| r.id == id) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("home_relay {id} is not a region of the relay map"),
            ));
        }
    }
    let (mut tx, node) = signed.begin_as_node(&st).await?;
    st.store.set_endpoints(&mut tx, &node, report).await?;
    tx.commit().await?;
    st.hub.wake();
    tracing::debug!(node = %node.key.short(), n = report.endpoints.len(), "endpoints");
    Ok(Json(serde_json::json!({})))
}

async fn logout(
    State(st): State<AppState>,
    signed: Signed<NoBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (mut tx, node) = signed.begin_as_node(&st).await?;
    st.store.delete_in(&mut tx, &node).await?;
    tx.commit().await?;
    st.hub.wake();
    tracing::info!(node = %node.key.short(), name = %node.name, "logged out");
    Ok(Json(serde_json::json!({})))
}

/// What the peers in this node's map let it do (`warren status`): read from
/// the hub's compiled policy, nothing stored but the spent nonce.
async fn reach(
    State(st): State<AppState>,
    signed: Signed<NoBody>,
) -> Result<Json<ReachResponse>, ApiError> {
    let (tx, node) = signed.begin_as_node(&st).await?;
    tx.commit().await?;
    let peers = st.hub.access().reach(node.id);
    Ok(Json(ReachResponse {
        policy: peers.is_some(),
        peers: peers.unwrap_or_default(),
    }))
}

/// Keeps the NAT mapping a node reports only when its address is the one
/// this request came from. Peers aim hard-NAT probes (thousands of ports)
/// at that address alone (`traversal::peer_punch`), so it must be what the
/// coordinator saw, not what the node says: a node naming a third party's
/// address there would turn every peer into a port scanner of it. A node
/// whose requests leave by another address than its UDP (an HTTP proxy)
/// loses only the hard-NAT method; its candidates stay.
fn vouch_observed(report: &mut EndpointsReport, source: Option<IpAddr>) {
    let Some(observed) = report.nat.observed else {
        return;
    };
    if source.map(|s| s.to_canonical()) != Some(observed.ip().to_canonical()) {
        tracing::debug!(%observed, ?source, "NAT mapping not from the request's address: dropped");
        report.nat.observed = None;
    }
}

/// With a policy, advertised tags need an owner there (Tailscale's
/// `tagOwners`): the node's user or a tag its token granted. Checked
/// before the registration commits, so a refused one changes nothing.
fn check_tags(st: &AppState, node: &crate::store::NodeRecord) -> Result<(), ApiError> {
    let access = st.hub.access();
    let Some(policy) = access.policy() else {
        return Ok(());
    };
    let user = node
        .user_id
        .and_then(|id| access.users.iter().find(|u| u.id == id))
        .map(|u| u.email.as_str());
    for tag in node
        .advertised_tags
        .iter()
        .filter(|t| !node.tags.contains(t))
    {
        if !policy.may_use_tag(user, &node.tags, tag) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "the policy does not let {} use {tag} (tagOwners)",
                    user.unwrap_or("this node's token")
                ),
            ));
        }
    }
    Ok(())
}

/// Approves what the policy's `autoApprovers` approve among the routes the
/// node advertises (Tailscale's rule: on advertising, by the node's user,
/// group or tag), inside the registration's transaction.
async fn auto_approve(
    st: &AppState,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    node: &crate::store::NodeRecord,
) -> Result<(), ApiError> {
    let access = st.hub.access();
    let Some(policy) = access.policy() else {
        return Ok(());
    };
    let pending: Vec<ipnet::IpNet> = node
        .advertised_routes
        .iter()
        .filter(|r| !node.approved_routes.contains(r))
        .copied()
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let inv = crate::store::users::inventory(&access.users, std::slice::from_ref(node));
    let auto = policy.auto_approved(&inv, std::net::IpAddr::V4(node.ipv4), &pending);
    if auto.is_empty() {
        return Ok(());
    }
    tracing::info!(node = %node.key.short(), routes = ?auto, "routes approved by autoApprovers");
    let mut approved = node.approved_routes.clone();
    approved.extend(auto);
    approved.sort();
    st.store.set_approved_routes_in(tx, node, &approved).await?;
    Ok(())
}

pub(crate) fn unknown_node() -> ApiError {
    ApiError::new(
        ErrorCode::UnknownNode,
        "this node key is not registered (removed, or never joined)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(observed: &str) -> EndpointsReport {
        let mut r = EndpointsReport::endpoints(&[]);
        r.nat.observed = Some(observed.parse().unwrap());
        r
    }

    #[test]
    fn a_nat_mapping_is_kept_only_at_the_requests_own_address() {
        let from = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let mut r = report("198.51.100.7:41000");
        vouch_observed(&mut r, from("198.51.100.7"));
        assert!(r.nat.observed.is_some(), "the request's own address");
        // A dual-stack listener sees IPv4 clients as mapped IPv6.
        let mut r = report("198.51.100.7:41000");
        vouch_observed(&mut r, from("::ffff:198.51.100.7"));
        assert!(r.nat.observed.is_some(), "mapped IPv6 is the same address");
        let mut r = report("203.0.113.50:41000");
        vouch_observed(&mut r, from("198.51.100.7"));
        assert_eq!(r.nat.observed, None, "a third party's address");
        let mut r = report("198.51.100.7:41000");
        vouch_observed(&mut r, None);
        assert_eq!(r.nat.observed, None, "no address to check it against");
    }
}
