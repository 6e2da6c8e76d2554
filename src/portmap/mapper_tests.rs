//! Mapper and probe tests against a fake NAT-PMP gateway on a loopback
//! address (127.77.0.x, so the fixed port 5351 never clashes with a real
//! service). It grants 2-second mappings so a renewal happens within the
//! test; every wait is bounded. The real-gateway tests (miniupnpd, each
//! protocol) are lab tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::*;
use crate::portmap::{probe, PortmapPresence};

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// A NAT-PMP-only gateway. Reports every mapping request as
/// (internal port, requested lifetime).
async fn fake_natpmp(addr: Ipv4Addr, granted_lifetime: u32) -> mpsc::UnboundedReceiver<(u16, u32)> {
    let socket = UdpSocket::bind((addr, 5351)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = [0u8; 1100];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let req = &buf[..n];
            let epoch = 1234u32.to_be_bytes();
            let reply: Vec<u8> = match (req.first(), req.get(1)) {
                // PCP (version 2): "I only speak version 0".
                (Some(2), _) => [&[0u8, 128, 0, 1][..], &epoch].concat(),
                (Some(0), Some(0)) => [&[0u8, 128, 0, 0][..], &epoch, &EXTERNAL.octets()].concat(),
                (Some(0), Some(1)) if n == 12 => {
                    let internal = u16::from_be_bytes([req[4], req[5]]);
                    let lifetime = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
                    let _ = tx.send((internal, lifetime));
                    let (external, granted) = if lifetime == 0 {
                        (0u16, 0u32)
                    } else {
                        (internal + 1, granted_lifetime.min(lifetime))
                    };
                    [
                        &[0u8, 129, 0, 0][..],
                        &epoch,
                        &internal.to_be_bytes(),
                        &external.to_be_bytes(),
                        &granted.to_be_bytes(),
                    ]
                    .concat()
                }
                _ => continue,
            };
            let _ = socket.send_to(&reply, from).await;
        }
    });
    rx
}

fn natpmp_only(gateway: Ipv4Addr) -> Config {
    Config {
        upnp: false,
        natpmp: true,
        pcp: false,
        gateway: Some(gateway.into()),
        request_timeout: Duration::from_millis(500),
        retry_interval: Duration::from_millis(200),
        ..Config::default()
    }
}

async fn recv_within<T>(rx: &mut mpsc::UnboundedReceiver<T>, secs: u64) -> T {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .expect("gateway saw the request in time")
        .expect("fake gateway alive")
}

#[tokio::test]
async fn maps_renews_and_deletes_via_natpmp() {
    let gw = Ipv4Addr::new(127, 77, 0, 1);
    let mut requests = fake_natpmp(gw, 2).await;
    let handle = PortMapper::start(6000, natpmp_only(gw));
    let mut updates = handle.subscribe();

    assert_eq!(recv_within(&mut requests, 3).await, (6000, 7200));
    tokio::time::timeout(Duration::from_secs(3), updates.wait_for(|m| m.is_some()))
        .await
        .unwrap()
        .unwrap();
    let expected: SocketAddr = (EXTERNAL, 6001).into();
    assert_eq!(handle.current(), Some(expected));
    assert_eq!(handle.mapping().map(|m| m.protocol), Some(Protocol::NatPmp));

    // Granted 2 s, so the renewal comes after about 1 s, asking for the
    // granted lifetime again.
    assert_eq!(recv_within(&mut requests, 3).await, (6000, 2));
    assert_eq!(handle.current(), Some(expected));

    handle.shutdown().await;
    assert_eq!(
        recv_within(&mut requests, 3).await,
        (6000, 0),
        "deleted on shutdown"
    );
    assert_eq!(*updates.borrow(), None);
}

#[tokio::test]
async fn silent_gateway_never_blocks() {
    // Nothing listens on 127.77.0.2: every protocol fails, quietly.
    let config = Config {
        upnp: false,
        pcp: true,
        ..natpmp_only(Ipv4Addr::new(127, 77, 0, 2))
    };
    let handle = PortMapper::start(6001, config);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.current(), None);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), handle.shutdown())
        .await
        .expect("shutdown is bounded");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn probe_reports_what_the_gateway_speaks() {
    let gw = Ipv4Addr::new(127, 77, 0, 3);
    let _requests = fake_natpmp(gw, 60).await;
    let config = Config {
        pcp: true,
        ..natpmp_only(gw)
    };
    let presence = tokio::time::timeout(Duration::from_secs(5), probe(&config))
        .await
        .unwrap();
    assert_eq!(
        presence,
        PortmapPresence {
            upnp: false,
            natpmp: true,
            pcp: false,
        }
    );

    let nobody = natpmp_only(Ipv4Addr::new(127, 77, 0, 4));
    assert_eq!(probe(&nobody).await, PortmapPresence::default());
}

#[test]
fn protocol_order_follows_config() {
    let all = Config::default();
    assert_eq!(
        all.protocols(),
        vec![Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]
    );
    let only_upnp = Config {
        pcp: false,
        natpmp: false,
        ..Config::default()
    };
    assert_eq!(only_upnp.protocols(), vec![Protocol::Upnp]);
}
