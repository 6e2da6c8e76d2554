//! Lab tests of joining a network through a real coordinator: `warren up`
//! with a token, peers configured from the map (no peer written by hand),
//! traffic between them, `node remove` cutting a node off, `down`/`up`,
//! a daemon restart re-joining by itself, and the errors a bad token gets
//! (one-off token spent, expired, revoked) — which change nothing.

use crate::lab;

use std::time::{Duration, Instant};

use lab::agent::{Agent, AgentConfig};
use lab::coord::Coordinator;
use lab::mesh::{overlay_v4, peer_names, peer_of, up, wait_peers};
use lab::nat::Nat;
use lab::{poll_until, Lab};

/// A node joins, learns its peers and has a working tunnel within this.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn join_with_token_ping_remove_and_rejoin() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    // Two public hosts and one behind an easy NAT.
    let na = lab.public("a");
    let nb = lab.public("b");
    let gw = lab.gateway("gw", Nat::Eim);
    let nc = lab.host_behind(&gw, "c");
    let a = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    let b = Agent::start(&lab, &nb, &AgentConfig::mesh(&lab, &nb));
    let cc = Agent::start(&lab, &nc, &AgentConfig::mesh(&lab, &nc));

    let before = a.status(&lab);
    assert_eq!(before["mesh"]["state"], "needs_login", "{before}");

    // A one-off token joins once; a second use is refused and changes
    // nothing on the node that tried.
    let (once, _) = coord.token(&lab, &[]);
    up(&lab, &a, &coord, &once).expect_ok("up with a one-off token");
    let spent = up(&lab, &b, &coord, &once);
    assert!(!spent.ok(), "a spent one-off token must be refused");
    assert!(
        spent.stderr.contains("token"),
        "the error says it is about the token: {}",
        spent.stderr
    );
    assert_eq!(b.status(&lab)["mesh"]["state"], "needs_login");

    // Expired and revoked tokens: refused, clearly.
    let (short, _) = coord.token(&lab, &["--reusable", "--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let expired = up(&lab, &b, &coord, &short);
    assert!(
        !expired.ok() && expired.stderr.contains("expired"),
        "{}",
        expired.stderr
    );
    let (revoked, id) = coord.token(&lab, &["--reusable"]);
    coord
        .admin(&lab, &["token", "revoke", &id])
        .expect_ok("revoke");
    let refused = up(&lab, &b, &coord, &revoked);
    assert!(
        !refused.ok() && refused.stderr.contains("revoked"),
        "{}",
        refused.stderr
    );
    assert_eq!(b.status(&lab)["mesh"]["state"], "needs_login");

    // A reusable token joins the other two; the peers come from the map.
    let (team, _) = coord.token(&lab, &["--reusable"]);
    let joined = up(&lab, &b, &coord, &team).expect_ok("up b");
    assert!(
        joined.stdout.contains("warren is up: b"),
        "{}",
        joined.stdout
    );
    up(&lab, &cc, &coord, &team).expect_ok("up c");
    for (agent, others) in [(&a, ["b", "c"]), (&b, ["a", "c"]), (&cc, ["a", "b"])] {
        assert!(
            wait_peers(&lab, agent, &others, JOIN_TIMEOUT),
            "{} sees {:?}",
            agent.node.name,
            peer_names(&agent.status(&lab))
        );
    }
    let ip_a = overlay_v4(&a.status(&lab));
    let ip_b = overlay_v4(&b.status(&lab));
    let ip_c = overlay_v4(&cc.status(&lab));
    assert!(
        !ip_a.is_empty() && ip_a != ip_b && ip_b != ip_c,
        "{ip_a} {ip_b} {ip_c}"
    );
    assert!(
        ip_a.starts_with("100."),
        "overlay from 100.64.0.0/10: {ip_a}"
    );
    for (from, to) in [(&a, &ip_b), (&b, &ip_c), (&cc, &ip_a)] {
        assert!(
            lab.ping_within(&from.node, to, JOIN_TIMEOUT),
            "{} cannot reach {to}\n{}",
            from.node.name,
            from.cli(&lab, &["status"]).stdout
        );
    }
    // c's NAT, from its own netcheck through the map, in a's status.
    assert!(
        poll_until(JOIN_TIMEOUT, Duration::from_millis(200), || {
            peer_of(&a.status(&lab), "c")
                .is_some_and(|p| p["mesh"]["nat"]["mapping"] == "endpoint-independent")
        }),
        "c's NAT kind in a's status: {}",
        a.status(&lab)
    );
    let text = a.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(text.contains("network: a on http://"), "{text}");
    let row_c = text.lines().find(|l| l.starts_with("c ")).unwrap_or("");
    assert!(row_c.contains(" EIM "), "{text}");

    // Removed at the coordinator: its peers drop it within 2 s, and it
    // is told it is no longer part of the network.
    coord
        .admin(&lab, &["node", "remove", "c"])
        .expect_ok("node remove");
    let t0 = Instant::now();
    assert!(
        wait_peers(&lab, &a, &["b"], Duration::from_secs(2)),
        "a still sees {:?} 2 s after removal",
        peer_names(&a.status(&lab))
    );
    eprintln!("removal reached a in {:?}", t0.elapsed());
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            cc.status(&lab)["mesh"]["state"] == "needs_login"
        }),
        "the removed node learns it is out: {}",
        cc.status(&lab)
    );
    assert!(!lab.ping(&cc.node, &ip_a), "a removed node reaches nobody");

    // down: peers go; up (no token): back, same address.
    let left = b.cli(&lab, &["down", "--json"]).expect_ok("down");
    let left: serde_json::Value = serde_json::from_str(&left.stdout).unwrap();
    assert_eq!(left["coordinator"], coord.url().as_str(), "{left}");
    assert_eq!(left["name"], "b", "{left}");
    assert_eq!(left["logged_out"], false, "{left}");
    assert_eq!(b.status(&lab)["mesh"]["state"], "stopped");
    assert!(wait_peers(&lab, &b, &[], Duration::from_secs(2)));
    b.cli(&lab, &["up"]).expect_ok("up again");
    assert!(wait_peers(&lab, &b, &["a"], JOIN_TIMEOUT));
    assert_eq!(
        overlay_v4(&b.status(&lab)),
        ip_b,
        "a node keeps its address"
    );
    assert!(lab.ping_within(&b.node, &ip_a, JOIN_TIMEOUT));

    // A restarted daemon re-joins by itself (the login is saved).
    lab.signal(a.proc, libc::SIGTERM);
    assert!(lab.wait_exit(a.proc, Duration::from_secs(10)).is_some());
    let a2 = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    assert!(wait_peers(&lab, &a2, &["b"], JOIN_TIMEOUT));
    assert_eq!(overlay_v4(&a2.status(&lab)), ip_a);
    assert!(lab.ping_within(&a2.node, &ip_b, JOIN_TIMEOUT));

    // logout: the coordinator forgets the node; `up` alone is refused.
    let out = a2.cli(&lab, &["logout"]).expect_ok("logout");
    assert!(
        out.stdout.contains("logged out of") && out.stdout.contains("needs a token"),
        "{}",
        out.stdout
    );
    assert_eq!(a2.status(&lab)["mesh"]["state"], "needs_login");
    let again = a2.cli(&lab, &["up"]);
    assert!(
        !again.ok() && again.stderr.contains("--token"),
        "{}",
        again.stderr
    );
    assert!(wait_peers(&lab, &b, &[], Duration::from_secs(2)));
}

