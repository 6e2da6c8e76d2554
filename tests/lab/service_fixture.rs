//! A real daemon for the CLI tests: two `warren agent` processes on two
//! public hosts of a NAT lab (`tests/lab`), each with its own temporary API
//! socket.
//!
//! ```text
//!   lab host a: warren agent, 100.64.0.1 ── lab internet ── lab host b: 100.64.0.2
//! ```
//!
//! Two hosts rather than one so that traffic between the overlay addresses
//! really crosses the tunnel (inside one namespace the kernel would deliver
//! it locally) and `status` has a handshake and bytes to show. The lab owns
//! the namespaces and processes and tears everything down when dropped, also
//! when a test panics (printing the agents' logs then).

use crate::lab;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lab::agent::PORT;
use lab::{Lab, ProcId};
use warren::api::client::call;
use warren::api::{Request, Status};
use warren::keys::{NodeKey, PrivateKey};

pub const BIN: &str = env!("CARGO_BIN_EXE_warren");
const READY_WITHIN: Duration = Duration::from_secs(20);

/// One agent on a lab host.
pub struct Agent {
    pub host: lab::Node,
    pub ifname: String,
    pub key: PrivateKey,
    pub overlay: &'static str,
    pub config: PathBuf,
    pub socket: PathBuf,
    proc: Option<ProcId>,
}

impl Agent {
    pub fn public(&self) -> NodeKey {
        self.key.public()
    }

    pub fn status(&self) -> Status {
        call(&self.socket, &Request::Status).unwrap()
    }
}

/// Two connected agents in their own lab. Dropping it removes everything.
pub struct Pair {
    pub a: Agent,
    pub b: Agent,
    pub lab: Lab,
}

impl Pair {
    /// Builds the lab, writes the configs and starts both agents; `None`
    /// when the lab cannot run here (see [`Lab::new_or_skip`]).
    pub fn start_or_skip() -> Option<Pair> {
        let lab = Lab::new_or_skip()?;
        // World-traversable, so that `nobody` meets the socket's own mode.
        std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let agent = |name: &str, overlay| Agent {
            host: lab.public(name),
            ifname: lab.ifname(),
            key: PrivateKey::generate(),
            overlay,
            config: lab.dir().join(format!("{name}.toml")),
            socket: lab.dir().join(format!("run-{name}/warren.sock")),
            proc: None,
        };
        let a = agent("a", "100.64.0.1");
        let b = agent("b", "100.64.0.2");
        let mut pair = Pair { a, b, lab };
        pair.write_config(Side::A, "");
        pair.write_config(Side::B, "");
        for side in [Side::A, Side::B] {
            let (lab, me) = pair.side(side);
            let config = me.config.to_str().unwrap().to_owned();
            let name = format!("warren-{}", me.host.name);
            me.proc = Some(lab.spawn(&me.host, &name, &[BIN, "agent", "--config", &config]));
        }
        pair.wait_ready(Side::A);
        pair.wait_ready(Side::B);
        Some(pair)
    }

    fn side(&mut self, side: Side) -> (&Lab, &mut Agent) {
        match side {
            Side::A => (&self.lab, &mut self.a),
            Side::B => (&self.lab, &mut self.b),
        }
    }

    fn agent(&self, side: Side) -> &Agent {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn wait_ready(&self, side: Side) {
        let me = self.agent(side);
        let proc = me.proc.unwrap();
        let deadline = Instant::now() + READY_WITHIN;
        while call::<Status>(&me.socket, &Request::Status).is_err() {
            if let Some(st) = self.lab.exit_status(proc) {
                panic!(
                    "agent {} exited ({st}):\n{}",
                    me.host.name,
                    self.lab.log(proc)
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {} not ready within {READY_WITHIN:?}:\n{}",
                me.host.name,
                self.lab.log(proc)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `side`'s config: the other host as a peer, plus `extra` TOML.
    pub fn write_config(&self, side: Side, extra: &str) {
        let (me, other) = match side {
            Side::A => (&self.a, &self.b),
            Side::B => (&self.b, &self.a),
        };
        let text = format!(
            "[interface]\nname = \"{}\"\nprivate_key = \"{}\"\naddresses = [\"{}/10\"]\n\n\
             [agent]\nsocket = \"{}\"\n\n\
             [[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"{}/32\"]\nendpoint = \"{}:{PORT}\"\n{extra}",
            me.ifname,
            me.key.to_base64(),
            me.overlay,
            me.socket.display(),
            other.public(),
            other.overlay,
            other.host.ip,
        );
        std::fs::write(&me.config, text).unwrap();
        std::fs::set_permissions(&me.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Pings B's overlay address from A until it answers (bounded), so the
    /// tunnel has a handshake and bytes.
    pub fn ping_through(&self) {
        assert!(
            self.lab
                .ping_within(&self.a.host, self.b.overlay, Duration::from_secs(15)),
            "no ping through the tunnel:\n--- a ---\n{}\n--- b ---\n{}",
            self.log(Side::A),
            self.log(Side::B)
        );
    }

    /// Runs the CLI (in the root namespace: the socket is a file) with
    /// `args`, against A's socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(BIN)
            .arg("--socket")
            .arg(&self.a.socket)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn pid(&self, side: Side) -> i32 {
        self.lab.pid(self.agent(side).proc.unwrap())
    }

    pub fn log(&self, side: Side) -> String {
        self.lab.log(self.agent(side).proc.unwrap())
    }

    /// The other host's public endpoint, as configured on this side.
    pub fn underlay(&self, side: Side) -> String {
        format!("{}:{PORT}", self.agent(side).host.ip)
    }
}

#[derive(Clone, Copy)]
pub enum Side {
    A,
    B,
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// True when `path` is a socket file.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
