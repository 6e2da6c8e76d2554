//! Names end to end (issue 17): two agents joined to a coordinator with
//! DNS settings (a split domain, an extra record); host a's own
//! `/etc/resolv.conf` (its namespace's, `harness::netns::resolv_conf`)
//! names an "ISP" resolver. Real dnsmasq servers play the ISP's resolver
//! and the split domain's server, and log every query they get. Real libc
//! (`getent`) resolves through the agent's resolver.

use crate::lab;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lab::agent::{Agent, AgentConfig};
use lab::coord::Coordinator;
use lab::mesh::{up_with, wait_peers};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

/// Starts dnsmasq on `node` answering `name` with `addr`, logging queries
/// to the returned file.
pub(crate) fn dnsmasq(lab: &Lab, node: &Node, name: &str, addr: &str) -> std::path::PathBuf {
    dnsmasq_with(lab, node, name, addr, &[])
}

/// [`dnsmasq`] with more of its options.
fn dnsmasq_with(
    lab: &Lab,
    node: &Node,
    name: &str,
    addr: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let log = lab.dir().join(format!("dnsmasq-{}.queries", node.name));
    let listen = format!("--listen-address={}", node.ip);
    let answer = format!("--address=/{name}/{addr}");
    let log_arg = format!("--log-facility={}", log.display());
    let pid = lab.dir().join(format!("dnsmasq-{}.pid", node.name));
    let pid_arg = format!("--pid-file={}", pid.display());
    lab.spawn(
        node,
        &format!("dnsmasq-{}", node.name),
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            &answer,
            "--log-queries",
            &log_arg,
            &pid_arg,
            "--user=root",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || log
            .exists()),
        "dnsmasq did not start on {}",
        node.name
    );
    log
}

fn queries(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The first IPv4 (`ahostsv4`) or IPv6 address libc finds for `name` on
/// `node`.
fn getent(lab: &Lab, node: &Node, db: &str, name: &str) -> Option<IpAddr> {
    let out = lab.exec(node, &["getent", db, name]);
    out.stdout
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
}

/// A query straight to the resolver's address from inside `node`: the
/// answer's addresses, or `None` when nothing came back.
fn ask(lab: &Lab, node: &Node, name: &str) -> Option<Vec<IpAddr>> {
    let q = warren::dns::resolver::build_query(0x4242, name, hickory_proto::rr::RecordType::A)?;
    lab.thread_in(node, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.send_to(&q, SocketAddr::from(([100, 100, 100, 100], 53)))
            .ok()?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).ok()?;
        let m = hickory_proto::op::Message::from_vec(&buf[..n]).ok()?;
        Some(m.answers.iter().filter_map(|r| r.data.ip_addr()).collect())
    })
    .join()
    .ok()
    .flatten()
}

fn query_json(lab: &Lab, a: &Agent, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["dns", "query"];
    argv.extend_from_slice(args);
    argv.push("--json");
    let out = a.cli(lab, &argv).expect_ok("warren dns query");
    serde_json::from_str(&out.stdout).expect("dns query JSON")
}

