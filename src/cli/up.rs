//! `warren up` on the CLI side: send the request, then show the stages the
//! daemon goes through — registering → map received → tunnel up — and give
//! up with a clear message when `--timeout` runs out.
//!
//! The daemon answers `up` once the coordinator accepted the registration
//! (see `agent::mesh::up`); the later stages are read by polling `status`
//! every [`POLL`]. Polling rather than a streamed reply keeps the socket
//! protocol one request, one answer for every command, and costs nothing
//! that matters: `status` is answered from memory, and the CLI polls for a
//! few seconds at most.
//!
//! Progress goes to stderr, one line per stage, so `warren up > file` or a
//! script reading stdout gets only the result; `--json` prints no progress
//! and one JSON object at the end.

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::CliError;
use crate::api::client::call;
use crate::api::mesh::{MeshState, MeshStatus, UpArgs, UpReply};
use crate::api::{Request, Status};

/// How often `status` is asked while waiting.
const POLL: Duration = Duration::from_millis(200);

/// The default for `--timeout`: a first join on a slow link takes a few
/// seconds; past this something is wrong and a person should hear so.
pub const DEFAULT_TIMEOUT: &str = "30s";

/// What `warren up --json` prints.
#[derive(Debug, Serialize)]
pub struct UpResult {
    #[serde(flatten)]
    pub joined: UpReply,
    /// Peers in the map when the tunnel came up.
    pub peers: usize,
    /// The interface carrying the overlay.
    pub interface: String,
    /// The relay region this node keeps a connection to, if any.
    pub home_relay: Option<String>,
    /// How long `up` took, in milliseconds.
    pub elapsed_ms: u64,
}

/// Where `up` stands; a person sees one line per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Registering,
    Map,
    Tunnel,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Registering => "registering",
            Stage::Map => "waiting for the network map",
            Stage::Tunnel => "bringing the tunnel up",
        }
    }
}

/// Whether `status` shows the stage after `stage` reached. The map counts
/// once the coordinator sent one on the current stream (a map replayed from
/// disk does not); the tunnel once the overlay addresses are set and the
/// home relay — the path every peer can be reached on before a direct one
/// is found — is connected (or there is no relay at all).
pub fn reached(stage: Stage, m: &MeshStatus) -> bool {
    match stage {
        Stage::Registering => true,
        Stage::Map => m.map_received && m.state == MeshState::Running,
        Stage::Tunnel => {
            !m.addresses.is_empty() && (m.home_relay.is_none() || m.home_relay_connected)
        }
    }
}

/// Runs `up`: progress on `err` unless `json`, the result on `out`.
pub fn run(
    socket: &Path,
    mut args: UpArgs,
    timeout: Duration,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), CliError> {
    let start = Instant::now();
    let deadline = start + timeout;
    args.timeout_secs = Some(timeout.as_secs().max(1));
    let mut progress = Progress { err, quiet: json };
    let target = args
        .coordinator
        .clone()
        .unwrap_or_else(|| "the saved coordinator".to_string());
    progress.begin(&format!("registering with {target}"))?;
    let joined: UpReply = match call(socket, &Request::Up(args)) {
        Ok(r) => r,
        Err(e) => {
            progress.end("failed")?;
            return Err(e.into());
        }
    };
    let addrs: Vec<String> = joined.addresses.iter().map(|a| a.to_string()).collect();
    progress.end(&format!("ok: {} ({})", joined.name, addrs.join(", ")))?;

    let mut last = None;
    for stage in [Stage::Map, Stage::Tunnel] {
        progress.begin(stage.label())?;
        let st = match wait_for(socket, stage, deadline, &mut last)? {
            Some(st) => st,
            None => {
                progress.end("timed out")?;
                return Err(CliError::Usage(timeout_message(
                    stage,
                    timeout,
                    &joined,
                    last.as_ref(),
                )));
            }
        };
        let m = st.mesh.clone().unwrap_or_default();
        let note = match stage {
            Stage::Map => format!("ok: {} peers", st.peers.len()),
            _ => match &m.home_relay {
                Some(r) => format!("ok: {}, relay {r} connected", st.interface),
                None => format!("ok: {}", st.interface),
            },
        };
        progress.end(&note)?;
        last = Some(st);
    }
    let Some(st) = last else {
        return Err(CliError::Usage("no status from the daemon".into()));
    };
    let result = UpResult {
        peers: st.peers.len(),
        interface: st.interface.clone(),
        home_relay: st.mesh.as_ref().and_then(|m| m.home_relay.clone()),
        elapsed_ms: start.elapsed().as_millis() as u64,
        joined,
    };
    if json {
        super::print_json(out, &result)?;
    } else {
        writeln!(out, "{}", summary(&result))?;
    }
    Ok(())
}

