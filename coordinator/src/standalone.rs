//! `warren-coordinator relay`: a relay (with its STUN server) for a further
//! region, away from the coordinator.
//!
//! It learns which node keys may connect from the coordinator's node feed
//! (see [`crate::relay_nodes`]), proving itself with the shared relay
//! secret, and keeps its own key in the data directory. The rules on plain
//! HTTP are the coordinator's: TLS unless the relay listens on loopback or
//! the operator asks for lab mode by name; the same goes for the feed's
//! connection to the coordinator. The agents find this relay only through
//! the coordinator's relay map (`--relay-map`), which the operator keeps in
//! step with the relays actually running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use warren::dial;

use crate::listen::{tls_config_from_pem, Security};

use crate::relay::{
    start_standalone, RelayLimits, RemoteAdmissionConfig, Standalone, StandaloneConfig,
};
use crate::server::{load_or_create_key, start_stun, ServerError};

/// Everything the `relay` subcommand is told.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain HTTP off loopback, and to a coordinator off loopback (labs).
    pub insecure_http: bool,
    /// The coordinator's URL (`https://host[:port]`).
    pub coordinator: String,
    /// PEM roots to trust for the coordinator instead of the public ones.
    pub coordinator_ca: Option<PathBuf>,
    pub secret: Vec<u8>,
    /// Where `relay.key` lives.
    pub data_dir: PathBuf,
    /// STUN sockets (primary, then the optional second port); may be empty.
    pub stun_listen: Vec<SocketAddr>,
    pub limits: RelayLimits,
    /// How often to log the relay's counters; `None` never does.
    pub health_every: Option<Duration>,
    /// The token that reads `GET /relay/metrics` off loopback.
    pub metrics_token: Option<Vec<u8>>,
}

/// A running standalone relay. Dropping it stops everything.
pub struct RunningRelay {
    pub relay: Standalone,
    /// The bound STUN sockets.
    pub stun: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningRelay {
    pub fn addr(&self) -> SocketAddr {
        self.relay.addr
    }

    /// Runs until the relay's listener fails.
    pub async fn wait(mut self) -> std::io::Result<()> {
        self.relay.wait().await
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn coordinator_tls(opts: &Options) -> Result<Option<Arc<rustls::ClientConfig>>, ServerError> {
    let Some(ca) = &opts.coordinator_ca else {
        return Ok(None);
    };
    // The same CA handling as the agent's: one PEM bundle, only its roots.
    let bad = |source| ServerError::CoordinatorCa {
        path: ca.display().to_string(),
        source,
    };
    let pem = std::fs::read(ca).map_err(|e| bad(e.into()))?;
    dial::tls_config_with_ca(&pem).map(Some).map_err(bad)
}

/// Checks the options, binds, and starts the relay and its STUN server.
pub async fn start(opts: Options) -> Result<RunningRelay, ServerError> {
    let security = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Security::Tls(tls_config_from_pem(c, k, false)?),
        (None, None) if opts.listen.ip().is_loopback() || opts.insecure_http => Security::Plain,
        (None, None) => return Err(ServerError::PlainHttpRefused(opts.listen)),
        _ => return Err(ServerError::TlsPair),
    };
    let target = dial::parse_url(&opts.coordinator, true).map_err(ServerError::CoordinatorUrl)?;
    let allow_plain = opts.insecure_http || target.is_loopback();
    if !target.tls && !allow_plain {
        return Err(ServerError::Relay(format!(
            "--coordinator {}: plain http is allowed only to loopback or with --insecure-http",
            opts.coordinator
        )));
    }
    std::fs::create_dir_all(&opts.data_dir).map_err(|source| ServerError::Io {
        path: opts.data_dir.display().to_string(),
        source,
    })?;
    let key = load_or_create_key(&opts.data_dir.join("relay.key"))?;
    let coordinator = RemoteAdmissionConfig {
        coordinator_url: opts.coordinator.clone(),
        allow_plain,
        secret: opts.secret.clone(),
        relay_key: key.public(),
        tls: coordinator_tls(&opts)?,
    };
    let (stun, mut tasks) = start_stun(&opts.stun_listen, "warren-relay").await?;
    let relay = start_standalone(StandaloneConfig {
        listen: opts.listen,
        security,
        key,
        limits: opts.limits,
        coordinator,
        metrics_token: opts.metrics_token.clone(),
    })
    .await
    .map_err(|source| ServerError::Io {
        path: opts.listen.to_string(),
        source,
    })?;
    if let Some(every) = opts.health_every {
        tasks.push(tokio::spawn(log_health(relay.server.clone(), every)));
    }
    Ok(RunningRelay { relay, stun, tasks })
}

/// Logs the relay's counters now and then, when they moved.
async fn log_health(server: crate::relay::RelayServer, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = None;
    loop {
        tick.tick().await;
        let h = server.health();
        if last.as_ref() == Some(&h) {
            continue;
        }
        let drops =
            h.drop_queue_full + h.drop_no_such_peer + h.drop_bad_frame + h.drop_write_timeout;
        tracing::info!(
            clients = h.clients,
            bytes_in = h.bytes_in,
            bytes_out = h.bytes_out,
            packets_forwarded = h.packets_forwarded,
            drops,
            refused =
                h.refused_unknown_key + h.refused_bad_proof + h.refused_too_many + h.refused_busy,
            disconnected_removed = h.disconnected_removed,
            "relay counters (all of them: GET /relay/metrics)"
        );
        last = Some(h);
    }
}
