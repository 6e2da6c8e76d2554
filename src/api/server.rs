//! The daemon side of the local API: the Unix socket and the request loop.
//!
//! [`Listener::bind`] prepares the socket before the agent reports ready:
//! it creates the parent directory when systemd has not (`RuntimeDirectory=`),
//! replaces a stale socket left by a crashed daemon but refuses to steal one
//! a live daemon still answers on, and sets the permissions the CLI relies
//! on (group `warren` when it exists, mode 0660). [`serve`] then answers
//! requests from a [`Backend`], the daemon's view of the running agent; the
//! trait keeps this module testable without a TUN device.
//!
//! Each connection runs in its own task with a deadline and a size limit, and
//! the number of connections in flight is bounded: a stuck or hostile local
//! client costs a task for a few seconds, never the daemon.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::mesh::PingRound;
use super::resolve::resolve;
pub use super::view::AgentView;
use super::{
    ApiError, ErrorCode, IpReply, PingReply, Reply, Request, Status, VersionReply, MAX_REQUEST,
    SOCKET_GROUP,
};
use crate::keys::NodeKey;

/// How long one connection may take to send its request and read the answer.
/// `up` waits on the coordinator and `netcheck` on STUN servers, so this is
/// the longest of those plus slack.
const CONN_DEADLINE: Duration = Duration::from_secs(30);
/// How long one ping round waits for pongs unless the request says.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait a ping request may ask for (well inside the deadline).
const MAX_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNS: usize = 32;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    // Messages leave out `source`: callers print the chain (`{:#}`).
    #[error(
        "cannot create the API socket {path}: permission denied; the agent runs as root \
         with CAP_NET_ADMIN (systemctl start warren), or set a writable --socket"
    )]
    Permission { path: PathBuf, source: io::Error },
    #[error("creating the API socket directory {path}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("another warren agent already answers on {path}; stop it first")]
    InUse { path: PathBuf },
    #[error("binding the API socket {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("setting permissions of the API socket {path}")]
    Permissions { path: PathBuf, source: io::Error },
}

/// What the API needs from the running agent.
pub trait Backend: Send + Sync + 'static {
    /// A snapshot of the node and its peers.
    fn status(&self) -> Status;

    /// One disco ping round to a mesh peer, waiting at most `timeout`.
    fn disco_ping(
        &self,
        peer: NodeKey,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<PingRound, ApiError>> {
        let _ = (peer, timeout);
        Box::pin(async {
            Err(ApiError::new(
                ErrorCode::Unsupported,
                "this daemon runs without a mesh",
            ))
        })
    }

    /// What the peers let this node do, from the coordinator (`GET
    /// /reach`); `None` when there is no coordinator to ask.
    fn reach(&self) -> BoxFuture<'_, Option<Result<crate::control::ReachResponse, String>>> {
        Box::pin(async { None })
    }

    /// The resolver's requests: `dns status`, `dns query`.
    fn dns(&self, request: Request) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        let _ = request;
        Box::pin(async {
            Err(ApiError::new(
                ErrorCode::Unsupported,
                "this daemon runs without a resolver ([dns] enabled = false)",
            ))
        })
    }

    /// Requests that act on the mesh: `up`, `down`, `logout`, `netcheck`.
    /// A backend without a mesh (tests, a static config) refuses them.
    fn mesh(&self, request: Request) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        let _ = request;
        Box::pin(async {
            Err(ApiError::new(
                ErrorCode::Unsupported,
                "this daemon runs without a mesh",
            ))
        })
    }
}

