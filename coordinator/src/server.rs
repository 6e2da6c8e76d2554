//! Running the coordinator: configuration, its key, TLS, and the
//! background tasks (hub, liveness refresh, reaping).
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

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use warren::control::{RelayMap, KEEPALIVE_SECS};
use warren::keys::PrivateKey;

use crate::api::{self, AppState};
use crate::hub::Hub;
use crate::store::{Store, StoreError};

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
    #[error("key file {0}: {1}")]
    BadKey(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("refusing plain HTTP on {0}: give --tls-cert/--tls-key, bind loopback, or pass --insecure-http (lab only)")]
    PlainHttpRefused(SocketAddr),
    #[error("this replica's key ({ours}) is not the network's ({theirs}): copy coordinator.key from another replica")]
    KeyMismatch { ours: String, theirs: String },
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
    /// How long an ephemeral node may stay offline before it is removed.
    pub ephemeral_timeout: Duration,
    pub relay_map: RelayMap,
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
            ephemeral_timeout: Duration::from_secs(600),
            relay_map: RelayMap::default(),
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
        Ok(text) => text.trim().parse().map_err(|e: warren::keys::KeyError| {
            ServerError::BadKey(path.display().to_string(), e.to_string())
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
            tracing::info!(public = %key.public(), "created coordinator key");
            Ok(key)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ServerError> {
    let cert_pem = std::fs::read(cert).map_err(io_err(cert))?;
    let key_pem = std::fs::read(key).map_err(io_err(key))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(cert))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(io_err(key))?
        .ok_or_else(|| ServerError::Tls(format!("no private key in {}", key.display())))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A running coordinator. Dropping it stops the listener and tasks.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub store: Store,
    tasks: Vec<JoinHandle<()>>,
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
        (Some(c), Some(k)) => Some(tls_config(c, k)?),
        (None, None) => None,
        _ => {
            return Err(ServerError::Tls(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    if tls.is_none() && !cfg.listen.ip().is_loopback() && !cfg.insecure_http {
        return Err(ServerError::PlainHttpRefused(cfg.listen));
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(io_err(&cfg.data_dir))?;
    let key = load_or_create_key(&cfg.data_dir.join("coordinator.key"))?;
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
        relay_map: cfg.relay_map.clone(),
        keepalive: cfg.keepalive,
        live: Arc::default(),
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Io {
            path: cfg.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Io {
        path: cfg.listen.to_string(),
        source,
    })?;
    let feed = hub.spawn(store.clone(), Duration::from_secs(15)).await;
    let app = api::router(state.clone());
    let serve = match tls {
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "server stopped");
            }
        }),
        Some(tls) => tokio::spawn(serve_tls(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            app,
        )),
    };
    let upkeep = tokio::spawn(upkeep(state, cfg.ephemeral_timeout));
    tracing::info!(%addr, tls = cfg.tls_cert.is_some(), backend = ?store.backend(), "coordinator listening");
    Ok(Running {
        addr,
        store,
        tasks: vec![serve, feed, upkeep],
    })
}

async fn serve_tls(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, app: axum::Router) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically out of file descriptors: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
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
