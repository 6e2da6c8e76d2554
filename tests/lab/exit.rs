//! Exit nodes end to end (issue 18): a laptop behind a NAT sends its
//! internet traffic, IPv4 and IPv6, through a peer that offers an exit
//! node; a server on the lab's internet sees the exit node's address; the
//! laptop's own tunnel traffic (its path to the exit node, the relay, the
//! coordinator, STUN) keeps using the underlay by policy routing; with
//! `--exit-node-allow-lan-access` its LAN stays direct; turning the exit
//! node off leaves no rule, route or nftables table behind. Real agents, a
//! real coordinator, kernel forwarding and NAT.

use crate::lab;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lab::agent::{Agent, AgentConfig};
use lab::coord::Coordinator;
use lab::mesh::{up_with, wait_peers};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

/// How long a route change may take to reach the laptop.
const APPLY: Duration = Duration::from_secs(10);

/// The source address `server` sees for a TCP connection from `from` to
/// `to` (a fresh listener on a fresh port each time: a listener from an
/// attempt that got nothing still holds its port for a while), or `None`
/// if none arrived.
fn source_seen(lab: &Lab, from: &Node, server: &Node, to: IpAddr) -> Option<IpAddr> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7100);
    let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seen = crate::routes::first_source(lab, server, port);
    let addr = SocketAddr::new(to, port);
    let connected = lab
        .thread_in(from, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
        })
        .join()
        .unwrap_or(false);
    if !connected {
        return None;
    }
    seen.recv_timeout(Duration::from_secs(5)).ok()
}

/// What warren leaves in `node`'s routing: its rules and its table.
fn leftovers(lab: &Lab, node: &Node) -> String {
    let mut out = String::new();
    for argv in [
        &["ip", "-4", "rule", "show"][..],
        &["ip", "-6", "rule", "show"],
        &["ip", "-4", "route", "show", "table", "87"],
        &["ip", "-6", "route", "show", "table", "87"],
    ] {
        let o = lab.exec(node, argv);
        for line in o.stdout.lines() {
            let ours = line.starts_with("52") || argv.contains(&"87");
            if ours && !line.trim().is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `warren up --exit-node exit` on `laptop`, retried until the approval
/// has reached its map.
fn choose_exit(lab: &Lab, laptop: &Agent, coord: &Coordinator, tok: &str) {
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || {
            up_with(
                lab,
                laptop,
                coord,
                tok,
                &["--exit-node", "exit", "--reconfigure"],
            )
            .ok()
        }),
        "choosing the approved exit node failed:\n{}",
        laptop.cli(lab, &["status"]).stdout
    );
}

#[test]
fn an_exit_node_carries_the_laptops_internet_traffic_and_nothing_else() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    lab.ipv6_internet();
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let exit_node = lab.public("exit");
    let web = lab.public("web");
    let exit_v6 = lab.ipv6_public(&exit_node);
    let web_v6 = lab.ipv6_public(&web);
    let home = lab.gateway("ghome", Nat::Eim);
    let laptop_node = lab.host_behind(&home, "laptop");
    let printer = lab.host_behind(&home, "printer");
    for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        lab.exec(&exit_node, &["sysctl", "-qw", s])
            .expect_ok("forwarding");
    }

    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let exit = Agent::start(&lab, &exit_node, &AgentConfig::mesh(&lab, &exit_node));
    up_with(&lab, &exit, &coord, &tok, &["--advertise-exit-node"]).expect_ok("exit up");
    let laptop = Agent::start(&lab, &laptop_node, &AgentConfig::mesh(&lab, &laptop_node));
    up_with(&lab, &laptop, &coord, &tok, &[]).expect_ok("laptop up");
    assert!(wait_peers(
        &lab,
        &laptop,
        &["exit"],
        Duration::from_secs(20)
    ));

    // Not approved yet: choosing it is refused, with what to do.
    let refused = up_with(
        &lab,
        &laptop,
        &coord,
        &tok,
        &["--exit-node", "exit", "--reconfigure"],
    );
    assert!(!refused.ok(), "an unapproved exit node was accepted");
    assert!(
        refused.stderr.contains("does not offer an exit node"),
        "{}",
        refused.stderr
    );
    coord
        .admin(&lab, &["route", "approve", "exit", "0.0.0.0/0", "::/0"])
        .expect_ok("route approve");

    // Before: the web server sees the home gateway.
    let direct = source_seen(&lab, &laptop_node, &web, web.ip.into());
    assert_eq!(direct, Some(IpAddr::V4(home.ip)), "before the exit node");
    assert!(lab.ping(&laptop_node, printer.ip), "the LAN before");

    choose_exit(&lab, &laptop, &coord, &tok);
    let through = || source_seen(&lab, &laptop_node, &web, web.ip.into());
    assert!(
        poll_until(APPLY, Duration::from_millis(300), || through()
            == Some(IpAddr::V4(exit_node.ip))),
        "the web server does not see the exit node:\n{}\n{}",
        laptop.cli(&lab, &["status"]).stdout,
        leftovers(&lab, &laptop_node)
    );
    // IPv6 too, though the laptop's own network has none: from its
    // overlay address, masqueraded to the exit node's.
    let v6 = source_seen(&lab, &laptop_node, &web, web_v6.into());
    assert_eq!(
        v6,
        Some(IpAddr::V6(exit_v6)),
        "IPv6 through the exit node:\n{}\n{}",
        lab.exec(&exit_node, &["nft", "list", "ruleset"]).stdout,
        leftovers(&lab, &laptop_node)
    );
    // The tunnel to the exit node itself stays direct: its UDP carries
    // warren's mark, so the exit node's own default route does not catch
    // it (without the mark it loops, and only the relay, whose address is
    // the coordinator's, would be left).
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || {
            lab.ping(&laptop_node, web.ip);
            lab::mesh::path_of(&laptop.status(&lab), "exit") == "direct"
        }),
        "the path to the exit node is not direct:\n{}",
        laptop.cli(&lab, &["status"]).stdout
    );
    let st = laptop.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(
        st.contains("exit node: exit (all internet traffic)"),
        "{st}"
    );

    // The laptop's own traffic stays on the underlay: the coordinator
    // answers a registration, STUN answers netcheck over UDP, and the
    // tunnel to the exit node is up (the pings above went through it).
    laptop
        .cli(&lab, &["up", "--hostname", "laptop2", "--reconfigure"])
        .expect_ok("registration under the exit node");
    let nc = laptop
        .cli(&lab, &["netcheck", "--json"])
        .expect_ok("netcheck");
    let nc: serde_json::Value = serde_json::from_str(&nc.stdout).expect("netcheck JSON");
    assert_eq!(nc["udp"], true, "STUN under the exit node: {nc}");

    // Without LAN access the printer is behind the exit node (which cannot
    // reach it); with it, it is direct again.
    assert!(
        !lab.ping(&laptop_node, printer.ip),
        "LAN reachable without LAN access"
    );
    up_with(
        &lab,
        &laptop,
        &coord,
        &tok,
        &["--exit-node-allow-lan-access", "--reconfigure"],
    )
    .expect_ok("allow LAN access");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || lab
            .ping(&laptop_node, printer.ip)),
        "the LAN stays unreachable with LAN access:\n{}",
        leftovers(&lab, &laptop_node)
    );
    assert_eq!(
        through(),
        Some(IpAddr::V4(exit_node.ip)),
        "still through the exit"
    );

    // Off: the default route is the host's again, nothing left behind.
    up_with(
        &lab,
        &laptop,
        &coord,
        &tok,
        &["--exit-node=", "--reconfigure"],
    )
    .expect_ok("exit node off");
    assert!(
        poll_until(APPLY, Duration::from_millis(300), || leftovers(
            &lab,
            &laptop_node
        )
        .is_empty()),
        "left behind:\n{}",
        leftovers(&lab, &laptop_node)
    );
    let after = source_seen(&lab, &laptop_node, &web, web.ip.into());
    assert_eq!(after, Some(IpAddr::V4(home.ip)), "after the exit node");
    assert!(
        !lab.exec(&laptop_node, &["nft", "list", "table", "inet", "warren"])
            .ok(),
        "a NAT table on the laptop"
    );
    // The exit node NATs for its peers; its table goes with the approval.
    coord
        .admin(&lab, &["route", "reject", "exit", "0.0.0.0/0", "::/0"])
        .expect_ok("route reject");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || {
            !lab.exec(&exit_node, &["nft", "list", "table", "inet", "warren"])
                .ok()
        }),
        "the exit node's NAT table outlived its approval"
    );
}

