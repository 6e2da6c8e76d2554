//! Self-test of the NAT lab: proves with real traffic that each gateway kind
//! behaves as its name says, that port forwards and double NAT work, that
//! stock WireGuard crosses the lab, and that teardown leaves nothing behind.
//! If these fail, the data-plane lab tests' results mean nothing.

use crate::lab;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lab::wg::{wg_keypair, WgGo};
use lab::{Lab, Nat, Node, Proto};

const OBSERVER_PORT: u16 = 3478;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts a UDP "what is my address" server in `node`: each datagram is
/// answered with the source address it came from, like a STUN binding.
/// Returns once the socket is bound; the thread ends after `answers`
/// datagrams or 20 s.
fn observer(lab: &Lab, node: &Node, port: u16, answers: usize) {
    let (tx, rx) = mpsc::channel();
    lab.thread_in(node, move || {
        let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind observer");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("set timeout");
        tx.send(()).expect("report bound");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 64];
        let mut answered = 0;
        while answered < answers && Instant::now() < deadline {
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                sock.send_to(from.to_string().as_bytes(), from)
                    .expect("answer");
                answered += 1;
            }
        }
    });
    rx.recv_timeout(IO_TIMEOUT).expect("observer bound");
}

/// From `node`, one UDP socket bound to `port` asks each server for the
/// address it sees. Returns the answers in order (None = no answer).
fn observed_from(
    lab: &Lab,
    node: &Node,
    port: u16,
    servers: Vec<SocketAddr>,
) -> Vec<Option<SocketAddr>> {
    lab.thread_in(node, move || {
        let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind client");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("set timeout");
        servers
            .iter()
            .map(|s| {
                sock.send_to(b"who am i", s).expect("send");
                let mut buf = [0u8; 64];
                let (n, _) = sock.recv_from(&mut buf).ok()?;
                std::str::from_utf8(&buf[..n]).ok()?.parse().ok()
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// Public ports the gateway's conntrack table gives to UDP flows from
/// `client` port `sport` (the destination port of each reply tuple).
fn conntrack_ports(lab: &Lab, gw: &Node, client: Ipv4Addr, sport: u16) -> Vec<u16> {
    let out = lab
        .exec(gw, &["conntrack", "-L", "-p", "udp"])
        .expect_ok("conntrack -L");
    let src = format!("src={client}");
    let sp = format!("sport={sport}");
    out.stdout
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.contains(&src.as_str())
                && f.iter().position(|x| *x == sp) < f.iter().rposition(|x| x.starts_with("src="))
        })
        .filter_map(|l| {
            // The original tuple comes first, the reply tuple second: the
            // reply's dport is the public port the NAT chose.
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .nth(1)?
                .parse()
                .ok()
        })
        .collect()
}

fn server_addrs(servers: &[&Node]) -> Vec<SocketAddr> {
    servers
        .iter()
        .map(|s| SocketAddr::V4(SocketAddrV4::new(s.ip, OBSERVER_PORT)))
        .collect()
}

#[test]
fn eim_keeps_one_mapping_and_edm_does_not() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s1 = lab.public("s1");
    let s2 = lab.public("s2");
    let g_eim = lab.gateway("geim", Nat::Eim);
    let h_eim = lab.host_behind(&g_eim, "heim");
    let g_edm = lab.gateway("gedm", Nat::Edm);
    let h_edm = lab.host_behind(&g_edm, "hedm");
    observer(&lab, &s1, OBSERVER_PORT, 2);
    observer(&lab, &s2, OBSERVER_PORT, 2);
    let servers = server_addrs(&[&s1, &s2]);

    let eim = observed_from(&lab, &h_eim, 40000, servers.clone());
    let expect = Some(SocketAddr::V4(SocketAddrV4::new(g_eim.ip, 40000)));
    assert_eq!(
        eim,
        vec![expect, expect],
        "EIM: same port-preserved mapping for both servers"
    );
    let ports = conntrack_ports(&lab, &g_eim, h_eim.ip, 40000);
    assert_eq!(ports, vec![40000, 40000], "EIM conntrack reply ports");

    let edm = observed_from(&lab, &h_edm, 40000, servers);
    let (a, b) = (edm[0].expect("EDM answer 1"), edm[1].expect("EDM answer 2"));
    assert_eq!(a.ip(), b.ip());
    assert_eq!(
        a.ip(),
        std::net::IpAddr::V4(g_edm.ip),
        "EDM: translated to the gateway's WAN"
    );
    assert_ne!(
        a.port(),
        b.port(),
        "EDM: a different mapping per destination"
    );
    let mut ports = conntrack_ports(&lab, &g_edm, h_edm.ip, 40000);
    ports.sort_unstable();
    let mut seen = vec![a.port(), b.port()];
    seen.sort_unstable();
    assert_eq!(
        ports, seen,
        "EDM conntrack agrees with what the servers saw"
    );
}

#[test]
fn port_forward_reaches_host_and_lan_is_private() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s = lab.public("s");
    let gw = lab.gateway("gw", Nat::Eim);
    let h = lab.host_behind(&gw, "h");
    lab.forward(&gw, Proto::Udp, 5000, &h, 6000);
    observer(&lab, &h, 6000, 1);
    let seen = observed_from(
        &lab,
        &s,
        7000,
        vec![SocketAddr::V4(SocketAddrV4::new(gw.ip, 5000))],
    );
    // The host sees the real public source: DNAT does not masquerade.
    assert_eq!(
        seen,
        vec![Some(SocketAddr::V4(SocketAddrV4::new(s.ip, 7000)))]
    );
    assert!(
        lab.ping(&h, s.ip),
        "host behind NAT reaches the public host"
    );
    assert!(
        !lab.ping(&s, h.ip),
        "a LAN address is not reachable from the internet"
    );
}

#[test]
fn double_nat_and_routed_lan() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s = lab.public("s");
    let outer = lab.gateway("outer", Nat::Eim);
    let inner = lab.gateway_behind(&outer, "inner", Nat::Eim);
    let h = lab.host_behind(&inner, "h");
    let router = lab.gateway("router", Nat::None);
    let p = lab.host_behind(&router, "p");
    observer(&lab, &s, OBSERVER_PORT, 2);
    let seen = observed_from(&lab, &h, 41000, server_addrs(&[&s]));
    assert_eq!(
        seen,
        vec![Some(SocketAddr::V4(SocketAddrV4::new(outer.ip, 41000)))]
    );
    assert_eq!(p.ip.octets()[..2], [11, 11], "routed LAN is public");
    let seen = observed_from(&lab, &p, 41000, server_addrs(&[&s]));
    assert_eq!(
        seen,
        vec![Some(SocketAddr::V4(SocketAddrV4::new(p.ip, 41000)))]
    );
    assert!(
        lab.ping(&s, p.ip),
        "a host behind a plain router is reachable"
    );
    // No route out of the lab: the internet namespace knows only lab subnets.
    let out = lab.exec(&lab_internet(&lab), &["ip", "route", "get", "8.8.8.8"]);
    assert!(
        !out.ok(),
        "internet namespace must have no route out: {}",
        out.stdout
    );
}