#[test]
fn tunnels_survive_a_coordinator_outage_and_resync_after() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    let na = lab.public("a");
    let gw = lab.gateway("gw", Nat::Eim);
    let nb = lab.host_behind(&gw, "b");
    let a = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    let b = Agent::start(&lab, &nb, &AgentConfig::mesh(&lab, &nb));
    let (team, _) = coord.token(&lab, &["--reusable"]);
    up(&lab, &a, &coord, &team).expect_ok("up a");
    up(&lab, &b, &coord, &team).expect_ok("up b");
    assert!(wait_peers(&lab, &a, &["b"], JOIN_TIMEOUT));
    assert!(wait_peers(&lab, &b, &["a"], JOIN_TIMEOUT));
    let ip_a = overlay_v4(&a.status(&lab));
    let ip_b = overlay_v4(&b.status(&lab));
    assert!(lab.ping_within(&b.node, &ip_a, JOIN_TIMEOUT));
    // The coordinator is also the relay: the outage must find the tunnel
    // on its direct path, which needs no one else.
    assert!(
        poll_until(JOIN_TIMEOUT, Duration::from_millis(200), || {
            let _ = lab.ping(&b.node, &ip_a);
            b.status(&lab)["peers"][0]["path"]["kind"] == "direct"
        }),
        "b never goes direct: {}",
        b.status(&lab)
    );

    lab.signal(coord.proc, libc::SIGTERM);
    assert!(lab.wait_exit(coord.proc, Duration::from_secs(10)).is_some());
    // The agents notice, say so, and keep their tunnels.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            a.status(&lab)["mesh"]["state"] == "reconnecting"
        }),
        "{}",
        a.status(&lab)
    );
    for _ in 0..3 {
        assert!(
            lab.ping(&a.node, &ip_b),
            "the tunnel outlives the coordinator"
        );
        assert!(lab.ping(&b.node, &ip_a));
    }
    let text = a.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(text.contains("coordinator unreachable"), "{text}");

    // Back on the same store: the agents re-sync, and a node that joins
    // now reaches both.
    let coord = Coordinator::start(&lab, &c, &[]);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
            a.status(&lab)["mesh"]["state"] == "running"
        }),
        "a re-connects: {}",
        a.status(&lab)
    );
    let nc = lab.public("c");
    let cc = Agent::start(&lab, &nc, &AgentConfig::mesh(&lab, &nc));
    up(&lab, &cc, &coord, &team).expect_ok("up c");
    assert!(wait_peers(&lab, &a, &["b", "c"], JOIN_TIMEOUT));
    assert!(wait_peers(&lab, &b, &["a", "c"], JOIN_TIMEOUT));
    assert!(lab.ping_within(&cc.node, &ip_b, JOIN_TIMEOUT));
}
