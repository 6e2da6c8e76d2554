//! `warren up` as a person uses it, against a real coordinator in the lab:
//! the progress it shows (registering → network map → tunnel), `--json`
//! (one object, parsed and checked), `--advertise-tags` reaching peers, the
//! coordinator's `node list` and `status`, the OS/version column, an `up`
//! with other settings on a node that is up (refused with each difference
//! named, nothing changed; `--reconfigure` changes only what is passed),
//! the timeout against a coordinator that never answers, and the same
//! `up` and `status` typed into a real terminal (tmux).

use crate::lab;
use crate::tmux;

use std::time::{Duration, Instant};

use lab::agent::{Agent, AgentConfig, WARREN};
use lab::coord::Coordinator;
use lab::mesh::{peer_of, up_with, wait_peers};
use lab::{poll_until, Lab};
use serde_json::Value;

/// A coordinator, a reusable token and two agents "a" and "b" not joined yet.
fn network(lab: &Lab) -> (Coordinator, Agent, Agent, String) {
    let c = lab.public("coord");
    let coord = Coordinator::start(lab, &c, &[]);
    let agent = |name: &str| {
        let n = lab.public(name);
        Agent::start(lab, &n, &AgentConfig::mesh(lab, &n))
    };
    let (a, b) = (agent("a"), agent("b"));
    let (token, _) = coord.token(lab, &["--reusable"]);
    (coord, a, b, token)
}

#[test]
fn up_shows_progress_advertises_tags_and_refuses_other_settings() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let (coord, a, b, token) = network(&lab);
    let url = coord.url();

    // A bad tag is refused by the CLI before anything is sent.
    let bad = up_with(&lab, &a, &coord, &token, &["--advertise-tags", "server"]);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("must start with \"tag:\""),
        "{}",
        bad.stderr
    );
    assert_eq!(a.status(&lab)["mesh"]["state"], "needs_login");

    // The first join shows each stage on stderr and the result on stdout.
    let tags = ["--advertise-tags", "tag:server,tag:db"];
    let up = up_with(&lab, &a, &coord, &token, &tags).expect_ok("up a");
    for stage in [
        format!("registering with {url} … ok: a ("),
        "waiting for the network map … ok: 0 peers".to_string(),
        "bringing the tunnel up … ok: ".to_string(),
    ] {
        assert!(
            up.stderr.contains(&stage),
            "{stage:?} not in:\n{}",
            up.stderr
        );
    }
    assert!(
        up.stdout.starts_with("warren is up: a (100.")
            && up.stdout.contains("tags tag:db,tag:server"),
        "{}",
        up.stdout
    );

    // --json: no progress, one object with the result.
    let up = up_with(&lab, &b, &coord, &token, &["--json"]).expect_ok("up b --json");
    assert!(up.stderr.is_empty(), "progress with --json: {}", up.stderr);
    let j: Value = serde_json::from_str(&up.stdout).expect("one JSON object");
    assert_eq!(j["name"], "b", "{j}");
    assert_eq!(j["coordinator"], url.as_str());
    assert_eq!(j["changed"], serde_json::json!(["coordinator"]));
    assert_eq!(j["tags"], serde_json::json!([]));
    assert!(
        j["addresses"].as_array().is_some_and(|a| a.len() == 2),
        "{j}"
    );
    assert!(j["elapsed_ms"].as_u64().is_some(), "{j}");
    assert!(
        j["interface"].as_str().is_some_and(|i| !i.is_empty()),
        "{j}"
    );

    // b sees a's tags, OS and version, in JSON and in the table.
    assert!(wait_peers(&lab, &b, &["a"], Duration::from_secs(20)));
    let st = b.status(&lab);
    let pa = peer_of(&st, "a").unwrap();
    assert_eq!(
        pa["mesh"]["tags"],
        serde_json::json!(["tag:db", "tag:server"])
    );
    assert_eq!(pa["mesh"]["os"], "linux");
    assert_eq!(pa["mesh"]["version"], env!("CARGO_PKG_VERSION"));
    let table = b.cli(&lab, &["status"]).expect_ok("status").stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("no row for a:\n{table}"));
    let os = format!("linux {}", env!("CARGO_PKG_VERSION"));
    assert!(row.contains(&os), "{row}\n{table}");
    assert!(table.contains("a: tags tag:db,tag:server"), "{table}");
    let nodes = coord
        .admin(&lab, &["node", "list"])
        .expect_ok("node list")
        .stdout;
    let line = nodes.lines().find(|l| l.contains(" a ")).unwrap();
    assert!(line.contains("tag:db,tag:server"), "{nodes}");

    // Other settings on a node that is up: each one named, nothing changed.
    let other = a.cli(
        &lab,
        &["up", "--hostname", "a2", "--advertise-tags", "tag:web"],
    );
    assert!(!other.ok());
    for want in [
        "already up with other settings; nothing changed",
        "--hostname: is a, you asked for a2",
        "--advertise-tags: is tag:db,tag:server, you asked for tag:web",
        "--reconfigure",
    ] {
        assert!(
            other.stderr.contains(want),
            "{want:?} not in:\n{}",
            other.stderr
        );
    }
    assert!(!other.stderr.contains("--coordinator:"), "{}", other.stderr);
    let me = a.status(&lab);
    assert_eq!(
        me["mesh"]["tags"],
        serde_json::json!(["tag:db", "tag:server"])
    );
    assert_eq!(me["mesh"]["state"], "running");

    // The same settings again, or none: nothing to do, no error.
    a.cli(&lab, &["up", "--coordinator", &url, "--hostname", "a"])
        .expect_ok("up with the same settings");
    a.cli(&lab, &["up"]).expect_ok("bare up");

    // --reconfigure changes what is passed, and only that.
    let re = a
        .cli(
            &lab,
            &[
                "up",
                "--advertise-tags",
                "tag:web",
                "--reconfigure",
                "--json",
            ],
        )
        .expect_ok("reconfigure");
    let j: Value = serde_json::from_str(&re.stdout).unwrap();
    assert_eq!(j["changed"], serde_json::json!(["advertise-tags"]), "{j}");
    assert_eq!(j["tags"], serde_json::json!(["tag:web"]));
    assert_eq!(j["name"], "a");
    let seen = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        peer_of(&b.status(&lab), "a")
            .is_some_and(|p| p["mesh"]["tags"] == serde_json::json!(["tag:web"]))
    });
    assert!(seen, "b never saw a's new tags: {}", b.status(&lab));
}

