use super::*;
use crate::dns::settings::{ExtraRecord, RecordKind};
use crate::dns::zone::NodeName;
use hickory_proto::op::Query;

fn settings() -> DnsSettings {
    let mut s = DnsSettings::default();
    s.split
        .insert("corp.example".into(), vec!["10.0.0.53".parse().unwrap()]);
    s.split
        .insert("eu.corp.example".into(), vec!["10.1.0.53".parse().unwrap()]);
    s.nameservers = vec!["9.9.9.9".parse().unwrap()];
    s.extra_records.push(ExtraRecord {
        name: "grafana.warren.internal".into(),
        kind: RecordKind::A,
        value: "100.64.9.9".parse().unwrap(),
    });
    s
}

fn resolver() -> Resolver {
    let mut r = Resolver::default();
    let s = settings();
    let nodes = [NodeName {
        name: "b".into(),
        v4: "100.64.0.3".parse().unwrap(),
        v6: "fd7a:115c:a1e0::6440:3".parse().unwrap(),
    }];
    r.set_zone(Arc::new(Zone::build(
        &s,
        &nodes,
        "fd7a:115c:a1e0::/48".parse().ok(),
    )));
    r.set_settings(s);
    r.set_host_resolvers(vec!["192.168.1.1".parse().unwrap()]);
    r
}

fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    build_query(id, name, t).unwrap()
}

fn reply(d: Decision) -> (Message, Source) {
    match d {
        Decision::Reply { wire, source } => (Message::from_vec(&wire).unwrap(), source),
        other => panic!("not a reply: {other:?}"),
    }
}

fn forward(d: Decision) -> Box<Forward> {
    match d {
        Decision::Forward(f) => f,
        other => panic!("not forwarded: {other:?}"),
    }
}

#[test]
fn the_networks_names_answer_a_aaaa_and_ptr_authoritatively() {
    let mut r = resolver();
    let now = Instant::now();
    let (m, src) = reply(r.handle_query(now, &query(7, "B.warren.internal", RecordType::A), true));
    assert_eq!((m.metadata.id, src), (7, Source::Zone));
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        m.answers[0].data.ip_addr(),
        Some("100.64.0.3".parse().unwrap())
    );
    assert_eq!(m.answers[0].ttl, ZONE_TTL);
    let (m, _) = reply(r.handle_query(now, &query(8, "b.warren.internal", RecordType::AAAA), true));
    assert_eq!(
        m.answers[0].data.ip_addr(),
        Some("fd7a:115c:a1e0::6440:3".parse().unwrap())
    );
    // An extra record has no AAAA: no data, not NXDOMAIN.
    let (m, _) = reply(r.handle_query(
        now,
        &query(9, "grafana.warren.internal", RecordType::AAAA),
        true,
    ));
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let (m, _) =
        reply(r.handle_query(now, &query(10, "nope.warren.internal", RecordType::A), true));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // PTR for a node, NXDOMAIN for an unused overlay address, and any
    // other address goes out.
    let (m, _) = reply(r.handle_query(now, &query(11, "100.64.0.3", RecordType::PTR), true));
    assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "b.warren.internal."));
    let (m, _) = reply(r.handle_query(
        now,
        &query(12, "fd7a:115c:a1e0::6440:3", RecordType::PTR),
        true,
    ));
    assert_eq!(m.answers.len(), 1);
    let (m, _) = reply(r.handle_query(now, &query(13, "100.64.0.99", RecordType::PTR), true));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let f = forward(r.handle_query(now, &query(14, "8.8.8.8", RecordType::PTR), true));
    assert_eq!(f.source, Source::Host);
    assert_eq!(r.stats.answered_locally, 7);
}

