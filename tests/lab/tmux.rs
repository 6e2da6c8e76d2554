//! A tmux server of our own for terminal tests: type a command line, read
//! the screen back with `capture-pane`, as a person would see it. Shared by
//! the service and `up` terminal tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tmux server of our own (`-L`), killed on drop even when a test panics.
pub struct Tmux {
    server: String,
}

impl Tmux {
    pub fn start(width: u16, height: u16) -> Option<Tmux> {
        let t = Tmux {
            server: format!("warren-test-{}", std::process::id()),
        };
        let out = Command::new("tmux")
            .args(["-L", &t.server, "-f", "/dev/null", "new-session", "-d"])
            .args([
                "-s",
                "main",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            // A plain shell with a known prompt, no rc files.
            .args([
                "env",
                "PS1=$ ",
                "TERM=xterm",
                "bash",
                "--norc",
                "--noprofile",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => Some(t),
            Ok(o) => panic!("tmux new-session failed: {}", text(&o.stderr)),
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("tmux is needed (apt-get install tmux): {e}");
                }
                eprintln!("skipping: tmux is not installed ({e})");
                None
            }
        }
    }

    pub fn tmux(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        out
    }

    pub fn type_line(&self, line: &str) {
        self.tmux(&["send-keys", "-t", "main", "-l", line]);
        self.tmux(&["send-keys", "-t", "main", "Enter"]);
    }

    pub fn screen(&self) -> String {
        text(&self.tmux(&["capture-pane", "-p", "-t", "main"]).stdout)
    }

    /// Polls the screen until `done` holds, at most `timeout`.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if done(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.server, "kill-server"])
            .output();
    }
}

impl Tmux {
    /// Types `command; echo MARKER=$?`, waits (at most `timeout`) for the
    /// marker's output line and asserts exit status 0, then returns the
    /// screen. The typed line shows `MARKER=$?` too, and a long one wraps
    /// so that a screen line may start with it: only `MARKER=` followed by
    /// digits counts.
    pub fn run_ok(&self, command: &str, marker: &str, timeout: Duration) -> String {
        let tag = format!("{marker}=");
        self.type_line(&format!("{command}; echo {tag}$?"));
        let is_status = |l: &str| {
            l.strip_prefix(&tag)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        };
        let screen = self.wait_for(timeout, |s| s.lines().any(is_status));
        assert!(
            screen.lines().any(|l| l == format!("{tag}0")),
            "{command} did not exit 0:\n{screen}"
        );
        screen
    }
}

/// The `warren status` table on a screen: checks its header is exactly
/// [`warren::cli::render::STATUS_HEADERS`] and returns the first row.
pub fn status_first_row(screen: &str) -> String {
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("PEER"))
        .unwrap_or_else(|| panic!("no table header on screen:\n{screen}"));
    let cols: Vec<&str> = lines[header].split_whitespace().collect();
    assert_eq!(cols, warren::cli::render::STATUS_HEADERS, "{screen}");
    lines
        .get(header + 1)
        .unwrap_or_else(|| panic!("no row under the header:\n{screen}"))
        .to_string()
}
