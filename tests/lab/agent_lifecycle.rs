//! Lab tests of the `warren` binary's life cycle, without traffic between
//! peers: key commands compatible with `wg`, bad configs that fail early
//! and cleanly (named file, line and key; no device left behind), and a
//! clean stop on SIGTERM and SIGINT (exit 0, TUN removed).

use crate::lab;

use std::time::Duration;

use lab::agent::{warren_keypair, Agent, AgentConfig, PeerCfg, PORT, WARREN};
use lab::wg::wg_keypair;
use lab::{Lab, Node};

#[test]
fn keys_match_wg_format() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let n = lab.public("n");
    let t = lab::EXEC_TIMEOUT;
    let k = warren_keypair(&lab, &n);
    let wg_pub = lab.exec_with(&n, &["wg", "pubkey"], Some(k.private.as_bytes()), t);
    let wg_pub = wg_pub.expect_ok("wg pubkey");
    assert_eq!(
        wg_pub.stdout.trim(),
        k.public,
        "wg derives the same public key"
    );
    let wg = wg_keypair();
    let ours = lab.exec_with(&n, &[WARREN, "pubkey"], Some(wg.private.as_bytes()), t);
    let ours = ours.expect_ok("warren pubkey");
    assert_eq!(ours.stdout.trim(), wg.public, "warren reads wg keys");
    let bad = lab.exec_with(&n, &[WARREN, "pubkey"], Some(b"not a key"), t);
    assert!(!bad.ok(), "garbage on stdin must fail");
    assert!(
        bad.stderr.contains("key"),
        "says what is wrong: {}",
        bad.stderr
    );
}

/// Runs `warren agent` on `config` (written to `file` in the lab dir) and
/// checks it fails without creating a device. With `names_config`, stderr
/// must also name the config file. Returns stderr.
fn agent_must_fail(lab: &Lab, node: &Node, file: &str, config: &str, names_config: bool) -> String {
    let path = lab.write_file(file, config);
    let path = path.to_string_lossy();
    let argv = [WARREN, "agent", "--config", &path];
    let out = lab.exec_with(node, &argv, None, Duration::from_secs(20));
    let err = out.stderr;
    assert!(
        !out.timed_out,
        "warren agent kept running on a bad config:\n{err}"
    );
    assert!(
        !out.status.success(),
        "bad config must exit non-zero:\n{err}"
    );
    assert!(
        !names_config || err.contains(path.as_ref()),
        "stderr names the file: {err}"
    );
    let links = lab.links(node);
    assert_eq!(links, ["lo", "wan"], "no device left behind after: {err}");
    err
}

#[test]
fn bad_config_fails_cleanly() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let n = lab.public("n");
    let k = wg_keypair();
    let good = AgentConfig::new(&k.private, &["100.64.0.1/24"]).to_toml();

    let bad_port = good.replace(&format!("listen_port = {PORT}"), "listen_port = \"many\"");
    assert_eq!(bad_port.lines().nth(3), Some("listen_port = \"many\""));
    let err = agent_must_fail(&lab, &n, "bad-port.toml", &bad_port, true);
    assert!(
        err.contains(":4:") && err.contains("listen_port"),
        "names line 4 and the key: {err}"
    );

    // Line 6 is the broken table header.
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

    let peer = PeerCfg::new("AAAA", &["100.64.0.2/32"]);
    let bad_peer = AgentConfig::new(&k.private, &["100.64.0.1/24"])
        .peer(peer)
        .to_toml();
    let err = agent_must_fail(&lab, &n, "bad-peer.toml", &bad_peer, true);
    assert!(
        err.contains(":8:") && err.contains("public_key"),
        "names the peer key: {err}"
    );

    let bad_cidr = good.replace("100.64.0.1/24", "100.64.0.1/33");
    let err = agent_must_fail(&lab, &n, "bad-cidr.toml", &bad_cidr, true);
    assert!(
        err.contains(":5:") && err.contains("addresses"),
        "names the address: {err}"
    );

    let unknown = good.replace("[interface]\n", "[interface]\nmtuu = 1400\n");
    let err = agent_must_fail(&lab, &n, "unknown.toml", &unknown, true);
    assert!(
        err.contains(":2:") && err.contains("mtuu"),
        "names an unknown key: {err}"
    );

    // A missing key file: the message must at least name that file.
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
fn stops_cleanly_on(lab: Lab, sig: i32) {
    let n = lab.public("n");
    let k = warren_keypair(&lab, &n);
    let mut config = AgentConfig::new(&k.private, &["100.64.0.1/24"]);
    config.ifname = lab.ifname();
    let agent = Agent::start(&lab, &n, &config);
    let addrs = lab.exec(&n, &["ip", "-o", "addr", "show", "dev", &agent.ifname]);
    let addrs = addrs.expect_ok("ip addr show");
    assert!(
        addrs.stdout.contains("100.64.0.1/24"),
        "overlay address configured: {}",
        addrs.stdout
    );
    lab.signal(agent.proc, sig);
    let status = lab.wait_exit(agent.proc, Duration::from_secs(10));
    let log = lab.log(agent.proc);
    let status =
        status.unwrap_or_else(|| panic!("agent still running 10 s after signal {sig}:\n{log}"));
    let how = lab::describe(&status);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {sig} ({how}):\n{log}"
    );
    assert!(
        !lab.has_link(&agent.node, &agent.ifname),
        "TUN {} removed",
        agent.ifname
    );
}

#[test]
fn sigterm_stops_cleanly() {
    if let Some(lab) = Lab::new_or_skip() {
        stops_cleanly_on(lab, libc::SIGTERM);
    }
}

#[test]
fn sigint_stops_cleanly() {
    if let Some(lab) = Lab::new_or_skip() {
        stops_cleanly_on(lab, libc::SIGINT);
    }
}
