//! Interop: coturn's `turnutils_stunclient` (a third-party STUN client) must
//! get a usable answer from our server. Skips with a reason when the tool is
//! missing, except under `CI=true` where a missing tool is a failure.

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
