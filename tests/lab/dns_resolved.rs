//! Names through a real systemd-resolved (issue 17): host a runs Debian's
//! systemd-resolved (unpacked by tests/setup.sh into
//! /opt/warren-lab/resolved, never installed on the machine) with a private
//! D-Bus system bus, in a mount namespace of its own that the agent shares:
//! a wrapper mounts tmpfs over /run/dbus and /run/systemd, starts
//! dbus-daemon and resolved, then execs the agent. Its uplink's DNS is an
//! "ISP" dnsmasq (set over D-Bus as NetworkManager would); a split domain
//! goes to another dnsmasq. Commands run in that namespace with nsenter.

use crate::lab;

use std::net::IpAddr;
use std::time::Duration;

use lab::agent::{Agent, AgentConfig, WARREN};
use lab::coord::Coordinator;
use lab::mesh::{up_with, wait_peers};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

const RESOLVED: &str = "/opt/warren-lab/resolved/lib/systemd/systemd-resolved";
const RESOLVECTL: &str = "/opt/warren-lab/resolved/usr/bin/resolvectl";

/// The wrapper: a private bus and resolved, then the agent (`"$@"`).
fn wrapper(lab: &Lab) -> String {
    let bus = lab.write_file(
        "bus.conf",
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
    );
    let script = format!(
        "set -e\n\
         mkdir -p /run/dbus && mount -t tmpfs none /run/dbus\n\
         mkdir -p /run/systemd && mount -t tmpfs none /run/systemd\n\
         mkdir -p /run/systemd/resolve && chown systemd-resolve: /run/systemd/resolve\n\
         dbus-daemon --config-file={bus} --fork --nopidfile\n\
         {RESOLVED} > {log} 2>&1 &\n\
         echo $! > {pid}\n\
         for i in $(seq 1 50); do [ -e /run/systemd/resolve/stub-resolv.conf ] && break; sleep 0.1; done\n\
         exec \"$@\"\n",
        bus = bus.display(),
        log = lab.dir().join("resolved.log").display(),
        pid = lab.dir().join("resolved.pid").display(),
    );
    lab.write_file("with-resolved.sh", &script)
        .to_string_lossy()
        .into_owned()
}

/// Runs `argv` in the agent's namespaces (network and mount).
fn inside(lab: &Lab, node: &Node, agent: &Agent, argv: &[&str]) -> lab::Output {
    let pid = lab.pid(agent.proc).to_string();
    let mut full = vec!["nsenter", "-t", &pid, "-m", "-n"];
    full.extend_from_slice(argv);
    lab.exec(node, &full)
}

/// Asserts that `name`, looked up through the host's resolver inside the
/// agent's namespaces (`getent ahostsv4`, which follows nsswitch and so
/// systemd-resolved's stub), first gives `want`.
fn assert_resolves(lab: &Lab, node: &Node, agent: &Agent, name: &str, want: IpAddr) {
    let out = inside(lab, node, agent, &["getent", "ahostsv4", name]);
    let got: Option<IpAddr> = out.stdout.split_whitespace().find_map(|w| w.parse().ok());
    assert_eq!(got, Some(want), "{name}: {out:?}");
}

