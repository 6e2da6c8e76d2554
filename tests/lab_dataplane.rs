//! Foundation lab tests against the real `warren` binary: two agents through
//! NAT (one learns the other's endpoint by roaming), a 50 MB TCP transfer
//! over the tunnel, interop with stock wireguard-go in both directions,
//! bad configs that must fail cleanly, and a clean stop on SIGTERM/SIGINT.

mod lab;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use lab::wg::{wg_keypair, KeyPair, WgGo};
use lab::{Lab, Nat, Node, ProcId, Proto};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");
const PORT: u16 = 51820;
/// How long an agent may take from spawn to its TUN device existing.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a first handshake through the lab may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// A key pair made by `warren genkey` / `warren pubkey`.
fn warren_keypair(lab: &Lab, node: &Node) -> KeyPair {
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
        lab::EXEC_TIMEOUT,
    );
    let public = out.expect_ok("warren pubkey").stdout.trim().to_owned();
    KeyPair { private, public }
}

/// One `[[peer]]` section.
struct PeerCfg<'a> {
    public_key: &'a str,
    allowed_ips: &'a str,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
}

fn agent_config(ifname: &str, private_key: &str, cidr: &str, peers: &[PeerCfg<'_>]) -> String {
    let mut s = format!(
        "[interface]\nname = \"{ifname}\"\nprivate_key = \"{private_key}\"\nlisten_port = {PORT}\naddresses = [\"{cidr}\"]\n"
    );
    for p in peers {
        s += &format!(
            "\n[[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"{}\"]\n",
            p.public_key, p.allowed_ips
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

/// A warren agent running in a lab node.
struct Agent {
    node: Node,
    ifname: String,
    proc: ProcId,
}

impl Agent {
    /// Writes `config`, starts `warren agent` and waits for its TUN device.
    fn start(lab: &Lab, node: &Node, ifname: &str, config: &str) -> Agent {
        let path = lab.write_file(&format!("{}.toml", node.name), config);
        let path = path.to_string_lossy();
        let proc = lab.spawn(
            node,
            &format!("warren-{}", node.name),
            &[WARREN, "agent", "--config", &path],
        );
        let up = lab::poll_until(START_TIMEOUT, Duration::from_millis(50), || {
            lab.exit_status(proc).is_some() || lab.has_link(node, ifname)
        });
        if let Some(status) = lab.exit_status(proc) {
            panic!(
                "warren agent in {} exited at start ({}):\n{}",
                node.name,
                lab::describe(&status),
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
        }
    }
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Sends `len` random bytes over TCP from `from` to `to_ip:port` (a
/// listener in `to`), returning the SHA-256 each side computed.
fn tcp_transfer(
    lab: &Lab,
    from: &Node,
    to: &Node,
    to_ip: Ipv4Addr,
    port: u16,
    len: usize,
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
        let mut conn =
            TcpStream::connect_timeout(&sock(to_ip, port), IO).expect("connect over tunnel");
        conn.set_write_timeout(Some(IO)).expect("write timeout");
        let mut urandom = std::fs::File::open("/dev/urandom").expect("urandom");
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1024 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            urandom.read_exact(&mut buf[..n]).expect("read urandom");
            hash.update(&buf[..n]);
            conn.write_all(&buf[..n]).expect("sender write");
            left -= n;
        }
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        <[u8; 32]>::from(hash.finalize())
    });
    let sent = sender.join().expect("sender thread");
    let received = receiver.join().expect("receiver thread");
    (sent, received)
}

#[test]
fn two_agents_through_nat_ping_and_transfer() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let g1 = lab.gateway("g1", Nat::Eim);
    let h1 = lab.host_behind(&g1, "h1");
    let g2 = lab.gateway("g2", Nat::Eim);
    let h2 = lab.host_behind(&g2, "h2");
    lab.forward(&g2, Proto::Udp, PORT, &h2, PORT);
    let (k1, k2) = (warren_keypair(&lab, &h1), warren_keypair(&lab, &h2));
    let peer2 = PeerCfg {
        public_key: &k2.public,
        allowed_ips: "100.64.0.2/32",
        endpoint: Some(sock(g2.ip, PORT)),
        keepalive: Some(5),
    };
    let peer1 = PeerCfg {
        public_key: &k1.public,
        allowed_ips: "100.64.0.1/32",
        endpoint: None,
        keepalive: None,
    };
    let a = Agent::start(
        &lab,
        &h1,
        "warren0",
        &agent_config("warren0", &k1.private, "100.64.0.1/24", &[peer2]),
    );
    let b = Agent::start(
        &lab,
        &h2,
        "warren0",
        &agent_config("warren0", &k2.private, "100.64.0.2/24", &[peer1]),
    );

    assert!(
        lab.ping_within(&h1, "100.64.0.2", HANDSHAKE_TIMEOUT),
        "h1 -> h2 over warren"
    );
    // h2 knew no endpoint: it answers because it learned h1's from the
    // authenticated packets (roaming).
    assert!(
        lab.ping_within(&h2, "100.64.0.1", Duration::from_secs(5)),
        "h2 -> h1 over warren"
    );

    let len = 50 * 1024 * 1024;
    let start = Instant::now();
    let (sent, received) = tcp_transfer(&lab, &h1, &h2, Ipv4Addr::new(100, 64, 0, 2), 5001, len);
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "50 MB over warren in {secs:.1} s ({:.0} Mbit/s)",
        len as f64 * 8.0 / secs / 1e6
    );
    assert_eq!(sent, received, "sha256 of the 50 MB sent and received");
    assert!(
        lab.exit_status(a.proc).is_none() && lab.exit_status(b.proc).is_none(),
        "agents still running"
    );
}

/// warren behind an EIM NAT and wireguard-go on a public host; `warren_initiates`
/// chooses which side knows the other's endpoint (the other one roams).
fn interop(warren_initiates: bool) {
    let lab = Lab::new();
    let gw = lab.gateway("gw", Nat::Eim);
    let wh = lab.host_behind(&gw, "warren");
    let pub_host = lab.public("wggo");
    // When wireguard-go initiates, it needs a way in to warren: a forward.
    lab.forward(&gw, Proto::Udp, PORT, &wh, PORT);
    let kw = warren_keypair(&lab, &wh);
    let kg = wg_keypair();
    let wg = WgGo::start(&lab, &pub_host, &kg, PORT, "100.64.0.2/24");
    let (endpoint, keepalive) = if warren_initiates {
        (Some(sock(pub_host.ip, PORT)), Some(5))
    } else {
        (None, None)
    };
    let peer = PeerCfg {
        public_key: &kg.public,
        allowed_ips: "100.64.0.2/32",
        endpoint,
        keepalive,
    };
    let _agent = Agent::start(
        &lab,
        &wh,
        "warren0",
        &agent_config("warren0", &kw.private, "100.64.0.1/24", &[peer]),
    );
    if warren_initiates {
        wg.add_peer(&lab, &kw.public, "100.64.0.1/32", None, None);
        assert!(
            lab.ping_within(&wh, "100.64.0.2", HANDSHAKE_TIMEOUT),
            "warren -> wireguard-go"
        );
        assert!(
            lab.ping_within(&pub_host, "100.64.0.1", Duration::from_secs(5)),
            "wireguard-go -> warren"
        );
    } else {
        wg.add_peer(
            &lab,
            &kw.public,
            "100.64.0.1/32",
            Some(sock(gw.ip, PORT)),
            Some(5),
        );
        assert!(
            lab.ping_within(&pub_host, "100.64.0.1", HANDSHAKE_TIMEOUT),
            "wireguard-go -> warren"
        );
        assert!(
            lab.ping_within(&wh, "100.64.0.2", Duration::from_secs(5)),
            "warren -> wireguard-go"
        );
    }
    assert!(
        wg.latest_handshake(&lab, &kw.public).is_some(),
        "wg show latest-handshakes"
    );
}

#[test]
fn interop_warren_initiates_to_wireguard_go() {
    if lab::require_root() {
        interop(true);
    }
}

#[test]
fn interop_wireguard_go_initiates_to_warren() {
    if lab::require_root() {
        interop(false);
    }
}

#[test]
fn keys_match_wg_format() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let n = lab.public("n");
    let k = warren_keypair(&lab, &n);
    let wg_pub = lab.exec_with(
        &n,
        &["wg", "pubkey"],
        Some(k.private.as_bytes()),
        lab::EXEC_TIMEOUT,
    );
    assert_eq!(
        wg_pub.expect_ok("wg pubkey").stdout.trim(),
        k.public,
        "wg derives the same public key"
    );
    let wg = wg_keypair();
    let ours = lab.exec_with(
        &n,
        &[WARREN, "pubkey"],
        Some(wg.private.as_bytes()),
        lab::EXEC_TIMEOUT,
    );
    assert_eq!(
        ours.expect_ok("warren pubkey").stdout.trim(),
        wg.public,
        "warren reads wg keys"
    );
    let bad = lab.exec_with(
        &n,
        &[WARREN, "pubkey"],
        Some(b"not a key"),
        lab::EXEC_TIMEOUT,
    );
    assert!(!bad.ok(), "garbage on stdin must fail");
    assert!(
        bad.stderr.contains("key"),
        "message says what is wrong: {}",
        bad.stderr
    );
}

/// Runs `warren agent` on `config` (written to `file` in the lab dir) and
/// checks it fails without creating a device. With `names_config`, stderr
/// must also name the config file. Returns stderr.
fn agent_must_fail(lab: &Lab, node: &Node, file: &str, config: &str, names_config: bool) -> String {
    let path = lab.write_file(file, config);
    let path_s = path.to_string_lossy();
    let out = lab.exec_with(
        node,
        &[WARREN, "agent", "--config", &path_s],
        None,
        Duration::from_secs(20),
    );
    assert!(
        !out.timed_out,
        "warren agent kept running on a bad config:\n{}",
        out.stderr
    );
    assert!(!out.status.success(), "bad config must exit non-zero");
    assert!(
        !names_config || out.stderr.contains(path_s.as_ref()),
        "stderr names the file: {}",
        out.stderr
    );
    let links = lab.links(node);
    assert_eq!(
        links,
        ["lo", "wan"],
        "no device left behind after: {}",
        out.stderr
    );
    out.stderr
}

#[test]
fn bad_config_fails_cleanly() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let n = lab.public("n");
    let k = wg_keypair();
    let good = agent_config("warren0", &k.private, "100.64.0.1/24", &[]);

    // Line 4 is listen_port.
    let bad_port = good.replace(&format!("listen_port = {PORT}"), "listen_port = \"many\"");
    assert_eq!(bad_port.lines().nth(3), Some("listen_port = \"many\""));
    let err = agent_must_fail(&lab, &n, "bad-port.toml", &bad_port, true);
    assert!(
        err.contains(":4:") && err.contains("listen_port"),
        "names line 4 and the key: {err}"
    );

    let err = agent_must_fail(&lab, &n, "syntax.toml", &format!("{good}[[peer]\n"), true);
    assert!(
        err.contains(":6:"),
        "names the line of a syntax error: {err}"
    );

    let bad_key = good.replace(&k.private, "bm90IGEga2V5");
    let err = agent_must_fail(&lab, &n, "bad-key.toml", &bad_key, true);
    assert!(
        err.contains(":3:") && err.contains("private_key"),
        "names the key: {err}"
    );

    let peer = PeerCfg {
        public_key: "AAAA",
        allowed_ips: "100.64.0.2/32",
        endpoint: None,
        keepalive: None,
    };
    let bad_peer = agent_config("warren0", &k.private, "100.64.0.1/24", &[peer]);
    let err = agent_must_fail(&lab, &n, "bad-peer.toml", &bad_peer, true);
    assert!(err.contains("public_key"), "names the peer key: {err}");

    let unknown = good
        .replace("mtu", "mtuu")
        .replace("[interface]\n", "[interface]\nmtuu = 1400\n");
    let err = agent_must_fail(&lab, &n, "unknown.toml", &unknown, true);
    assert!(err.contains("mtuu"), "names an unknown key: {err}");

    let no_key_file = good.replace(
        &format!("private_key = \"{}\"", k.private),
        "private_key_file = \"/nonexistent/warren.key\"",
    );
    let err = agent_must_fail(&lab, &n, "no-key-file.toml", &no_key_file, false);
    assert!(
        err.contains("/nonexistent/warren.key"),
        "names the key file: {err}"
    );

    let missing = lab.dir().join("missing.toml");
    let missing = missing.to_string_lossy();
    let out = lab.exec(&n, &[WARREN, "agent", "--config", &missing]);
    assert!(
        !out.ok() && out.stderr.contains(missing.as_ref()),
        "missing file is named: {}",
        out.stderr
    );
}

