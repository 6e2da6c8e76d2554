//! The map stream's compression, over real HTTP: a stream that asks for
//! `zstd=1` gets zstd frames that decode to exactly the lines a plain
//! stream gets, its deltas arrive as they happen, and one that does not
//! ask (an older agent) gets plain lines (`warren::control::zmap`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt as _;
use warren::control::auth::{AuthHeaders, SessionKey};
use warren::control::zmap::{Decoder, Unframer};
use warren::control::{Endpoint, EndpointKind, EndpointsReport};
use warren::keys::{NodeKey, PrivateKey};

/// A map stream read line by line, decoding its frames when it is
/// compressed.
struct Stream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    zstd: Option<(Unframer, Decoder)>,
    buf: Vec<u8>,
    /// Bytes as they came over the wire.
    wire: usize,
}

impl Stream {
    async fn open(base: &str, key: &PrivateKey, coord: &NodeKey, path: &str) -> Stream {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let session = SessionKey::for_node(key, coord).unwrap();
        let mut req = reqwest::Client::new().get(format!("{base}{path}"));
        for (n, v) in AuthHeaders::sign(&session, key.public(), "GET", path, now, b"").to_pairs() {
            req = req.header(n, v);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        let zstd = match resp.headers().get(reqwest::header::CONTENT_ENCODING) {
            Some(v) if v == "zstd" => Some((Unframer::new(), Decoder::new().unwrap())),
            None => None,
            Some(v) => panic!("unexpected encoding {v:?}"),
        };
        Stream {
            body: resp.bytes_stream().boxed(),
            zstd,
            buf: Vec::new(),
            wire: 0,
        }
    }

    /// The next line that is not a keepalive (5 s at most).
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8(line).unwrap();
                if !line.contains("\"keepalive\"") {
                    return line;
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.body.next())
                .await
                .expect("a line within 5 s")
                .expect("the stream stays open")
                .unwrap();
            self.wire += chunk.len();
            match &mut self.zstd {
                None => self.buf.extend_from_slice(&chunk),
                Some((u, dec)) => {
                    u.push(&chunk);
                    while u.next_into(dec, &mut self.buf).unwrap() {}
                }
            }
        }
    }
}

#[tokio::test]
async fn a_compressed_stream_carries_the_same_lines_in_fewer_bytes() {
    let dir = tempfile::tempdir().unwrap();
    common::init();
    let mut cfg = warren_coordinator::server::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("coord"),
    );
    cfg.compress_maps = true;
    let srv = warren_coordinator::server::start(cfg).await.unwrap();
    let url = common::url(&srv);
    let tok = common::token(&srv.store, true, false).await;
    // Enough peers that the full map spans several compressed blocks.
    let mut clients = Vec::new();
    for i in 0..250 {
        let state = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&state).unwrap();
        let key = PrivateKey::generate();
        let c = warren::control::ControlClient::new(&url, key.clone(), &state).unwrap();
        c.register(
            Some(&tok),
            &format!("n{i}"),
            PrivateKey::generate().public(),
        )
        .await
        .unwrap();
        clients.push((c, key));
    }
    let coord = clients[0].0.coordinator_key().await.unwrap();
    // The hub applies registrations after they commit: wait until a full
    // map lists everyone, so that both streams below get the same one.
    // The waiting stream stays open, so its node's presence holds still.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _waiter = loop {
        let mut s = Stream::open(&url, &clients[0].1, &coord, "/map?v=2").await;
        let full: serde_json::Value = serde_json::from_str(&s.line().await).unwrap();
        if full["peers"].as_array().map(Vec::len) == Some(249) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hub never held all 250 nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let me = &clients[7].1;
    let mut plain = Stream::open(&url, me, &coord, "/map?v=2").await;
    let mut zstd = Stream::open(&url, me, &coord, "/map?v=2&zstd=1").await;
    assert!(plain.zstd.is_none(), "not asked: not compressed");
    assert!(zstd.zstd.is_some(), "asked: Content-Encoding: zstd");

    let (full_plain, full_zstd) = (plain.line().await, zstd.line().await);
    let parsed: serde_json::Value = serde_json::from_str(&full_zstd).unwrap();
    assert_eq!(parsed["type"], "full");
    assert_eq!(parsed["peers"].as_array().map(Vec::len), Some(249));
    // The same map but for the presence both streams gave this node.
    let peers = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["peers"].clone()
    };
    assert_eq!(peers(&full_plain), peers(&full_zstd));
    // Its own block (32 KB of 70) goes stored; the rest compresses to
    // about a third (the keys in it are random).
    assert!(
        zstd.wire * 10 < plain.wire * 7,
        "compressed full map: {} bytes on the wire against {}",
        zstd.wire,
        plain.wire
    );

    // A change reaches both, the compressed one as a line of its own.
    let eps = [Endpoint {
        addr: "203.0.113.9:41641".parse().unwrap(),
        kind: EndpointKind::Srflx,
    }];
    clients[3]
        .0
        .report_endpoints(&EndpointsReport::endpoints(&eps))
        .await
        .unwrap();
    for s in [&mut plain, &mut zstd] {
        let mut seen = false;
        for _ in 0..20 {
            if s.line().await.contains("203.0.113.9:41641") {
                seen = true;
                break;
            }
        }
        assert!(seen, "the endpoint change arrived");
    }

    // The agent's own client reads the compressed stream into a map.
    let mut agent = clients[11].0.map_stream();
    let map = common::first_full(&mut agent).await;
    assert_eq!(map.peers.len(), 249);
}

#[tokio::test]
async fn a_coordinator_that_does_not_compress_answers_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, url, tok) = common::start_with_token(dir.path(), false).await;
    let key = PrivateKey::generate();
    let c = warren::control::ControlClient::new(&url, key.clone(), dir.path()).unwrap();
    c.register(Some(&tok), "a", PrivateKey::generate().public())
        .await
        .unwrap();
    let coord = c.coordinator_key().await.unwrap();
    let mut s = Stream::open(&url, &key, &coord, "/map?v=2&zstd=1").await;
    assert!(s.zstd.is_none(), "asked, but not turned on: plain");
    assert!(s.line().await.starts_with("{\"type\":\"full\""));
}
