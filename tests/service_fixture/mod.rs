//! A real daemon for the CLI tests: two `warren agent` processes in two
//! throwaway network namespaces joined by a veth pair, each with its own
//! temporary API socket.
//!
//! ```text
//!   ns A: warren agent, 100.64.0.1  (veth 10.77.0.1) ── (veth 10.77.0.2)  ns B: 100.64.0.2
//! ```
//!
//! Two namespaces rather than one so that traffic between the overlay
//! addresses really crosses the tunnel (inside one namespace the kernel
//! would deliver it locally) and `status` has a handshake and bytes to show.
//! Nothing is routed outside the namespaces. Everything is torn down in
//! `Drop`, also when a test panics: agents get SIGTERM then SIGKILL, the
//! namespaces are deleted, and on panic the agents' logs are printed.

#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use warren::api::client::call;
use warren::api::{Request, Status};
use warren::keys::{NodeKey, PrivateKey};

pub const BIN: &str = env!("CARGO_BIN_EXE_warren");
const READY_WITHIN: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(3);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether a root-only test can run: prints why not and returns false, but
/// under `CI=true` a test that cannot run fails (the lab's rule).
#[track_caller]
pub fn require_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (network namespaces), and CI=true forbids skipping it");
    }
    eprintln!("skipping: this test needs root (network namespaces)");
    false
}

/// Runs `argv` and panics with its output if it fails.
pub fn must(argv: &[&str]) -> Output {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One agent in its namespace.
pub struct Node {
    pub ns: String,
    pub ifname: String,
    pub key: PrivateKey,
    pub overlay: &'static str,
    pub underlay: &'static str,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn public(&self) -> NodeKey {
        self.key.public()
    }

    /// Runs `ip netns exec NS argv…` to completion.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(argv)
            .output()
            .unwrap()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn status(&self) -> Status {
        call(&self.socket, &Request::Status).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, BIN, "agent", "--config"])
            .arg(&self.config)
            .env("WARREN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if call::<Status>(&self.socket, &Request::Status).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("agent in {} exited ({st}):\n{}", self.ns, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent in {} not ready within {READY_WITHIN:?}:\n{}",
                self.ns,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Two connected agents. Dropping it removes everything.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
}

impl Pair {
    /// Creates the namespaces, writes the configs and starts both agents.
    pub fn start() -> Pair {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("warren-svc-")
            .tempdir()
            .unwrap();
        // World-traversable, so that `nobody` meets the socket's own mode.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let node = |side: &str, overlay, underlay| Node {
            ns: format!("wsvc-{tag}-{side}"),
            ifname: format!("ws{tag}{side}"),
            key: PrivateKey::generate(),
            overlay,
            underlay,
            config: dir.path().join(format!("{side}.toml")),
            socket: dir.path().join(format!("run-{side}/warren.sock")),
            log: dir.path().join(format!("{side}.log")),
            child: None,
        };
        let mut pair = Pair {
            a: node("a", "100.64.0.1", "10.77.0.1"),
            b: node("b", "100.64.0.2", "10.77.0.2"),
            dir,
        };
        // Recorded in `pair` before creation so Drop deletes half-built state.
        for ns in [&pair.a.ns, &pair.b.ns] {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        must(&[
            "ip", "-n", &pair.a.ns, "link", "add", "veth0", "type", "veth", "peer", "name",
            "veth0", "netns", &pair.b.ns,
        ]);
        for n in [&pair.a, &pair.b] {
            let cidr = format!("{}/24", n.underlay);
            must(&["ip", "-n", &n.ns, "addr", "add", &cidr, "dev", "veth0"]);
            must(&["ip", "-n", &n.ns, "link", "set", "veth0", "up"]);
        }
        pair.write_config(Side::A, "");
        pair.write_config(Side::B, "");
        pair.a.start();
        pair.b.start();
        pair.a.wait_ready();
        pair.b.wait_ready();
        pair
    }

    /// Writes `side`'s config: the other node as a peer, plus `extra` TOML.
    pub fn write_config(&self, side: Side, extra: &str) {
        let (me, other) = match side {
            Side::A => (&self.a, &self.b),
            Side::B => (&self.b, &self.a),
        };
        let text = format!(
            "[interface]\nname = \"{}\"\nprivate_key = \"{}\"\naddresses = [\"{}/10\"]\n\n\
             [agent]\nsocket = \"{}\"\n\n\
             [[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"{}/32\"]\nendpoint = \"{}:51820\"\n{extra}",
            me.ifname,
            me.key.to_base64(),
            me.overlay,
            me.socket.display(),
            other.public(),
            other.overlay,
            other.underlay,
        );
        std::fs::write(&me.config, text).unwrap();
        std::fs::set_permissions(&me.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Pings B's overlay address from A until it answers (bounded), so the
    /// tunnel has a handshake and bytes.
    pub fn ping_through(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let out = self
                .a
                .exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", self.b.overlay]);
            if out.status.success() {
                return;
            }
        }
        panic!(
            "no ping through the tunnel:\n--- a ---\n{}\n--- b ---\n{}",
            self.a.log_text(),
            self.b.log_text()
        );
    }

    /// Runs the CLI (in the root namespace: the socket is a file) with
    /// `args`, against A's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.a.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

#[derive(Clone, Copy)]
pub enum Side {
    A,
    B,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.a.stop();
        self.b.stop();
        if std::thread::panicking() {
            eprintln!("--- agent a log ---\n{}", self.a.log_text());
            eprintln!("--- agent b log ---\n{}", self.b.log_text());
        }
        for ns in [&self.a.ns, &self.b.ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// True when `path` is a socket file.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
