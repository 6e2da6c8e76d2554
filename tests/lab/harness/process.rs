//! Running commands for the lab: one-shot commands with a deadline, and
//! long-running processes whose output goes to a log file.
//!
//! Output is captured into files rather than pipes: a process that writes
//! more than a pipe buffer can never block on us, and a one-shot command
//! can be polled with `try_wait` and killed at its deadline without extra
//! reader threads. Long-running processes get their own process group so
//! teardown can signal the process and anything it forked.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Result of a one-shot command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// True when the command was killed because it ran past its deadline.
    pub timed_out: bool,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    /// Panics with the command's output unless it succeeded.
    #[track_caller]
    pub fn expect_ok(self, what: &str) -> Self {
        if !self.ok() {
            panic!(
                "{what}: {} (timed out: {})\nstdout:\n{}\nstderr:\n{}",
                self.status, self.timed_out, self.stdout, self.stderr
            );
        }
        self
    }
}

fn read_back(mut f: File) -> io::Result<String> {
    f.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs `argv` to completion, feeding it `input` on stdin, killing it when
/// it runs past `timeout`.
pub fn run_bounded(argv: &[&str], input: Option<&[u8]>, timeout: Duration) -> io::Result<Output> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let out_file = tempfile::tempfile()?;
    let err_file = tempfile::tempfile()?;
    let stdin = match input {
        Some(bytes) => {
            let mut f = tempfile::tempfile()?;
            f.write_all(bytes)?;
            f.seek(SeekFrom::Start(0))?;
            Stdio::from(f)
        }
        None => Stdio::null(),
    };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(stdin)
        .stdout(out_file.try_clone()?)
        .stderr(err_file.try_clone()?)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: read_back(out_file)?,
        stderr: read_back(err_file)?,
        timed_out,
    })
}

/// A long-running process started by `Lab::spawn`.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `argv` in its own process group with stdout and stderr
    /// appended to `log`.
    pub fn start(name: &str, argv: &[&str], log: &Path) -> io::Result<Self> {
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
        let f = File::create(log)?;
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0)
            .spawn()?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the process alone (not its group), as systemd or a
    /// user's Ctrl-C would.
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// The process's output so far.
    pub fn read_log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    /// SIGTERM to the whole group, a bounded grace period, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) {
        if self.try_status().is_some() {
            return;
        }
        let pgid = self.pid();
        // SAFETY: kill(2) has no memory-safety preconditions; the negative
        // pid addresses the group this process leads.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        if self.wait_timeout(grace).is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

/// Describes an exit status readably: "exit code 1" or "signal 9".
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status}"),
    }
}

/// Polls `cond` every `step` until it holds or `timeout` passes; returns
/// whether it held. The condition is always checked at least once.
pub fn poll_until(timeout: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(step);
    }
}

/// Like [`poll_until`] but panics naming `what` when the time runs out.
#[track_caller]
pub fn wait_for(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    if !poll_until(timeout, Duration::from_millis(50), cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_bounded_captures_and_kills() {
        let out = run_bounded(
            &["sh", "-c", "cat; echo err >&2"],
            Some(b"hi"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(out.ok());
        assert_eq!(out.stdout, "hi");
        assert_eq!(out.stderr, "err\n");
        let start = Instant::now();
        let out = run_bounded(&["sleep", "30"], None, Duration::from_millis(200)).unwrap();
        assert!(out.timed_out && !out.ok());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn poll_until_is_bounded() {
        let start = Instant::now();
        assert!(!poll_until(
            Duration::from_millis(100),
            Duration::from_millis(10),
            || false
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut n = 0;
        assert!(poll_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                n == 3
            }
        ));
    }
}
