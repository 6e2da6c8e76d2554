//! Access policy end to end (issue 16): users alice and bob, a node tagged
//! `tag:server` with listeners on TCP 22 and 80 and UDP 22, and a policy
//! in Tailscale's format that lets `group:dev` (alice) reach
//! `tag:server:22`. Real agents, a real coordinator, the kernel's TCP.

use crate::lab;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lab::agent::Agent;
use lab::coord::Coordinator;
use lab::mesh::{join, overlay_v4, peer_names, wait_peers};
use lab::{poll_until, Lab, Node};

const POLICY: &str = r#"// The lab's policy: alice (group:dev) may use the server's port 22.
{
  "groups": {"group:dev": ["alice@example.com"]},
  "tagOwners": {"tag:server": []},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]},
  ],
  "tests": [
    {"src": "alice@example.com", "accept": ["tag:server:22"], "deny": ["tag:server:80"]},
    {"src": "bob@example.com", "deny": ["tag:server:22"]},
  ],
}
"#;

/// Every rule gone: nobody may reach anybody.
const REVOKED: &str = r#"{"tagOwners": {"tag:server": []}, "acls": []}"#;

const BAD: &str = "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"mallory@example.com\"], \"dst\": [\"*:*\"]}]}\n";

/// How long a policy change may take to reach the agents.
const APPLY: Duration = Duration::from_secs(3);

/// Listeners in the server's namespace: TCP 22 and 80 answer "hi", UDP 22
/// echoes, for the life of the test.
fn serve(lab: &Lab, node: &Node) {
    let (tx, rx) = std::sync::mpsc::channel();
    lab.thread_in(node, move || {
        let tcp: Vec<TcpListener> = [22, 80]
            .iter()
            .map(|p| TcpListener::bind(("0.0.0.0", *p)).unwrap())
            .collect();
        let udp = UdpSocket::bind(("0.0.0.0", 22)).unwrap();
        tx.send(()).unwrap();
        for l in tcp {
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    let _ = s.write_all(b"hi");
                }
            });
        }
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// Whether a TCP connection from `node` to `to` opens and reads "hi".
fn tcp_ok(lab: &Lab, node: &Node, to: SocketAddr) -> bool {
    lab.thread_in(node, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(800)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).is_ok() && &buf == b"hi"
    })
    .join()
    .unwrap()
}

