//! Fault tests of the mesh in the NAT lab (issue #6, "Faults"):
//!
//! - the NAT forgets its mappings (`conntrack -F` on the gateway) in the
//!   middle of a checksummed transfer over a direct path: the transfer
//!   completes, the path falls back to the relay, and later turns direct
//!   again;
//! - the only relay dies (a standalone `warren-coordinator relay`, the
//!   coordinator running `--no-relay`) while a direct path is up: traffic
//!   keeps flowing directly and the path stays direct.
//!
//! Every wait is bounded; overlay pings run in the background during the
//! faults so the peers count as active (heartbeats every 3 s), as they would
//! with real traffic.

#![allow(clippy::unwrap_used)]

mod lab;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::agent::{tcp_transfer_paced, Agent, AgentConfig};
use lab::coord::{coordinator_bin, Coordinator, COORD_PORT};
use lab::mesh::{overlay_v4, path_of, peer_of, up};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Joins both agents with one token and waits until `a`'s path to `b` is
/// direct (overlay pings make the traffic that starts traversal).
fn join_direct(lab: &Lab, coord: &Coordinator, a: &Agent, b: &Agent) -> String {
    let (token, _) = coord.token(lab, &["--reusable"]);
    up(lab, a, coord, &token).expect_ok("up a");
    up(lab, b, coord, &token).expect_ok("up b");
    assert!(
        poll_until(JOIN_TIMEOUT, Duration::from_millis(200), || {
            peer_of(&a.status(lab), &b.node.name).is_some()
                && peer_of(&b.status(lab), &a.node.name).is_some()
        }),
        "the pair does not see each other"
    );
    let ip_b = overlay_v4(&b.status(lab));
    assert!(lab.ping_within(&a.node, &ip_b, JOIN_TIMEOUT), "no tunnel");
    assert!(
        poll_until(JOIN_TIMEOUT, Duration::from_millis(200), || {
            let _ = lab.ping(&a.node, &ip_b);
            path_of(&a.status(lab), &b.node.name) == "direct"
        }),
        "no direct path:\n{}",
        a.cli(lab, &["status"]).stdout
    );
    ip_b
}

/// Pings `to` from `from` every 200 ms until stopped; counts the answers
/// and the losses.
struct Pinger {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    lost: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(from: &Node, to: &str) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let lost = Arc::new(AtomicU32::new(0));
        let (s, o, l, ns, to) = (
            stop.clone(),
            ok.clone(),
            lost.clone(),
            from.ns.clone(),
            to.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            // Bounded by the caller's stop; each ping by -W 1.
            while !s.load(Ordering::Relaxed) {
                let answered = std::process::Command::new("ip")
                    .args([
                        "netns", "exec", &ns, "ping", "-n", "-q", "-c", "1", "-W", "1", &to,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if answered { &o } else { &l }.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Pinger {
            stop,
            ok,
            lost,
            thread: Some(thread),
        }
    }

    /// Stops and returns (answered, lost).
    fn stop(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn conntrack_flush_mid_transfer_falls_back_to_relay_and_returns_direct() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let coord = Coordinator::start(&lab, &lab.public("coord"), &[]);
    // a is behind a random-port NAT (reached by the birthday method), b
    // behind an easy one. After the flush a's packets leave from a new
    // random port that b's gateway drops, and b's go to a port ga forgot:
    // the direct path is really gone. (Behind a sequential or an EIM NAT
    // the mapping comes back by itself or by prediction within a
    // heartbeat, and no fallback shows.)
    let ga = lab.gateway("ga", Nat::Edm);
    let gb = lab.gateway("gb", Nat::Eim);
    let na = lab.host_behind(&ga, "a");
    let nb = lab.host_behind(&gb, "b");
    let a = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    let b = Agent::start(&lab, &nb, &AgentConfig::mesh(&lab, &nb));
    let ip_b = join_direct(&lab, &coord, &a, &b);
    let pinger = Pinger::start(&na, &ip_b);

    // 24 MB at 1.5 MB/s: about 16 s, enough to span the fallback.
    const LEN: usize = 24 << 20;
    let transfer = {
        let (lab_dir_a, lab_dir_b) = (na.clone(), nb.clone());
        let ip: std::net::IpAddr = ip_b.parse().unwrap();
        let lab = &lab;
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                tcp_transfer_paced(lab, &lab_dir_a, &lab_dir_b, ip, 5301, LEN, Some(3 << 19))
            });
            std::thread::sleep(Duration::from_secs(2));
            let flushed = Instant::now();
            lab.exec(&ga, &["conntrack", "-F"])
                .expect_ok("conntrack -F");
            eprintln!("conntrack flushed on ga");
            let fell_back = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
                path_of(&a.status(lab), "b") == "relay"
            });
            let fallback_after = flushed.elapsed();
            let back = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
                path_of(&a.status(lab), "b") == "direct"
            });
            let direct_after = flushed.elapsed();
            let st = a.status(lab);
            let (sent, got) = t.join().unwrap();
            (fell_back, fallback_after, back, direct_after, st, sent, got)
        })
    };
    let (fell_back, fallback_after, back, direct_after, st, sent, got) = transfer;
    let (ok, lost) = pinger.stop();
    eprintln!(
        "relay after {fallback_after:?}, direct again after {direct_after:?}; \
         pings answered {ok}, lost {lost}"
    );
    assert!(fell_back, "a never fell back to the relay: {st}");
    assert!(back, "the path never returned to direct: {st}");
    assert_eq!(sent, got, "24 MB arrive intact across the flush");
    assert!(ok > lost, "most pings answered: {ok} vs {lost} lost");
}

