//! [`Signed<T>`]: the one extractor every signed control request goes
//! through, so that no handler can skip a step or take them out of order.
//!
//! Extraction does everything that needs no database: the body size (the
//! declared length first, then the bytes read), the authentication
//! headers, the MAC over method, path, time and body (`warren::control::
//! auth`, with the node's session key cached once a request of it has
//! verified), and only then the body's JSON. An address that has failed
//! too often lately (bad MAC, unknown key, wrong token) is refused before
//! any of it. The handler then calls
//! [`Signed::begin`] or [`Signed::begin_as_node`], which opens the
//! transaction and records the nonce *in it*: a request refused at any
//! later step drops the transaction, so it changes nothing, not even the
//! nonce table, and a replay is refused by the nonce's uniqueness.
//!
//! Bodies are read by hand rather than through axum's `Json` extractor so
//! that every refusal (too large, malformed, unknown field) comes back as
//! the protocol's typed `{code, message}` instead of axum's plain text.

use std::net::IpAddr;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use sqlx::{Any, Transaction};
use warren::control::auth::{AuthError, AuthHeaders, SessionKey};
use warren::control::{EndpointsReport, ErrorCode, RegisterRequest};
use warren::keys::NodeKey;

use super::{unix_now, unknown_node, ApiError, AppState, MAX_BODY};
use crate::listen::PeerAddr;
use crate::store::{NodeRecord, Store};

/// A request whose signature verified, with its body parsed as `T`. Its
/// nonce is not consumed until [`Signed::begin`].
pub(crate) struct Signed<T> {
    auth: AuthHeaders,
    /// The client's address, for its failure budget.
    ip: Option<IpAddr>,
    pub body: T,
}

/// What a signed request's body may be.
pub(crate) trait SignedBody: Sized {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError>;
}

/// The body of a request that takes none (`GET /map`, `POST /logout`).
pub(crate) struct NoBody;

impl SignedBody for NoBody {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        if bytes.is_empty() {
            Ok(NoBody)
        } else {
            Err(ApiError::new(
                ErrorCode::BadRequest,
                "this request takes no body",
            ))
        }
    }
}

/// Request types whose body is one JSON document.
macro_rules! json_body {
    ($($t:ty),*) => {$(
        impl SignedBody for $t {
            fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
                serde_json::from_slice(bytes).map_err(|e| {
                    ApiError::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}"))
                })
            }
        }
    )*};
}
json_body!(RegisterRequest, EndpointsReport);

impl<T: SignedBody> FromRequest<AppState> for Signed<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        // An address that has failed too often lately is refused before
        // any work: each failure costs an X25519 and maybe a store read.
        let ip = parts.extensions.get::<PeerAddr>().map(|p| p.0.ip());
        if let Some(ip) = ip {
            if !failures(st).has_budget(ip, Instant::now()) {
                return Err(ApiError::new(
                    ErrorCode::TooManyRequests,
                    "too many failed requests from this address; try again in a few seconds",
                ));
            }
        }
        let too_large = || {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("body larger than {MAX_BODY} bytes"),
            )
        };
        let declared = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY) {
            return Err(too_large());
        }
        // A body that stops arriving is cut off by the listener's body
        // timeout (crate::listen), which ends up here as a read error.
        let body: Bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::new(ErrorCode::BadRequest, format!("reading the body: {e}"))
            }
        })?;
        let headers = &parts.headers;
        let auth = AuthHeaders::parse(|name| headers.get(name).and_then(|v| v.to_str().ok()))
            .map_err(|e| ApiError::new(ErrorCode::Unauthenticated, e.to_string()))?;
        let cached = sessions(st).get(&auth.node).cloned();
        let session = match cached {
            Some(s) => s,
            None => SessionKey::for_coordinator(&st.key, &auth.node)
                .map_err(|e| ApiError::new(ErrorCode::BadSignature, e.to_string()))?,
        };
        let uri = &parts.uri;
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or_else(|| uri.path());
        if let Err(e) = auth.verify(&session, parts.method.as_str(), target, unix_now(), &body) {
            charge(st, ip);
            return Err(match e {
                AuthError::Stale { .. } => ApiError::new(ErrorCode::StaleRequest, e.to_string()),
                _ => ApiError::new(ErrorCode::BadSignature, e.to_string()),
            });
        }
        // Kept only for a key that proved itself; bounded, and started
        // over when full (the next request of each node derives it again).
        {
            let mut cache = sessions(st);
            if cache.len() >= MAX_CACHED_SESSIONS && !cache.contains_key(&auth.node) {
                cache.clear();
            }
            cache.insert(auth.node, session);
        }
        // Only a request that proved its key gets its body parsed.
        let body = T::parse(&body)?;
        Ok(Signed { auth, ip, body })
    }
}

