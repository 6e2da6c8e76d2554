//! Running the coordinator: configuration, its key, TLS, and the
//! background tasks (hub, liveness refresh, reaping), plus the STUN server
//! (its own UDP sockets, and a TCP listener on the STUN port) and the
//! embedded relay, which shares the control API's listener (the relay's
//! routes sit beside the API's on [`crate::listen::serve`], so one port and
//! one certificate serve both).
//!
//! Plain HTTP is refused unless the listening address is loopback or the
//! operator passed the lab flag: the control protocol's only protection for
//! `GET /key` (and for the map's confidentiality) is TLS.
//!
//! The coordinator's X25519 key lives in `coordinator.key` in the data
//! directory (mode 0600), made at first start. Replicas sharing a
//! PostgreSQL database must share that file too, since agents derive their
//! MAC keys from it; the store records the public half, and a replica that
//! starts with a different key refuses to run instead of rejecting every
//! agent's requests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use warren::control::{RelayMap, KEEPALIVE_SECS};
use warren::keys::{NodeKey, PrivateKey};

use crate::api::{self, AppState};
use crate::hub::Hub;
use crate::listen::Security;
use crate::relay::{Admission, RelayLimits, RelayServer};
use crate::relay_map::EmbeddedRegion;
use crate::relay_nodes::{feed_router, StoreAdmission};
use crate::store::{Store, StoreError};
use crate::stun;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {source}")]
    BadKey {
        path: String,
        #[source]
        source: warren::keys::KeyError,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::listen::ListenError),
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("--coordinator-ca {path}: {source}")]
    CoordinatorCa {
        path: String,
        #[source]
        source: warren::dial::DialError,
    },
    #[error("refusing plain HTTP on {0}: give --tls-cert/--tls-key, bind loopback, or pass --insecure-http (lab only)")]
    PlainHttpRefused(SocketAddr),
    #[error("this replica's key ({ours}) is not the network's ({theirs}): copy coordinator.key from another replica")]
    KeyMismatch { ours: String, theirs: String },
    #[error("relay: {0}")]
    Relay(String),
    #[error(transparent)]
    PublicUrl(#[from] crate::relay_map::EmbeddedError),
    #[error("relay: --coordinator: {0}")]
    CoordinatorUrl(#[source] warren::dial::DialError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `postgres://…`; `None` for SQLite in the data directory.
    pub database: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_http: bool,
    pub keepalive: Duration,
    /// Answer map streams that ask for zstd frames with them
    /// (`warren::control::zmap`); off: plain lines to every agent.
    pub compress_maps: bool,
    /// How long an ephemeral node may stay offline before it is removed.
    pub ephemeral_timeout: Duration,
    /// Regions of standalone relays, published after the embedded one.
    pub relay_map: RelayMap,
    /// The embedded relay's region; `None` runs no embedded relay.
    pub embedded_relay: Option<EmbeddedRegion>,
    pub relay_limits: RelayLimits,
    /// STUN sockets to serve on: the primary, then an optional second port
    /// (for mapping-behaviour tests). Empty runs no STUN server.
    pub stun_listen: Vec<SocketAddr>,
    /// The secret standalone relays prove on the node feed; `None` leaves
    /// the feed unmounted.
    pub relay_secret: Option<Vec<u8>>,
    /// The token that reads the embedded relay's counters off loopback.
    pub metrics_token: Option<Vec<u8>>,
    /// The network's DNS settings (checked), sent in every full map.
    pub dns: warren::dns::DnsSettings,
}

impl Config {
    /// Defaults for everything but where to listen and keep data.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            data_dir,
            database: None,
            tls_cert: None,
            tls_key: None,
            insecure_http: false,
            keepalive: Duration::from_secs(KEEPALIVE_SECS),
            compress_maps: false,
            ephemeral_timeout: Duration::from_secs(600),
            relay_map: RelayMap::default(),
            embedded_relay: Some(EmbeddedRegion::default()),
            relay_limits: RelayLimits::default(),
            stun_listen: Vec::new(),
            relay_secret: None,
            metrics_token: None,
            dns: warren::dns::DnsSettings::default(),
        }
    }

    /// The database URL this configuration selects.
    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| Store::sqlite_url(&self.data_dir))
    }
}

/// Reads the coordinator key, or makes one (mode 0600) at first start.
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, ServerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|source| ServerError::BadKey {
            path: path.display().to_string(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            use std::io::Write as _;
            let mut f = opts.open(path).map_err(io_err(path))?;
            f.write_all(format!("{}\n", key.to_base64()).as_bytes())
                .map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))?;
            tracing::info!(file = %path.display(), public = %key.public(), "created a key");
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a relay secret file (trimmed). Short secrets are refused: the
/// feed's MAC is only as strong as the secret.
pub fn read_relay_secret(path: &Path) -> Result<Vec<u8>, ServerError> {
    read_secret(path, "a relay secret")
}

