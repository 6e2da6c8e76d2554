//! The agent's side of the control protocol.
//!
//! [`ControlClient`] registers the node, reports its endpoints, logs out, and
//! keeps a map stream open: [`ControlClient::map_stream`] spawns a task that
//! connects, folds the coordinator's messages into a [`NetMap`], forwards
//! typed [`MapEvent`]s, saves the map to disk (a full map at once, deltas
//! at most once a second, so a burst of them in a large network costs one
//! write), and reconnects with
//! exponential backoff when the connection drops or goes silent. Before the
//! first connection it replays the map saved last time, so an agent that
//! starts while the coordinator is down still brings its tunnels up.
//!
//! The coordinator's public key is fetched once from `GET /key` (TLS
//! authenticates it) and cached; a `bad_signature` answer clears the cache
//! so a coordinator whose key was replaced is picked up on the next try.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::auth::{AuthError, AuthHeaders, SessionKey};
use super::netmap::{MapChange, MapFileError, NetMap};
use super::types::{
    EndpointsReport, ErrorBody, ErrorCode, MapMessage, RegisterRequest, RegisterResponse,
    ServerKeyResponse, KEEPALIVE_SECS,
};
use crate::keys::{NodeKey, PrivateKey};

/// What `register` returns.
pub type Registration = RegisterResponse;

/// What a registration advertises; `None` leaves the coordinator's value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Advertised<'a> {
    /// Tags (`warren up --advertise-tags`).
    pub tags: Option<&'a [String]>,
    /// Routes (`--advertise-routes`, `--advertise-exit-node`).
    pub routes: Option<&'a [ipnet::IpNet]>,
}

/// The file in the state directory that holds the last map.
pub const MAP_FILE: &str = "netmap.json";

/// Longest line the map stream may send (a full map of a large network).
const MAX_LINE: usize = 64 << 20;
/// A stream silent for this long is presumed dead and reconnected.
const SILENCE: Duration = Duration::from_secs(KEEPALIVE_SECS * 5 / 2);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A map stream's unfinished input: the bytes after the last whole line,
/// how far they were searched for a newline, and whether the map changed
/// since it was last saved.
struct Lines<'a> {
    buf: &'a mut Vec<u8>,
    scanned: &'a mut usize,
    dirty: &'a mut bool,
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("coordinator URL {0:?} is not usable (want http:// or https://, no trailing path)")]
    BadUrl(String),
    #[error("HTTP to the coordinator failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("coordinator refused the request ({status}, {code:?}): {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("coordinator sent something that is not the control protocol: {0}")]
    Protocol(String),
    #[error("coordinator's compressed map stream: {0}")]
    Frame(#[from] super::zmap::FrameError),
    #[error("coordinator sent JSON this agent cannot read: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    MapFile(#[from] MapFileError),
    #[error("TLS setup: {0}")]
    Tls(#[source] reqwest::Error),
}

impl ControlError {
    /// Whether retrying can help (see [`ErrorCode::is_permanent`]).
    pub fn is_permanent(&self) -> bool {
        matches!(self, ControlError::Api { code, .. } if code.is_permanent())
    }
}

pub use super::follow::MapEvent;

/// A running map stream. Dropping it stops the task.
#[derive(Debug)]
pub struct MapStream {
    rx: mpsc::Receiver<MapEvent>,
    task: JoinHandle<()>,
}

impl MapStream {
    /// The next event; `None` once the node was revoked.
    pub async fn recv(&mut self) -> Option<MapEvent> {
        self.rx.recv().await
    }
}

impl Drop for MapStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client for one coordinator, as one node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ControlClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    base: String,
    http: reqwest::Client,
    node_key: PrivateKey,
    state_dir: PathBuf,
    session: Mutex<Option<(NodeKey, SessionKey)>>,
}

impl ControlClient {
    /// A client that trusts the system's root certificates.
    pub fn new(
        url: &str,
        node_key: PrivateKey,
        state_dir: impl Into<PathBuf>,
    ) -> Result<Self, ControlError> {
        Self::build(url, node_key, state_dir.into(), None)
    }

    /// A client that trusts only the CA certificate(s) in `ca_pem`: for a
    /// coordinator with a private or self-signed certificate.
    pub fn with_ca_pem(
        url: &str,
        node_key: PrivateKey,
        state_dir: impl Into<PathBuf>,
        ca_pem: &[u8],
    ) -> Result<Self, ControlError> {
        Self::build(url, node_key, state_dir.into(), Some(ca_pem))
    }

