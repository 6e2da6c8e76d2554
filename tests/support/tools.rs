//! Shared by the interop tests of both crates: is an external tool
//! installed? Skipping is allowed locally, never under `CI=true`.

use std::process::Command;

/// Whether `tool` is on PATH. Without it, prints why the test is skipped,
/// or panics under `CI=true` where a skipped interop test would hide a gap.
pub fn tool_available(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true (Debian package {package})"
        );
        eprintln!("SKIP: {tool} not installed (apt-get install {package})");
    }
    found
}
