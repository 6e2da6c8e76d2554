//! Interop: our STUN client (the codec and `netcheck::run`) against coturn's
//! `turnserver` running as a plain STUN server on loopback. Skips with a
//! reason when coturn is missing, except under `CI=true`.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use warren::netcheck::{self, MappingBehavior, Server};
use warren::proto::stun::{self, Message, TransactionId};

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

/// Kills the server when the test ends, however it ends.
struct Turnserver {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Turnserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_turnserver(port: u16) -> Turnserver {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--stun-only",
            "--no-auth",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
        ])
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .args(["--simple-log", "-l", "stdout"])
        .arg("--userdb")
        .arg(dir.path().join("turndb"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Turnserver { child, _dir: dir }
}

/// Sends Binding requests until coturn answers (it takes a moment to
/// start), bounded to 10 s. Returns the raw answer.
async fn first_answer(client: &UdpSocket, server: SocketAddr) -> Vec<u8> {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1500];
    let mut n = 0u8;
    while Instant::now() < give_up {
        n += 1;
        let tx = TransactionId([n; 12]);
        client
            .send_to(&stun::binding_request(tx), server)
            .await
            .unwrap();
        if let Ok(Ok((len, from))) =
            tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await
        {
            assert_eq!(from, server);
            let (got_tx, _) = stun::parse_binding_response(&buf[..len]).unwrap();
            assert_eq!(got_tx, tx);
            return buf[..len].to_vec();
        }
    }
    panic!("turnserver did not answer within 10 s");
}

#[tokio::test]
async fn our_client_reads_coturn_answers() {
    if !tool_available("turnserver") {
        return;
    }
    let port = free_udp_port();
    let _server = start_turnserver(port);
    let server: SocketAddr = ([127, 0, 0, 1], port).into();

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = client.local_addr().unwrap();
    let answer = first_answer(&client, server).await;
    let msg = Message::decode(&answer).unwrap();
    assert_eq!(msg.xor_mapped_address, Some(me));
    assert!(msg.fingerprint, "coturn signs its answers with FINGERPRINT");

    // The whole netcheck driver against coturn.
    let report = netcheck::run(
        vec![UdpSocket::bind("0.0.0.0:0").await.unwrap()],
        vec![Server {
            name: "coturn".into(),
            addrs: vec![server],
        }],
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    eprintln!("{report}");
    assert!(report.udp);
    assert_eq!(report.ipv4.mapping, MappingBehavior::NoNat);
    assert_eq!(report.preferred_server.as_deref(), Some("coturn"));
    assert_eq!(report.rejected, Default::default());
}