fn lab_internet(lab: &Lab) -> Node {
    let ns = lab.namespaces()[0].clone();
    Node {
        name: "inet".into(),
        ns,
        ip: lab::INTERNET_ROUTER,
        lan: None,
    }
}

#[test]
fn udp_blocked_allows_only_tcp_443() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s = lab.public("s");
    let gw = lab.gateway("gw", Nat::UdpBlocked);
    let h = lab.host_behind(&gw, "h");
    observer(&lab, &s, OBSERVER_PORT, 1);
    assert_eq!(
        observed_from(&lab, &h, 42000, server_addrs(&[&s])),
        vec![None],
        "UDP must be blocked"
    );
    let (tx, rx) = mpsc::channel();
    lab.thread_in(&s, move || {
        let l443 = TcpListener::bind(("0.0.0.0", 443)).unwrap();
        let l80 = TcpListener::bind(("0.0.0.0", 80)).unwrap();
        tx.send(()).unwrap();
        let _ = l443.accept();
        drop(l80);
    });
    rx.recv_timeout(IO_TIMEOUT).unwrap();
    let sip = s.ip;
    let (ok443, ok80) = lab
        .thread_in(&h, move || {
            let t = Duration::from_secs(2);
            let ok80 =
                TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(sip, 80)), t).is_ok();
            let ok443 =
                TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(sip, 443)), t).is_ok();
            (ok443, ok80)
        })
        .join()
        .unwrap();
    assert!(ok443, "TCP 443 must pass");
    assert!(!ok80, "TCP 80 must be blocked");
}

#[test]
fn wireguard_go_peers_ping_through_nat() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let g1 = lab.gateway("g1", Nat::Eim);
    let h1 = lab.host_behind(&g1, "h1");
    let g2 = lab.gateway("g2", Nat::Edm);
    let h2 = lab.host_behind(&g2, "h2");
    lab.forward(&g1, Proto::Udp, 51820, &h1, 51820);
    let (k1, k2) = (wg_keypair(), wg_keypair());
    let w1 = WgGo::start(&lab, &h1, &k1, 51820, "100.64.0.1/24");
    let w2 = WgGo::start(&lab, &h2, &k2, 51820, "100.64.0.2/24");
    w1.add_peer(&lab, &k2.public, "100.64.0.2/32", None, None);
    let public1 = SocketAddr::V4(SocketAddrV4::new(g1.ip, 51820));
    w2.add_peer(&lab, &k1.public, "100.64.0.1/32", Some(public1), Some(1));
    assert!(
        lab.ping_within(&h2, "100.64.0.1", Duration::from_secs(15)),
        "h2 -> h1 over wireguard-go"
    );
    assert!(
        lab.ping_within(&h1, "100.64.0.2", Duration::from_secs(5)),
        "h1 -> h2 over wireguard-go"
    );
    assert!(w1.latest_handshake(&lab, &k2.public).is_some());
    // h1 learned h2's endpoint by roaming: the EDM gateway's address.
    let learned = w1.endpoint(&lab, &k2.public).expect("roamed endpoint");
    assert_eq!(learned.ip(), std::net::IpAddr::V4(g2.ip));
}

