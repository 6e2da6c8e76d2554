//! Hostile and broken requests: each gets a typed 4xx `{code, message}` and
//! leaves the store exactly as it was.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use warren::control::auth::{AuthHeaders, SessionKey, HDR_MAC, HDR_TIME};
use warren::control::{ErrorBody, ErrorCode};
use warren::keys::{NodeKey, PrivateKey};

struct Raw {
    http: reqwest::Client,
    base: String,
    key: PrivateKey,
    coord: NodeKey,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Raw {
    /// A client with a fresh key of its own for the coordinator at `base`.
    async fn new(base: &str) -> Raw {
        let http = reqwest::Client::new();
        let coord = coordinator_key(&http, base).await;
        Raw {
            http,
            base: base.to_owned(),
            key: PrivateKey::generate(),
            coord,
        }
    }

    fn headers(
        &self,
        method: &str,
        path: &str,
        time: u64,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        let s = SessionKey::for_node(&self.key, &self.coord).unwrap();
        AuthHeaders::sign(&s, self.key.public(), method, path, time, body)
            .to_pairs()
            .to_vec()
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> (u16, Option<ErrorBody>) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        for (n, v) in headers {
            req = req.header(*n, v);
        }
        let resp = req.body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).ok())
    }

    /// A signed `GET /map`, its response left open.
    async fn open_map(&self) -> reqwest::Response {
        let h = self.headers("GET", "/map", now(), b"");
        let mut req = self.http.get(format!("{}/map", self.base));
        for (n, v) in &h {
            req = req.header(*n, v);
        }
        req.send().await.unwrap()
    }

    async fn signed(&self, method: &str, path: &str, body: &[u8]) -> (u16, Option<ErrorBody>) {
        let h = self.headers(method, path, now(), body);
        self.send(method, path, &h, body.to_vec()).await
    }
}

