//! The provisional "UDP probably blocked" verdict, on the same simulated
//! NAT and virtual clock as the other netcheck scenarios: it must come
//! early when TCP answered and UDP is silent, never when UDP works, and go
//! away when a late UDP answer shows it wrong.

use std::time::Duration;

use super::*;

/// When the provisional "UDP probably blocked" verdict was first seen, and
/// when (if ever) it was withdrawn before the report.
type Suspicion = (Option<Duration>, Option<Duration>, Report);

fn suspicion(sim: &mut Sim, cfg: Config, tcp: Option<(Duration, Duration)>) -> Suspicion {
    let (mut first, mut withdrawn) = (None, None);
    let (report, _, _) = run_observed(sim, cfg, None, tcp, |at, nc| {
        if nc.poll_report().is_some() {
            return;
        }
        let suspect = nc.udp_probably_blocked();
        if suspect && first.is_none() {
            first = Some(at);
        }
        if !suspect && first.is_some() && withdrawn.is_none() {
            withdrawn = Some(at);
        }
    });
    (first, withdrawn, report)
}

#[test]
fn tcp_answer_and_silent_udp_suspect_a_block_early() {
    let cfg = four_dests();
    let mut sim = with_servers(Nat::Blocked, &cfg);
    let tcp = (Duration::from_millis(20), Duration::from_millis(20));
    let (first, withdrawn, report) = suspicion(&mut sim, cfg.clone(), Some(tcp));
    assert_eq!(
        first,
        Some(Duration::from_millis(500)),
        "the wait, not the deadline"
    );
    assert_eq!(withdrawn, None);
    assert!(!report.udp, "the report still decides, and agrees");
    // The report keeps what the TCP answer saw: the address peers whose
    // UDP is blocked too would dial, shown by `warren netcheck`.
    let want = TcpReport {
        public: TCP_PUBLIC,
        rtt: Some(Duration::from_millis(20)),
    };
    assert_eq!(report.tcp, Some(want));
    assert!(report.to_string().contains("TCP: yes, 198.51.100.7:41641"));
    let cli = crate::cli::render_mesh::netcheck(&report);
    assert!(
        cli.contains("TCP: yes, seen as 198.51.100.7:41641"),
        "{cli}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["tcp"]["public"], "198.51.100.7:41641");
    assert_eq!(json["tcp"]["rtt_ms"], 20.0);

    // A slow TCP exchange stretches the wait to twice its length.
    let slow = (Duration::from_millis(400), Duration::from_millis(400));
    let (first, _, _) = suspicion(
        &mut with_servers(Nat::Blocked, &cfg),
        cfg.clone(),
        Some(slow),
    );
    assert_eq!(first, Some(Duration::from_millis(800)));

    // No TCP answer (the whole network may be down): silence proves nothing.
    let (first, _, report) = suspicion(&mut with_servers(Nat::Blocked, &cfg), cfg, None);
    assert_eq!(first, None);
    assert_eq!(report.tcp, None);
    let cli = crate::cli::render_mesh::netcheck(&report);
    assert!(cli.contains("TCP: no answer over TCP"), "{cli}");
}

#[test]
fn working_udp_is_never_suspected() {
    let cfg = four_dests();
    let tcp = Some((Duration::from_millis(20), Duration::from_millis(20)));
    let (first, _, report) = suspicion(
        &mut with_servers(Nat::Eim { port: 5000 }, &cfg),
        cfg.clone(),
        tcp,
    );
    assert!(report.udp);
    assert_eq!(first, None);
    // The first probe to every address is lost: the retransmissions at
    // 250 ms still answer before the wait is over.
    let mut sim = with_servers(Nat::Eim { port: 5000 }, &cfg);
    for s in &cfg.servers {
        for a in &s.addrs {
            sim.lose_first.insert(*a, 1);
        }
    }
    let (first, _, report) = suspicion(&mut sim, cfg, tcp);
    assert!(report.udp);
    assert_eq!(first, None);
}

#[test]
fn a_late_udp_answer_withdraws_the_suspicion() {
    // UDP answers after 800 ms; TCP (to a nearer server) answered at once.
    let cfg = config(&[("a", &["192.0.2.1:3478"])]);
    let mut sim = Sim::new(Nat::Eim { port: 5000 }).server("192.0.2.1:3478", 400);
    let tcp = Some((Duration::from_millis(10), Duration::from_millis(10)));
    let (first, withdrawn, report) = suspicion(&mut sim, cfg, tcp);
    assert_eq!(first, Some(Duration::from_millis(500)));
    assert_eq!(
        withdrawn,
        Some(Duration::from_millis(800)),
        "withdrawn once UDP answered"
    );
    assert!(report.udp);
}