/// An exit node chosen and then gone: the laptop's internet traffic is
/// blocked (not leaked onto the underlay), and `status` says why.
#[test]
fn a_vanished_exit_node_fails_closed() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let exit_node = lab.public("exit");
    let web = lab.public("web");
    let home = lab.gateway("ghome", Nat::Eim);
    let laptop_node = lab.host_behind(&home, "laptop");
    lab.exec(&exit_node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect_ok("forwarding");
    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let exit = Agent::start(&lab, &exit_node, &AgentConfig::mesh(&lab, &exit_node));
    up_with(&lab, &exit, &coord, &tok, &["--advertise-exit-node"]).expect_ok("exit up");
    coord
        .admin(&lab, &["route", "approve", "exit", "0.0.0.0/0", "::/0"])
        .expect_ok("route approve");
    let laptop = Agent::start(&lab, &laptop_node, &AgentConfig::mesh(&lab, &laptop_node));
    up_with(&lab, &laptop, &coord, &tok, &[]).expect_ok("laptop up");
    assert!(wait_peers(
        &lab,
        &laptop,
        &["exit"],
        Duration::from_secs(20)
    ));
    choose_exit(&lab, &laptop, &coord, &tok);
    assert!(poll_until(
        APPLY,
        Duration::from_millis(300),
        || source_seen(&lab, &laptop_node, &web, web.ip.into()) == Some(IpAddr::V4(exit_node.ip))
    ));
    // The admin withdraws the approval: nothing carries the default
    // routes, and nothing leaks past the tunnel.
    coord
        .admin(&lab, &["route", "reject", "exit", "0.0.0.0/0", "::/0"])
        .expect_ok("route reject");
    assert!(
        poll_until(APPLY, Duration::from_millis(200), || {
            laptop
                .cli(&lab, &["status"])
                .stdout
                .contains("does not offer an exit node")
        }),
        "status does not say why:\n{}",
        laptop.cli(&lab, &["status"]).stdout
    );
    assert_eq!(
        source_seen(&lab, &laptop_node, &web, web.ip.into()),
        None,
        "traffic leaked past the vanished exit node"
    );
    // The coordinator is still reachable (its own rule), so clearing the
    // choice works and the internet is back.
    up_with(
        &lab,
        &laptop,
        &coord,
        &tok,
        &["--exit-node=", "--reconfigure"],
    )
    .expect_ok("exit node off");
    assert_eq!(
        source_seen(&lab, &laptop_node, &web, web.ip.into()),
        Some(IpAddr::V4(home.ip))
    );
}
