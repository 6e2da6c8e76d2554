//! The `warren` binary's key commands and its answers to bad input, run as
//! a user would run them. None of these needs a network namespace.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_warren");

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warren");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn genkey_pubkey_agree_with_wg_format() {
    let out = run(&["genkey"], "");
    assert!(out.status.success());
    let key = text(&out.stdout).trim().to_string();
    assert_eq!(key.len(), 44, "{key}");
    let out = run(&["pubkey"], &key);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout).trim().to_string();
    assert_eq!(public.len(), 44);
    assert_ne!(public, key);
    // When wireguard-tools is installed, the two must agree exactly.
    if let Ok(mut wg) = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        wg.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
        let o = wg.wait_with_output().unwrap();
        assert_eq!(text(&o.stdout).trim(), public);
    }
}

#[test]
fn bad_key_on_stdin_says_why() {
    let out = run(&["pubkey"], "not-a-key");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("invalid private key"), "{err}");
    assert!(err.contains("base64") || err.contains("32 bytes"), "{err}");
}

fn write_config(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

#[test]
fn malformed_config_names_file_line_and_key() {
    let f = write_config(
        "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\nname = \"wbad0\"\n\n[[peer]]\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\npersistent_keepalive = \"often\"\n",
    );
    let path = f.path().to_str().unwrap().to_string();
    let out = run(&["agent", "--config", &path], "");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{path}:7: key `peer[0].persistent_keepalive`")),
        "{err}"
    );
    // No device was created: the error comes before any device work.
    assert!(!std::path::Path::new("/sys/class/net/wbad0").exists());
}

#[test]
fn bad_key_in_config_is_clear() {
    let f = write_config("[interface]\nprivate_key = \"c2hvcnQ=\"\n");
    let out = run(&["agent", "--config", f.path().to_str().unwrap()], "");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(":2: key `interface.private_key`"), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let out = run(&["agent", "--config", "/nonexistent/warren.toml"], "");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/warren.toml: cannot read"));
}

/// Without CAP_NET_ADMIN the agent says what is missing. As root we drop to
/// `nobody` with `setpriv`; as another user we are already unprivileged.
#[test]
fn without_net_admin_the_message_names_the_capability() {
    let mut f = write_config(
        "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\nname = \"wnoperm0\"\nlisten_port = 0\n",
    );
    f.flush().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let is_root = text(&Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0";
    let out = if is_root {
        let Ok(o) = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .args([BIN, "agent", "--config", f.path().to_str().unwrap()])
            .output()
        else {
            eprintln!("skipping: setpriv (util-linux) is not installed");
            return;
        };
        o
    } else {
        run(&["agent", "--config", f.path().to_str().unwrap()], "")
    };
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(!std::path::Path::new("/sys/class/net/wnoperm0").exists());
}