/// Whether a UDP datagram from `node` to `to` is echoed.
fn udp_ok(lab: &Lab, node: &Node, to: SocketAddr) -> bool {
    lab.thread_in(node, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
        let _ = s.send_to(b"ping", to);
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((4, _)))
    })
    .join()
    .unwrap()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn a_policy_allows_what_it_says_and_its_revocation_cuts_at_once() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    for email in ["alice@example.com", "bob@example.com"] {
        coord
            .admin(&lab, &["user", "create", email])
            .expect_ok("user create");
    }
    let (na, nb, ns) = (lab.public("alice"), lab.public("bob"), lab.public("server"));
    let (ta, _) = coord.token(&lab, &["--user", "alice@example.com"]);
    let (tb, _) = coord.token(&lab, &["--user", "bob@example.com"]);
    let (ts, _) = coord.token(&lab, &["--tag", "tag:server"]);
    let alice: Agent = join(&lab, &coord, &ta, &na);
    let bob = join(&lab, &coord, &tb, &nb);
    let server = join(&lab, &coord, &ts, &ns);
    // No policy yet: everyone sees everyone.
    assert!(wait_peers(
        &lab,
        &bob,
        &["alice", "server"],
        Duration::from_secs(20)
    ));
    serve(&lab, &ns);
    let s_ip = overlay_v4(&server.status(&lab));
    let a_ip = overlay_v4(&alice.status(&lab));

    let file = lab.write_file("policy.hujson", POLICY);
    let set = coord.admin(&lab, &["policy", "set", &file.to_string_lossy()]);
    set.expect_ok("policy set");
    let listed = coord.admin(&lab, &["node", "list"]).expect_ok("node list");
    assert!(listed.stdout.contains("tag:server"), "{}", listed.stdout);

    // Maps: bob sees nobody, alice and the server only each other.
    assert!(
        wait_peers(&lab, &bob, &[], APPLY),
        "{:?}",
        peer_names(&bob.status(&lab))
    );
    assert!(wait_peers(&lab, &alice, &["server"], APPLY));
    assert!(wait_peers(&lab, &server, &["alice"], APPLY));

    // alice: TCP and UDP 22 and ping, not TCP 80.
    assert!(poll_until(APPLY, Duration::from_millis(100), || tcp_ok(
        &lab,
        &na,
        addr(&s_ip, 22)
    )));
    assert!(udp_ok(&lab, &na, addr(&s_ip, 22)), "UDP 22 is in the rule");
    assert!(
        lab.ping_within(&na, &s_ip, APPLY),
        "ICMP is a default protocol"
    );
    assert!(
        !tcp_ok(&lab, &na, addr(&s_ip, 80)),
        "port 80 is not allowed"
    );
    // The server answers alice's flows but cannot open one towards her.
    let (tx, rx) = std::sync::mpsc::channel();
    lab.thread_in(&na, move || {
        let l = TcpListener::bind(("0.0.0.0", 2222)).unwrap();
        tx.send(()).unwrap();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"hi");
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        !tcp_ok(&lab, &ns, addr(&a_ip, 2222)),
        "the server may not open flows to alice"
    );
    assert!(!lab.ping(&ns, &a_ip), "nor ping her");
    let drops = server.status(&lab)["drops"]["policy"].as_u64().unwrap_or(0);
    assert!(drops > 0, "the server counts what it dropped by policy");
    // bob reaches nothing: the server is not even in his map.
    assert!(!tcp_ok(&lab, &nb, addr(&s_ip, 22)));
    assert!(!lab.ping(&nb, &s_ip));
    let ping = bob.cli(&lab, &["ping", "server", "-c", "1"]);
    assert!(
        !ping.ok() && ping.stderr.contains("access policy"),
        "{}",
        ping.stderr
    );
    let st = alice.cli(&lab, &["status"]).expect_ok("status");
    assert!(st.stdout.contains("access policy: on"), "{}", st.stdout);
    // Both sides of the policy per peer: what the server allows alice
    // (asked of the coordinator) and what hers allows the server (local).
    let both = "allows you: icmp, tcp/22, udp/22, ipv6-icmp; you allow it: nothing";
    assert!(st.stdout.contains(both), "{}", st.stdout);
    let st = server.cli(&lab, &["status"]).expect_ok("status");
    let back = "allows you: nothing; you allow it: icmp, tcp/22, udp/22, ipv6-icmp";
    assert!(st.stdout.contains(back), "{}", st.stdout);
    let json = alice.status(&lab);
    let peer = &json["peers"][0]["mesh"];
    assert_eq!(peer["hostname"], "server");
    assert_eq!(
        peer["allows_you"][1],
        serde_json::json!({"proto": 6, "ports": [22, 22]})
    );
    let ping = alice
        .cli(&lab, &["ping", "server", "-c", "1"])
        .expect_ok("ping");
    assert!(
        ping.stdout.contains("lets you reach server") && ping.stdout.contains("tcp/22"),
        "{}",
        ping.stdout
    );

    // A bad policy is refused with its place and changes nothing.
    let bad = lab.write_file("bad.hujson", BAD);
    let refused = coord.admin(&lab, &["policy", "set", &bad.to_string_lossy()]);
    assert!(!refused.ok(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("line 3, column"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("mallory@example.com"),
        "{}",
        refused.stderr
    );
    let stored = coord
        .admin(&lab, &["policy", "get"])
        .expect_ok("policy get");
    assert_eq!(stored.stdout, POLICY, "the stored policy is unchanged");
    assert!(
        tcp_ok(&lab, &na, addr(&s_ip, 22)),
        "alice's access is unchanged"
    );

    // Revocation: within a second alice's new connections fail and the
    // server leaves her map.
    let revoked = lab.write_file("revoked.hujson", REVOKED);
    let t0 = Instant::now();
    coord
        .admin(&lab, &["policy", "set", &revoked.to_string_lossy()])
        .expect_ok("policy set (revoke)");
    // The first connection that fails is timed from when it was opened.
    let mut cut = None;
    assert!(
        poll_until(APPLY, Duration::from_millis(20), || {
            let opened = t0.elapsed();
            let failed = !tcp_ok(&lab, &na, addr(&s_ip, 22));
            if failed {
                cut = Some(opened);
            }
            failed
        }),
        "revoked access still works"
    );
    let cut = cut.unwrap_or_default();
    assert!(wait_peers(&lab, &alice, &[], APPLY));
    assert!(wait_peers(&lab, &server, &[], APPLY));
    eprintln!("policy revocation cut alice's new connections after {cut:?}");
    assert!(cut < Duration::from_millis(1500), "took {cut:?}");
}