/// Answers one request line. Pure apart from the backend, so the protocol
/// is tested without sockets.
pub async fn answer(backend: &dyn Backend, line: &str) -> Reply {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Reply::Error(ApiError::new(
                ErrorCode::BadRequest,
                format!("request is not JSON: {e}"),
            ))
        }
    };
    let request: Request = match serde_json::from_value(value.clone()) {
        Ok(r) => r,
        Err(e) => {
            let name = value.get("request").and_then(|r| r.as_str());
            return Reply::Error(match name {
                Some(n) if !is_known(n) => ApiError::new(
                    ErrorCode::UnknownRequest,
                    format!(
                        "this daemon (warren {}) does not know the request `{n}`; \
                         is the daemon older than the CLI?",
                        env!("CARGO_PKG_VERSION")
                    ),
                ),
                _ => ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}")),
            });
        }
    };
    let result = match request {
        Request::Status => to_value(&status_with_reach(backend).await),
        Request::Version => to_value(&VersionReply {
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        Request::Ip { peer: None } => {
            let st = backend.status();
            to_value(&IpReply {
                public_key: st.public_key,
                addresses: st.addresses.iter().map(|n| n.addr()).collect(),
            })
        }
        Request::Ip { peer: Some(name) } => {
            let st = backend.status();
            resolve(&st.peers, &name).and_then(|p| {
                to_value(&IpReply {
                    public_key: p.public_key,
                    addresses: p
                        .allowed_ips
                        .iter()
                        .filter(|n| n.prefix_len() == n.max_prefix_len())
                        .map(|n| n.addr())
                        .collect(),
                })
            })
        }
        Request::Ping { peer, timeout_ms } => ping(backend, &peer, timeout_ms).await,
        Request::Up(mut args) => match exit_node_key(backend, &mut args) {
            Ok(()) => backend.mesh(Request::Up(args)).await,
            Err(e) => Err(e),
        },
        r @ (Request::Down | Request::Logout | Request::Netcheck) => backend.mesh(r).await,
        r @ (Request::DnsStatus | Request::DnsQuery { .. }) => backend.dns(r).await,
    };
    match result {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e),
    }
}

/// How long `status` waits for the coordinator to say what the peers allow.
const REACH_TIMEOUT: Duration = Duration::from_secs(2);

/// The backend's status and, when the network has an access policy, what
/// each peer lets this node do (`allows_you`). Only the coordinator knows
/// that (it is the peers' filters), so it is asked here, when a person
/// looks, rather than pushed to every node on every change.
async fn status_with_reach(backend: &dyn Backend) -> Status {
    let mut st = backend.status();
    let Some(mesh) = st.mesh.as_mut().filter(|m| m.policy_rules.is_some()) else {
        return st;
    };
    let reach = match tokio::time::timeout(REACH_TIMEOUT, backend.reach()).await {
        Ok(Some(Ok(r))) => r,
        Ok(Some(Err(e))) => {
            mesh.reach_error = Some(e);
            return st;
        }
        Ok(None) => return st,
        Err(_) => {
            mesh.reach_error = Some(format!(
                "the coordinator did not answer within {}s",
                REACH_TIMEOUT.as_secs()
            ));
            return st;
        }
    };
    let allows: std::collections::HashMap<NodeKey, Vec<crate::policy::Allowance>> =
        reach.peers.into_iter().map(|p| (p.key, p.allows)).collect();
    for p in &mut st.peers {
        if let Some(m) = &mut p.mesh {
            // A peer the coordinator did not list is one it no longer
            // shows this node: it allows nothing.
            m.allows_you = Some(allows.get(&p.public_key).cloned().unwrap_or_default());
        }
    }
    st
}

/// `up --exit-node PEER`: the peer named the way every command names one
/// (`resolve`), passed on as its full key, which is what the daemon keeps
/// (a name may change; the key does not). An empty name clears the choice.
fn exit_node_key(
    backend: &dyn Backend,
    args: &mut crate::api::mesh::UpArgs,
) -> Result<(), ApiError> {
    let Some(query) = args.exit_node.as_deref().filter(|q| !q.trim().is_empty()) else {
        return Ok(());
    };
    let st = backend.status();
    let p = resolve(&st.peers, query).map_err(|mut e| {
        e.message = format!(
            "{} (the exit node is chosen among this node's peers: join first)",
            e.message
        );
        e
    })?;
    args.exit_node = Some(p.public_key.to_string());
    Ok(())
}