    /// A client on a caller-built HTTP client: to share one connection
    /// pool (and one parse of the root certificates, which is not cheap)
    /// between many clients, as a load generator or a test does.
    pub fn with_http_client(
        url: &str,
        node_key: PrivateKey,
        state_dir: impl Into<PathBuf>,
        http: reqwest::Client,
    ) -> Result<Self, ControlError> {
        let base = url.trim_end_matches('/').to_owned();
        let host_part = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"))
            .ok_or_else(|| ControlError::BadUrl(url.to_owned()))?;
        if host_part.is_empty() || host_part.contains('/') {
            return Err(ControlError::BadUrl(url.to_owned()));
        }
        Ok(ControlClient {
            inner: Arc::new(Inner {
                base,
                http,
                node_key,
                state_dir: state_dir.into(),
                session: Mutex::new(None),
            }),
        })
    }

    /// The HTTP client `new` and `with_ca_pem` use: rustls (the process's
    /// installed provider), the system roots or only `ca_pem`'s.
    pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, ControlError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tls_backend_rustls();
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(ControlError::Tls)?;
            builder = builder.tls_certs_only(certs);
        }
        Ok(builder.build()?)
    }

    fn build(
        url: &str,
        node_key: PrivateKey,
        state_dir: PathBuf,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ControlError> {
        Self::with_http_client(url, node_key, state_dir, Self::http_client(ca_pem)?)
    }

    /// This node's public key.
    pub fn node_key(&self) -> NodeKey {
        self.inner.node_key.public()
    }

    /// Where the last map is kept.
    pub fn map_path(&self) -> PathBuf {
        self.inner.state_dir.join(MAP_FILE)
    }

    /// The map saved by the last run, if any.
    pub fn load_cached_map(&self) -> Result<Option<NetMap>, ControlError> {
        Ok(NetMap::load(&self.map_path())?)
    }

    /// The coordinator's public key (fetched once, then cached).
    pub async fn coordinator_key(&self) -> Result<NodeKey, ControlError> {
        Ok(self.session().await?.0)
    }

    async fn session(&self) -> Result<(NodeKey, SessionKey), ControlError> {
        if let Some(s) = lock(&self.inner.session).clone() {
            return Ok(s);
        }
        let url = format!("{}/key", self.inner.base);
        let resp = super::retry::send(|| self.inner.http.get(&url)).await?;
        let resp = check(resp).await?;
        let body: ServerKeyResponse = parse_json(&resp.bytes().await?)?;
        let session = SessionKey::for_node(&self.inner.node_key, &body.key)?;
        *lock(&self.inner.session) = Some((body.key, session.clone()));
        Ok((body.key, session))
    }

    async fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ControlError> {
        let (_, session) = self.session().await?;
        let url = format!("{}{path}", self.inner.base);
        // Signed afresh for each try: a second try carries its own nonce.
        let build = || {
            let headers = AuthHeaders::sign(
                &session,
                self.node_key(),
                method.as_str(),
                path,
                unix_now(),
                &body,
            );
            let mut req = self.inner.http.request(method.clone(), &url);
            for (name, value) in headers.to_pairs() {
                req = req.header(name, value);
            }
            if !body.is_empty() {
                req = req
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            req
        };
        let result = check(super::retry::send(build).await?).await;
        if let Err(ControlError::Api {
            code: ErrorCode::BadSignature,
            ..
        }) = &result
        {
            *lock(&self.inner.session) = None;
        }
        result
    }

    /// Registers this node with a join token (`None` to re-register a node
    /// key the coordinator already knows, which spends nothing).
    pub async fn register(
        &self,
        token: Option<&str>,
        hostname: &str,
        disco_key: NodeKey,
    ) -> Result<Registration, ControlError> {
        self.register_tagged(token, hostname, disco_key, None).await
    }

    /// [`Self::register`], also setting the tags the node advertises
    /// (`None` leaves the coordinator's as they are).
    pub async fn register_tagged(
        &self,
        token: Option<&str>,
        hostname: &str,
        disco_key: NodeKey,
        tags: Option<&[String]>,
    ) -> Result<Registration, ControlError> {
        let adv = Advertised { tags, routes: None };
        self.register_advertising(token, hostname, disco_key, &adv)
            .await
    }

    /// [`Self::register`], also setting what the node advertises.
    pub async fn register_advertising(
        &self,
        token: Option<&str>,
        hostname: &str,
        disco_key: NodeKey,
        adv: &Advertised<'_>,
    ) -> Result<Registration, ControlError> {
        let req = RegisterRequest {
            token: token.map(str::to_owned),
            node_key: self.node_key(),
            disco_key,
            hostname: hostname.to_owned(),
            os: std::env::consts::OS.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            tags: adv.tags.map(<[String]>::to_vec),
            routes: adv.routes.map(<[ipnet::IpNet]>::to_vec),
        };
        let body = serde_json::to_vec(&req)?;
        let resp = self
            .signed(reqwest::Method::POST, "/register", body)
            .await?;
        parse_json(&resp.bytes().await?)
    }

    /// Publishes this node's endpoint candidates and netcheck summary.
    pub async fn report_endpoints(&self, report: &EndpointsReport) -> Result<(), ControlError> {
        let body = serde_json::to_vec(report)?;
        self.signed(reqwest::Method::POST, "/endpoints", body)
            .await?;
        Ok(())
    }

    /// Tells the coordinator this node is leaving the network: it is
    /// removed (peers get a removal delta), and joining again takes a token.
    pub async fn logout(&self) -> Result<(), ControlError> {
        self.signed(reqwest::Method::POST, "/logout", Vec::new())
            .await?;
        Ok(())
    }

    /// What this node's peers let it do (`GET /reach`), for `status`.
    pub async fn reach(&self) -> Result<super::ReachResponse, ControlError> {
        let resp = self
            .signed(reqwest::Method::GET, "/reach", Vec::new())
            .await?;
        parse_json(&resp.bytes().await?)
    }

    /// Starts the map stream task (see the module doc).
    pub fn map_stream(&self) -> MapStream {
        let (tx, rx) = mpsc::channel(256);
        let client = self.clone();
        let task = tokio::spawn(async move { client.stream_task(tx).await });
        MapStream { rx, task }
    }

    async fn stream_task(self, tx: mpsc::Sender<MapEvent>) {
        let mut map = match self.load_cached_map() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unreadable cached map");
                None
            }
        };
        if let Some(m) = &map {
            let _ = tx
                .send(MapEvent::Full {
                    map: m.clone(),
                    from_cache: true,
                })
                .await;
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = self.stream_once(&tx, &mut map, &mut backoff).await;
            let reason = match result {
                Ok(()) => "coordinator closed the map stream".to_owned(),
                Err(e) if e.is_permanent() => {
                    let _ = tx
                        .send(MapEvent::Revoked {
                            reason: e.to_string(),
                        })
                        .await;
                    return;
                }
                Err(e) => e.to_string(),
            };
            // Jitter spreads the reconnects of a whole network after a
            // coordinator restart.
            let retry_in = backoff.mul_f64(0.75 + rand::random::<f64>() / 2.0);
            tracing::info!(%reason, ?retry_in, "map stream down");
            if tx
                .send(MapEvent::Disconnected { reason, retry_in })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(retry_in).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn stream_once(
        &self,
        tx: &mpsc::Sender<MapEvent>,
        map: &mut Option<NetMap>,
        backoff: &mut Duration,
    ) -> Result<(), ControlError> {
        let resp = self
            .signed(reqwest::Method::GET, super::MAP_PATH, Vec::new())
            .await?;
        let coordinator = self.coordinator_key().await?;
        *backoff = BACKOFF_MIN;
        if tx.send(MapEvent::Connected).await.is_err() {
            return Ok(());
        }
        // Compressed only when this coordinator knows `zstd=1` (an older
        // one sends plain lines without the header): `control::zmap`.
        let encoding = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
        let mut unframer = match encoding.as_deref() {
            None | Some("identity") => None,
            Some("zstd") => Some((super::zmap::Unframer::new(), super::zmap::Decoder::new()?)),
            Some(other) => {
                return Err(ControlError::Protocol(format!(
                    "map stream in an encoding this agent did not ask for: {other:?}"
                )))
            }
        };
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut scanned = 0;
        let mut dirty = false;
        let mut save_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(SILENCE, body.next()) => c,
                _ = save_tick.tick() => {
                    if dirty {
                        self.save(map.as_ref());
                        dirty = false;
                    }
                    continue;
                }
            };
            let chunk = match chunk {
                Err(_) => return Err(ControlError::Protocol("map stream went silent".into())),
                Ok(None) => {
                    if dirty {
                        self.save(map.as_ref());
                    }
                    return Ok(());
                }
                Ok(Some(c)) => c?,
            };
            let mut lines = Lines {
                buf: &mut buf,
                scanned: &mut scanned,
                dirty: &mut dirty,
            };
            let open = match &mut unframer {
                None => {
                    lines.buf.extend_from_slice(&chunk);
                    self.take_lines(&mut lines, coordinator, map, tx).await?
                }
                Some((u, dec)) => {
                    // Frame by frame, so what one chunk decodes to is
                    // taken apart before the next frame is decoded.
                    u.push(&chunk);
                    let mut open = true;
                    while open && u.next_into(dec, lines.buf)? {
                        open = self.take_lines(&mut lines, coordinator, map, tx).await?;
                    }
                    open
                }
            };
            if !open {
                return Ok(());
            }
        }
    }

    /// Folds every whole line in `lines.buf` into `map` and hands the
    /// events on; false when the receiver is gone.
    async fn take_lines(
        &self,
        lines: &mut Lines<'_>,
        coordinator: NodeKey,
        map: &mut Option<NetMap>,
        tx: &mpsc::Sender<MapEvent>,
    ) -> Result<bool, ControlError> {
        let buf = &mut *lines.buf;
        // Lines are cut out by offset and the buffer is shifted once per
        // chunk: a drain per line would move the rest of a big batch once
        // for every line in it. `scanned` keeps a long partial line from
        // being searched again from its start on every chunk.
        let mut start = 0;
        let mut scanned = *lines.scanned;
        let mut events = Vec::new();
        while let Some(len) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + len;
            let msg: MapMessage = parse_json(&buf[start..end])?;
            start = end + 1;
            scanned = start;
            let is_full = matches!(msg, MapMessage::Full { .. });
            fold(coordinator, map, msg, &mut events);
            if events.is_empty() {
                continue;
            }
            // A full map is saved at once (it is what a restart needs
            // most); deltas are batched by the tick.
            if is_full {
                self.save(map.as_ref());
            } else {
                *lines.dirty = true;
            }
            for event in events.drain(..) {
                if tx.send(event).await.is_err() {
                    return Ok(false);
                }
            }
        }
        buf.drain(..start);
        *lines.scanned = buf.len();
        if buf.len() > MAX_LINE {
            return Err(ControlError::Protocol("map line too long".into()));
        }
        Ok(true)
    }

    fn save(&self, map: Option<&NetMap>) {
        if let Some(m) = map {
            if let Err(e) = m.save(&self.map_path()) {
                tracing::warn!(error = %e, "could not save the map");
            }
        }
    }
}