#[test]
fn names_split_dns_and_the_hosts_resolv_conf() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let isp = lab.public("isp");
    let corpdns = lab.public("corpdns");
    let isp_log = dnsmasq(&lab, &isp, "www.example.com", "203.0.113.80");
    // The split server also has a record too big for a datagram of 512
    // bytes, the most it sends: its UDP answer comes truncated.
    let big = format!("big.corp.example,{}", "warren-".repeat(100));
    let txt = format!("--txt-record={big}");
    let corp_log = dnsmasq_with(
        &lab,
        &corpdns,
        "git.corp.example",
        "10.9.9.9",
        &["--edns-packet-max=512", &txt],
    );
    let dns_toml = lab.write_file(
        "dns.toml",
        &format!(
            "[dns]\n[dns.split]\n\"corp.example\" = [\"{}\"]\n[[dns.extra_records]]\nname = \"grafana\"\ntype = \"A\"\nvalue = \"100.64.200.1\"\n",
            corpdns.ip
        ),
    );
    let dns_arg = dns_toml.to_string_lossy().into_owned();
    let coord = Coordinator::start(&lab, &lab.public("coord"), &["--dns-config", &dns_arg]);
    let home = lab.gateway("ghome", Nat::Eim);
    let a_node = lab.host_behind(&home, "a");
    let b_node = lab.host_behind(&lab.gateway("gwork", Nat::Eim), "b");
    // Host a's own DNS, as its DHCP client left it.
    let host_file = format!(
        "# from DHCP\nsearch lan.example\nnameserver {}\noptions edns0\n",
        isp.ip
    );
    let rc_path = lab::netns::resolv_conf(&a_node.ns);
    std::fs::write(&rc_path, &host_file).unwrap();
    let file = || std::fs::read_to_string(&rc_path).unwrap_or_default();

    let (tok, _) = coord.token(&lab, &["--reusable"]);
    let a = Agent::start(&lab, &a_node, &AgentConfig::mesh(&lab, &a_node));
    up_with(&lab, &a, &coord, &tok, &[]).expect_ok("a up");
    let b = Agent::start(&lab, &b_node, &AgentConfig::mesh(&lab, &b_node));
    up_with(&lab, &b, &coord, &tok, &[]).expect_ok("b up");
    assert!(wait_peers(&lab, &a, &["b"], Duration::from_secs(20)));
    let b_st = b.status(&lab);
    let b_v4: IpAddr = lab::mesh::overlay_v4(&b_st).parse().unwrap();

    // The file points at the resolver, with the network's domain first.
    let ours = file();
    assert!(ours.starts_with("# written by warren"), "{ours}");
    assert!(ours.contains("nameserver 100.100.100.100\n"), "{ours}");
    // And its IPv6 address in the network's /48, once the map gave it.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || file()
            .lines()
            .any(|l| l.starts_with("nameserver fd") && l.ends_with("::53"))),
        "no IPv6 resolver address: {}",
        file()
    );
    assert!(
        ours.contains("search warren.internal corp.example lan.example\n"),
        "{ours}"
    );
    assert!(ours.contains("options edns0\n"), "{ours}");

    // libc: the short name through the search domain, both families.
    assert!(
        poll_until(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || getent(&lab, &a_node, "ahostsv4", "b") == Some(b_v4)
        ),
        "getent b: {:?}\n{}",
        lab.exec(&a_node, &["getent", "ahostsv4", "b"]),
        a.cli(&lab, &["dns", "status"]).stdout
    );
    let v6 = getent(&lab, &a_node, "ahostsv6", "b.warren.internal");
    assert!(matches!(v6, Some(IpAddr::V6(_))), "{v6:?}");
    // Overlay traffic by name, IPv6 too: the resolver's ::53 (a /128 on
    // the TUN) must never be chosen as the source.
    let ping6 = lab.exec(&a_node, &["ping", "-6", "-c", "2", "-W", "2", "b"]);
    assert!(ping6.ok(), "ping -6 b: {ping6:?}");
    // The split domain goes to its server, the rest to the host's own.
    assert_eq!(
        getent(&lab, &a_node, "ahostsv4", "git.corp.example"),
        Some("10.9.9.9".parse().unwrap())
    );
    assert_eq!(
        getent(&lab, &a_node, "ahostsv4", "www.example.com"),
        Some("203.0.113.80".parse().unwrap())
    );
    let (isp_q, corp_q) = (queries(&isp_log), queries(&corp_log));
    assert!(
        corp_q.contains("git.corp.example") && !corp_q.contains("www.example.com"),
        "{corp_q}"
    );
    assert!(
        isp_q.contains("www.example.com") && !isp_q.contains("git.corp.example"),
        "{isp_q}"
    );
    assert!(
        !isp_q.contains("warren.internal") && !corp_q.contains("warren.internal"),
        "the network's names leaked upstream:\n{isp_q}\n{corp_q}"
    );

    // Extra records, PTR, and where each answer came from.
    let g = query_json(&lab, &a, &["grafana"]);
    assert_eq!(g["source"], "the network's names", "{g}");
    assert!(
        g["answers"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("A 100.64.200.1"),
        "{g}"
    );
    let p = query_json(&lab, &a, &[&b_v4.to_string(), "PTR"]);
    assert!(
        p["answers"][0]
            .as_str()
            .unwrap_or("")
            .contains("b.warren.internal"),
        "{p}"
    );
    let s = query_json(&lab, &a, &["git.corp.example"]);
    assert_eq!(s["source"], "split DNS for corp.example", "{s}");

    // A truncated upstream answer is asked again over TCP: the whole
    // record comes back.
    let t = query_json(&lab, &a, &["big.corp.example", "TXT"]);
    assert!(
        t["answers"][0]
            .as_str()
            .unwrap_or("")
            .matches("warren-")
            .count()
            == 100,
        "{t}"
    );
    assert!(
        queries(&corp_log).matches("big.corp.example").count() >= 2,
        "asked once only: {}",
        queries(&corp_log)
    );

    // A rename reaches a's resolver within a second.
    let t0 = Instant::now();
    coord
        .admin(&lab, &["node", "rename", "b", "bee"])
        .expect_ok("rename");
    assert!(
        poll_until(Duration::from_secs(3), Duration::from_millis(20), || ask(
            &lab,
            &a_node,
            "bee.warren.internal"
        )
            == Some(vec![b_v4])),
        "the new name does not resolve"
    );
    let took = t0.elapsed();
    println!("rename reached the resolver in {} ms", took.as_millis());
    assert!(took < Duration::from_millis(1500), "rename took {took:?}");
    assert_eq!(ask(&lab, &a_node, "b.warren.internal"), Some(vec![]));

    // down: the host's file is back byte for byte; up: ours again.
    a.cli(&lab, &["down"]).expect_ok("down");
    assert_eq!(file(), host_file, "after down");
    a.cli(&lab, &["up"]).expect_ok("up again");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || file().starts_with("# written by warren")
    ));

    // kill -9, then a new agent: the backup survived; its `down` restores.
    lab.signal(a.proc, libc::SIGKILL);
    let _ = lab.wait_exit(a.proc, Duration::from_secs(5));
    assert!(
        file().starts_with("# written by warren"),
        "nothing restores after kill -9"
    );
    let a = Agent::start(&lab, &a_node, &AgentConfig::mesh(&lab, &a_node));
    assert!(poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || a.cli(&lab, &["down"]).ok()
    ));
    assert_eq!(file(), host_file, "after a restart following kill -9");

    // --accept-dns=false leaves the file alone; the resolver still answers.
    a.cli(&lab, &["up", "--accept-dns=false", "--reconfigure"])
        .expect_ok("up without DNS");
    assert!(poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || ask(&lab, &a_node, "bee.warren.internal") == Some(vec![b_v4])
    ));
    assert_eq!(file(), host_file, "--accept-dns=false touched the file");
    a.cli(&lab, &["up", "--accept-dns", "--reconfigure"])
        .expect_ok("up with DNS");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || file().starts_with("# written by warren")
    ));

    // Another program rewrites the file: its servers are taken, ours is back.
    let dhcp = format!("nameserver {}\nsearch other.example\n", isp.ip);
    std::fs::write(&rc_path, &dhcp).unwrap();
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || file()
            .contains("search warren.internal corp.example other.example")),
        "no reapply after a rewrite: {}",
        file()
    );
    // Rewritten again and again: warren gives up, leaves theirs, says so.
    for i in 0..8 {
        std::fs::write(&rc_path, format!("nameserver {}\n# rewrite {i}\n", isp.ip)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || a
            .cli(&lab, &["dns", "status"])
            .stdout
            .contains("warren left it alone")),
        "no give-up reported:\n{}",
        a.cli(&lab, &["dns", "status"]).stdout
    );
    assert!(
        file().contains("# rewrite 7"),
        "warren kept writing: {}",
        file()
    );
    let st = a.cli(&lab, &["status"]).expect_ok("status").stdout;
    assert!(st.contains("dns: problem: another program rewrote"), "{st}");
}
