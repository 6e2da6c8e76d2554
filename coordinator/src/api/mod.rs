//! The HTTP control API (axum). The protocol itself is documented in
//! `warren::control`.
//!
//! Every signed request goes through [`authenticate`] before anything else:
//! body size, then the authentication headers, then the MAC (all without
//! touching the database), and only then does the handler open a
//! transaction, record the nonce in it and do its work. Any failure drops
//! the transaction, so a request that is refused changes nothing, not even
//! the nonce table.
//!
//! Bodies are read by hand rather than through axum's `Json` extractor so
//! that every refusal (too large, malformed, unknown field) comes back as the
//! protocol's typed `{code, message}` instead of axum's plain-text rejection.

mod map;

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use warren::control::auth::{AuthError, AuthHeaders, SessionKey};
use warren::control::{
    EndpointsReport, ErrorBody, ErrorCode, RegisterRequest, RegisterResponse, RelayMap,
    ServerKeyResponse, MAX_ENDPOINTS,
};
use warren::keys::PrivateKey;

use crate::hub::Hub;
use crate::store::{RegisterInput, Store, StoreError};

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
    pub keepalive: Duration,
    /// Node id → open map streams on this replica (for liveness refresh).
    pub live: Arc<Mutex<HashMap<i64, usize>>>,
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

/// The router for the control API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/key", get(key))
        .route("/register", post(register))
        .route("/endpoints", post(endpoints))
        .route("/logout", post(logout))
        .route("/map", get(map::map))
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

/// A request whose MAC verified (its nonce is not yet consumed).
pub(crate) struct Authed {
    pub auth: AuthHeaders,
    pub body: Bytes,
}

/// Reads the body and checks the signature; see the module doc.
pub(crate) async fn authenticate(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Authed, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("body larger than {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| too_large())?;
    let auth = AuthHeaders::parse(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .map_err(|e| ApiError::new(ErrorCode::Unauthenticated, e.to_string()))?;
    let session = SessionKey::for_coordinator(&state.key, &auth.node)
        .map_err(|e| ApiError::new(ErrorCode::BadSignature, e.to_string()))?;
    let target = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| uri.path());
    auth.verify(&session, method.as_str(), target, unix_now(), &body)
        .map_err(|e| match e {
            AuthError::Stale { .. } => ApiError::new(ErrorCode::StaleRequest, e.to_string()),
            _ => ApiError::new(ErrorCode::BadSignature, e.to_string()),
        })?;
    Ok(Authed { auth, body })
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
}

fn require_empty(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::BadRequest,
            "this request takes no body",
        ))
    }
}

async fn key(State(st): State<AppState>) -> Json<ServerKeyResponse> {
    Json(ServerKeyResponse {
        key: st.key.public(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn register(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RegisterResponse>, ApiError> {
    let a = authenticate(&st, &method, &uri, &headers, body).await?;
    let req: RegisterRequest = parse_body(&a.body)?;
    if req.node_key != a.auth.node {
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
    let mut tx = st.store.begin().await?;
    Store::consume_nonce(&mut tx, &a.auth.nonce, &a.auth.node, a.auth.time as i64).await?;
    let input = RegisterInput {
        token: req.token,
        node_key: req.node_key,
        disco_key: req.disco_key,
        hostname: req.hostname,
        os: req.os,
        version: req.version,
    };
    let reg = st.store.register(&mut tx, &input, st.ula).await?;
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
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let a = authenticate(&st, &method, &uri, &headers, body).await?;
    let report: EndpointsReport = parse_body(&a.body)?;
    if report.endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("more than {MAX_ENDPOINTS} endpoints"),
        ));
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
    let mut tx = st.store.begin().await?;
    Store::consume_nonce(&mut tx, &a.auth.nonce, &a.auth.node, a.auth.time as i64).await?;
    let node = Store::node_by_key_tx(&mut tx, &a.auth.node)
        .await?
        .ok_or_else(unknown_node)?;
    st.store.set_endpoints(&mut tx, &node, &report).await?;
    tx.commit().await?;
    st.hub.wake();
    tracing::debug!(node = %node.key.short(), n = report.endpoints.len(), "endpoints");
    Ok(Json(serde_json::json!({})))
}

async fn logout(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let a = authenticate(&st, &method, &uri, &headers, body).await?;
    require_empty(&a.body)?;
    let mut tx = st.store.begin().await?;
    Store::consume_nonce(&mut tx, &a.auth.nonce, &a.auth.node, a.auth.time as i64).await?;
    let node = Store::node_by_key_tx(&mut tx, &a.auth.node)
        .await?
        .ok_or_else(unknown_node)?;
    st.store.delete_in(&mut tx, &node).await?;
    tx.commit().await?;
    st.hub.wake();
    tracing::info!(node = %node.key.short(), name = %node.name, "logged out");
    Ok(Json(serde_json::json!({})))
}

pub(crate) fn unknown_node() -> ApiError {
    ApiError::new(
        ErrorCode::UnknownNode,
        "this node key is not registered (removed, or never joined)",
    )
}
