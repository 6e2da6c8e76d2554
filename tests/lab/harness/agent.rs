//! The `warren` binary in the lab: keys, config files, starting agents and
//! checking traffic through their tunnels.
//!
//! Config files are written as TOML text rather than by serializing the
//! agent's own `Config` type: the tests must catch a change in the file
//! format the agent accepts, so they use the format as documented, not
//! whatever the code currently derives.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::wg::KeyPair;
use super::{Lab, Node, ProcId};

/// The binary under test, built by cargo for integration tests.
pub const WARREN: &str = env!("CARGO_BIN_EXE_warren");
/// The UDP port agents listen on in the lab.
pub const PORT: u16 = 51820;
/// How long an agent may take from spawn to its TUN device existing.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a first handshake through the lab may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// A key pair made by `warren genkey` / `warren pubkey` in `node`.
pub fn warren_keypair(lab: &Lab, node: &Node) -> KeyPair {
    let private = lab
        .exec(node, &[WARREN, "genkey"])
        .expect_ok("warren genkey")
        .stdout
        .trim()
        .to_owned();
    let out = lab.exec_with(
        node,
        &[WARREN, "pubkey"],
        Some(private.as_bytes()),
        super::EXEC_TIMEOUT,
    );
    let public = out.expect_ok("warren pubkey").stdout.trim().to_owned();
    KeyPair { private, public }
}

/// One `[[peer]]` section.
#[derive(Clone, Debug)]
pub struct PeerCfg {
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
}

impl PeerCfg {
    pub fn new(public_key: &str, allowed_ips: &[&str]) -> Self {
        PeerCfg {
            public_key: public_key.into(),
            allowed_ips: allowed_ips.iter().map(|s| s.to_string()).collect(),
            endpoint: None,
            keepalive: None,
        }
    }

    pub fn endpoint(mut self, e: SocketAddr) -> Self {
        self.endpoint = Some(e);
        self
    }

    pub fn keepalive(mut self, secs: u16) -> Self {
        self.keepalive = Some(secs);
        self
    }
}

/// An agent config file.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub ifname: String,
    pub private_key: String,
    pub listen_port: u16,
    pub addresses: Vec<String>,
    /// None leaves the key out (the agent's default applies).
    pub offload: Option<bool>,
    pub peers: Vec<PeerCfg>,
    /// `[agent] state_dir`; `None` leaves the section out.
    pub state_dir: Option<String>,
    /// `[agent] portmap` (written only with `state_dir`).
    pub portmap: bool,
    /// `[agent] portmap_protocols` (written only with `state_dir`); `None`
    /// leaves the key out (all protocols).
    pub portmap_protocols: Option<Vec<String>>,
    /// Further `[agent]` lines (`key = value`), written only with
    /// `state_dir`: `relay_transport`, `relay_idle_timeout`.
    pub agent_extra: Vec<String>,
    /// `[agent] insecure_http` (written only with `state_dir`): the lab's
    /// coordinators and relays speak plain HTTP on the lab's "internet".
    pub insecure_http: bool,
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl AgentConfig {
    /// Interface `warren0` on [`PORT`] with the given overlay addresses.
    pub fn new(private_key: &str, addresses: &[&str]) -> Self {
        AgentConfig {
            ifname: "warren0".into(),
            private_key: private_key.into(),
            listen_port: PORT,
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            offload: None,
            peers: Vec::new(),
            state_dir: None,
            portmap: false,
            portmap_protocols: None,
            agent_extra: Vec::new(),
            insecure_http: true,
        }
    }

    /// A node that learns everything from a coordinator: no key (generated
    /// in its own state directory), no addresses, no peers.
    pub fn mesh(lab: &super::Lab, node: &Node) -> Self {
        let dir = lab.dir().join(format!("state-{}", node.name));
        AgentConfig {
            private_key: String::new(),
            addresses: Vec::new(),
            state_dir: Some(dir.to_string_lossy().into_owned()),
            ..AgentConfig::new("", &[])
        }
    }

    pub fn peer(mut self, p: PeerCfg) -> Self {
        self.peers.push(p);
        self
    }

    /// The file text. `[interface]` is line 1, then one key per line in
    /// the order: name, private_key, listen_port, addresses, offload.
    pub fn to_toml(&self) -> String {
        let mut s = format!("[interface]\nname = \"{}\"\n", self.ifname);
        if !self.private_key.is_empty() {
            s += &format!("private_key = \"{}\"\n", self.private_key);
        }
        s += &format!(
            "listen_port = {}\naddresses = {}\n",
            self.listen_port,
            toml_list(&self.addresses)
        );
        if let Some(o) = self.offload {
            s += &format!("offload = {o}\n");
        }
        if let Some(dir) = &self.state_dir {
            s += &format!(
                "\n[agent]\nstate_dir = \"{dir}\"\nportmap = {}\ninsecure_http = {}\n",
                self.portmap, self.insecure_http
            );
            if let Some(list) = &self.portmap_protocols {
                s += &format!("portmap_protocols = {}\n", toml_list(list));
            }
            for line in &self.agent_extra {
                s += line;
                s += "\n";
            }
        }
        for p in &self.peers {
            s += &format!(
                "\n[[peer]]\npublic_key = \"{}\"\nallowed_ips = {}\n",
                p.public_key,
                toml_list(&p.allowed_ips)
            );
            if let Some(e) = p.endpoint {
                s += &format!("endpoint = \"{e}\"\n");
            }
            if let Some(k) = p.keepalive {
                s += &format!("persistent_keepalive = {k}\n");
            }
        }
        s
    }
}

