//! Subnet routers end to end (issue 18): a router node on an office LAN
//! advertises it; a laptop elsewhere with `--accept-routes` reaches a
//! plain host on that LAN (no warren there) once an admin approves the
//! route, and not before or after its rejection; the host sees the
//! router's LAN address (source NAT); nothing is left in the routing table
//! or nftables afterwards. Real agents, a real coordinator, kernel
//! forwarding and NAT.

use crate::lab;

use std::time::Duration;

use lab::agent::{tcp_transfer, Agent, AgentConfig};
use lab::coord::Coordinator;
use lab::mesh::{up_with, wait_peers};
use lab::nat::Nat;
use lab::{poll_until, Lab};

/// How long a route change may take to reach the laptop.
const APPLY: Duration = Duration::from_secs(10);

#[test]
fn a_subnet_router_carries_its_lan_once_approved() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let office = lab.gateway("goffice", Nat::Eim);
    let srv = lab.host_behind(&office, "srv");
    let r = lab.host_behind(&office, "router");
    let home = lab.gateway("ghome", Nat::Eim);
    let laptop_node = lab.host_behind(&home, "laptop");
    let o = srv.ip.octets();
    let lan = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    lab.exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect_ok("ip_forward");

    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let router = Agent::start(&lab, &r, &AgentConfig::mesh(&lab, &r));
    up_with(&lab, &router, &coord, &tok, &["--advertise-routes", &lan]).expect_ok("router up");
    let laptop = Agent::start(&lab, &laptop_node, &AgentConfig::mesh(&lab, &laptop_node));
    up_with(&lab, &laptop, &coord, &tok, &["--accept-routes"]).expect_ok("laptop up");
    assert!(wait_peers(
        &lab,
        &laptop,
        &["router"],
        Duration::from_secs(20)
    ));

    // Advertised, not approved: the LAN is not reachable, and the router
    // says what awaits approval.
    let st = router.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(
        st.contains(&format!("routes: advertising {lan}; awaiting approval")),
        "{st}"
    );
    assert!(
        !lab.ping(&laptop_node, srv.ip),
        "the LAN is reachable before approval"
    );

    coord
        .admin(&lab, &["route", "approve", "router", &lan])
        .expect_ok("route approve");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || lab
            .ping(&laptop_node, srv.ip)),
        "no ping to the LAN host through the router:\n{}\n{}",
        laptop.cli(&lab, &["status"]).stdout,
        router.cli(&lab, &["status"]).stdout
    );
    let st = laptop.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(st.contains(&format!("router: offers {lan}")), "{st}");
    let (sent, got) = tcp_transfer(&lab, &laptop_node, &srv, srv.ip.into(), 5001, 20 << 20);
    assert_eq!(sent, got, "20 MB arrive intact");
    // Source NAT: the LAN host has no route back to the overlay (its
    // default route is the office gateway), so the transfer above could
    // only succeed with the router's address as the source.
    let nat = lab
        .exec(&r, &["nft", "list", "table", "inet", "warren"])
        .expect_ok("nft list");
    assert!(nat.stdout.contains("masquerade"), "{}", nat.stdout);

    // Rejected: the laptop's route goes, and so does the reachability.
    coord
        .admin(&lab, &["route", "reject", "router", &lan])
        .expect_ok("route reject");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || !lab
            .ping(&laptop_node, srv.ip)),
        "the LAN stayed reachable after rejection"
    );
    // warren's routes live in its own table (87), never the main one.
    let routes = lab
        .exec(&laptop_node, &["ip", "route", "show", "table", "87", &lan])
        .expect_ok("ip route");
    assert!(
        routes.stdout.trim().is_empty(),
        "route left: {}",
        routes.stdout
    );
    // No longer serving: the router's NAT table is gone.
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || {
            !lab.exec(&r, &["nft", "list", "table", "inet", "warren"])
                .ok()
        }),
        "the router's NAT table outlived its routes"
    );
}

/// The router `laptop` sends `lan` through, by host name.
fn primary(lab: &Lab, laptop: &Agent, lan: &str) -> Option<String> {
    let st = laptop.status(lab);
    st["peers"].as_array()?.iter().find_map(|p| {
        let routed = p["mesh"]["routed"].as_array()?;
        routed
            .iter()
            .any(|r| r.as_str() == Some(lan))
            .then(|| p["hostname"].as_str().unwrap_or_default().to_owned())
    })
}

