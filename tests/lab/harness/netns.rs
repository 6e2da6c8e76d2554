//! Network namespaces: unique names, creation, reaping of stale ones, and
//! entering one from a thread.
//!
//! Every name the lab creates starts with [`PREFIX`] followed by the pid of
//! the test process, so a lab can tell its own namespaces from those of a
//! concurrent test run, and can reap the leftovers of a run that was killed
//! (its pid is gone) before Drop could clean up. Interface names follow the
//! same scheme in a shorter form because Linux limits them to 15 bytes; only
//! interfaces whose name is global (wireguard-go's UAPI socket) need it, the
//! veths live inside namespaces where short fixed names cannot collide.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::{run_bounded, Output};

/// Prefix of every namespace and global interface name the lab creates.
pub const PREFIX: &str = "wl";

/// Bound on any single `ip`/`nft`/`sysctl` configuration command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static IF_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A lab id unique on this machine while this process lives: `<pid>-<n>`.
pub fn new_lab_id() -> String {
    let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{}-{}", std::process::id(), n)
}

/// The namespace name of node `node` in lab `lab_id`.
pub fn ns_name(lab_id: &str, node: &str) -> String {
    format!("{PREFIX}-{lab_id}-{node}")
}

/// A globally unique interface name of at most 15 bytes:
/// `wl<pid base36>_<counter base36>`. The separator must not be a base-36
/// digit: with `i` a pid such as 12346 (`9iy`) was read back as 9 and
/// [`reap_stale`] deleted a live run's wireguard-go socket.
pub fn unique_ifname() -> String {
    let n = IF_COUNTER.fetch_add(1, Ordering::SeqCst);
    ifname_for(std::process::id(), n)
}

fn ifname_for(pid: u32, n: u32) -> String {
    let name = format!("{PREFIX}{}_{}", base36(pid), base36(n));
    assert!(name.len() <= 15, "interface name {name} too long");
    name
}

/// The pid of the test process that made interface (or socket) `name`.
fn ifname_pid(name: &str) -> Option<u32> {
    let (pid36, _) = name.strip_prefix(PREFIX)?.split_once('_')?;
    u32::from_str_radix(pid36, 36).ok()
}

fn base36(mut v: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// Runs a configuration command in the root namespace and panics with its
/// stderr when it fails: lab setup errors are test failures, never silent.
pub fn must(argv: &[&str]) -> Output {
    let out = run_bounded(argv, None, CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("lab: cannot run {argv:?}: {e} (is the tool installed?)"));
    if !out.status.success() {
        panic!(
            "lab: {argv:?} failed ({}):\n{}{}",
            out.status, out.stdout, out.stderr
        );
    }
    out
}

/// A namespace's own `/etc/resolv.conf`: `ip netns exec` mounts
/// `/etc/netns/NS/resolv.conf` over `/etc/resolv.conf` for what it runs, so
/// an agent in the lab manages this file and never the machine's.
pub fn resolv_conf(ns: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns")
        .join(ns)
        .join("resolv.conf")
}

/// What a lab namespace's resolv.conf holds until a test writes its own:
/// a documentation address, which nothing in the lab answers.
pub const LAB_RESOLV_CONF: &str = "# warren lab\nnameserver 192.0.2.53\n";

/// Creates namespace `ns` with its loopback up and its own resolv.conf.
pub fn create(ns: &str) {
    must(&["ip", "netns", "add", ns]);
    must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    let rc = resolv_conf(ns);
    if let Some(dir) = rc.parent() {
        std::fs::create_dir_all(dir).expect("lab: /etc/netns");
    }
    std::fs::write(&rc, LAB_RESOLV_CONF).expect("lab: a namespace's resolv.conf");
}

/// Sets a sysctl inside namespace `ns` (net.* sysctls are per namespace).
pub fn sysctl(ns: &str, key_value: &str) {
    must(&["ip", "netns", "exec", ns, "sysctl", "-qw", key_value]);
}

/// Kills every process still inside `ns`, then deletes it. Errors are
/// ignored: this runs during teardown, where panicking would abort.
pub fn destroy(ns: &str) {
    if let Ok(out) = run_bounded(&["ip", "netns", "pids", ns], None, CMD_TIMEOUT) {
        for pid in out.stdout.split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = run_bounded(&["ip", "netns", "del", ns], None, CMD_TIMEOUT);
    if let Some(dir) = resolv_conf(ns).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Names of every namespace on the machine.
pub fn list() -> Vec<String> {
    let out = must(&["ip", "netns", "list"]);
    out.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces (and wireguard-go sockets) left behind by lab runs
/// whose process no longer exists. Names of live processes are left alone,
/// so concurrent test binaries never tear down each other's labs.
pub fn reap_stale() {
    let ns_prefix = format!("{PREFIX}-");
    for ns in list() {
        let Some(rest) = ns.strip_prefix(&ns_prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            destroy(&ns);
        }
    }
    // wireguard-go leaves its UAPI socket behind when it is SIGKILLed.
    if let Ok(dir) = fs::read_dir("/var/run/wireguard") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ifname_pid(name.trim_end_matches(".sock")).is_some_and(|pid| !pid_alive(pid)) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Moves the calling thread into namespace `ns`.
///
/// Only the network namespace of this one thread changes, so call it first
/// thing in a thread spawned for the purpose (see `Lab::thread_in`), never
/// on a thread that returns to a pool or runs the test itself.
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = fs::File::open(&path).unwrap_or_else(|e| panic!("lab: open {path}: {e}"));
    // SAFETY: setns(2) on a valid fd we own; it only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("lab: setns {ns}: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_limits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // Largest pid Linux allows (pid_max limit) plus a big counter.
        let worst = format!("{PREFIX}{}_{}", base36(4_194_304), base36(46_655));
        assert!(worst.len() <= 15, "{worst}");
        assert!(unique_ifname().len() <= 15);
    }
}

#[test]
fn an_interface_name_gives_back_its_pid() {
    // 12346 is `9iy` in base 36: the old `i` separator read it as 9.
    for (pid, n) in [(12346, 0), (12346, 18), (u32::MAX, 40_000), (1, 0)] {
        assert_eq!(
            ifname_pid(&ifname_for(pid, n)),
            Some(pid),
            "pid {pid}, n {n}"
        );
    }
    assert_eq!(ifname_pid("wg0"), None);
}