/// The coordinator's public key, as an agent learns it (`GET /key`).
async fn coordinator_key(http: &reqwest::Client, base: &str) -> NodeKey {
    let key: warren::control::ServerKeyResponse = serde_json::from_slice(
        &http
            .get(format!("{base}/key"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    key.key
}

fn register_body(key: &NodeKey, token: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"token":"{token}","node_key":"{key}","disco_key":"{key}","hostname":"h"{extra}}}"#)
        .into_bytes()
}

#[track_caller]
fn refused(got: (u16, Option<ErrorBody>), code: ErrorCode) {
    let body = got
        .1
        .unwrap_or_else(|| panic!("status {} without a typed error body", got.0));
    assert_eq!(body.code, code, "{}", body.message);
    assert_eq!(got.0, code.status());
    assert!((400..500).contains(&got.0));
    assert!(!body.message.is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, base, tok) = common::start_with_token(dir.path(), false).await;
    let raw = Raw::new(&base).await;
    let me = raw.key.public();

    // A registered node to aim the post-registration requests with.
    let (status, _) = raw
        .signed("POST", "/register", &register_body(&me, &tok, ""))
        .await;
    assert_eq!(status, 200);
    // Let the registration's own change note settle.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = common::snapshot(&srv.store).await;
    let stranger = Raw {
        http: raw.http.clone(),
        base: raw.base.clone(),
        key: PrivateKey::generate(),
        coord: raw.coord,
    };
    let them = stranger.key.public();

    // Malformed JSON, unknown fields, wrong types, a key that is not the signer's.
    refused(
        stranger.signed("POST", "/register", b"{\"token\":").await,
        ErrorCode::BadRequest,
    );
    refused(
        stranger
            .signed(
                "POST",
                "/register",
                &register_body(&them, &tok, r#","admin":true"#),
            )
            .await,
        ErrorCode::BadRequest,
    );
    refused(
        stranger
            .signed("POST", "/register", br#"{"node_key":5}"#)
            .await,
        ErrorCode::BadRequest,
    );
    refused(
        stranger
            .signed("POST", "/register", &register_body(&me, &tok, ""))
            .await,
        ErrorCode::BadRequest,
    );
    // Another node's disco key (the registered node's is its own key).
    refused(
        stranger
            .signed(
                "POST",
                "/register",
                format!(
                    r#"{{"token":"{tok}","node_key":"{them}","disco_key":"{me}","hostname":"h"}}"#
                )
                .as_bytes(),
            )
            .await,
        ErrorCode::Conflict,
    );
    // Text that would reach admins' terminals with an escape sequence in
    // it (clear screen, set the window title) or a bidi override.
    for extra in [
        r#","os":"linux\u001b[2J""#,
        r#","version":"0.1\u001b]0;owned\u0007""#,
        r#","os":"li\u202enux""#,
    ] {
        refused(
            stranger
                .signed("POST", "/register", &register_body(&them, &tok, extra))
                .await,
            ErrorCode::BadRequest,
        );
    }
    refused(
        stranger
            .signed(
                "POST",
                "/register",
                format!(
                    r#"{{"token":"{tok}","node_key":"{them}","disco_key":"{them}","hostname":"h\u001b[1m"}}"#
                )
                .as_bytes(),
            )
            .await,
        ErrorCode::BadRequest,
    );
    refused(
        raw.signed(
            "POST",
            "/endpoints",
            br#"{"endpoints":[{"addr":"nope","kind":"host"}]}"#,
        )
        .await,
        ErrorCode::BadRequest,
    );
    refused(
        raw.signed("POST", "/endpoints", br#"{"endpoints":[],"extra":1}"#)
            .await,
        ErrorCode::BadRequest,
    );
    // Candidates that would aim every peer at this host, a link, a group
    // or the overlay, and a NAT "mapping" at loopback.
    for bad in [
        r#"{"endpoints":[{"addr":"127.0.0.1:22","kind":"host"}]}"#,
        r#"{"endpoints":[{"addr":"[fe80::1]:41641","kind":"host"}]}"#,
        r#"{"endpoints":[{"addr":"224.0.0.251:5353","kind":"srflx"}]}"#,
        r#"{"endpoints":[{"addr":"100.64.0.1:41641","kind":"host"}]}"#,
        r#"{"endpoints":[{"addr":"192.0.2.1:0","kind":"host"}]}"#,
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([format!(
        r#"{{"endpoints":[],"nat":{}}}"#,
        serde_json::to_string(&warren::traversal::NatSummary {
            observed: Some("127.0.0.1:9".parse().unwrap()),
            ..Default::default()
        })
        .unwrap()
    )]) {
        refused(
            raw.signed("POST", "/endpoints", bad.as_bytes()).await,
            ErrorCode::BadRequest,
        );
    }
    let many: Vec<String> = (0..65)
        .map(|i| format!(r#"{{"addr":"192.0.2.1:{}","kind":"host"}}"#, i + 1))
        .collect();
    refused(
        raw.signed(
            "POST",
            "/endpoints",
            format!(r#"{{"endpoints":[{}]}}"#, many.join(",")).as_bytes(),
        )
        .await,
        ErrorCode::BadRequest,
    );
    refused(
        raw.signed("POST", "/logout", b"{}").await,
        ErrorCode::BadRequest,
    );

    // Oversized bodies, declared or not.
    let big = vec![b' '; 100 * 1024];
    refused(
        stranger.signed("POST", "/register", &big).await,
        ErrorCode::PayloadTooLarge,
    );

    // Wrong tokens.
    refused(
        stranger
            .signed("POST", "/register", &register_body(&them, "wrn_00_00", ""))
            .await,
        ErrorCode::InvalidToken,
    );
    refused(
        stranger
            .signed("POST", "/register", &register_body(&them, "", ""))
            .await,
        ErrorCode::InvalidToken,
    );

    // Missing, malformed and forged authentication.
    refused(
        raw.send("POST", "/endpoints", &[], br#"{"endpoints":[]}"#.to_vec())
            .await,
        ErrorCode::Unauthenticated,
    );
    let body = br#"{"endpoints":[]}"#;
    let mut h = raw.headers("POST", "/endpoints", now(), body);
    h.retain(|(n, _)| *n != HDR_TIME);
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::Unauthenticated,
    );
    let mut h = raw.headers("POST", "/endpoints", now(), body);
    for (n, v) in h.iter_mut() {
        if *n == HDR_MAC {
            let mut bytes: Vec<u8> = v.bytes().collect();
            bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
            *v = String::from_utf8(bytes).unwrap();
        }
    }
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::BadSignature,
    );
    // A valid MAC for another body, another path, or by another key.
    let h = raw.headers("POST", "/endpoints", now(), b"{}");
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::BadSignature,
    );
    let h = raw.headers("POST", "/logout", now(), b"");
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::BadSignature,
    );
    let mut h = stranger.headers("POST", "/endpoints", now(), body);
    h[0].1 = me.to_string();
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::BadSignature,
    );
    // Signed for another coordinator.
    let other = Raw {
        coord: PrivateKey::generate().public(),
        http: raw.http.clone(),
        base: raw.base.clone(),
        key: raw.key.clone(),
    };
    refused(
        other.signed("POST", "/endpoints", body).await,
        ErrorCode::BadSignature,
    );
    // Stale or future timestamps.
    let h = raw.headers("POST", "/endpoints", now() - 3600, body);
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::StaleRequest,
    );
    let h = raw.headers("POST", "/endpoints", now() + 3600, body);
    refused(
        raw.send("POST", "/endpoints", &h, body.to_vec()).await,
        ErrorCode::StaleRequest,
    );
    // A valid request from a key that never registered.
    refused(
        stranger.signed("POST", "/endpoints", body).await,
        ErrorCode::UnknownNode,
    );
    refused(
        stranger.signed("GET", "/map", b"").await,
        ErrorCode::UnknownNode,
    );
    // Unknown paths and methods are typed too.
    refused(
        raw.send("GET", "/admin", &[], vec![]).await,
        ErrorCode::NotFound,
    );
    refused(
        raw.send("DELETE", "/register", &[], vec![]).await,
        ErrorCode::MethodNotAllowed,
    );

    assert_eq!(
        common::snapshot(&srv.store).await,
        before,
        "a refused request changed the store"
    );

    // Replays: the original succeeds once; the captured copy gets nothing.
    let good = br#"{"endpoints":[{"addr":"192.0.2.1:41641","kind":"host"}]}"#;
    let h = raw.headers("POST", "/endpoints", now(), good);
    assert_eq!(
        raw.send("POST", "/endpoints", &h, good.to_vec()).await.0,
        200
    );
    let after_first = common::snapshot(&srv.store).await;
    assert_ne!(after_first, before);
    refused(
        raw.send("POST", "/endpoints", &h, good.to_vec()).await,
        ErrorCode::Replayed,
    );
    let h = raw.headers("POST", "/logout", now(), b"");
    assert_eq!(raw.send("POST", "/logout", &h, vec![]).await.0, 200);
    let after_logout = common::snapshot(&srv.store).await;
    // A replayed registration cannot bring the node back either.
    let reg = register_body(&me, &tok, "");
    let h = raw.headers("POST", "/register", now(), &reg);
    let (status, _) = raw.send("POST", "/register", &h, reg.clone()).await;
    assert_eq!(status, 200);
    let h2 = h.clone();
    let snap = common::snapshot(&srv.store).await;
    refused(
        raw.send("POST", "/register", &h2, reg).await,
        ErrorCode::Replayed,
    );
    assert_eq!(common::snapshot(&srv.store).await, snap);
    assert_ne!(after_logout, snap);
}

/// Whether the body of a map stream ends within `within` (after the full
/// map and keepalives it may have sent).
async fn ends_within(resp: &mut reqwest::Response, within: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => return false,
            Ok(Ok(Some(_))) => continue,
            Ok(_) => return true,
        }
    }
}

#[tokio::test]
async fn a_node_holds_at_most_four_map_streams_and_the_newest_win() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (_srv, base, tok) = common::start_with_token(dir.path(), false).await;
    let raw = Raw::new(&base).await;
    let me = raw.key.public();
    let (status, _) = raw
        .signed("POST", "/register", &register_body(&me, &tok, ""))
        .await;
    assert_eq!(status, 200);
    let mut streams = Vec::new();
    for _ in 0..6 {
        let resp = raw.open_map().await;
        assert_eq!(resp.status(), 200);
        streams.push(resp);
        // Each stream is filed before the next is opened.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The two oldest were ended by the four newer ones.
    for (i, s) in streams.iter_mut().enumerate().take(2) {
        assert!(
            ends_within(s, Duration::from_secs(5)).await,
            "stream {i} still open"
        );
    }
    for (i, s) in streams.iter_mut().enumerate().skip(2) {
        assert!(
            !ends_within(s, Duration::from_millis(300)).await,
            "stream {i} ended"
        );
    }
}

#[tokio::test]
async fn self_made_keys_write_nothing_and_an_address_that_keeps_failing_is_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, base, _tok) = common::start_with_token(dir.path(), false).await;
    let http = reqwest::Client::new();
    let coord = coordinator_key(&http, &base).await;
    let before = common::snapshot(&srv.store).await;
    let mut codes = Vec::new();
    for _ in 0..40 {
        // A fresh key each time: any key signs validly.
        let raw = Raw {
            http: http.clone(),
            base: base.clone(),
            key: PrivateKey::generate(),
            coord,
        };
        let (_, body) = raw
            .signed("POST", "/endpoints", br#"{"endpoints":[]}"#)
            .await;
        codes.push(body.map(|b| b.code));
    }
    // Not even a nonce was stored for them.
    assert_eq!(common::snapshot(&srv.store).await, before);
    let unknown = codes
        .iter()
        .filter(|c| **c == Some(ErrorCode::UnknownNode))
        .count();
    let cut = codes
        .iter()
        .filter(|c| **c == Some(ErrorCode::TooManyRequests))
        .count();
    assert_eq!(unknown + cut, 40, "{codes:?}");
    assert!(
        (15..=25).contains(&unknown),
        "the burst is about 20: {codes:?}"
    );
    assert!(
        cut >= 15,
        "the rest were refused before any work: {codes:?}"
    );
}
