//! How the rest of the daemon talks to the mesh task: commands from the
//! local API (`up`, `down`, `logout`, `netcheck`, `ping`) answered on a oneshot, and
//! a snapshot of the mesh's state that `status` reads without waiting on
//! the task.
//!
//! The snapshot is written by the mesh task after each loop turn that
//! changes something and read under a short mutex: status requests are rare
//! and the copy is small (one entry per peer), so nothing fancier is needed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::api::mesh::{LeaveReply, MeshStatus, PeerMesh, PingRound, UpArgs, UpReply};
use crate::api::{ApiError, ErrorCode};
use crate::keys::NodeKey;
use crate::netcheck::Report;

/// A command for the mesh task.
#[derive(Debug)]
pub enum Command {
    Up(UpArgs),
    Down,
    Logout,
    Netcheck,
    /// The daemon is exiting: give back what is held outside this host
    /// (the port mapping) and answer once it is done.
    Shutdown,
    /// One disco ping round to `peer`, answered with a
    /// [`crate::api::mesh::PingRound`] after the first direct pong, a short
    /// grace after the first relayed one, or `timeout`.
    Ping {
        peer: NodeKey,
        timeout: std::time::Duration,
    },
}

/// What the mesh task answers to a [`Command`]: one typed value per
/// command, turned into JSON only by the API server.
#[derive(Debug)]
pub enum MeshReply {
    Up(UpReply),
    Left(LeaveReply),
    Netcheck(Box<Report>),
    Ping(PingRound),
    /// `Shutdown` is done.
    Done,
}

pub type Reply = oneshot::Sender<Result<MeshReply, ApiError>>;

/// What `status` shows of the mesh.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub node: MeshStatus,
    pub peers: HashMap<NodeKey, PeerMesh>,
    /// The session's client, so that `status` can ask the coordinator what
    /// the peers allow (`GET /reach`) without waiting on the mesh task.
    pub client: Option<crate::control::ControlClient>,
}

/// The daemon's handle on the mesh task. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    calls: mpsc::Sender<(Command, Reply)>,
    view: Arc<Mutex<View>>,
}

impl MeshHandle {
    pub(super) fn new(calls: mpsc::Sender<(Command, Reply)>, view: Arc<Mutex<View>>) -> Self {
        MeshHandle { calls, view }
    }

    /// Runs `cmd` on the mesh task and waits for its answer.
    pub async fn call(&self, cmd: Command) -> Result<MeshReply, ApiError> {
        let gone = || ApiError::new(ErrorCode::Internal, "the mesh task has stopped");
        let (tx, rx) = oneshot::channel();
        self.calls.send((cmd, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub fn view(&self) -> View {
        match self.view.lock() {
            Ok(v) => v.clone(),
            // A panic while writing leaves a usable (if stale) view.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The mesh task's side of the view.
pub(super) fn publish(view: &Mutex<View>, f: impl FnOnce(&mut View)) {
    match view.lock() {
        Ok(mut v) => f(&mut v),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}
