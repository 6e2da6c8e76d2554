//! The client commands against a real daemon (`warren agent` in network
//! namespaces, see `service_fixture`): `status`, `ip`, `ping`, `version`,
//! with `--json` parsed and checked, their errors as a person sees them,
//! the socket's permissions, a SIGHUP reload that keeps the tunnel, and
//! `warren status` typed into a real terminal (tmux) and read back from the
//! screen: width detection, no stray escape codes, nothing cut off. The
//! terminal test needs tmux (`apt-get install tmux`); without it it is
//! skipped, except under `CI=true`.
//!
//! Tests that need a daemon need root; without it they are skipped with the
//! reason printed (and fail under `CI=true`). The daemon-down and bad-flag
//! tests run anywhere.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::service_fixture::{is_socket, text, Pair, Side, BIN};
use crate::tmux::{self, Tmux};
use warren::api::{IpReply, PeerPath, PingReply, Status};

#[test]
fn status_json_and_table_show_the_live_peer() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };
    pair.ping_through();

    let out = pair.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st: Status = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st.interface, pair.a.ifname);
    assert_eq!(st.public_key, pair.a.public());
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.addresses, vec!["100.64.0.1/10".parse().unwrap()]);
    assert_eq!(st.listen.port(), 51820);
    assert_eq!(st.peers.len(), 1);
    let p = &st.peers[0];
    assert_eq!(p.public_key, pair.b.public());
    assert_eq!(p.allowed_ips, vec!["100.64.0.2/32".parse().unwrap()]);
    assert_eq!(
        p.path,
        PeerPath::Direct {
            endpoint: pair.underlay(Side::B).parse().unwrap()
        }
    );
    assert!(p.last_handshake_secs.is_some_and(|s| s < 60), "{p:?}");
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "{p:?}");
    // The field names are the documented, stable ones.
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "public_key",
        "allowed_ips",
        "path",
        "latency_ms",
        "last_handshake_secs",
    ] {
        assert!(raw["peers"][0].get(key).is_some(), "missing {key}: {raw}");
    }
    assert_eq!(raw["peers"][0]["path"]["kind"], "direct");
    assert!(raw["drops"]["no_route"].is_u64(), "{raw}");

    let out = pair.cli(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("PEER") && table.contains("HANDSHAKE") && table.contains("RX"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&pair.b.public().short()))
        .unwrap_or_else(|| panic!("no row for the peer:\n{table}"));
    assert!(row.contains("100.64.0.2"), "{row}");
    assert!(
        row.contains(&format!("direct {}", pair.underlay(Side::B))),
        "{row}"
    );
    assert!(row.contains("s ago"), "{row}");
}