#[test]
fn killing_the_only_relay_leaves_a_direct_path_working() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::new();
    let cn = lab.public("coord");
    let rn = lab.public("relay");
    let secret = lab.write_file("relay-secret", "lab-relay-secret-0123456789abcdef\n");
    let map = lab.write_file(
        "relays.toml",
        &format!(
            "[[region]]\nid = 2\nname = \"solo\"\nurl = \"http://{ip}:{COORD_PORT}/relay\"\n\
             stun = [\"{ip}:3478\", \"{ip}:3479\"]\n",
            ip = rn.ip
        ),
    );
    let (secret, map) = (
        secret.to_string_lossy().into_owned(),
        map.to_string_lossy().into_owned(),
    );
    let coord = Coordinator::start(
        &lab,
        &cn,
        &[
            "--no-relay",
            "--relay-map",
            &map,
            "--relay-secret-file",
            &secret,
        ],
    );
    let bin = coordinator_bin().to_string_lossy().into_owned();
    let dir = lab.dir().join("relay-data").to_string_lossy().into_owned();
    let listen = format!("{}:{COORD_PORT}", rn.ip);
    let url = coord.url();
    let relay = lab.spawn(
        &rn,
        "relay",
        &[
            &bin,
            "--data-dir",
            &dir,
            "relay",
            "--listen",
            &listen,
            "--insecure-http",
            "--coordinator",
            &url,
            "--secret-file",
            &secret,
        ],
    );
    let ga = lab.gateway("ga", Nat::Eim);
    let gb = lab.gateway("gb", Nat::Eim);
    let na = lab.host_behind(&ga, "a");
    let nb = lab.host_behind(&gb, "b");
    let a = Agent::start(&lab, &na, &AgentConfig::mesh(&lab, &na));
    let b = Agent::start(&lab, &nb, &AgentConfig::mesh(&lab, &nb));
    let ip_b = join_direct(&lab, &coord, &a, &b);
    let st = a.status(&lab);
    assert_eq!(st["mesh"]["home_relay"], "solo", "{st}");
    assert_eq!(st["mesh"]["home_relay_connected"], true, "{st}");

    let pinger = Pinger::start(&na, &ip_b);
    lab.signal(relay, libc::SIGKILL);
    assert!(lab.wait_exit(relay, Duration::from_secs(5)).is_some());
    eprintln!("relay killed");
    // Past several heartbeats and trust windows: still direct, still
    // answering.
    let t0 = Instant::now();
    let mut always_direct = true;
    while t0.elapsed() < Duration::from_secs(15) {
        always_direct &= path_of(&a.status(&lab), "b") == "direct";
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ok, lost) = pinger.stop();
    eprintln!("after the relay died: pings answered {ok}, lost {lost}");
    let st = a.status(&lab);
    assert_eq!(st["mesh"]["home_relay_connected"], false, "{st}");
    assert!(always_direct, "the path left direct: {st}");
    assert!(ok >= 40 && lost <= 2, "pings answered {ok}, lost {lost}");
    let out = a
        .cli(&lab, &["ping", "b", "-c", "3"])
        .expect_ok("warren ping without a relay");
    assert!(
        out.stdout.contains(&format!("via {}:", gb.ip)),
        "{}",
        out.stdout
    );
    let (sent, got) =
        tcp_transfer_paced(&lab, &na, &nb, ip_b.parse().unwrap(), 5302, 10 << 20, None);
    assert_eq!(sent, got, "10 MB arrive intact with no relay");
}
