//! What a person sees: `warren status` typed into a real terminal (tmux),
//! against a real daemon, read back from the screen with `capture-pane`.
//!
//! This catches what the string tests of the renderer cannot: the table as a
//! terminal lays it out (width detection, no stray escape codes, nothing
//! cut off at 80 columns). Needs root for the daemon (skip rules as for the
//! lab) and tmux (`apt-get install tmux`); without tmux the test is skipped,
//! except under `CI=true`.

#![allow(clippy::unwrap_used)]

mod service_fixture;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use service_fixture::{require_root, text, Pair, Side, BIN};

/// A tmux server of our own (`-L`), killed on drop even when a test panics.
struct Tmux {
    server: String,
}

impl Tmux {
    fn start(width: u16, height: u16) -> Option<Tmux> {
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

    fn tmux(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        out
    }

    fn type_line(&self, line: &str) {
        self.tmux(&["send-keys", "-t", "main", "-l", line]);
        self.tmux(&["send-keys", "-t", "main", "Enter"]);
    }

    fn screen(&self) -> String {
        text(&self.tmux(&["capture-pane", "-p", "-t", "main"]).stdout)
    }

    /// Polls the screen until `done` holds, at most `timeout`.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
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

#[test]
fn status_in_a_terminal_shows_the_table() {
    if !require_root() {
        return;
    }
    let pair = Pair::start();
    pair.ping_through();
    let Some(term) = Tmux::start(100, 30) else {
        return;
    };
    term.type_line(&format!(
        "{BIN} --socket {} status; echo EXIT=$?",
        pair.a.socket.display()
    ));
    // The typed command line shows "EXIT=$?" too: wait for the output line.
    let exited = |s: &str| s.lines().any(|l| l.starts_with("EXIT="));
    let screen = term.wait_for(Duration::from_secs(10), exited);
    assert!(screen.lines().any(|l| l == "EXIT=0"), "{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("PEER"))
        .unwrap_or_else(|| panic!("no table header on screen:\n{screen}"));
    let cols: Vec<&str> = lines[header].split_whitespace().collect();
    assert_eq!(
        cols,
        ["PEER", "IPS", "PATH", "LATENCY", "HANDSHAKE", "RX", "TX"],
        "{screen}"
    );
    let row = lines[header + 1];
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
