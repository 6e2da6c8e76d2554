//! The stateful filter: replies to our flows pass, the rules decide the
//! rest, a filter change cuts flows it no longer allows, the table stays
//! bounded, entries expire. Time is a parameter: no sleeps.

use std::net::Ipv4Addr;

use super::*;
use crate::dataplane::flow::build;
use crate::policy::filter::{DstNet, FilterRule};
use crate::policy::PortRange;

const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 10);
const ALICE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const BOB: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

/// Alice may reach us on TCP and UDP 22, and ICMP.
fn alice_to_22() -> PacketFilter {
    PacketFilter::new(vec![FilterRule {
        proto: vec![6, 17, 1],
        src: vec![IpNet::from(IpAddr::V4(ALICE))],
        dst: vec![DstNet {
            net: IpNet::from(IpAddr::V4(ME)),
            ports: PortRange {
                first: 22,
                last: 22,
            },
        }],
    }])
}

fn firewall() -> Firewall {
    let fw = Firewall::default();
    fw.set_filter(alice_to_22());
    fw
}

#[test]
fn the_rules_decide_new_flows() {
    let fw = firewall();
    let now = Instant::now();
    assert_eq!(
        fw.inbound(&build::tcp(ALICE, 4000, ME, 22, true, false), now),
        Verdict::Pass
    );
    assert_eq!(
        fw.inbound(&build::tcp(ALICE, 4000, ME, 80, true, false), now),
        Verdict::Policy
    );
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 4000, ME, 22, true, false), now),
        Verdict::Policy
    );
    assert_eq!(
        fw.inbound(&build::udp(ALICE, 5000, ME, 22), now),
        Verdict::Pass
    );
    assert_eq!(
        fw.inbound(&build::echo(ALICE, ME, 1, true), now),
        Verdict::Pass
    );
    assert_eq!(
        fw.inbound(&build::echo(BOB, ME, 1, true), now),
        Verdict::Policy
    );
    assert_eq!(fw.inbound(&[0x45, 0, 0], now), Verdict::Malformed);
    assert_eq!(fw.drops.policy.load(Ordering::Relaxed), 3);
}

#[test]
fn replies_to_flows_we_opened_pass_and_nothing_else_from_that_peer() {
    let fw = firewall();
    let now = Instant::now();
    // We open TCP to bob:80 and ping him; his answers pass.
    fw.outbound(&build::tcp(ME, 40000, BOB, 80, true, false), now);
    fw.outbound(&build::echo(ME, BOB, 9, true), now);
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 80, ME, 40000, true, true), now),
        Verdict::Pass
    );
    assert_eq!(
        fw.inbound(&build::echo(BOB, ME, 9, false), now),
        Verdict::Pass
    );
    // But bob cannot open his own connection, nor answer another port.
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 80, ME, 40001, false, true), now),
        Verdict::Policy
    );
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 5555, ME, 22, true, false), now),
        Verdict::Policy
    );
    // A SYN on our flow's ports is a new connection: the rules decide.
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 80, ME, 40000, true, false), now),
        Verdict::Policy
    );
}

#[test]
fn icmp_errors_pass_only_for_flows_we_know_or_allow() {
    let fw = firewall();
    let now = Instant::now();
    let ours = build::udp(ME, 6000, BOB, 53);
    fw.outbound(&ours, now);
    assert_eq!(
        fw.inbound(&build::unreachable(BOB, ME, &ours), now),
        Verdict::Pass
    );
    let not_ours = build::udp(ME, 6001, BOB, 53);
    assert_eq!(
        fw.inbound(&build::unreachable(BOB, ME, &not_ours), now),
        Verdict::Policy
    );
}

#[test]
fn a_new_filter_cuts_the_flows_it_no_longer_allows_but_not_ours() {
    let fw = firewall();
    let now = Instant::now();
    let data = build::tcp(ALICE, 4000, ME, 22, false, true);
    assert_eq!(
        fw.inbound(&build::tcp(ALICE, 4000, ME, 22, true, false), now),
        Verdict::Pass
    );
    assert_eq!(fw.inbound(&data, now), Verdict::Pass);
    fw.outbound(&build::tcp(ME, 40000, BOB, 80, true, false), now);
    fw.set_filter(PacketFilter::new(vec![]));
    assert_eq!(fw.inbound(&data, now), Verdict::Policy, "revoked");
    assert_eq!(
        fw.inbound(&build::tcp(BOB, 80, ME, 40000, false, true), now),
        Verdict::Pass
    );
}

#[test]
fn entries_expire_when_idle() {
    let fw = firewall();
    let t0 = Instant::now();
    fw.outbound(&build::udp(ME, 6000, BOB, 53), t0);
    let reply = build::udp(BOB, 53, ME, 6000);
    assert_eq!(
        fw.inbound(&reply, t0 + Duration::from_secs(100)),
        Verdict::Pass
    );
    // Refreshed at 100 s: still live at 200 s, gone 121 s after that.
    assert_eq!(
        fw.inbound(&reply, t0 + Duration::from_secs(200)),
        Verdict::Pass
    );
    assert_eq!(
        fw.inbound(&reply, t0 + Duration::from_secs(321)),
        Verdict::Policy
    );
}

#[test]
fn the_table_is_bounded() {
    let fw = firewall();
    let now = Instant::now();
    for port in 0..(MAX_FLOWS as u32 + 5_000) {
        let p = (port % 60_000) as u16;
        let host = Ipv4Addr::from(u32::from(BOB) + port / 60_000);
        fw.outbound(&build::udp(ME, p, host, 53), now);
    }
    assert!(fw.tracked() <= MAX_FLOWS, "{}", fw.tracked());
}