/// A warren agent running in a lab node.
pub struct Agent {
    pub node: Node,
    pub ifname: String,
    pub proc: ProcId,
    /// The `warren` binary it runs, and its CLI: the build's, or an
    /// installed one (the package test).
    pub bin: String,
}

impl Agent {
    /// Writes `config`, starts `warren agent` and waits for its TUN device;
    /// panics with the agent's log if it exits instead.
    pub fn start(lab: &Lab, node: &Node, config: &AgentConfig) -> Agent {
        Agent::start_with_env(lab, node, config, &[])
    }

    /// [`Agent::start`] with extra environment variables (`KEY=value`),
    /// such as `HTTPS_PROXY`.
    pub fn start_with_env(lab: &Lab, node: &Node, config: &AgentConfig, env: &[&str]) -> Agent {
        Agent::start_bin(lab, node, config, env, WARREN)
    }

    /// [`Agent::start_with_env`] running the `warren` binary at `bin`.
    pub fn start_bin(
        lab: &Lab,
        node: &Node,
        config: &AgentConfig,
        env: &[&str],
        bin: &str,
    ) -> Agent {
        let path = lab.write_file(&format!("{}.toml", node.name), &config.to_toml());
        let path = path.to_string_lossy();
        let name = format!("warren-{}", node.name);
        // Each agent gets its own API socket: the default path is one per
        // machine, and the lab runs several agents at once.
        let socket = lab.dir().join(format!("{}.sock", node.name));
        let socket = socket.to_string_lossy();
        let mut argv: Vec<&str> = Vec::new();
        if !env.is_empty() {
            argv.push("env");
            argv.extend_from_slice(env);
        }
        argv.extend_from_slice(&[bin, "agent", "--config", &path, "--socket", &socket]);
        let proc = lab.spawn(node, &name, &argv);
        let ifname = config.ifname.as_str();
        let up = super::poll_until(START_TIMEOUT, Duration::from_millis(50), || {
            lab.exit_status(proc).is_some() || lab.has_link(node, ifname)
        });
        if let Some(status) = lab.exit_status(proc) {
            panic!(
                "warren agent in {} exited at start ({}):\n{}",
                node.name,
                super::describe(&status),
                lab.log(proc)
            );
        }
        assert!(
            up,
            "warren agent in {}: no TUN {ifname} after {START_TIMEOUT:?}",
            node.name
        );
        Agent {
            node: node.clone(),
            ifname: ifname.to_owned(),
            proc,
            bin: bin.to_owned(),
        }
    }

