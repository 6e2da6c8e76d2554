//! The systemd units in `systemd/`: they pass `systemd-analyze verify`, the
//! agent's hardening scores 4.0 or lower in `systemd-analyze security`, and
//! they keep the settings the agent relies on.
//!
//! Runs offline on the unit files: no systemd as PID 1 is needed, only the
//! `systemd-analyze` tool (package `systemd`). Without it the test is
//! skipped with the reason printed, except under `CI=true`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_warren");
/// The agent unit's exposure must stay at or below this.
const MAX_EXPOSURE: f64 = 4.0;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

fn have_analyze() -> bool {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("systemd-analyze is needed (apt-get install systemd)");
    }
    eprintln!("skipping: systemd-analyze is not installed (package systemd)");
    false
}

/// Copies the units to a temp dir with ExecStart pointing at the binary we
/// just built: `verify` checks that the command exists and is executable.
fn staged() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["warren.service", "warren-coordinator.service"] {
        let text = std::fs::read_to_string(units_dir().join(unit)).unwrap();
        let text = text
            .replace("/usr/bin/warren-coordinator ", &format!("{BIN} "))
            .replace("/usr/bin/warren ", &format!("{BIN} "));
        assert!(text.contains(BIN), "{unit}: ExecStart not found");
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    dir
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have_analyze() {
        return;
    }
    let dir = staged();
    for unit in ["warren.service", "warren-coordinator.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(unit))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{unit}: {err}");
        // verify reports unknown keys and bad values as warnings, exit 0.
        let own: Vec<&str> = err.lines().filter(|l| l.contains(unit)).collect();
        assert!(own.is_empty(), "{unit}: {own:?}");
    }
}

fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "→ Overall exposure level for warren.service: 2.2 OK 🙂"
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score = line.rsplit(": ").next().unwrap().split_whitespace().next();
    score.unwrap().parse().unwrap()
}

#[test]
fn agent_unit_is_hardened() {
    if !have_analyze() {
        return;
    }
    let dir = staged();
    let score = exposure(&dir.path().join("warren.service"));
    eprintln!("systemd-analyze security: warren.service {score}");
    assert!(score <= MAX_EXPOSURE, "warren.service exposure {score}");
    let score = exposure(&dir.path().join("warren-coordinator.service"));
    eprintln!("systemd-analyze security: warren-coordinator.service {score}");
    assert!(score <= MAX_EXPOSURE, "coordinator exposure {score}");
}

#[test]
fn agent_unit_keeps_what_the_agent_needs() {
    let text = std::fs::read_to_string(units_dir().join("warren.service")).unwrap();
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "DeviceAllow=/dev/net/tun rw",
        "RuntimeDirectory=warren",
        "StateDirectory=warren",
        "Group=warren",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(has(line), "warren.service lacks `{line}`");
    }
    // The socket the unit's RuntimeDirectory holds is the API's default.
    assert_eq!(warren::api::DEFAULT_SOCKET, "/run/warren/warren.sock");
    // PrivateDevices would hide /dev/net/tun; PrivateNetwork the host's
    // network; PrivateUsers the capabilities.
    for bad in [
        "PrivateDevices=yes",
        "PrivateNetwork=yes",
        "PrivateUsers=yes",
    ] {
        assert!(!has(bad), "warren.service must not set {bad}");
    }
}

#[test]
fn shipped_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/warren.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = warren::config::Config::parse(&text, &path).unwrap();
    assert_eq!(
        cfg.interface.private_key_file.as_deref(),
        Some(Path::new("/var/lib/warren/private.key")),
        "the key file the postinst makes"
    );
    assert_eq!(cfg.agent.socket, Path::new(warren::api::DEFAULT_SOCKET));
    assert!(cfg.peers.is_empty());
    // Every commented-out key is a real key: uncommented, it still parses.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.contains(" = ") || rest.starts_with("[[") => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("base64…", "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
    let full = warren::config::Config::parse(&uncommented, &path)
        .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(full.peers.len(), 1);
    assert_eq!(full.interface.addresses.len(), 1);
}