#[test]
fn ip_version_and_ping() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };

    let out = pair.cli(&["ip"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "100.64.0.1\n");
    // The peer by key prefix, by overlay IP, and as JSON.
    let b_key = pair.b.public().to_string();
    let out = pair.cli(&["ip", &b_key[..8]]);
    assert_eq!(text(&out.stdout), "100.64.0.2\n", "{}", text(&out.stderr));
    let out = pair.cli(&["ip", "--json", "100.64.0.2"]);
    let ip: IpReply = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ip.public_key, pair.b.public());
    assert_eq!(
        ip.addresses,
        vec!["100.64.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let out = pair.cli(&["ip", "-6"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "", "no IPv6 overlay address configured");

    let out = pair.cli(&["version"]);
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        text(&out.stdout),
        format!("warren {v}\ndaemon: warren {v} (running)\n")
    );
    let out = pair.cli(&["version", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, serde_json::json!({"version": v, "daemon": v}));

    // Before any traffic the peer has no handshake: ping says so, exit 1.
    let out = pair.cli(&["ping", "100.64.0.2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not responding: no handshake yet"),
        "{}",
        text(&out.stderr)
    );
    pair.ping_through();
    let out = pair.cli(&["ping", "--json", &b_key[..6]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ping: PingReply = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ping.alive && ping.rx_bytes > 0, "{ping:?}");
    let out = pair.cli(&["ping", "100.64.0.2"]);
    assert!(text(&out.stdout).contains("is up: WireGuard handshake"));
}

#[test]
fn unknown_peer_is_a_clear_error() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };
    for args in [
        &["ip", "desktop"][..],
        &["ping", "100.64.9.9"],
        &["ip", "--json", "zzzz"],
    ] {
        let out = pair.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.starts_with("warren: unknown peer `"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn socket_permissions_and_a_caller_without_them() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };
    let meta = std::fs::metadata(&pair.a.socket).unwrap();
    assert!(is_socket(&pair.a.socket));
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);
    if let Ok(Some(g)) = nix::unistd::Group::from_name("warren") {
        assert_eq!(
            meta.gid(),
            g.gid.as_raw(),
            "socket not given to group warren"
        );
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .arg("--socket")
        .arg(&pair.a.socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "warren: permission denied: run as root or join group warren\n"
    );

    // A second agent on the same socket is refused before it touches
    // anything, and the first one keeps answering.
    let out = pair.lab.exec(
        &pair.b.host,
        &[
            BIN,
            "agent",
            "--config",
            pair.b.config.to_str().unwrap(),
            "--socket",
            pair.a.socket.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = out.stderr;
    assert!(
        err.contains("another warren agent already answers on"),
        "{err}"
    );
    assert_eq!(pair.a.status().public_key, pair.a.public());
}

#[test]
fn daemon_down_names_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("warren.sock");
    // A socket file nobody listens on (a crashed daemon's) reads the same.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [&missing, &stale] {
        for args in [&["status"][..], &["ip"], &["status", "--json"]] {
            let out = Command::new(BIN)
                .args(args)
                .env("WARREN_SOCKET", socket)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            assert_eq!(
                text(&out.stderr),
                "warren: warren is not running (start it with: systemctl start warren)\n"
            );
        }
    }
    // `version` still answers for the CLI itself.
    let out = Command::new(BIN)
        .args(["version", "--socket"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).ends_with("daemon: not running\n"));
}

#[test]
fn bad_flag_shows_usage() {
    let out = Command::new(BIN)
        .args(["status", "--jsn"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("unexpected argument '--jsn'"), "{err}");
    assert!(err.contains("Usage: warren status"), "{err}");
    let out = Command::new(BIN).args(["ip", "-4", "-6"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["status", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("--json"));
    assert!(text(&out.stdout).contains("--socket"));
}

#[test]
fn sighup_reloads_peers_and_keeps_the_tunnel() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };
    pair.ping_through();
    let before = pair.a.status();
    let handshake_before = before.peers[0].last_handshake_secs;
    assert!(handshake_before.is_some());

    let extra = warren::keys::PrivateKey::generate().public();
    pair.write_config(
        Side::A,
        &format!("\n[[peer]]\npublic_key = \"{extra}\"\nallowed_ips = [\"100.64.0.9/32\"]\n"),
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pair.pid(Side::A), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let st = pair.a.status();
        if st.peers.len() == 2 {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            pair.log(Side::A)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let kept = after
        .peers
        .iter()
        .find(|p| p.public_key == pair.b.public())
        .unwrap();
    // The same session: its handshake and byte counts survived the reload.
    assert!(kept.last_handshake_secs.is_some(), "{kept:?}");
    assert!(kept.rx_bytes >= before.peers[0].rx_bytes && kept.rx_bytes > 0);
    // The log line is written just after the peers are applied.
    let logged = Instant::now() + Duration::from_secs(5);
    while !pair.log(Side::A).contains("SIGHUP: config reloaded") {
        assert!(Instant::now() < logged, "the reload is not logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file changes nothing and the daemon lives on.
    std::fs::write(&pair.a.config, "[interface\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pair.pid(Side::A), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pair.a.status().peers.len(), 2);
    pair.ping_through();
}

#[test]
fn status_in_a_terminal_shows_the_table() {
    let Some(pair) = Pair::start_or_skip() else {
        return;
    };
    pair.ping_through();
    let Some(term) = Tmux::start(100, 30) else {
        return;
    };
    let screen = term.run_ok(
        &format!("{BIN} --socket {} status", pair.a.socket.display()),
        "EXIT",
        Duration::from_secs(10),
    );
    let row = tmux::status_first_row(&screen);
    assert!(row.starts_with(&pair.b.public().short()), "{screen}");
    let path = format!("direct {}", pair.underlay(Side::B));
    for cell in ["100.64.0.2", path.as_str(), "s ago", " B"] {
        assert!(row.contains(cell), "{cell:?} not in {row:?}\n{screen}");
    }
    // The node line above the table names the interface and its address.
    assert!(
        screen.contains(&format!("{}  100.64.0.1/10  key ", pair.a.ifname)),
        "{screen}"
    );
    assert!(
        !screen.contains('\u{1b}'),
        "escape codes on screen:\n{screen}"
    );

    // An error reads as one clear line on the same terminal.
    term.type_line(&format!("{BIN} --socket /nonexistent/warren.sock status"));
    let screen = term.wait_for(Duration::from_secs(10), |s| {
        s.lines().any(|l| l.starts_with("warren: "))
    });
    assert!(
        screen.contains("warren is not running (start it with: systemctl start warren)"),
        "{screen}"
    );
}
