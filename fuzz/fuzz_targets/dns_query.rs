//! Fuzzes the resolver's query path (`warren::dns::Resolver`) on arbitrary
//! datagrams, and the answer path on arbitrary upstream answers.
//!
//! Properties: nothing panics; every reply the resolver sends is a DNS
//! message that parses, fits the size the query allows over UDP, and
//! carries the query's id; an upstream answer of any shape gives a reply
//! with the client's id.

#![no_main]

use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use warren::dns::zone::{NodeName, Zone};
use warren::dns::{Decision, DnsSettings, Resolver};

fn resolver() -> Resolver {
    let mut r = Resolver::default();
    let mut s = DnsSettings::default();
    s.split.insert(
        "corp.example".into(),
        vec!["10.0.0.53".parse().expect("an address")],
    );
    let nodes = [NodeName {
        name: "b".into(),
        v4: "100.64.0.3".parse().expect("an address"),
        v6: "fd7a:115c:a1e0::6440:3".parse().expect("an address"),
    }];
    r.set_zone(Arc::new(Zone::build(&s, &nodes, "fd7a:115c:a1e0::/48".parse().ok())));
    r.set_settings(s);
    r.set_host_resolvers(vec!["192.168.1.1".parse().expect("an address")]);
    r
}

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a query and an upstream answer.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let (query, answer) = rest.split_at(cut);
    let mut r = resolver();
    let now = Instant::now();
    let id = |wire: &[u8]| u16::from_be_bytes([wire[0], wire[1]]);
    match r.handle_query(now, query, true) {
        Decision::Reply { wire, .. } => {
            let m = Message::from_vec(&wire).expect("a reply parses");
            assert!(wire.len() <= 1232.max(512), "an oversized UDP reply");
            assert_eq!(m.metadata.id, id(query));
        }
        Decision::Forward(f) => {
            let wire = r.handle_answer(now, &f, Some(answer));
            let m = Message::from_vec(&wire).expect("a reply parses");
            assert_eq!(m.metadata.id, f.request.metadata.id);
            assert!(wire.len() <= f.limit);
        }
        Decision::Drop => {}
    }
});
