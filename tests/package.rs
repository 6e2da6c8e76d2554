//! The .deb packages, installed for real: `packaging/build.sh --dev` builds
//! them, `dpkg -i` installs them, and the test checks what lands on the
//! system (files, modes, the group and user, conffiles, enabled units, the
//! node key), runs the installed binaries, then removes (state stays) and
//! purges (state goes).
//!
//! It changes the machine it runs on, so it only runs as root and only when
//! neither package is installed already (a developer's real install is never
//! touched); otherwise it is skipped with the reason printed, except under
//! `CI=true` where that is a failure. It works without systemd as PID 1 (CI
//! containers): enabling a unit then only creates its symlinks. Set
//! `WARREN_DEB_DIR` to test prebuilt packages instead of building them.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PACKAGES: [&str; 2] = ["warren", "warren-coordinator"];

fn skip(why: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the package test cannot run: {why}, and CI=true forbids skipping it");
    }
    eprintln!("skipping: {why}");
    false
}

fn can_run() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("installing packages needs root");
    }
    if Command::new("dpkg").arg("--version").output().is_err() {
        return skip("dpkg is not available (not a Debian system)");
    }
    for p in PACKAGES {
        if installed(p) {
            return skip(&format!("package {p} is already installed here"));
        }
    }
    true
}

fn run(argv: &[&str]) -> Output {
    Command::new(argv[0]).args(&argv[1..]).output().unwrap()
}

fn must(argv: &[&str]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed(pkg: &str) -> bool {
    let out = run(&["dpkg-query", "-W", "-f=${db:Status-Status}", pkg]);
    out.status.success() && String::from_utf8_lossy(&out.stdout) == "installed"
}

/// Purges both packages when the test ends, also on panic.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in PACKAGES {
            let _ = run(&["dpkg", "--purge", p]);
        }
    }
}

fn build() -> (Option<tempfile::TempDir>, Vec<PathBuf>) {
    let (tmp, dir) = match std::env::var_os("WARREN_DEB_DIR") {
        Some(d) => (None, PathBuf::from(d)),
        None => {
            let t = tempfile::tempdir().unwrap();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build.sh");
            let p = t.path().to_str().unwrap().to_owned();
            must(&[script.to_str().unwrap(), "--dev", "--out", &p]);
            (Some(t), PathBuf::from(p))
        }
    };
    let debs = PACKAGES
        .iter()
        .map(|p| {
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|f| {
                    let name = f.file_name().unwrap().to_string_lossy().into_owned();
                    name.starts_with(&format!("{p}_")) && name.ends_with(".deb")
                })
                .unwrap_or_else(|| panic!("no {p}_*.deb in {}", dir.display()))
        })
        .collect();
    (tmp, debs)
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

fn unit_path(unit: &str) -> Option<PathBuf> {
    ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(|d| Path::new(d).join(unit))
        .find(|p| p.exists())
}

const WANTS: &str = "/etc/systemd/system/multi-user.target.wants";

#[test]
fn install_remove_purge() {
    if !can_run() {
        return;
    }
    let (_tmp, debs) = build();
    let _cleanup = Cleanup;

    // Install both. No systemd as PID 1 must not fail the install.
    must(&[
        "dpkg",
        "-i",
        debs[0].to_str().unwrap(),
        debs[1].to_str().unwrap(),
    ]);
    assert!(installed("warren") && installed("warren-coordinator"));

    // The agent package.
    assert_eq!(mode("/usr/bin/warren"), 0o755);
    assert_eq!(mode("/etc/warren"), 0o755);
    assert_eq!(mode("/etc/warren/warren.toml"), 0o600);
    assert_eq!(mode("/var/lib/warren"), 0o700);
    assert_eq!(mode("/var/lib/warren/private.key"), 0o600);
    assert_eq!(
        std::fs::metadata("/var/lib/warren/private.key")
            .unwrap()
            .uid(),
        0
    );
    let conffiles = must(&["dpkg-query", "-W", "-f=${Conffiles}", "warren"]);
    assert!(conffiles.contains("/etc/warren/warren.toml"), "{conffiles}");
    must(&["getent", "group", "warren"]);
    assert!(
        unit_path("warren.service").is_some(),
        "warren.service not installed"
    );
    assert!(
        Path::new(WANTS).join("warren.service").exists(),
        "warren.service not enabled"
    );
    // Installed and runnable; the key it made is a valid key.
    let version = must(&["/usr/bin/warren", "version"]);
    assert!(
        version.starts_with(&format!("warren {}\n", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("daemon: not running"), "{version}");
    let key = std::fs::read_to_string("/var/lib/warren/private.key").unwrap();
    let mut child = Command::new("/usr/bin/warren")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), key.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && out.stdout.len() == 45, "{out:?}");
    // The shipped config is valid for the agent that ships with it.
    let text = std::fs::read_to_string("/etc/warren/warren.toml").unwrap();
    let cfg = warren::config::Config::parse(&text, Path::new("/etc/warren/warren.toml")).unwrap();
    assert_eq!(
        cfg.private_key().unwrap().public().to_string(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let status = run(&["/usr/bin/warren", "status"]);
    assert_eq!(
        String::from_utf8_lossy(&status.stderr),
        "warren: warren is not running (start it with: systemctl start warren)\n"
    );

    // The coordinator package.
    assert_eq!(mode("/usr/bin/warren-coordinator"), 0o755);
    must(&["getent", "passwd", "warren-coordinator"]);
    assert_eq!(mode("/var/lib/warren-coordinator"), 0o700);
    assert!(unit_path("warren-coordinator.service").is_some());
    assert!(Path::new(WANTS).join("warren-coordinator.service").exists());
    assert!(Path::new("/etc/default/warren-coordinator").exists());
    let out = run(&["/usr/bin/warren-coordinator", "--version"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
    // The installed units verify with their real ExecStart paths.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        for unit in ["warren.service", "warren-coordinator.service"] {
            let p = unit_path(unit).unwrap();
            must(&["systemd-analyze", "verify", p.to_str().unwrap()]);
        }
    }

    // Remove: the program and unit go, the key and the config stay.
    must(&["dpkg", "--remove", "warren", "warren-coordinator"]);
    assert!(!Path::new("/usr/bin/warren").exists());
    assert!(unit_path("warren.service").is_none());
    assert!(
        Path::new("/var/lib/warren/private.key").exists(),
        "remove lost the node key"
    );
    assert!(
        Path::new("/etc/warren/warren.toml").exists(),
        "remove lost the config"
    );
    assert!(Path::new("/var/lib/warren-coordinator").exists());

    // Purge: the state goes too.
    must(&["dpkg", "--purge", "warren", "warren-coordinator"]);
    for gone in [
        "/var/lib/warren",
        "/etc/warren",
        "/var/lib/warren-coordinator",
        "/etc/default/warren-coordinator",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} survived purge");
    }
    assert!(!Path::new(WANTS).join("warren.service").exists());
    assert!(!installed("warren"));
}