#[test]
fn systemd_resolved_routes_the_networks_names_to_warren_and_gets_its_link_back() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    if !std::path::Path::new(RESOLVED).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{RESOLVED} missing: tests/setup.sh unpacks it"
        );
        eprintln!("skipping: {RESOLVED} missing (tests/setup.sh unpacks it)");
        return;
    }
    let isp = lab.public("isp");
    let corpdns = lab.public("corpdns");
    let isp_log = crate::dns::dnsmasq(&lab, &isp, "www.example.com", "203.0.113.80");
    let corp_log = crate::dns::dnsmasq(&lab, &corpdns, "git.corp.example", "10.9.9.9");
    let dns_toml = lab.write_file(
        "dns.toml",
        &format!(
            "[dns]\n[dns.split]\n\"corp.example\" = [\"{}\"]\n",
            corpdns.ip
        ),
    );
    let dns_arg = dns_toml.to_string_lossy().into_owned();
    let coord = Coordinator::start(&lab, &lab.public("coord"), &["--dns-config", &dns_arg]);
    let a_node = lab.host_behind(&lab.gateway("ghome", Nat::Eim), "a");
    let b_node = lab.host_behind(&lab.gateway("gwork", Nat::Eim), "b");
    // Host a's resolv.conf is resolved's stub, as on a desktop.
    let stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
    let rc_path = lab::netns::resolv_conf(&a_node.ns);
    std::fs::write(&rc_path, stub).unwrap();

    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let wrap = wrapper(&lab);
    let a = Agent::start_bin(
        &lab,
        &a_node,
        &AgentConfig::mesh(&lab, &a_node),
        &["unshare", "-m", "--propagation", "private", "bash", &wrap],
        WARREN,
    );
    // The uplink's DNS, as NetworkManager would set it.
    let isp_ip = isp.ip.to_string();
    inside(&lab, &a_node, &a, &[RESOLVECTL, "dns", "wan", &isp_ip]).expect_ok("resolvectl dns wan");
    inside(
        &lab,
        &a_node,
        &a,
        &[RESOLVECTL, "default-route", "wan", "true"],
    )
    .expect_ok("resolvectl default-route");
    up_with(&lab, &a, &coord, &tok, &[]).expect_ok("a up");
    let b = Agent::start(&lab, &b_node, &AgentConfig::mesh(&lab, &b_node));
    up_with(&lab, &b, &coord, &tok, &[]).expect_ok("b up");
    assert!(wait_peers(&lab, &a, &["b"], Duration::from_secs(20)));
    let b_v4: IpAddr = lab::mesh::overlay_v4(&b.status(&lab)).parse().unwrap();

    // resolved has the link: warren's resolver, the domains.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            let st = inside(&lab, &a_node, &a, &[RESOLVECTL, "status", "warren0"]).stdout;
            st.contains("100.100.100.100")
                && st.contains("warren.internal")
                && st.contains("~corp.example")
        }),
        "resolved's link:\n{}\n{}",
        inside(&lab, &a_node, &a, &[RESOLVECTL, "status", "warren0"]).stdout,
        a.cli(&lab, &["dns", "status"]).stdout
    );
    assert_eq!(
        std::fs::read_to_string(&rc_path).unwrap(),
        stub,
        "warren wrote resolved's file"
    );
    let st = a
        .cli(&lab, &["dns", "status"])
        .expect_ok("dns status")
        .stdout;
    assert!(st.starts_with("mode: resolved"), "{st}");

    let q = inside(
        &lab,
        &a_node,
        &a,
        &[RESOLVECTL, "query", "b.warren.internal"],
    );
    assert!(q.ok() && q.stdout.contains(&b_v4.to_string()), "{q:?}");
    // A short name through the search domain, by libc, with the file
    // resolved writes for its stub (what /etc/resolv.conf links to).
    let generated = inside(
        &lab,
        &a_node,
        &a,
        &["cat", "/run/systemd/resolve/stub-resolv.conf"],
    )
    .stdout;
    assert!(generated.contains("search warren.internal"), "{generated}");
    std::fs::write(&rc_path, &generated).unwrap();
    assert_resolves(&lab, &a_node, &a, "b", b_v4);
    // The split domain reaches its server through warren; the rest goes
    // where resolved sent it before (the ISP), never through warren.
    assert_resolves(
        &lab,
        &a_node,
        &a,
        "git.corp.example",
        "10.9.9.9".parse().unwrap(),
    );
    assert_resolves(
        &lab,
        &a_node,
        &a,
        "www.example.com",
        "203.0.113.80".parse().unwrap(),
    );
    let (isp_q, corp_q) = (
        std::fs::read_to_string(&isp_log).unwrap_or_default(),
        std::fs::read_to_string(&corp_log).unwrap_or_default(),
    );
    assert!(
        corp_q.contains("git.corp.example") && !corp_q.contains("www.example.com"),
        "{corp_q}"
    );
    assert!(
        !isp_q.contains("git.corp.example") && !isp_q.contains("warren.internal"),
        "{isp_q}"
    );
    // resolved restarts: warren gives it the link again.
    let pid = std::fs::read_to_string(lab.dir().join("resolved.pid")).unwrap();
    inside(&lab, &a_node, &a, &["kill", pid.trim()]).expect_ok("kill resolved");
    let log = lab.dir().join("resolved-2.log");
    let restart = format!("{RESOLVED} > {} 2>&1 &", log.display());
    inside(&lab, &a_node, &a, &["bash", "-c", &restart]).expect_ok("restart resolved");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            let q = inside(
                &lab,
                &a_node,
                &a,
                &[RESOLVECTL, "query", "b.warren.internal"],
            );
            q.ok() && q.stdout.contains(&b_v4.to_string())
        }),
        "names lost after resolved restarted:\n{}",
        inside(&lab, &a_node, &a, &[RESOLVECTL, "status", "warren0"]).stdout
    );

    // down: the link is resolved's own again; other names still resolve.
    a.cli(&lab, &["down"]).expect_ok("down");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            !inside(&lab, &a_node, &a, &[RESOLVECTL, "status", "warren0"])
                .stdout
                .contains("100.100.100.100")
        }),
        "the link kept warren's settings after down"
    );
    let q = inside(
        &lab,
        &a_node,
        &a,
        &[RESOLVECTL, "query", "b.warren.internal"],
    );
    assert!(!q.ok(), "b resolved after down: {q:?}");
    assert_resolves(
        &lab,
        &a_node,
        &a,
        "www.example.com",
        "203.0.113.80".parse().unwrap(),
    );
}