#[test]
fn plain_http_beyond_this_host_is_refused_without_the_lab_flag() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let c = lab.public("coord");
    let coord = Coordinator::start(&lab, &c, &[]);
    let (token, _) = coord.token(&lab, &["--reusable"]);
    let na = lab.public("a");
    let cfg = AgentConfig {
        insecure_http: false,
        ..AgentConfig::mesh(&lab, &na)
    };
    let a = Agent::start(&lab, &na, &cfg);
    // The coordinator is reachable and the token good: only the plain
    // HTTP to another host is wrong, and nothing is sent or saved.
    let out = up_with(&lab, &a, &coord, &token, &[]);
    assert!(!out.ok(), "{}", out.stdout);
    assert!(
        out.stderr.contains("refusing plain HTTP") && out.stderr.contains("insecure_http"),
        "{}",
        out.stderr
    );
    assert_eq!(a.status(&lab)["mesh"]["state"], "needs_login");
    let nodes = coord.admin(&lab, &["node", "list"]).expect_ok("node list");
    assert!(
        !nodes.stdout.lines().skip(1).any(|l| l.contains(" a ")),
        "the node registered: {}",
        nodes.stdout
    );
}

#[test]
fn up_gives_up_after_the_timeout_with_a_clear_message() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    // A "coordinator" that accepts the connection and never answers.
    let c = lab.public("mute");
    let mute = lab.spawn(&c, "mute", &["nc", "-l", "-k", "443"]);
    let na = lab.public("a");
    let a = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            lab.exec(&c, &["ss", "-ltn", "sport = :443"])
                .stdout
                .contains("443")
        }
    ));
    let url = format!("http://{}:443", c.ip);
    let started = Instant::now();
    let out = a.cli(
        &lab,
        &[
            "up",
            "--coordinator",
            &url,
            "--token",
            "wrn_x_y",
            "--timeout",
            "3s",
        ],
    );
    let took = started.elapsed();
    assert!(!out.ok() && !out.timed_out, "{out:?}", out = out.stderr);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    assert!(
        out.stderr
            .contains(&format!("registering with {url} … failed")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("no answer from the coordinator {url} within 3s")),
        "{}",
        out.stderr
    );
    assert_eq!(a.status(&lab)["mesh"]["state"], "needs_login");
    assert!(lab.exit_status(mute).is_none());
}

#[test]
fn up_and_status_in_a_terminal() {
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let (coord, a, b, token) = network(&lab);
    let url = coord.url();
    lab::mesh::up(&lab, &a, &coord, &token).expect_ok("up a");
    let Some(term) = tmux::Tmux::start(120, 40) else {
        return;
    };
    let warren = format!(
        "ip netns exec {} {WARREN} --socket {}",
        b.node.ns,
        b.socket(&lab)
    );
    let screen = term.run_ok(
        &format!(
            "{warren} up --coordinator {url} --token {token} --hostname b --advertise-tags tag:db"
        ),
        "EXIT",
        Duration::from_secs(40),
    );
    let lines: Vec<&str> = screen.lines().collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{screen}"))
    };
    // One line per stage, in order, each finished with "ok".
    let reg = at("registering with ");
    let map = at("waiting for the network map … ok: 1 peers");
    let tun = at("bringing the tunnel up … ok: ");
    let done = at("warren is up: b (100.");
    assert!(reg < map && map < tun && tun < done, "{screen}");
    assert!(lines[reg].contains("… ok: b ("), "{screen}");
    assert!(lines[done].contains("1 peer, tags tag:db"), "{screen}");

    term.type_line("clear");
    let screen = term.run_ok(
        &format!("{warren} status"),
        "STATUS_EXIT",
        Duration::from_secs(10),
    );
    let row = tmux::status_first_row(&screen);
    assert!(row.starts_with("a "), "{screen}");
    assert!(
        row.contains(&format!("linux {}", env!("CARGO_PKG_VERSION"))),
        "{screen}"
    );
    assert!(row.contains("relay") || row.contains("direct"), "{screen}");
    assert!(screen.contains("network: b on "), "{screen}");
    assert!(screen.contains("tags: tag:db"), "{screen}");
    assert!(
        !screen.contains('\u{1b}'),
        "escape codes on screen:\n{screen}"
    );
}