/// The last line: what the node is now.
pub fn summary(r: &UpResult) -> String {
    let addrs: Vec<String> = r.joined.addresses.iter().map(|a| a.to_string()).collect();
    let mut s = format!(
        "warren is up: {} ({}) on {}, {} peer{}",
        r.joined.name,
        addrs.join(", "),
        r.joined.coordinator,
        r.peers,
        if r.peers == 1 { "" } else { "s" }
    );
    if !r.joined.tags.is_empty() {
        s.push_str(&format!(", tags {}", r.joined.tags.join(",")));
    }
    if !r.joined.changed.is_empty() {
        s.push_str(&format!(" (changed: {})", r.joined.changed.join(", ")));
    }
    s
}

/// Polls `status` until `stage` is reached (its status) or the deadline
/// passes (`None`). `last` keeps the newest status for the error message.
fn wait_for(
    socket: &Path,
    stage: Stage,
    deadline: Instant,
    last: &mut Option<Status>,
) -> Result<Option<Status>, CliError> {
    loop {
        let st: Status = call(socket, &Request::Status)?;
        let m = st.mesh.clone().unwrap_or_default();
        if m.state == MeshState::NeedsLogin {
            return Err(CliError::Usage(format!(
                "the coordinator no longer accepts this node{}; join again with --token",
                m.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
            )));
        }
        if reached(stage, &m) {
            return Ok(Some(st));
        }
        *last = Some(st);
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// What went wrong, in words: which stage, for how long, the last error.
pub fn timeout_message(
    stage: Stage,
    timeout: Duration,
    joined: &UpReply,
    last: Option<&Status>,
) -> String {
    let m = last.and_then(|s| s.mesh.clone()).unwrap_or_default();
    let secs = timeout.as_secs();
    let why = match stage {
        Stage::Map | Stage::Registering => format!(
            "registered with {}, but no network map came within {secs}s",
            joined.coordinator
        ),
        Stage::Tunnel => match &m.home_relay {
            Some(r) => match &m.home_relay_error {
                Some(e) => format!("the relay {r} did not connect within {secs}s: {e}"),
                None => format!("the relay {r} did not connect within {secs}s"),
            },
            None => format!("the overlay addresses were not set within {secs}s"),
        },
    };
    let detail = m
        .last_error
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    format!(
        "{why}{detail}; the daemon keeps trying in the background: \
         see `warren status` and `warren netcheck`, or raise --timeout"
    )
}

/// One line per stage: the label, then its outcome once known.
struct Progress<'a, W: Write> {
    err: &'a mut W,
    quiet: bool,
}

impl<W: Write> Progress<'_, W> {
    fn begin(&mut self, what: &str) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        write!(self.err, "{what} … ")?;
        self.err.flush()
    }

    fn end(&mut self, outcome: &str) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        writeln!(self.err, "{outcome}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(state: MeshState, map: bool, relay: Option<&str>, connected: bool) -> MeshStatus {
        MeshStatus {
            state,
            map_received: map,
            addresses: vec!["100.64.0.1".parse().unwrap()],
            home_relay: relay.map(str::to_owned),
            home_relay_connected: connected,
            ..Default::default()
        }
    }

    #[test]
    fn stages_are_reached_only_when_status_says_so() {
        // A map replayed from disk while reconnecting is not "map received".
        assert!(!reached(
            Stage::Map,
            &mesh(MeshState::Reconnecting, false, None, false)
        ));
        assert!(!reached(
            Stage::Map,
            &mesh(MeshState::Running, false, None, false)
        ));
        assert!(reached(
            Stage::Map,
            &mesh(MeshState::Running, true, None, false)
        ));
        // The tunnel waits for the home relay, when there is one.
        let m = mesh(MeshState::Running, true, Some("fra"), false);
        assert!(!reached(Stage::Tunnel, &m));
        let m = mesh(MeshState::Running, true, Some("fra"), true);
        assert!(reached(Stage::Tunnel, &m));
        assert!(reached(
            Stage::Tunnel,
            &mesh(MeshState::Running, true, None, false)
        ));
        let mut no_addr = mesh(MeshState::Running, true, None, false);
        no_addr.addresses.clear();
        assert!(!reached(Stage::Tunnel, &no_addr));
    }

    fn joined() -> UpReply {
        UpReply {
            coordinator: "https://c.example".into(),
            name: "web1".into(),
            addresses: vec!["100.64.0.1".parse().unwrap(), "fd7a::1".parse().unwrap()],
            tags: vec!["tag:web".into()],
            changed: vec!["advertise-tags".into()],
        }
    }

    #[test]
    fn summary_and_json_say_what_the_node_is() {
        let r = UpResult {
            joined: joined(),
            peers: 1,
            interface: "warren0".into(),
            home_relay: Some("fra".into()),
            elapsed_ms: 812,
        };
        assert_eq!(
            summary(&r),
            "warren is up: web1 (100.64.0.1, fd7a::1) on https://c.example, 1 peer, \
             tags tag:web (changed: advertise-tags)"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["name"], "web1");
        assert_eq!(v["peers"], 1);
        assert_eq!(v["home_relay"], "fra");
        assert_eq!(v["changed"], serde_json::json!(["advertise-tags"]));
    }

    #[test]
    fn timeouts_name_the_stage_and_the_last_error() {
        let msg = timeout_message(Stage::Map, Duration::from_secs(30), &joined(), None);
        assert!(
            msg.starts_with(
                "registered with https://c.example, but no network map came within 30s;"
            ),
            "{msg}"
        );
        let mut m = mesh(MeshState::Running, true, Some("fra"), false);
        m.last_error = Some("connection refused".into());
        let st = Status {
            version: String::new(),
            interface: "warren0".into(),
            public_key: crate::keys::NodeKey([0; 32]),
            listen: "0.0.0.0:51820".parse().unwrap(),
            offload: false,
            addresses: vec![],
            uptime_secs: 0,
            peers: vec![],
            drops: Default::default(),
            mesh: Some(m),
        };
        let msg = timeout_message(Stage::Tunnel, Duration::from_secs(5), &joined(), Some(&st));
        assert!(
            msg.starts_with(
                "the relay fra did not connect within 5s (last error: connection refused)"
            ),
            "{msg}"
        );
        assert!(msg.contains("warren status"), "{msg}");
        // The relay's own failure is named, not just that it failed.
        let mut st = st;
        if let Some(m) = st.mesh.as_mut() {
            m.last_error = None;
            m.home_relay_error = Some("relay presented key aaaa, expected bbbb".into());
        }
        let msg = timeout_message(Stage::Tunnel, Duration::from_secs(5), &joined(), Some(&st));
        assert!(
            msg.starts_with(
                "the relay fra did not connect within 5s: relay presented key aaaa, expected bbbb;"
            ),
            "{msg}"
        );
    }
}