/// Reads the `--metrics-token-file`: the same rules as the relay secret.
pub fn read_metrics_token(path: &Path) -> Result<Vec<u8>, ServerError> {
    read_secret(path, "a metrics token")
}

fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>, ServerError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let secret = text.trim().as_bytes().to_vec();
    if secret.len() < 16 {
        return Err(ServerError::Relay(format!(
            "{}: {what} needs at least 16 characters (try `openssl rand -base64 32`)",
            path.display()
        )));
    }
    Ok(secret)
}

/// Binds the STUN sockets and starts a server on each. Returns the bound
/// addresses (ports resolved) and the tasks.
pub async fn start_stun(
    listen: &[SocketAddr],
    software: &str,
) -> Result<(Vec<SocketAddr>, Vec<JoinHandle<()>>), ServerError> {
    let stats = Arc::new(stun::StunStats::default());
    let (mut addrs, mut tasks) = (Vec::new(), Vec::new());
    for (i, want) in listen.iter().enumerate() {
        let err = |source| ServerError::Io {
            path: format!("STUN socket {want}"),
            source,
        };
        let sock = UdpSocket::bind(want).await.map_err(err)?;
        let bound = sock.local_addr().map_err(err)?;
        addrs.push(bound);
        if i == 0 {
            // STUN over TCP beside the primary socket, for agents whose UDP
            // is blocked; optional: a busy TCP port only loses that.
            match tokio::net::TcpListener::bind(bound).await {
                Ok(l) => {
                    let options = stun::ServerOptions {
                        software: Some(software.to_owned()),
                    };
                    let stats = stats.clone();
                    tasks.push(tokio::spawn(async move {
                        if let Err(e) = stun::serve_tcp(l, options, stats).await {
                            tracing::error!(error = %e, "STUN server (tcp) stopped");
                        }
                    }));
                }
                Err(e) => tracing::warn!(%bound, error = %e, "no STUN over TCP"),
            }
        }
        let options = stun::ServerOptions {
            software: Some(software.to_owned()),
        };
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = stun::serve(sock, options, stats).await {
                tracing::error!(error = %e, "STUN server stopped");
            }
        }));
    }
    Ok((addrs, tasks))
}

