//! The seam's promise: a session sees the time it is given, not the clock.
//! Each test moves time by minutes in microseconds of real time, so each
//! fails if boringtun read the real clock.

use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;

use super::Wg;
use crate::dataplane::packet::build::ipv4;
use crate::keys::PrivateKey;

/// The first byte of what a call asks to send (WireGuard's message type),
/// or 0 when it asks for nothing.
fn sent(r: TunnResult<'_>) -> (u8, Vec<u8>) {
    match r {
        TunnResult::WriteToNetwork(p) => (p[0], p.to_vec()),
        _ => (0, Vec::new()),
    }
}

/// `own`'s session with `peer`, made at `at`.
fn session(
    at: Instant,
    own: &PrivateKey,
    peer: &PrivateKey,
    keepalive: Option<u16>,
    index: u32,
) -> Wg {
    let (secret, public) = (own.secret().clone(), peer.public().to_x25519());
    Wg::new(at, secret, public, None, keepalive, index, None)
}

/// Two sessions that completed a handshake at `t0`: (initiator, responder).
fn pair(t0: Instant) -> (Wg, Wg) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = session(t0, &ka, &kb, None, 1);
    let mut b = session(t0, &kb, &ka, None, 2);
    let packet = ipv4([100, 64, 0, 1].into(), [100, 64, 0, 2].into(), b"hello");
    let mut buf = vec![0u8; 2048];
    let (kind, init) = sent(a.encapsulate(t0, &packet, &mut buf));
    assert_eq!(kind, 1, "no session yet: a handshake initiation");
    let mut out = vec![0u8; 2048];
    let (kind, response) = sent(b.decapsulate(t0, None, &init, &mut out));
    assert_eq!(kind, 2, "the responder answers");
    let (kind, _) = sent(a.decapsulate(t0, None, &response, &mut out));
    assert_eq!(kind, 4, "the initiator confirms with its queued data");
    (a, b)
}

/// boringtun's timers advance only in `update_timers` (a device calls it
/// every 250 ms); these tests call it where a device would.
#[test]
fn a_silent_peer_gets_a_new_handshake_when_the_given_time_says_so() {
    let t0 = Instant::now();
    let (mut a, _b) = pair(t0);
    let at = |s: u64| t0 + Duration::from_secs(s);
    let packet = ipv4([100, 64, 0, 1].into(), [100, 64, 0, 2].into(), b"x");
    let mut buf = vec![0u8; 2048];
    assert_eq!(sent(a.update_timers(at(5), &mut buf)).0, 0);
    let (kind, _) = sent(a.encapsulate(at(5), &packet, &mut buf));
    assert_eq!(kind, 4, "the session carries data");
    assert_eq!(
        sent(a.update_timers(at(12), &mut buf)).0,
        0,
        "12 s of silence"
    );
    // Data sent and nothing heard for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    // (15 s) since the handshake: a new handshake.
    let (kind, _) = sent(a.update_timers(at(16), &mut buf));
    assert_eq!(kind, 1, "16 s of silence, a new handshake");
}

#[test]
fn stats_measure_the_given_time() {
    let t0 = Instant::now();
    let (mut a, _b) = pair(t0);
    let _ = a.update_timers(t0 + Duration::from_secs(30), &mut [0u8; 256]);
    let (last, _, _) = a.stats(t0 + Duration::from_secs(30));
    let last = last.expect("a handshake happened");
    assert!(
        last >= Duration::from_secs(29) && last <= Duration::from_secs(31),
        "{last:?}"
    );
}

#[test]
fn keepalives_and_rekeys_follow_the_given_time() {
    let t0 = Instant::now();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = session(t0, &ka, &kb, Some(25), 1);
    let mut buf = vec![0u8; 2048];
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(sent(a.update_timers(at(0), &mut buf)).0, 0);
    assert_eq!(sent(a.update_timers(at(10_000), &mut buf)).0, 0);
    // The persistent keepalive is due after 25 s; with no session it asks
    // for a handshake.
    assert_eq!(sent(a.update_timers(at(25_000), &mut buf)).0, 1);
    // Unanswered, it is retried after REKEY_TIMEOUT (5 s) plus up to
    // 333 ms of jitter, and not before.
    assert_eq!(sent(a.update_timers(at(27_000), &mut buf)).0, 0);
    let retried = (0..=8).any(|i| sent(a.update_timers(at(30_000 + i * 100), &mut buf)).0 == 1);
    assert!(
        retried,
        "retried 5 to 5.8 s after the first, by the given time"
    );
}

#[test]
fn an_earlier_time_after_a_later_one_is_taken_as_the_later() {
    // Two packet tasks may reach one peer out of the order they read the
    // clock in; boringtun's mock clock panics when time goes back.
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let packet = ipv4([100, 64, 0, 1].into(), [100, 64, 0, 2].into(), b"x");
    let mut buf = vec![0u8; 2048];
    let (kind, data) = sent(a.encapsulate(t0 + Duration::from_secs(10), &packet, &mut buf));
    assert_eq!(kind, 4);
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        b.decapsulate(t0 + Duration::from_secs(10), None, &data, &mut out),
        TunnResult::WriteToTunnelV4(..)
    ));
    let (kind, data) = sent(a.encapsulate(t0 + Duration::from_secs(9), &packet, &mut buf));
    assert_eq!(kind, 4, "still the same session");
    let _ = b.decapsulate(t0 + Duration::from_secs(1), None, &data, &mut out);
    let _ = a.update_timers(t0, &mut buf);
    let _ = a.stats(t0);
    // A packet task's batch began before the mesh task made the peer.
    let (kc, kd) = (PrivateKey::generate(), PrivateKey::generate());
    let mut c = session(t0 + Duration::from_secs(10), &kc, &kd, None, 3);
    let _ = c.update_timers(t0, &mut buf);
    let (kind, _) = sent(c.encapsulate(t0, &packet, &mut buf));
    assert_eq!(kind, 1);
    let _ = c.update_timers(t0 + Duration::from_secs(2), &mut buf);
}

/// The shared rate limiter, called by tasks whose clocks interleave, never
/// sees time go back (`mock_instant` panics if it does).
#[test]
fn the_rate_limiter_takes_an_earlier_time_as_the_later() {
    let t0 = Instant::now();
    let own = PrivateKey::generate();
    let limiter = super::Limiter::new(t0, &x25519_dalek::PublicKey::from(own.public().0), 10);
    limiter.reset(t0 + Duration::from_secs(5));
    // Another task's batch read its clock before that reset.
    limiter.reset(t0 + Duration::from_secs(2));
    let _ = limiter.at_time(t0 + Duration::from_secs(1));
    limiter.reset(t0 + Duration::from_secs(6));
}
