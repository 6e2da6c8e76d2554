//! Load generator for `tests/bench/load.sh`: holds idle and slow
//! connections against a running coordinator (a slowloris attacker) while
//! simulated agents register and open their map streams, and reports how
//! many agents made it and how long they took, first without the attack
//! (the reference column) and then under it.
//!
//! The attacker's connections come from loopback addresses other than the
//! agents' (`127.0.0.2` and up, `--attack-sources` of them), as an attacker
//! with a few addresses would: the coordinator's per-address cap must not
//! shut the agents out along with it. Half the connections send nothing;
//! the other half send a request head one byte every `--trickle` seconds.
//! Each one that the server closes is opened again at once, so the count
//! held is the attacker's best effort, reported as it goes.
//!
//! Agents use the agent's real client to register; their map streams are
//! read raw (signed `GET /map`, up to the first line, the full map), as
//! `coordinator_bench` does, so the load generator measures the server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpSocket;
use warren::control::auth::{AuthHeaders, SessionKey};
use warren::control::ControlClient;
use warren::keys::{NodeKey, PrivateKey};

struct Args {
    url: String,
    token: String,
    agents: usize,
    attackers: usize,
    sources: u8,
    trickle: Duration,
    deadline: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        url: String::new(),
        token: String::new(),
        agents: 100,
        attackers: 2000,
        sources: 8,
        trickle: Duration::from_secs(5),
        deadline: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.url = v,
            "--token" => a.token = v,
            "--agents" => a.agents = v.parse()?,
            "--attackers" => a.attackers = v.parse()?,
            "--attack-sources" => a.sources = v.parse()?,
            "--trickle" => a.trickle = Duration::from_secs(v.parse()?),
            "--deadline" => a.deadline = Duration::from_secs(v.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.url.is_empty() || a.token.is_empty() || a.sources == 0 {
        bail!(
            "usage: load_bench --url http://127.0.0.1:PORT --token TOKEN [--agents N] \
             [--attackers N] [--attack-sources N] [--trickle SECS] [--deadline SECS]"
        );
    }
    Ok(a)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One attacker connection, opened again whenever the server ends it,
/// until `stop`. `held` counts the ones open right now.
async fn attacker(
    server: SocketAddr,
    source: IpAddr,
    slow: bool,
    trickle: Duration,
    held: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    const HEAD: &[u8] = b"GET /map HTTP/1.1\r\nHost: coordinator\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    while !stop.load(Ordering::Relaxed) {
        let conn = async {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(source, 0))?;
            sock.connect(server).await
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), conn).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        held.fetch_add(1, Ordering::Relaxed);
        let mut sent = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if slow {
                let byte = &HEAD[sent % HEAD.len()..][..1];
                if conn.write_all(byte).await.is_err() {
                    break;
                }
                sent += 1;
            }
            // A closed connection shows as a readable EOF.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(trickle, conn.peek(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => break, // the server answered (an error): closed soon
                Err(_) => {}        // nothing yet: still held
            }
        }
        held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One simulated agent: registers, then opens its map stream and waits for
/// the full map. Returns how long that took.
async fn agent(
    url: String,
    token: String,
    coord: NodeKey,
    i: usize,
    dir: std::path::PathBuf,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let work = async {
        let key = PrivateKey::generate();
        let http = ControlClient::http_client(None)?;
        let c = ControlClient::with_http_client(&url, key.clone(), dir, http.clone())?;
        c.register(
            Some(&token),
            &format!("load-{i}"),
            PrivateKey::generate().public(),
        )
        .await?;
        let session = SessionKey::for_node(&key, &coord)?;
        let h = AuthHeaders::sign(&session, key.public(), "GET", "/map", unix_now(), b"");
        let mut req = http.get(format!("{url}/map"));
        for (n, v) in h.to_pairs() {
            req = req.header(n, v);
        }
        let resp = req.send().await?.error_for_status()?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            if chunk?.contains(&b'\n') {
                return Ok(start.elapsed());
            }
        }
        bail!("the map stream ended before the full map")
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => bail!("no full map within {deadline:?}"),
    }
}

/// Runs the agents at once; prints how many made it and how long they took.
async fn agents(a: &Args, coord: NodeKey, label: &str, first: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let runs = (0..a.agents).map(|i| {
        tokio::spawn(agent(
            a.url.clone(),
            a.token.clone(),
            coord,
            first + i,
            dir.path().to_path_buf(),
            a.deadline,
        ))
    });
    let mut took = Vec::new();
    let mut errors = Vec::new();
    for r in futures_util::future::join_all(runs).await {
        match r {
            Ok(Ok(d)) => took.push(d),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    took.sort();
    let pct = |p: usize| {
        took.get((took.len() * p / 100).min(took.len().saturating_sub(1)))
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{label}: {}/{} agents registered and got their map in {:.1?}; per agent p50 {}, p99 {}, max {}",
        took.len(),
        a.agents,
        t.elapsed(),
        pct(50),
        pct(99),
        pct(100)
    );
    if let Some(e) = errors.first() {
        println!("{label}: {} failed, the first with: {e}", errors.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args()?;
    let server: SocketAddr = a
        .url
        .strip_prefix("http://")
        .context("the load bench speaks plain HTTP to a loopback coordinator")?
        .trim_end_matches('/')
        .parse()
        .context("the URL must be http://IP:PORT")?;
    let scratch = tempfile::tempdir()?;
    let coord = ControlClient::new(&a.url, PrivateKey::generate(), scratch.path())?
        .coordinator_key()
        .await?;

    agents(&a, coord, "no attack (reference)", 0).await?;

    let (held, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for i in 0..a.attackers {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % a.sources as usize) as u8));
        tasks.push(tokio::spawn(attacker(
            server,
            source,
            i % 2 == 1,
            a.trickle,
            held.clone(),
            stop.clone(),
        )));
    }
    // Let the attacker reach its count (or what the server lets it hold).
    let t = Instant::now();
    while held.load(Ordering::Relaxed) < a.attackers && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "attack: {} of {} connections held ({} idle, {} slow, from {} addresses)",
        held.load(Ordering::Relaxed),
        a.attackers,
        a.attackers - a.attackers / 2,
        a.attackers / 2,
        a.sources
    );
    agents(&a, coord, "under attack", a.agents).await?;
    println!(
        "attack: {} connections held at the end",
        held.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