/// A running coordinator. Dropping it stops the listener and tasks.
pub struct Running {
    pub addr: SocketAddr,
    pub store: Store,
    /// The bound STUN sockets (primary first).
    pub stun: Vec<SocketAddr>,
    /// The relay map agents are given.
    pub relay_map: RelayMap,
    /// The embedded relay, if it runs.
    pub relay: Option<RelayServer>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .field("stun", &self.stun)
            .field("relay_map", &self.relay_map)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Waits until the listener stops (it only does on error).
    pub async fn wait(mut self) {
        if let Some(t) = self.tasks.first_mut() {
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the store, binds, and starts serving.
pub async fn start(cfg: Config) -> Result<Running, ServerError> {
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(crate::listen::tls_config_from_pem(c, k, true)?),
        (None, None) => None,
        _ => return Err(ServerError::TlsPair),
    };
    if tls.is_none() && !cfg.listen.ip().is_loopback() && !cfg.insecure_http {
        return Err(ServerError::PlainHttpRefused(cfg.listen));
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(io_err(&cfg.data_dir))?;
    let key = load_or_create_key(&cfg.data_dir.join("coordinator.key"))?;
    let listener = crate::listen::bind(cfg.listen).map_err(|source| ServerError::Io {
        path: cfg.listen.to_string(),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Io {
        path: cfg.listen.to_string(),
        source,
    })?;
    let (stun_addrs, mut tasks) = start_stun(&cfg.stun_listen, "warren-coordinator").await?;
    // Loaded before the map is made: the embedded region is published with
    // its key, which agents then hold the relay to.
    let relay_key = match &cfg.embedded_relay {
        Some(_) => Some(load_or_create_key(&cfg.data_dir.join("relay.key"))?),
        None => None,
    };
    let relay_map = publish_map(
        &cfg,
        addr,
        tls.is_some(),
        &stun_addrs,
        relay_key.as_ref().map(PrivateKey::public),
    )?;
    let store = Store::open(&cfg.database_url()).await?;
    let recorded = store
        .setting_or_init("coordinator_public_key", || key.public().to_string())
        .await?;
    if recorded != key.public().to_string() {
        return Err(ServerError::KeyMismatch {
            ours: key.public().to_string(),
            theirs: recorded,
        });
    }
    let hub = Hub::new();
    let state = AppState {
        store: store.clone(),
        hub: hub.clone(),
        key,
        ula: store.ula_prefix().await?,
        relay_map: relay_map.clone(),
        dns_json: serde_json::to_string(&cfg.dns)
            .unwrap_or_else(|_| "null".into())
            .into(),
        keepalive: cfg.keepalive,
        compress_maps: cfg.compress_maps,
        live: Arc::default(),
        streams: Default::default(),
        presence: api::presence::Presence::spawn(store.clone(), hub.clone()),
        failures: Arc::new(std::sync::Mutex::new(api::failure_limiter())),
        sessions: Arc::default(),
    };
    let feed = hub.spawn(store.clone(), Duration::from_secs(15)).await;
    let mut app = api::router(state.clone());
    let relay = match relay_key {
        Some(relay_key) => {
            let (admission, follow) = StoreAdmission::spawn(store.clone(), &hub);
            tasks.push(follow);
            let relay =
                RelayServer::new(relay_key, cfg.relay_limits, admission as Arc<dyn Admission>)
                    .with_metrics_token(cfg.metrics_token.clone());
            app = app.merge(relay.router());
            Some(relay)
        }
        None => None,
    };
    if let Some(secret) = &cfg.relay_secret {
        app = app.merge(feed_router(hub.clone(), secret.clone()));
    }
    let security = match tls {
        Some(tls) => Security::Tls(tls),
        None => Security::Plain,
    };
    let serve = tokio::spawn(async move {
        if let Err(e) = crate::listen::serve(listener, app, security).await {
            tracing::error!(error = %e, "the API listener failed");
        }
    });
    let upkeep = tokio::spawn(upkeep(state, cfg.ephemeral_timeout));
    tracing::info!(
        %addr,
        tls = cfg.tls_cert.is_some(),
        backend = ?store.backend(),
        stun = ?stun_addrs,
        relay_regions = ?relay_map.regions.iter().map(|r| (r.id, r.url.as_str())).collect::<Vec<_>>(),
        node_feed = cfg.relay_secret.is_some(),
        "coordinator listening"
    );
    // The listener first: `Running::wait` waits on it.
    tasks.splice(0..0, [serve, feed, upkeep]);
    Ok(Running {
        addr,
        store,
        stun: stun_addrs,
        relay_map,
        relay,
        tasks,
    })
}

/// The relay map agents get: the embedded region, then the listed ones.
fn publish_map(
    cfg: &Config,
    addr: SocketAddr,
    tls: bool,
    stun: &[SocketAddr],
    relay_key: Option<NodeKey>,
) -> Result<RelayMap, ServerError> {
    let mut regions = Vec::new();
    if let (Some(spec), Some(key)) = (&cfg.embedded_relay, relay_key) {
        if cfg.relay_map.regions.iter().any(|r| r.id == spec.id) {
            return Err(ServerError::Relay(format!(
                "region {} is both the embedded relay's and a listed one",
                spec.id
            )));
        }
        regions.extend(spec.region(addr, tls, stun, key)?);
    }
    regions.extend(cfg.relay_map.regions.iter().cloned());
    Ok(RelayMap { regions })
}

/// Keeps `last_seen` fresh for the streams held here, marks offline nodes
/// whose replica died, removes ephemeral nodes offline too long, and
/// forgets old nonces.
async fn upkeep(state: AppState, ephemeral_timeout: Duration) {
    let period = state
        .keepalive
        .min(ephemeral_timeout / 2)
        .max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let ids: Vec<i64> = state.live().keys().copied().collect();
        if let Err(e) = state.store.touch(&ids).await {
            tracing::warn!(error = %e, "liveness refresh failed");
        }
        let stale_ms = (state.keepalive * 3).as_millis() as i64;
        match state
            .store
            .reap(stale_ms, ephemeral_timeout.as_millis() as i64)
            .await
        {
            Ok((0, 0)) => {}
            Ok((stale, removed)) => {
                tracing::info!(stale, removed, "reaped nodes");
                state.hub.wake();
            }
            Err(e) => tracing::warn!(error = %e, "reaping failed"),
        }
        let horizon = 2 * warren::control::auth::MAX_SKEW_SECS as i64 + 10;
        if let Err(e) = state.store.prune(horizon).await {
            tracing::warn!(error = %e, "pruning failed");
        }
    }
}