#[test]
fn packets_to_addresses_we_do_not_own_are_refused_even_without_a_policy() {
    let fw = Firewall::default();
    let now = Instant::now();
    fw.set_local(vec![IpNet::from(IpAddr::V4(ME))]);
    assert_eq!(fw.inbound(&build::udp(BOB, 1, ME, 2), now), Verdict::Pass);
    let other = Ipv4Addr::new(192, 168, 1, 1);
    assert_eq!(
        fw.inbound(&build::udp(BOB, 1, other, 2), now),
        Verdict::NotOurs
    );
    assert_eq!(fw.drops.not_ours.load(Ordering::Relaxed), 1);
    // Allow-all with no local addresses set tracks nothing.
    let open = Firewall::default();
    open.outbound(&build::udp(ME, 1, BOB, 2), now);
    assert_eq!(open.tracked(), 0);
}

#[test]
fn the_config_files_filter_holds_while_the_network_has_no_policy() {
    let fw = Firewall::default();
    let now = Instant::now();
    let bob_22 = build::tcp(BOB, 4000, ME, 22, true, false);
    fw.set_base(alice_to_22());
    assert_eq!(
        fw.inbound(&bob_22, now),
        Verdict::Policy,
        "the file's rules"
    );
    let bob_only = PacketFilter::new(vec![FilterRule {
        proto: vec![6],
        src: vec![IpNet::from(IpAddr::V4(BOB))],
        dst: vec![DstNet {
            net: IpNet::from(IpAddr::V4(ME)),
            ports: PortRange::ALL,
        }],
    }]);
    fw.set_policy(Some(bob_only));
    assert_eq!(
        fw.inbound(&bob_22, now),
        Verdict::Pass,
        "the policy replaces it"
    );
    fw.set_policy(None);
    let bob_23 = build::tcp(BOB, 4001, ME, 23, true, false);
    assert_eq!(
        fw.inbound(&bob_23, now),
        Verdict::Policy,
        "no policy any more: the file's rules again, not allow-all"
    );
}

#[test]
fn a_tasks_flow_cache_passes_a_busy_flow_but_not_past_a_new_filter() {
    let fw = firewall();
    let mut cache = FlowCache::default();
    let now = Instant::now();
    let syn = build::tcp(ALICE, 4000, ME, 22, true, false);
    let data = build::tcp(ALICE, 4000, ME, 22, false, false);
    assert_eq!(fw.inbound_cached(&mut cache, &syn, now), Verdict::Pass);
    assert_eq!(fw.inbound_cached(&mut cache, &data, now), Verdict::Pass);
    // The cache answers without the table: emptied, the flow still passes.
    for s in &fw.shards {
        s.lock().clear();
    }
    assert_eq!(fw.inbound_cached(&mut cache, &data, now), Verdict::Pass);
    // A filter without alice's rule: the cached flow is cut at once.
    fw.set_filter(PacketFilter::new(vec![]));
    assert_eq!(fw.inbound_cached(&mut cache, &data, now), Verdict::Policy);
}

#[test]
fn new_own_addresses_empty_the_flow_caches() {
    let fw = firewall();
    fw.set_local(vec![IpNet::from(IpAddr::V4(ME))]);
    let mut cache = FlowCache::default();
    let now = Instant::now();
    let data = build::tcp(ALICE, 4000, ME, 22, false, false);
    assert_eq!(fw.inbound_cached(&mut cache, &data, now), Verdict::Pass);
    assert_eq!(fw.inbound_cached(&mut cache, &data, now), Verdict::Pass);
    fw.set_local(vec![IpNet::from(IpAddr::V4(BOB))]);
    assert_eq!(
        fw.inbound_cached(&mut cache, &data, now),
        Verdict::NotOurs,
        "the cache does not outlive the address"
    );
}

/// Our replies do not make a flow the peer opened ours: a revoked rule
/// cuts it even after we answered (TCP and UDP alike); a connection we
/// open on the same ports is ours.
#[test]
fn answering_a_peers_flow_does_not_keep_it_past_a_revocation() {
    let fw = firewall();
    let now = Instant::now();
    let syn = build::tcp(ALICE, 4000, ME, 22, true, false);
    let data = build::tcp(ALICE, 4000, ME, 22, false, true);
    let udp = build::udp(ALICE, 5000, ME, 22);
    assert_eq!(fw.inbound(&syn, now), Verdict::Pass);
    assert_eq!(fw.inbound(&udp, now), Verdict::Pass);
    // Our SYN-ACK and our UDP answer.
    fw.outbound(&build::tcp(ME, 22, ALICE, 4000, true, true), now);
    fw.outbound(&build::udp(ME, 22, ALICE, 5000), now);
    assert_eq!(fw.inbound(&data, now), Verdict::Pass);
    fw.set_filter(PacketFilter::new(vec![]));
    assert_eq!(fw.inbound(&data, now), Verdict::Policy, "tcp revoked");
    assert_eq!(fw.inbound(&udp, now), Verdict::Policy, "udp revoked");
    // A connection we open from port 22 to Alice's 4000 is ours.
    fw.outbound(&build::tcp(ME, 22, ALICE, 4000, true, false), now);
    assert_eq!(fw.inbound(&data, now), Verdict::Pass);
}
