//! Lab test of `warren ping`: two agents behind EIM NATs whose gateways
//! first drop all UDP between each other (nftables), so every pong comes
//! back through the relay; once the rule goes, `warren ping` (default
//! `--until-direct`) must show the path turn direct, and `--json` must say
//! the same per round. Also `status` names why the peer was relayed, with a
//! wall-clock time.

use crate::lab;

use std::time::Duration;

use serde_json::Value;

use lab::coord::Coordinator;
use lab::mesh::{join_pair, path_of, peer_of};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
const BLOCK_TABLE: &str = "wlpingblock";

/// Drops UDP that `gw` would forward to `other` (its WAN address).
fn block_udp(lab: &Lab, gw: &Node, other: &Node) {
    let rules = format!(
        "table ip {BLOCK_TABLE} {{\n  chain drop_udp {{\n    type filter hook forward priority -10; policy accept;\n    ip daddr {} meta l4proto udp drop\n  }}\n}}\n",
        other.ip
    );
    let file = lab.write_file(&format!("{}-block.nft", gw.name), &rules);
    lab.exec(gw, &["nft", "-f", &file.to_string_lossy()])
        .expect_ok("nft block");
}

fn unblock_udp(lab: &Lab, gw: &Node) {
    lab.exec(gw, &["nft", "delete", "table", "ip", BLOCK_TABLE])
        .expect_ok("nft unblock");
}

#[test]
fn ping_shows_relay_pongs_then_the_path_turning_direct() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    let ga = lab.gateway("ga", Nat::Eim);
    let gb = lab.gateway("gb", Nat::Eim);
    block_udp(&lab, &ga, &gb);
    block_udp(&lab, &gb, &ga);
    let na = lab.host_behind(&ga, "a");
    let nb = lab.host_behind(&gb, "b");
    let (a, _b, ip_b) = join_pair(&lab, &coord, &na, &nb);
    assert!(lab.ping_within(&na, &ip_b, JOIN_TIMEOUT), "no tunnel");

    // Blocked: three rounds, every pong through the relay, exit 0 (pongs
    // came) since --until-direct=false.
    let out = a
        .cli(&lab, &["ping", "b", "-c", "3", "--until-direct=false"])
        .expect_ok("warren ping over the relay");
    eprintln!("{}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.len() >= 3, "{}", out.stdout);
    let want = format!("pong from b ({ip_b}) via relay default in ");
    assert!(lines.iter().all(|l| l.starts_with(&want)), "{}", out.stdout);
    // With --until-direct (the default) and no direct path: exit 1.
    let out = a.cli(&lab, &["ping", "b", "-c", "2"]);
    assert!(!out.ok(), "{}", out.stdout);
    assert!(out.stderr.contains("direct path"), "{}", out.stderr);

    // Once the attempt gives up, status says why b is relayed, with a
    // wall-clock time, and which candidates were tried.
    let reason = |st: &Value| {
        peer_of(st, "b").unwrap()["mesh"]["relay_reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(500), || {
            reason(&a.status(&lab)).contains("gave up at ")
        }),
        "{}",
        a.status(&lab)
    );
    let st = a.status(&lab);
    let why = reason(&st);
    eprintln!("relay reason: {why}");
    let clock = why.rsplit("gave up at ").next().unwrap();
    let b = clock.as_bytes();
    assert!(
        clock.len() == 12 && b[2] == b':' && b[5] == b':' && clock.ends_with(" UTC"),
        "HH:MM:SS UTC: {why}"
    );
    let tried = peer_of(&st, "b").unwrap()["mesh"]["tried"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        tried
            .iter()
            .any(|t| t["kind"] == "srflx" && t["last_pong"].is_null()),
        "{st}"
    );
    let text = a.cli(&lab, &["status"]).expect_ok("status").stdout;
    eprintln!("{text}");
    assert!(text.contains("b: relayed: no pong from"), "{text}");
    assert!(
        text.contains("b: tried ") && text.contains("(srflx, no pong)"),
        "{text}"
    );

    // Unblocked: the pings themselves ask b to probe back, and the path
    // turns direct within a few rounds.
    unblock_udp(&lab, &ga);
    unblock_udp(&lab, &gb);
    let out = a
        .cli(&lab, &["ping", &ip_b, "-c", "15", "--json"])
        .expect_ok("warren ping until direct");
    let rounds: Value = serde_json::from_str(&out.stdout).expect("a JSON array");
    let rounds = rounds.as_array().unwrap();
    eprintln!("{} rounds:\n{}", rounds.len(), out.stdout);
    let last = rounds.last().unwrap();
    assert_eq!(last["round"]["direct"], true, "{last}");
    let direct: Vec<&Value> = last["round"]["pongs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["path"]["kind"] == "direct")
        .collect();
    assert!(!direct.is_empty(), "{last}");
    let endpoint = direct[0]["path"]["endpoint"].as_str().unwrap();
    assert!(
        endpoint.starts_with(&format!("{}:", gb.ip)),
        "direct to b's gateway: {endpoint}"
    );
    let ms = direct[0]["latency_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 1000.0, "{ms}");
    assert_eq!(last["seq"].as_u64().unwrap() as usize, rounds.len());
    // Every round before the last had no direct pong, and answered through
    // the relay.
    for r in &rounds[..rounds.len() - 1] {
        assert_eq!(r["round"]["direct"], false, "{r}");
        assert!(
            r["round"]["pongs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["path"]["kind"] == "relay"),
            "{r}"
        );
    }
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(200), || {
            path_of(&a.status(&lab), "b") == "direct"
        }),
        "status agrees the path is direct"
    );
    // Once direct, a round answers over the direct path at once.
    let out = a.cli(&lab, &["ping", "b"]).expect_ok("warren ping direct");
    assert!(
        out.stdout.contains("direct path found after 1 ping"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("via {}:", gb.ip)),
        "{}",
        out.stdout
    );
}