/// Applies one message to the map and adds what to tell the caller to
/// `out` (several events for a `presence` line).
fn fold(coordinator: NodeKey, map: &mut Option<NetMap>, msg: MapMessage, out: &mut Vec<MapEvent>) {
    if let MapMessage::Full { .. } = msg {
        if let Some(full) = NetMap::from_full(coordinator, &msg) {
            *map = Some(full.clone());
            out.push(MapEvent::Full {
                map: full,
                from_cache: false,
            });
        }
        return;
    }
    // A delta before any full map is a protocol slip; ignore it rather
    // than invent a map around it.
    let Some(current) = map.as_mut() else { return };
    let event = match (current.apply(&msg), msg) {
        (
            MapChange::PeerAdded(_),
            MapMessage::PeerAdded { peer } | MapMessage::PeerChanged { peer },
        ) => MapEvent::PeerAdded(peer),
        (
            MapChange::PeerChanged(_),
            MapMessage::PeerAdded { peer } | MapMessage::PeerChanged { peer },
        ) => MapEvent::PeerChanged(peer),
        (MapChange::PeerChanged(k), MapMessage::PeerOnline { .. }) => match current.peers.get(&k) {
            Some(p) => MapEvent::PeerChanged(p.clone()),
            None => return,
        },
        (MapChange::Presence(keys), _) => {
            let peers = keys.iter().filter_map(|k| current.peers.get(k));
            out.extend(peers.cloned().map(MapEvent::PeerChanged));
            return;
        }
        (MapChange::PeerRemoved(k), _) => MapEvent::PeerRemoved(k),
        (MapChange::SelfChanged, MapMessage::SelfChanged { node }) => MapEvent::SelfChanged(node),
        (MapChange::FilterChanged, MapMessage::FilterChanged { packet_filter }) => {
            MapEvent::FilterChanged(packet_filter)
        }
        _ => return,
    };
    out.push(event);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the cache inconsistent
    // (it is a single assignment), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ControlError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Turns a non-2xx answer into a typed error.
async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ControlError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => Err(ControlError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        }),
        Err(_) => Err(ControlError::Protocol(format!(
            "HTTP {status} without a control-protocol error body"
        ))),
    }
}
