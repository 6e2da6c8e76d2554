//! Netcheck fed an arbitrary datagram from its server's address or from a
//! stranger after its first transmission: it must never panic, and nothing
//! from a stranger may become an endpoint.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use warren::netcheck::{Config, Netcheck, Server};

fuzz_target!(|data: &[u8]| {
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let now = Instant::now();
    let mut nc = Netcheck::new(
        now,
        Config {
            servers: vec![Server {
                name: "s".into(),
                addrs: vec![server],
            }],
            ..Config::default()
        },
    );
    while nc.poll_transmit(now).is_some() {}
    let from = if data.first().is_some_and(|b| b & 1 == 1) {
        server
    } else {
        "198.51.100.9:1".parse().unwrap()
    };
    let _ = nc.handle_stun(now, from, data);
    nc.handle_timeout(now + Duration::from_secs(10));
    let report = nc.poll_report().unwrap();
    if from != server {
        assert!(!report.udp, "an answer from a stranger was accepted");
    }
});
