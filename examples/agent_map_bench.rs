//! The agent's sans-IO core with a large map (issue 19): how long parsing
//! a full map line takes, how long `AgentState` takes to apply it (and to
//! emit its outputs for the data plane), how long one delta takes, and the
//! memory the state holds, for 1,000 peers beside 10,000 measured in the
//! same run. The data plane's side (a WireGuard session per peer) is
//! measured by `tests/bench/peers.sh`.
//!
//!   cargo run --release --example agent_map_bench [PEERS...]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use warren::agent::state::{AgentState, Settings};
use warren::control::{
    Endpoint, EndpointKind, MapEvent, MapMessage, NetMap, Peer, RegisterResponse, RelayMap,
    RelayRegion,
};
use warren::keys::PrivateKey;
use warren::proto::disco::DiscoSecret;

fn peer(i: u32) -> Peer {
    let key = PrivateKey::generate().public();
    Peer {
        node_id: i64::from(i),
        key,
        disco_key: PrivateKey::generate().public(),
        name: format!("node-{i}"),
        ipv4: std::net::Ipv4Addr::from(0x6440_0000 + i),
        ipv6: format!("fd7a:115c:a1e0::{:x}:{:x}", i >> 16, i & 0xffff)
            .parse()
            .expect("an IPv6 address"),
        endpoints: vec![Endpoint {
            addr: std::net::SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 41641)),
            kind: EndpointKind::Srflx,
        }],
        online: true,
        last_seen_ms: 1,
        tags: vec![],
        os: "linux".into(),
        version: "0.1.0".into(),
        nat: Default::default(),
        home_relay: Some(1),
        routes: vec![],
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Figures {
    parse: Duration,
    apply: Duration,
    outputs: usize,
    again: Duration,
    delta_p50: Duration,
    delta_max: Duration,
    rss_mb: f64,
}

fn measure(n: u32) -> Figures {
    let relay_map = RelayMap {
        regions: vec![RelayRegion {
            id: 1,
            name: "r1".into(),
            url: "https://relay.example/relay".into(),
            stun: vec![],
            key: None,
        }],
    };
    let me = peer(0);
    let peers: Vec<Peer> = (1..=n).map(peer).collect();
    let line = serde_json::to_string(&MapMessage::Full {
        self_node: me.clone(),
        peers: peers.clone(),
        relay_map: relay_map.clone(),
        packet_filter: None,
        dns: None,
    })
    .expect("encode");
    let t = Instant::now();
    let msg: MapMessage = serde_json::from_str(&line).expect("parse");
    let map = NetMap::from_full(me.key, &msg).expect("a full map");
    let parse = t.elapsed();

    let rss0 = rss_kb();
    let settings = Settings {
        traversal: warren::traversal::Config::default(),
        tcp_port: 41641,
    };
    let mut s = AgentState::new(settings, me.key, DiscoSecret::from_bytes([7; 32]), 1);
    let now = Instant::now();
    s.begin();
    let reg = RegisterResponse {
        node_id: 0,
        name: "me".into(),
        ipv4: me.ipv4,
        ipv6: me.ipv6,
        ephemeral: false,
        relay_map,
    };
    s.registered(now, &reg, false);
    s.follow(now, None);
    while s.poll_output().is_some() {}
    let full = |map: &NetMap| MapEvent::Full {
        map: map.clone(),
        from_cache: false,
    };
    let ev = full(&map);
    let t = Instant::now();
    s.handle_map(now, Some(ev));
    let outputs = std::iter::from_fn(|| s.poll_output()).count();
    let apply = t.elapsed();
    let rss_mb = rss_kb().saturating_sub(rss0) as f64 / 1024.0;

    // The same map again (a reconnection).
    let ev = full(&map);
    let t = Instant::now();
    s.handle_map(now, Some(ev));
    while s.poll_output().is_some() {}
    let again = t.elapsed();

    // Deltas: a peer reports a new endpoint.
    let mut times = Vec::new();
    let peers_by_key: BTreeMap<_, _> = map.peers;
    for (i, p) in peers_by_key.values().take(200).enumerate() {
        let mut p = p.clone();
        p.endpoints[0].addr.set_port(50_000 + i as u16);
        let t = Instant::now();
        s.handle_map(now, Some(MapEvent::PeerChanged(p)));
        while s.poll_output().is_some() {}
        times.push(t.elapsed());
    }
    times.sort();
    Figures {
        parse,
        apply,
        outputs,
        again,
        delta_p50: times[times.len() / 2],
        delta_max: times[times.len() - 1],
        rss_mb,
    }
}

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let figures: Vec<(u32, Figures)> = sizes.iter().map(|&n| (n, measure(n))).collect();
    print!("{:<40}", "peers");
    for (n, _) in &figures {
        print!("{n:>14}");
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Figures) -> String| {
        print!("{name:<40}");
        for (_, fig) in &figures {
            print!("{:>14}", f(fig));
        }
        println!();
    };
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    row("parse the full map line", &|f| ms(f.parse));
    row("apply it (state + its outputs)", &|f| ms(f.apply));
    row("  outputs", &|f| f.outputs.to_string());
    row("apply the same map again", &|f| ms(f.again));
    row("one delta, p50 of 200", &|f| ms(f.delta_p50));
    row("one delta, max of 200", &|f| ms(f.delta_max));
    row("state memory (RSS growth)", &|f| {
        format!("{:.1} MB", f.rss_mb)
    });
}