    pub fn running(&self, lab: &Lab) -> bool {
        lab.exit_status(self.proc).is_none()
    }

    /// The agent's API socket.
    pub fn socket(&self, lab: &Lab) -> String {
        lab.dir()
            .join(format!("{}.sock", self.node.name))
            .to_string_lossy()
            .into_owned()
    }

    /// Runs `warren --socket <this agent's> ARGS` in the agent's node.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> super::process::Output {
        let socket = self.socket(lab);
        let mut argv = vec![self.bin.as_str(), "--socket", &socket];
        argv.extend_from_slice(args);
        lab.exec(&self.node, &argv)
    }

    /// `warren status --json`, parsed.
    pub fn status(&self, lab: &Lab) -> serde_json::Value {
        let out = self
            .cli(lab, &["status", "--json"])
            .expect_ok("warren status");
        serde_json::from_str(&out.stdout).expect("status is JSON")
    }
}

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Sends `len` random bytes over TCP from a thread in `from` to a listener
/// on `to_ip:port` in `to`, returning the SHA-256 each side computed (the
/// receiver also checks the length). Every socket operation is bounded.
pub fn tcp_transfer(
    lab: &Lab,
    from: &Node,
    to: &Node,
    to_ip: IpAddr,
    port: u16,
    len: usize,
) -> ([u8; 32], [u8; 32]) {
    tcp_transfer_paced(lab, from, to, to_ip, port, len, None)
}

/// [`tcp_transfer`] at no more than `rate` bytes a second when given, so a
/// transfer spans a fault injected while it runs.
pub fn tcp_transfer_paced(
    lab: &Lab,
    from: &Node,
    to: &Node,
    to_ip: IpAddr,
    port: u16,
    len: usize,
    rate: Option<u64>,
) -> ([u8; 32], [u8; 32]) {
    const IO: Duration = Duration::from_secs(30);
    let (tx, rx) = mpsc::channel();
    let receiver = lab.thread_in(to, move || {
        let listener = TcpListener::bind((to_ip, port)).expect("bind receiver");
        tx.send(()).expect("report bound");
        // accept() has no timeout: poll a non-blocking listener instead.
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + IO;
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("receiver: no connection: {e}"),
            }
        };
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(IO)).expect("read timeout");
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = conn.read(&mut buf).expect("receiver read");
            if n == 0 {
                break;
            }
            got += n;
            hash.update(&buf[..n]);
        }
        assert_eq!(got, len, "bytes received");
        <[u8; 32]>::from(hash.finalize())
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("receiver bound");
    let sender = lab.thread_in(from, move || {
        let mut conn = TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), IO)
            .expect("connect over tunnel");
        conn.set_write_timeout(Some(IO)).expect("write timeout");
        let mut urandom = std::fs::File::open("/dev/urandom").expect("urandom");
        let mut hash = Sha256::new();
        let mut buf = vec![
            0u8;
            if rate.is_some() {
                64 * 1024
            } else {
                1024 * 1024
            }
        ];
        let mut left = len;
        let start = Instant::now();
        while left > 0 {
            let n = left.min(buf.len());
            urandom.read_exact(&mut buf[..n]).expect("read urandom");
            hash.update(&buf[..n]);
            conn.write_all(&buf[..n]).expect("sender write");
            left -= n;
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64((len - left) as f64 / rate as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        <[u8; 32]>::from(hash.finalize())
    });
    let sent = sender.join().expect("sender thread");
    let received = receiver.join().expect("receiver thread");
    (sent, received)
}
