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

use crate::lab;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::agent::{tcp_transfer_paced, Agent};
use lab::coord::{start_with_region, Coordinator};
use lab::mesh::{join_pair, path_of};
use lab::nat::Nat;
use lab::{poll_until, Lab, Node};

const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Joins agents on `na` and `nb` and waits until `a`'s path to `b` is
/// direct (overlay pings make the traffic that starts traversal); returns
/// the agents and B's overlay address.
fn join_direct(lab: &Lab, coord: &Coordinator, na: &Node, nb: &Node) -> (Agent, Agent, String) {
    let (a, b, ip_b) = join_pair(lab, coord, na, nb);
    assert!(lab.ping_within(&a.node, &ip_b, JOIN_TIMEOUT), "no tunnel");
    assert!(
        poll_until(JOIN_TIMEOUT, Duration::from_millis(200), || {
            let _ = lab.ping(&a.node, &ip_b);
            path_of(&a.status(lab), &b.node.name) == "direct"
        }),
        "no direct path:\n{}",
        a.cli(lab, &["status"]).stdout
    );
    (a, b, ip_b)
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
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
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
    let (a, _b, ip_b) = join_direct(&lab, &coord, &na, &nb);
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
            // The relay spell can be shorter than a status poll (a new
            // birthday attempt wins in tens of milliseconds), so the
            // agent's own "path changed … to=relay" line is the witness.
            let timeouts = || {
                lab.log(a.proc)
                    .lines()
                    .filter(|l| l.contains("path changed") && l.contains("to=relay"))
                    .count()
            };
            let before = timeouts();
            let flushed = Instant::now();
            lab.exec(&ga, &["conntrack", "-F"])
                .expect_ok("conntrack -F");
            eprintln!("conntrack flushed on ga");
            let fell_back = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
                timeouts() > before
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
    let Some(lab) = Lab::new_or_skip() else {
        return;
    };
    let (coord, relay) = start_with_region(
        &lab,
        &lab.public("coord"),
        &["--no-relay"],
        &lab.public("relay"),
        "solo",
    );
    let ga = lab.gateway("ga", Nat::Eim);
    let gb = lab.gateway("gb", Nat::Eim);
    let na = lab.host_behind(&ga, "a");
    let nb = lab.host_behind(&gb, "b");
    let (a, _b, ip_b) = join_direct(&lab, &coord, &na, &nb);
    let st = a.status(&lab);
    assert_eq!(st["mesh"]["home_relay"], "solo", "{st}");
    assert_eq!(st["mesh"]["home_relay_connected"], true, "{st}");

    let pinger = Pinger::start(&na, &ip_b);
    lab.signal(relay.proc, libc::SIGKILL);
    assert!(lab.wait_exit(relay.proc, Duration::from_secs(5)).is_some());
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