/// Two routers serve the same LAN: the laptop uses one, and within 5 s of
/// that one dying uses the other.
#[test]
fn a_second_router_takes_over_within_five_seconds() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let office = lab.gateway("goffice", Nat::Eim);
    let srv = lab.host_behind(&office, "srv");
    let home = lab.gateway("ghome", Nat::Eim);
    let laptop_node = lab.host_behind(&home, "laptop");
    let o = srv.ip.octets();
    let lan = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let mut routers = Vec::new();
    for name in ["r1", "r2"] {
        let node = lab.host_behind(&office, name);
        lab.exec(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .expect_ok("ip_forward");
        let a = Agent::start(&lab, &node, &AgentConfig::mesh(&lab, &node));
        up_with(&lab, &a, &coord, &tok, &["--advertise-routes", &lan]).expect_ok("router up");
        coord
            .admin(&lab, &["route", "approve", name, &lan])
            .expect_ok("route approve");
        routers.push(a);
    }
    let laptop = Agent::start(&lab, &laptop_node, &AgentConfig::mesh(&lab, &laptop_node));
    up_with(&lab, &laptop, &coord, &tok, &["--accept-routes"]).expect_ok("laptop up");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || lab
            .ping(&laptop_node, srv.ip)),
        "no ping to the LAN host:\n{}",
        laptop.cli(&lab, &["status"]).stdout
    );
    let first = primary(&lab, &laptop, &lan).expect("a primary router");
    let (dead, alive) = if first == "r1" {
        (&routers[0], "r2")
    } else {
        (&routers[1], "r1")
    };
    let t0 = std::time::Instant::now();
    lab.signal(dead.proc, libc::SIGKILL);
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            lab.ping_within(&laptop_node, srv.ip, Duration::from_millis(300))
                && primary(&lab, &laptop, &lan).as_deref() == Some(alive)
        }),
        "no failover to {alive} within 5 s:\n{}",
        laptop.cli(&lab, &["status"]).stdout
    );
    println!("failover to {alive} in {:.2} s", t0.elapsed().as_secs_f64());
}

/// The source address of the first TCP connection accepted on `port` in
/// `node`, within 10 s.
pub(crate) fn first_source(
    lab: &Lab,
    node: &lab::Node,
    port: u16,
) -> std::sync::mpsc::Receiver<std::net::IpAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    lab.thread_in(node, move || {
        // `::` takes IPv4 too (as mapped addresses, made plain below).
        let l = std::net::TcpListener::bind(("::", port)).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        bound_tx.send(()).expect("bound");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok((_, from)) = l.accept() {
                let _ = tx.send(from.ip().to_canonical());
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener up");
    rx
}

/// With `--snat-subnet-routes=false` the LAN host sees the laptop's
/// overlay address (and needs a route back through the router); with the
/// default it sees the router's LAN address.
#[test]
fn source_nat_is_the_routers_choice() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let office = lab.gateway("goffice", Nat::Eim);
    let srv = lab.host_behind(&office, "srv");
    let r = lab.host_behind(&office, "router");
    let home = lab.gateway("ghome", Nat::Eim);
    let laptop_node = lab.host_behind(&home, "laptop");
    let o = srv.ip.octets();
    let lan = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    lab.exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect_ok("ip_forward");
    lab.exec(
        &srv,
        &[
            "ip",
            "route",
            "add",
            "100.64.0.0/10",
            "via",
            &r.ip.to_string(),
        ],
    )
    .expect_ok("return route");
    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let router = Agent::start(&lab, &r, &AgentConfig::mesh(&lab, &r));
    up_with(
        &lab,
        &router,
        &coord,
        &tok,
        &["--advertise-routes", &lan, "--snat-subnet-routes=false"],
    )
    .expect_ok("router up");
    coord
        .admin(&lab, &["route", "approve", "router", &lan])
        .expect_ok("route approve");
    let laptop = Agent::start(&lab, &laptop_node, &AgentConfig::mesh(&lab, &laptop_node));
    up_with(&lab, &laptop, &coord, &tok, &["--accept-routes"]).expect_ok("laptop up");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || lab
            .ping(&laptop_node, srv.ip)),
        "no ping to the LAN host:\n{}",
        laptop.cli(&lab, &["status"]).stdout
    );
    let overlay = lab::mesh::overlay_v4(&laptop.status(&lab));
    let connect = |port: u16| {
        let to = std::net::SocketAddr::new(srv.ip.into(), port);
        lab.thread_in(&laptop_node, move || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).is_ok()
        })
        .join()
        .unwrap()
    };
    let seen = first_source(&lab, &srv, 7001);
    assert!(connect(7001));
    let src = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a connection");
    assert_eq!(
        src.to_string(),
        overlay,
        "without SNAT the host sees the laptop"
    );
    assert!(
        !lab.exec(&r, &["nft", "list", "table", "inet", "warren"])
            .ok(),
        "no NAT table without SNAT"
    );

    // Back to the default: the router's own LAN address.
    up_with(
        &lab,
        &router,
        &coord,
        &tok,
        &["--snat-subnet-routes", "--reconfigure"],
    )
    .expect_ok("router reconfigure");
    let seen = first_source(&lab, &srv, 7002);
    assert!(connect(7002));
    let src = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a connection");
    assert_eq!(
        src,
        std::net::IpAddr::V4(r.ip),
        "with SNAT the host sees the router"
    );
}