/// Starts an agent, sends `sig`, and expects exit code 0 with the TUN gone.
fn stops_cleanly_on(sig: i32) {
    let lab = Lab::new();
    let n = lab.public("n");
    let k = warren_keypair(&lab, &n);
    let ifname = lab.ifname();
    let agent = Agent::start(
        &lab,
        &n,
        &ifname,
        &agent_config(&ifname, &k.private, "100.64.0.1/24", &[]),
    );
    let up = lab
        .exec(&n, &["ip", "-o", "addr", "show", "dev", &ifname])
        .expect_ok("ip addr show");
    assert!(
        up.stdout.contains("100.64.0.1/24"),
        "overlay address configured: {}",
        up.stdout
    );
    lab.signal(agent.proc, sig);
    let status = lab.wait_exit(agent.proc, Duration::from_secs(10));
    let log = lab.log(agent.proc);
    let status =
        status.unwrap_or_else(|| panic!("agent still running 10 s after signal {sig}:\n{log}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {sig} ({}):\n{log}",
        lab::describe(&status)
    );
    assert!(
        !lab.has_link(&agent.node, &agent.ifname),
        "TUN {} removed",
        agent.ifname
    );
}

#[test]
fn sigterm_stops_cleanly() {
    if lab::require_root() {
        stops_cleanly_on(libc::SIGTERM);
    }
}

#[test]
fn sigint_stops_cleanly() {
    if lab::require_root() {
        stops_cleanly_on(libc::SIGINT);
    }
}
