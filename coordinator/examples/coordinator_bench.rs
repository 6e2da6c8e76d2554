//! Load generator for `tests/bench/coordinator.sh`: registers N simulated
//! nodes against a running coordinator, opens a map stream for each, makes
//! one change, and reports how fast registrations go, how long the change
//! takes to reach every stream, and the coordinator's memory (by pid).
//!
//! Registration goes through the agent's real client. The streams are read
//! raw (signed `GET /map`, lines scanned for the changed key) instead of
//! through `ControlClient::map_stream`, which would save N copies of an
//! N-peer map to disk and measure the load generator instead of the
//! coordinator.
//!
//! With `--policy-cmd CMD` (a shell command that stores a policy, which
//! `tests/bench/coordinator.sh` makes with `POLICY_RULES` rules) a second
//! change follows: the policy, which every stream must hear about as a
//! `filter_changed` line; its time and bytes are reported beside the
//! endpoint change's, the reference measured in the same run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{StreamExt as _, TryStreamExt as _};
use warren::control::auth::{AuthHeaders, SessionKey};
use warren::control::{ControlClient, Endpoint, EndpointKind, EndpointsReport};
use warren::keys::{NodeKey, PrivateKey};

struct Args {
    url: String,
    token: String,
    nodes: usize,
    concurrency: usize,
    pid: Option<u32>,
    policy_cmd: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        url: String::new(),
        token: String::new(),
        nodes: 2000,
        concurrency: 32,
        pid: None,
        policy_cmd: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.url = v,
            "--token" => a.token = v,
            "--nodes" => a.nodes = v.parse()?,
            "--concurrency" => a.concurrency = v.parse()?,
            "--pid" => a.pid = Some(v.parse()?),
            "--policy-cmd" => a.policy_cmd = Some(v),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.url.is_empty() || a.token.is_empty() {
        bail!("usage: coordinator_bench --url URL --token TOKEN [--nodes N] [--concurrency C] [--pid PID]");
    }
    Ok(a)
}

fn rss(pid: Option<u32>) -> String {
    let Some(pid) = pid else { return "n/a".into() };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.trim_start_matches(name).trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "RSS {} (peak {}), CPU {}",
        field("VmRSS:"),
        field("VmHWM:"),
        cpu(pid)
    )
}