#[test]
fn teardown_removes_everything() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let gw = lab.gateway("gw", Nat::Edm);
    let h = lab.host_behind(&gw, "h");
    let sleeper = lab.spawn(&h, "sleeper", &["sleep", "600"]);
    let out = lab.exec(&h, &["sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str(), out.status.code()),
        ("hello\n", "oops\n", Some(3))
    );
    assert!(lab.exit_status(sleeper).is_none(), "sleeper runs");
    let pid = lab.pid(sleeper);
    let names = lab.namespaces();
    let dir = lab.dir().to_owned();
    assert_eq!(names.len(), 3);
    drop(lab);
    let left: Vec<String> = lab::netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!dir.exists(), "lab dir removed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "spawned process killed"
    );
}

#[test]
fn edm_sequential_hands_out_consecutive_ports() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let servers: Vec<Node> = (1..=3).map(|i| lab.public(&format!("s{i}"))).collect();
    let gw = lab.gateway("gw", Nat::EdmSequential);
    let h = lab.host_behind(&gw, "h");
    for s in &servers {
        observer(&lab, s, OBSERVER_PORT, 1);
    }
    let seen = observed_from(
        &lab,
        &h,
        43000,
        server_addrs(&servers.iter().collect::<Vec<_>>()),
    );
    let ports: Vec<u16> = seen
        .iter()
        .map(|a| {
            let a = a.expect("answer");
            assert_eq!(a.ip(), std::net::IpAddr::V4(gw.ip));
            a.port()
        })
        .collect();
    // A fresh gateway's counter starts at SEQ_BASE: one port per destination.
    let base = lab::nat::SEQ_BASE;
    assert_eq!(
        ports,
        vec![base, base + 1, base + 2],
        "sequential EDM ports"
    );
}

#[test]
fn upnp_gateway_maps_a_port_with_natpmp() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let s = lab.public("s");
    let gw = lab.gateway("gw", Nat::Upnp);
    let h = lab.host_behind(&gw, "h");
    let router = gw.lan.as_ref().expect("gateway").router;
    let (tx, rx) = mpsc::channel();
    let host = lab.thread_in(&h, move || {
        let sock = UdpSocket::bind("0.0.0.0:44000").expect("bind");
        let mapped =
            lab::upnp::natpmp_map(router, Proto::Udp, &sock, 45000, 120).expect("NAT-PMP exchange");
        tx.send(mapped).expect("report mapping");
        // Prove the mapping carries traffic: answer one datagram from outside.
        sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 64];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("datagram through the mapping");
        sock.send_to(&buf[..n], from).expect("reply");
    });
    let mapped = rx.recv_timeout(IO_TIMEOUT).expect("mapping result");
    let lab::upnp::NatPmp::Mapped { external, lifetime } = mapped else {
        panic!("NAT-PMP refused: {mapped:?}");
    };
    assert_eq!(
        *external.ip(),
        gw.ip,
        "external address is the gateway's WAN"
    );
    assert!(lifetime > 0 && lifetime <= 120);
    let sip = s.ip;
    let echoed = lab
        .thread_in(&s, move || {
            let sock = UdpSocket::bind((sip, 0)).expect("bind");
            sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            sock.send_to(b"through upnp", external).expect("send");
            let mut buf = [0u8; 64];
            let n = sock.recv(&mut buf).expect("echo");
            buf[..n].to_vec()
        })
        .join()
        .expect("public thread");
    assert_eq!(echoed, b"through upnp");
    host.join().expect("host thread");
}

#[test]
fn stale_namespaces_of_dead_runs_are_reaped() {
    if !lab::can_run() {
        return;
    }
    // A pid that just died stands for a test run killed before its Drop.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait true");
    let stale = format!("{}-{dead}-0-gw", lab::netns::PREFIX);
    lab::netns::create(&stale);
    let lab = Lab::new();
    let left = lab::netns::list();
    assert!(
        !left.contains(&stale),
        "stale namespace {stale} still there"
    );
    // Our own live lab is never reaped by a second one.
    let mine = lab.namespaces();
    let _other = Lab::new();
    let now = lab::netns::list();
    assert!(
        mine.iter().all(|n| now.contains(n)),
        "a live lab's namespaces were reaped"
    );
}