/// Session keys kept at once: more than any network's nodes.
const MAX_CACHED_SESSIONS: usize = 100_000;

fn sessions(
    st: &AppState,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<warren::keys::NodeKey, SessionKey>> {
    // Single map updates: a poisoned lock still guards a usable map.
    st.sessions.lock().unwrap_or_else(|p| p.into_inner())
}

fn failures(st: &AppState) -> std::sync::MutexGuard<'_, crate::ratelimit::RateLimiter> {
    // Single map updates: a poisoned lock still guards a usable table.
    st.failures.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a failed request against its address's budget.
fn charge(st: &AppState, ip: Option<IpAddr>) {
    if let Some(ip) = ip {
        failures(st).charge(ip, Instant::now());
    }
}

impl<T> Signed<T> {
    /// The node key that signed the request.
    pub fn node_key(&self) -> &NodeKey {
        &self.auth.node
    }

    /// The address the request came from, as the listener saw it (an
    /// IPv4-mapped IPv6 address as the IPv4 one).
    pub fn source_ip(&self) -> Option<IpAddr> {
        self.ip.map(|ip| ip.to_canonical())
    }

    /// Opens the transaction the request's changes go into, and consumes
    /// the nonce in it (a replay fails here).
    pub async fn begin(&self, st: &AppState) -> Result<Transaction<'static, Any>, ApiError> {
        let mut tx = st.store.begin().await?;
        Store::consume_nonce(
            &mut tx,
            &self.auth.nonce,
            &self.auth.node,
            self.auth.time as i64,
        )
        .await?;
        Ok(tx)
    }

    /// The registered node that signed, and then [`Signed::begin`]. The
    /// node is looked up first, outside the write transaction: a key the
    /// store does not know (anyone can make one, and sign with it) is
    /// refused as `unknown_node` without writing anything, not even its
    /// nonce, and counts against its address's failure budget.
    pub async fn begin_as_node(
        &self,
        st: &AppState,
    ) -> Result<(Transaction<'static, Any>, NodeRecord), ApiError> {
        let Some(node) = st.store.node_by_key(&self.auth.node).await? else {
            charge(st, self.ip);
            return Err(unknown_node());
        };
        let tx = self.begin(st).await?;
        Ok((tx, node))
    }

    /// For `GET /map`: the registered node that signed, with its nonce
    /// consumed and its new stream counted, written in a batch with other
    /// streams' (`presence.rs`). An unknown key is refused as in
    /// [`Signed::begin_as_node`].
    pub async fn open_stream(&self, st: &AppState) -> Result<NodeRecord, ApiError> {
        let req = super::presence::OpenRequest {
            key: self.auth.node,
            nonce: self.auth.nonce.clone(),
            time: self.auth.time as i64,
        };
        match st.presence.open(req).await? {
            Some(node) => Ok(node),
            None => {
                charge(st, self.ip);
                Err(unknown_node())
            }
        }
    }

    /// Counts this request as failed (a refused token, say) against its
    /// address's budget.
    pub fn failed(&self, st: &AppState) {
        charge(st, self.ip);
    }
}