/// Resolves the peer, runs a disco round when it is a mesh peer, and adds
/// the WireGuard-level liveness.
async fn ping(
    backend: &dyn Backend,
    query: &str,
    timeout_ms: Option<u64>,
) -> Result<serde_json::Value, ApiError> {
    let st = status_with_reach(backend).await;
    let policy = st.mesh.as_ref().and_then(|m| m.policy_rules).is_some();
    let p = resolve(&st.peers, query).map_err(|mut e| {
        // A peer the policy hides is not in the map at all.
        if policy && e.code == ErrorCode::UnknownPeer {
            e.message.push_str(
                "; this network has an access policy, and a node you may not reach \
                 (and that may not reach you) is not in your map",
            );
        }
        e
    })?;
    let mut reply = PingReply::from_peer(p);
    if p.mesh.is_some() {
        let ms = timeout_ms.unwrap_or(PING_TIMEOUT.as_millis() as u64);
        let timeout = Duration::from_millis(ms).min(MAX_PING_TIMEOUT);
        reply.round = Some(backend.disco_ping(p.public_key, timeout).await?);
    }
    to_value(&reply)
}

fn is_known(name: &str) -> bool {
    [
        "status", "ip", "ping", "version", "up", "down", "logout", "netcheck",
    ]
    .contains(&name)
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

/// A bound API socket, not yet serving. Removes the socket file on drop.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` with the API's permissions. Must run inside a tokio
    /// runtime.
    pub fn bind(path: &Path) -> Result<Listener, ServeError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|source| {
                    denied_or(path, source, |source| ServeError::Dir {
                        path: dir.to_owned(),
                        source,
                    })
                })?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        if path.exists() {
            // A live daemon answers; a crashed one left a file that refuses.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse {
                    path: path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let inner = UnixListener::bind(path).map_err(|source| {
            denied_or(path, source, |source| ServeError::Bind {
                path: path.to_owned(),
                source,
            })
        })?;
        let listener = Listener {
            inner,
            path: path.to_owned(),
        };
        listener.set_permissions()?;
        Ok(listener)
    }

    fn set_permissions(&self) -> Result<(), ServeError> {
        let err = |source| ServeError::Permissions {
            path: self.path.clone(),
            source,
        };
        match nix::unistd::Group::from_name(SOCKET_GROUP) {
            Ok(Some(group)) => {
                // Under systemd (`Group=warren`) the socket is born with the
                // group, and chown(2) is filtered out: only fix what differs.
                let already = std::fs::metadata(&self.path)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::gid(&m) == group.gid.as_raw());
                if already {
                    // Nothing to do.
                } else if let Err(e) = nix::unistd::chown(&self.path, None, Some(group.gid)) {
                    // Only root can use the socket then; say so once.
                    tracing::warn!(error = %e, socket = %self.path.display(),
                        "cannot give the API socket to group {SOCKET_GROUP}; only root can use it");
                }
            }
            Ok(None) => tracing::debug!("no group {SOCKET_GROUP}: the API socket is root's only"),
            Err(e) => tracing::warn!(error = %e, "looking up group {SOCKET_GROUP}"),
        }
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o660)).map_err(err)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A permission error becomes the sentence saying what the agent needs;
/// anything else becomes `other(source)`.
fn denied_or(
    path: &Path,
    source: io::Error,
    other: impl FnOnce(io::Error) -> ServeError,
) -> ServeError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        ServeError::Permission {
            path: path.to_owned(),
            source,
        }
    } else {
        other(source)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves requests until the task is dropped or aborted.
pub async fn serve(listener: Listener, backend: Arc<dyn Backend>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    tracing::info!(socket = %listener.path.display(), "local API listening");
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.inner.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends pass; back off instead of spinning.
                tracing::warn!(error = %e, "local API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tokio::time::timeout(CONN_DEADLINE, one(stream, &*backend)).await {
                tracing::debug!(error = %e, "local API: client too slow");
            }
        });
    }
}

async fn one(stream: UnixStream, backend: &dyn Backend) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
    let mut line = String::new();
    let reply = match reader.read_line(&mut line).await {
        Ok(_) if !line.ends_with('\n') && line.len() >= MAX_REQUEST => Reply::Error(ApiError::new(
            ErrorCode::BadRequest,
            "request longer than the limit",
        )),
        Ok(_) => answer(backend, line.trim_end()).await,
        Err(e) => Reply::Error(ApiError::new(
            ErrorCode::BadRequest,
            format!("unreadable request: {e}"),
        )),
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"code":"internal","message":"encoding the reply: {e}"}}}}"#)
    });
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
    let _ = write.shutdown().await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
