//! Helpers shared by the coordinator's integration tests: in-process
//! servers on loopback, fresh PostgreSQL databases, clients, and waiting
//! for map events with a deadline.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use warren::control::{ControlClient, MapEvent, MapStream};
use warren::keys::PrivateKey;
use warren_coordinator::server::{self, Config, Running};
use warren_coordinator::store::{NewToken, Store};

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The PostgreSQL server to test against, or `None` (with the reason
/// printed) when none is configured. Under `CI=true` a missing server is a
/// failure, not a skip.
pub fn postgres_base_url() -> Option<String> {
    match std::env::var("WARREN_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but WARREN_TEST_POSTGRES_URL is not set: PostgreSQL tests must run in CI");
            }
            eprintln!(
                "SKIPPED: WARREN_TEST_POSTGRES_URL is not set, so the PostgreSQL tests do not run"
            );
            None
        }
    }
}

/// A new, empty database on the test server, so tests never share state.
pub async fn fresh_postgres() -> Option<String> {
    use sqlx::Connection as _;
    let base = postgres_base_url()?;
    let name = format!("warren_t_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to WARREN_TEST_POSTGRES_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("CREATE DATABASE (the test user needs CREATEDB)");
    let (prefix, _) = base.rsplit_once('/').expect("URL has a database path");
    let query = base
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Some(format!("{prefix}/{name}{query}"))
}

/// A coordinator on loopback with a short keepalive and ephemeral timeout.
pub async fn start(dir: &Path, database: Option<String>) -> Running {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    cfg.database = database;
    cfg.keepalive = Duration::from_secs(1);
    cfg.ephemeral_timeout = Duration::from_secs(1);
    server::start(cfg).await.expect("coordinator starts")
}

/// A test's usual start: [`init`], a coordinator on `dir` without
/// PostgreSQL, its URL, and a reusable token (for ephemeral nodes when
/// `ephemeral`).
pub async fn start_with_token(dir: &Path, ephemeral: bool) -> (Running, String, String) {
    init();
    let srv = start(dir, None).await;
    let url = url(&srv);
    let tok = token(&srv.store, true, ephemeral).await;
    (srv, url, tok)
}

pub fn url(r: &Running) -> String {
    format!("http://{}", r.addr)
}

pub async fn token(store: &Store, reusable: bool, ephemeral: bool) -> String {
    let spec = NewToken {
        reusable,
        ephemeral,
        ..Default::default()
    };
    store.create_token(&spec).await.unwrap().1
}

/// A client with a fresh node key and its own state directory.
pub fn client(base: &str, state: &Path) -> ControlClient {
    ControlClient::new(base, PrivateKey::generate(), state).unwrap()
}

/// Waits (at most `within`) for the first event `pick` accepts.
pub async fn expect<T>(
    stream: &mut MapStream,
    within: Duration,
    mut pick: impl FnMut(&MapEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.recv()).await {
            Ok(Some(ev)) => {
                if let Some(t) = pick(&ev) {
                    return t;
                }
                seen.push(format!("{ev:?}"));
            }
            Ok(None) => panic!("map stream ended; events seen: {seen:#?}"),
            Err(_) => panic!("no matching event within {within:?}; events seen: {seen:#?}"),
        }
    }
}

/// Waits for the first full map from the coordinator (not from cache).
pub async fn first_full(stream: &mut MapStream) -> warren::control::NetMap {
    expect(stream, Duration::from_secs(5), |ev| match ev {
        MapEvent::Full {
            map,
            from_cache: false,
        } => Some(map.clone()),
        _ => None,
    })
    .await
}

/// Everything in the store, for "nothing changed" assertions.
pub async fn snapshot(store: &Store) -> String {
    let counts = store.row_counts().await.unwrap();
    let nodes = store.list_nodes().await.unwrap();
    let tokens = store.list_tokens().await.unwrap();
    // last_seen moves with keepalives; it is not something a request changes.
    let nodes: Vec<_> = nodes
        .into_iter()
        .map(|mut n| {
            n.last_seen_ms = 0;
            n
        })
        .collect();
    format!("{counts:?}\n{nodes:?}\n{tokens:?}")
}

/// A map stream plus the map it has delivered so far, for tests that care
/// about the state reached, not whether it came as a delta or a full map.
pub struct Watch {
    pub stream: MapStream,
    pub map: warren::control::NetMap,
}

impl Watch {
    pub async fn new(mut stream: MapStream) -> Watch {
        let map = first_full(&mut stream).await;
        Watch { stream, map }
    }

    /// Waits (at most `within`) until the map satisfies `ok`.
    pub async fn until(
        &mut self,
        within: Duration,
        what: &str,
        ok: impl Fn(&warren::control::NetMap) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !ok(&self.map) {
            let ev = match tokio::time::timeout_at(deadline, self.stream.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => panic!("map stream ended while waiting for {what}"),
                Err(_) => panic!(
                    "{what}: not within {within:?}; map now {:#?}",
                    self.map.peers
                ),
            };
            match ev {
                MapEvent::Full { map, .. } => self.map = map,
                MapEvent::PeerAdded(p) | MapEvent::PeerChanged(p) => {
                    self.map.peers.insert(p.key, p);
                }
                MapEvent::PeerRemoved(k) => {
                    self.map.peers.remove(&k);
                }
                MapEvent::SelfChanged(p) => self.map.self_node = p,
                _ => {}
            }
        }
    }
}