#[test]
fn other_names_go_to_split_then_global_or_host_resolvers() {
    let mut r = resolver();
    let now = Instant::now();
    let f = forward(r.handle_query(now, &query(1, "git.corp.example", RecordType::A), true));
    assert_eq!(f.upstreams, vec!["10.0.0.53:53".parse().unwrap()]);
    assert_eq!(
        f.source,
        Source::Split {
            domain: "corp.example".into()
        }
    );
    // The longest split domain wins.
    let f = forward(r.handle_query(now, &query(2, "x.EU.corp.example.", RecordType::A), true));
    assert_eq!(f.upstreams, vec!["10.1.0.53:53".parse().unwrap()]);
    // Not a suffix match on a label boundary: not split.
    let f = forward(r.handle_query(now, &query(3, "notcorp.example", RecordType::A), true));
    assert_eq!(
        (f.source.clone(), f.upstreams.clone()),
        (Source::Host, vec!["192.168.1.1:53".parse().unwrap()])
    );
    // override_local sends the rest to the network's nameservers.
    let mut s = settings();
    s.override_local = true;
    r.set_settings(s);
    let f = forward(r.handle_query(now, &query(4, "example.com", RecordType::A), true));
    assert_eq!(
        (f.source.clone(), f.upstreams.clone()),
        (Source::Global, vec!["9.9.9.9:53".parse().unwrap()])
    );
    // A host without resolvers uses them too; with neither, SERVFAIL.
    r.set_settings(settings());
    r.set_host_resolvers(Vec::new());
    assert_eq!(
        forward(r.handle_query(now, &query(5, "example.com", RecordType::A), true)).source,
        Source::Global
    );
    r.set_settings(DnsSettings::default());
    let (m, _) = reply(r.handle_query(now, &query(6, "example.com", RecordType::A), true));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

fn upstream_answer(req: &Message, ttl: u32, count: usize) -> Vec<u8> {
    let mut m = Message::response(4242, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_queries(req.queries.iter().cloned());
    let name = req.queries[0].name().clone();
    for i in 0..count {
        let ip = std::net::Ipv4Addr::new(93, 184, (i / 256) as u8, (i % 256) as u8);
        m.add_answer(Record::from_rdata(name.clone(), ttl, RData::A(A(ip))));
    }
    m.to_vec().unwrap()
}

#[test]
fn forwarded_answers_are_cached_for_their_ttl_with_the_clients_id() {
    let mut r = resolver();
    let t0 = Instant::now();
    let f = forward(r.handle_query(t0, &query(100, "example.com", RecordType::A), true));
    let wire = r.handle_answer(t0, &f, Some(&upstream_answer(&f.request, 60, 1)));
    let m = Message::from_vec(&wire).unwrap();
    assert_eq!((m.metadata.id, m.answers[0].ttl), (100, 60));
    // Again 20 s later: from the cache, TTL counted down, the new id.
    let later = t0 + Duration::from_secs(20);
    let (m, src) = reply(r.handle_query(later, &query(101, "EXAMPLE.com", RecordType::A), true));
    assert_eq!(
        (m.metadata.id, src, m.answers[0].ttl),
        (101, Source::Cache, 40)
    );
    // Expired: forwarded again.
    forward(r.handle_query(
        t0 + Duration::from_secs(61),
        &query(102, "example.com", RecordType::A),
        true,
    ));
    // Another type of the same name is its own entry.
    forward(r.handle_query(later, &query(103, "example.com", RecordType::AAAA), true));
}

#[test]
fn failures_and_mismatched_answers_are_servfail_and_not_cached() {
    let mut r = resolver();
    let now = Instant::now();
    let f = forward(r.handle_query(now, &query(5, "example.com", RecordType::A), true));
    let m = Message::from_vec(&r.handle_answer(now, &f, None)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // An answer to another question (a spoof, or a confused server).
    let other = forward(r.handle_query(now, &query(6, "evil.example", RecordType::A), true));
    let m = Message::from_vec(&r.handle_answer(
        now,
        &f,
        Some(&upstream_answer(&other.request, 600, 1)),
    ))
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(r.cached(), 0);
    assert_eq!(r.stats.upstream_failures, 2);
}

#[test]
fn a_big_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let mut r = resolver();
    let now = Instant::now();
    // No EDNS: 512 bytes over UDP.
    let mut plain = Message::new(9, MessageType::Query, OpCode::Query);
    plain.add_query(Query::query(
        Name::from_ascii("big.example.").unwrap(),
        RecordType::A,
    ));
    let f = forward(r.handle_query(now, &plain.to_vec().unwrap(), true));
    assert_eq!(f.limit, 512);
    let wire = r.handle_answer(now, &f, Some(&upstream_answer(&f.request, 60, 100)));
    let m = Message::from_vec(&wire).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty() && wire.len() <= 512);
    // The same over TCP: whole, from the cache.
    let (m, src) = reply(r.handle_query(now, &plain.to_vec().unwrap(), false));
    assert_eq!((m.answers.len(), src), (100, Source::Cache));
}

#[test]
fn malformed_queries_are_dropped_or_formerr_and_counted() {
    let mut r = resolver();
    let now = Instant::now();
    assert!(matches!(r.handle_query(now, b"", true), Decision::Drop));
    assert!(matches!(
        r.handle_query(now, &[0xff; 5], true),
        Decision::Drop
    ));
    // A readable header, then garbage: FORMERR with its id.
    let mut bad = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(&[0x3f, b'a']);
    let (m, _) = reply(r.handle_query(now, &bad, true));
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // A response sent to us as a query: dropped.
    let resp = upstream_answer(
        &Message::from_vec(&query(1, "a.example", RecordType::A)).unwrap(),
        1,
        1,
    );
    assert!(matches!(r.handle_query(now, &resp, true), Decision::Drop));
    assert_eq!(r.stats.malformed, 4);
}