/// User + system CPU time of `pid` so far, from `/proc/PID/stat` (in
/// clock ticks of 10 ms, which is what Linux reports on every usual build).
fn cpu(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    match f[..] {
        [user, system] => format!("{:.1}s", (user + system) as f64 / 100.0),
        _ => "?".into(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the streams have received, summed over all of them.
#[derive(Default)]
struct Counters {
    /// Streams that got their first full map.
    connected: AtomicUsize,
    lines: AtomicUsize,
    /// Full maps, the first of each stream included.
    fulls: AtomicUsize,
    bytes: AtomicUsize,
    /// Streams that saw the first needle.
    first_seen: AtomicUsize,
}

/// Opens one map stream; counts its lines, then waits for each of
/// `needles` in turn (in a delta, or in a later full map if the
/// coordinator sends one instead), returning when each was seen.
async fn stream(
    http: reqwest::Client,
    url: String,
    key: PrivateKey,
    coord: NodeKey,
    needles: Vec<String>,
    counters: Arc<Counters>,
) -> anyhow::Result<Vec<Instant>> {
    let mut seen = Vec::with_capacity(needles.len());
    let session = SessionKey::for_node(&key, &coord)?;
    let h = AuthHeaders::sign(&session, key.public(), "GET", "/map", now(), b"");
    let mut req = http.get(format!("{url}/map"));
    for (n, v) in h.to_pairs() {
        req = req.header(n, v);
    }
    let resp = req.send().await?.error_for_status()?;
    let mut body = resp.bytes_stream().map_err(std::io::Error::other);
    let mut buf: Vec<u8> = Vec::new();
    let mut got_full = false;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        counters.bytes.fetch_add(chunk.len(), Ordering::Relaxed);
        // Only the new bytes are searched for line ends, and the buffer is
        // shifted once per chunk: a chunk of many lines must cost the load
        // generator linear time, or it measures itself.
        let searched = buf.len();
        buf.extend_from_slice(&chunk);
        let mut start = 0;
        let mut from = searched;
        while let Some(off) = buf[from..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..from + off];
            start = from + off + 1;
            from = start;
            counters.lines.fetch_add(1, Ordering::Relaxed);
            if line.starts_with(br#"{"type":"full""#) {
                counters.fulls.fetch_add(1, Ordering::Relaxed);
            }
            if !got_full {
                got_full = true;
                counters.connected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            while seen.len() < needles.len()
                && String::from_utf8_lossy(line).contains(&needles[seen.len()])
            {
                seen.push(Instant::now());
                if seen.len() == 1 {
                    counters.first_seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            if seen.len() == needles.len() {
                return Ok(seen);
            }
        }
        buf.drain(..start);
        // A full map leaves a buffer of its size behind; thousands of them
        // would make the load generator's memory, not the coordinator, the
        // subject of the measurement.
        if buf.capacity() > 1 << 20 && buf.len() < 1 << 16 {
            buf.shrink_to(1 << 16);
        }
    }
    bail!("stream ended")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args()?;
    let state = tempfile::tempdir()?;

    // 1. Registrations.
    let keys: Vec<PrivateKey> = (0..a.nodes).map(|_| PrivateKey::generate()).collect();
    let shared = ControlClient::http_client(None)?;
    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(keys.iter().enumerate())
        .map(|(i, k)| {
            let (url, token, dir) = (a.url.clone(), a.token.clone(), state.path().to_path_buf());
            let (k, http) = (k.clone(), shared.clone());
            async move {
                let c = ControlClient::with_http_client(&url, k, dir, http)?;
                c.register(
                    Some(&token),
                    &format!("bench-{i}"),
                    PrivateKey::generate().public(),
                )
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(a.concurrency)
        .collect()
        .await;
    let reg_time = t.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("first registration error: {e:#}");
    }
    println!(
        "registered {} nodes in {:.2?} ({:.0}/s, concurrency {}, {failed} failed)",
        a.nodes,
        reg_time,
        a.nodes as f64 / reg_time.as_secs_f64(),
        a.concurrency
    );
    println!("coordinator after registration: {}", rss(a.pid));

    // 2. A map stream per node.
    let coord = ControlClient::new(&a.url, keys[0].clone(), state.path())?
        .coordinator_key()
        .await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let marker = format!(
        "203.0.113.{}:{}",
        rand::random::<u8>(),
        10000 + rand::random::<u16>() % 50000
    );
    let counters = Arc::new(Counters::default());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in keys.iter().skip(1) {
        let fut = stream(
            http.clone(),
            a.url.clone(),
            k.clone(),
            coord,
            match a.policy_cmd {
                Some(_) => vec![marker.clone(), "filter_changed".to_owned()],
                None => vec![marker.clone()],
            },
            counters.clone(),
        );
        tasks.push(tokio::spawn(fut));
    }
    let want = a.nodes - 1;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counters.connected.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            bail!(
                "only {} of {want} streams got their full map",
                counters.connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{want} map streams open with full maps in {:.2?}",
        t.elapsed()
    );
    // Every stream coming online is itself a change every other stream is
    // told about: N² deltas if each is written on its own. Measure how long that storm takes to drain, and
    // measure the single change only once the streams are quiet.
    let opened = Instant::now();
    let mut last = counters.lines.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = counters.lines.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        if opened.elapsed() > Duration::from_secs(900) {
            bail!("streams never went quiet");
        }
    }
    let quiet = opened.elapsed() - Duration::from_secs(2);
    println!(
        "reconnect storm: quiet {:.1?} after the first stream opened, {quiet:.1?} after the last",
        t.elapsed() - Duration::from_secs(2)
    );
    let fulls = counters.fulls.load(Ordering::Relaxed);
    println!(
        "reconnect storm: {last} lines ({} deltas, {fulls} full maps of which {want} first), {:.1} MB",
        last - fulls,
        counters.bytes.load(Ordering::Relaxed) as f64 / 1e6
    );
    println!("coordinator with {want} open streams: {}", rss(a.pid));
    // The load generator shares the machine: if it is the busier of the
    // two, the storm's wall-clock time measures it, not the coordinator.
    println!("load generator so far: CPU {}", cpu(std::process::id()));

    // 3. One change, seen by all: node 0 reports an endpoint no line
    // contained before (a random documentation address).
    let c0 = ControlClient::new(&a.url, keys[0].clone(), state.path())?;
    let eps = [Endpoint {
        addr: marker.parse()?,
        kind: EndpointKind::Srflx,
    }];
    let before = (
        counters.lines.load(Ordering::Relaxed),
        counters.fulls.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    c0.report_endpoints(&EndpointsReport::endpoints(&eps))
        .await?;
    // 4. With --policy-cmd: once every stream saw the change, the policy.
    let mut t1 = None;
    let mut after_first = before;
    let mut bytes = (counters.bytes.load(Ordering::Relaxed), 0);
    if let Some(cmd) = &a.policy_cmd {
        let deadline = Instant::now() + Duration::from_secs(60);
        while counters.first_seen.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        after_first = (
            counters.lines.load(Ordering::Relaxed),
            counters.fulls.load(Ordering::Relaxed),
        );
        bytes.1 = counters.bytes.load(Ordering::Relaxed);
        let start = Instant::now();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()?;
        if !status.success() {
            bail!("{cmd}: {status}");
        }
        println!("policy command took {:.1?}", start.elapsed());
        t1 = Some(start);
    }
    let mut lat = Vec::new();
    let mut lat_policy = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for task in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(at))) => {
                lat.push(at[0].saturating_duration_since(t0));
                if let (Some(t1), Some(p)) = (t1, at.get(1)) {
                    lat_policy.push(p.saturating_duration_since(t1));
                }
            }
            Ok(Ok(Err(e))) => eprintln!("stream failed: {e:#}"),
            Ok(Err(e)) => eprintln!("stream task: {e}"),
            Err(_) => eprintln!("a stream did not see every change within 120 s"),
        }
    }
    if lat.is_empty() {
        bail!("no stream saw the change");
    }
    let report = |what: &str, lat: &mut Vec<Duration>| {
        lat.sort();
        if lat.is_empty() {
            println!("{what} reached no stream");
            return;
        }
        println!(
            "{what} reached {}/{} streams: p50 {:.1?}, p99 {:.1?}, all {:.1?}",
            lat.len(),
            want,
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            lat[lat.len() - 1]
        );
    };
    report("one change (endpoint)", &mut lat);
    let now = (
        counters.lines.load(Ordering::Relaxed),
        counters.fulls.load(Ordering::Relaxed),
        counters.bytes.load(Ordering::Relaxed),
    );
    let first_end = if t1.is_some() {
        after_first
    } else {
        (now.0, now.1)
    };
    println!(
        "one change (endpoint): {} lines, {} of them full maps, {:.2} MB",
        first_end.0 - before.0,
        first_end.1 - before.1,
        (if t1.is_some() { bytes.1 } else { now.2 }).saturating_sub(bytes.0) as f64 / 1e6
    );
    if t1.is_some() {
        report("policy change", &mut lat_policy);
        println!(
            "policy change: {} lines, {} of them full maps, {:.2} MB",
            now.0 - after_first.0,
            now.1 - after_first.1,
            now.2.saturating_sub(bytes.1) as f64 / 1e6
        );
    }
    println!("coordinator at the end: {}", rss(a.pid));
    Ok(())
}
