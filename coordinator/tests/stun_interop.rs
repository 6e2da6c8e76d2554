//! Interop: coturn's `turnutils_stunclient` (a third-party STUN client) must
//! get a usable answer from our server. Skips with a reason when the tool is
//! missing, except under `CI=true` where a missing tool is a failure.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::UdpSocket;
use warren_coordinator::stun::{serve, ServerOptions, StunStats};

fn tool_available(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true (Debian package coturn)"
        );
        eprintln!("SKIP: {tool} not installed (apt-get install coturn)");
    }
    found
}

#[tokio::test]
async fn turnutils_stunclient_gets_our_answer() {
    if !tool_available("turnutils_stunclient") {
        return;
    }
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let stats = Arc::new(StunStats::default());
    let server = tokio::spawn(serve(
        socket,
        ServerOptions {
            software: Some("warren-interop".into()),
        },
        stats.clone(),
    ));
    // `timeout(1)` bounds the tool itself; spawn_blocking keeps the server's
    // runtime free while we wait.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "20",
                "turnutils_stunclient",
                "-p",
                &port.to_string(),
                "127.0.0.1",
            ])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    server.abort();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{text}");
    assert!(
        stats.answered.load(Ordering::Relaxed) >= 1,
        "no request answered: {text}"
    );
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "client did not report our mapped address: {text}"
    );
}

/// The netcheck driver against two of our servers, each on two ports, over
/// loopback: every destination answers and sees the same, un-NATed address.
#[tokio::test]
async fn netcheck_against_our_servers() {
    use warren::netcheck::{self, MappingBehavior, PortAllocation, Server};
    let stats = Arc::new(StunStats::default());
    let mut servers = Vec::new();
    for name in ["coordinator", "relay"] {
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            addrs.push(sock.local_addr().unwrap());
            tokio::spawn(serve(sock, ServerOptions::default(), stats.clone()));
        }
        servers.push(Server {
            name: name.into(),
            addrs,
        });
    }
    let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let report = netcheck::run(
        vec![socket],
        servers,
        None,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{report}"
    );
    assert!(report.udp);
    assert_eq!(report.ipv4.global, Some(([127, 0, 0, 1], port).into()));
    assert_eq!(report.ipv4.mapping, MappingBehavior::NoNat);
    assert_eq!(report.ipv4.port_allocation, PortAllocation::Preserving);
    assert!(
        report.servers.iter().all(|s| s.latency.is_some()),
        "{report}"
    );
    assert_eq!(stats.answered.load(Ordering::Relaxed), 4);
}
