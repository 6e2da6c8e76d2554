//! Load generator for `tests/bench/coordinator.sh`: registers N simulated
//! nodes against a running coordinator, opens a map stream for each, makes
//! one change, and reports how fast registrations go, how long the change
//! takes to reach every stream, and the coordinator's memory (by pid).
//!
//! Registration goes through the agent's real client. The streams are read
//! raw (signed `GET /map`, lines scanned for the changed key) instead of
//! through `ControlClient::map_stream`, which would save N copies of an
//! N-peer map to disk and measure the load generator instead of the
//! coordinator. Each stream's socket has a small receive buffer
//! ([`STREAM_RCVBUF`]): the load generator shares the coordinator's
//! kernel, and 10,000 receive queues autotuned to megabytes put the
//! machine's TCP memory under pressure (dropped segments, retransmission
//! timeouts, minutes-long idle gaps), which agents on their own hosts
//! would not.
//!
//! With several `--url`s (replicas of one PostgreSQL-backed network, each
//! with its `--pid`), node i registers and streams at replica i mod R, the
//! change is made at the first, and memory, CPU and the change's latency
//! are reported per replica.
//!
//! Each `--policy-cmd CMD` (a shell command that stores a policy, which
//! `tests/bench/coordinator.sh` makes with `POLICY_RULES` rules) is a
//! further change, made once every stream saw the one before: a policy
//! every stream must hear about as a `filter_changed` line. The first is
//! set where there was none (every stream's peer set is rebuilt), the
//! second edits it (the same peers, new filters); their times and bytes
//! are reported beside the endpoint change's, the reference measured in
//! the same run.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use warren::control::auth::{AuthHeaders, SessionKey};
use warren::control::{zmap, ControlClient, Endpoint, EndpointKind, EndpointsReport, MAP_PATH};
use warren::keys::{NodeKey, PrivateKey};

struct Args {
    /// One per replica; the first is where changes are made.
    urls: Vec<String>,
    token: String,
    nodes: usize,
    concurrency: usize,
    /// One per replica, in the order of `urls`.
    pids: Vec<u32>,
    /// Each one a change timed in turn, after the endpoint change.
    policy_cmds: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        urls: Vec::new(),
        token: String::new(),
        nodes: 2000,
        concurrency: 32,
        pids: Vec::new(),
        policy_cmds: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.urls.push(v),
            "--token" => a.token = v,
            "--nodes" => a.nodes = v.parse()?,
            "--concurrency" => a.concurrency = v.parse()?,
            "--pid" => a.pids.push(v.parse()?),
            "--policy-cmd" => a.policy_cmds.push(v),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.urls.is_empty() || a.token.is_empty() {
        bail!("usage: coordinator_bench --url URL [--url URL2 …] --token TOKEN [--nodes N] [--concurrency C] [--pid PID …]");
    }
    Ok(a)
}

impl Args {
    /// The replica node `i` uses.
    fn replica(&self, i: usize) -> usize {
        i % self.urls.len()
    }

    /// Memory and CPU of every replica, one line each after `what`.
    fn usage(&self, what: &str) {
        if self.pids.is_empty() {
            println!("{what}: n/a");
        }
        for (r, pid) in self.pids.iter().enumerate() {
            let which = if self.pids.len() > 1 {
                format!(" (replica {})", r + 1)
            } else {
                String::new()
            };
            println!("{what}{which}: {}", rss(Some(*pid)));
        }
    }
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

/// The host's TCP memory pressure so far (ms) and retransmission
/// timeouts, from `/proc/net/netstat`: the load generator shares the
/// coordinator's kernel, and a storm that pushes TCP memory over
/// `tcp_mem` stalls on timeouts instead of on the coordinator.
fn tcp_trouble() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let get = |want: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == want)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        return (get("TCPMemoryPressuresChrono"), get("TCPTimeouts"));
    }
    (0, 0)
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
    /// Lines per kind, in the order of [`KINDS`] (the last: any other).
    kinds: [AtomicUsize; KINDS.len() + 1],
    /// Bytes as they came over the wire (zstd frames when compressed).
    bytes: AtomicUsize,
    /// Bytes of lines, after decompression.
    decoded: AtomicUsize,
    /// Per needle: the streams that saw it.
    seen: Vec<AtomicUsize>,
    /// Streams that ended in an error (an agent would retry; the bench
    /// reports them), and the first error.
    failed: AtomicUsize,
    first_error: std::sync::OnceLock<String>,
}

/// One stream's current line, scanned as it arrives without keeping it:
/// 10,000 streams each holding a 3.5 MB full map until its newline would
/// make the load generator's memory the subject of the measurement. Only
/// the line's first bytes (is it a full map?) and the last few (a needle
/// split between two chunks) are kept.
#[derive(Default)]
struct Scan {
    head: Vec<u8>,
    tail: Vec<u8>,
    hit: bool,
}

const TYPE_PREFIX: &[u8] = br#"{"type":""#;
/// The line kinds counted apart, to say what a storm's lines were.
const KINDS: [&str; 9] = [
    "full",
    "presence",
    "peer_online",
    "peer_changed",
    "peer_added",
    "peer_removed",
    "self_changed",
    "filter_changed",
    "keepalive",
];
/// Enough of a line's start to hold its type.
const HEAD: usize = TYPE_PREFIX.len() + 16;

/// The index in [`KINDS`] of the line that starts with `head`.
fn kind(head: &[u8]) -> usize {
    let name = head
        .strip_prefix(TYPE_PREFIX)
        .and_then(|rest| rest.split(|&b| b == b'"').next());
    name.and_then(|n| KINDS.iter().position(|k| k.as_bytes() == n))
        .unwrap_or(KINDS.len())
}

impl Scan {
    fn feed(&mut self, part: &[u8], needle: &[u8]) {
        if self.head.len() < HEAD {
            let take = (HEAD - self.head.len()).min(part.len());
            self.head.extend_from_slice(&part[..take]);
        }
        if needle.is_empty() || self.hit {
            return;
        }
        self.tail.extend_from_slice(part);
        // memmem, not `windows().any()`: over a storm's tens of millions of
        // lines, a memcmp per byte was most of the load generator's CPU.
        self.hit = memchr::memmem::find(&self.tail, needle).is_some();
        let keep = needle.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    /// The line ended: whether it was a full map, and held the needle.
    fn end_line(&mut self) -> (usize, bool) {
        let r = (kind(&self.head), self.hit);
        self.head.clear();
        self.tail.clear();
        self.hit = false;
        r
    }
}

thread_local! {
    /// One zstd context per thread, not per stream: 10,000 streams each
    /// with their own would hold a gigabyte.
    static DECODER: std::cell::RefCell<Option<zmap::Decoder>> =
        const { std::cell::RefCell::new(None) };
}

/// A stream's body as lines: as it came, or through its zstd frames.
enum Body {
    Plain,
    Zstd(zmap::Unframer),
}

impl Body {
    /// The body for a `Content-Encoding` of `encoding`.
    fn named(encoding: Option<&str>) -> Body {
        match encoding {
            Some("zstd") => Body::Zstd(zmap::Unframer::new()),
            _ => Body::Plain,
        }
    }

    /// What `chunk` adds to the lines (empty while a frame is partial).
    fn decode(&mut self, chunk: bytes::Bytes) -> anyhow::Result<bytes::Bytes> {
        let Body::Zstd(u) = self else {
            return Ok(chunk);
        };
        u.push(&chunk);
        let mut out = Vec::new();
        DECODER.with(|d| -> anyhow::Result<()> {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zmap::Decoder::new()?);
            }
            if let Some(dec) = d.as_mut() {
                while u.next_into(dec, &mut out)? {}
            }
            Ok(())
        })?;
        Ok(out.into())
    }
}

/// The length of the first line (the full map) `key`'s stream gets:
/// decoded, and as it came over the wire.
async fn full_map_len(
    url: &str,
    key: &PrivateKey,
    coord: NodeKey,
) -> anyhow::Result<(usize, usize)> {
    let (mut lines, body) = open_stream(url, IpAddr::V4(Ipv4Addr::LOCALHOST), key, coord).await?;
    let mut body = body.into_data_stream();
    let (mut len, mut wire) = (0, 0);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        wire += chunk.len();
        let chunk = lines.decode(chunk)?;
        if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            return Ok((len + end + 1, wire));
        }
        len += chunk.len();
    }
    bail!("the stream ended before its full map")
}

/// The receive buffer asked for on each stream's socket (the kernel
/// doubles it): enough for a loopback stream to run at memory speed.
const STREAM_RCVBUF: u32 = 64 << 10;

/// Sends `key`'s signed `GET MAP_PATH` to `url` from `source` over a
/// socket of its own with a [`STREAM_RCVBUF`] receive buffer (reqwest sets
/// no buffer sizes), and returns the body with what decodes it.
async fn open_stream(
    url: &str,
    source: IpAddr,
    key: &PrivateKey,
    coord: NodeKey,
) -> anyhow::Result<(Body, hyper::body::Incoming)> {
    let session = SessionKey::for_node(key, &coord)?;
    let headers = AuthHeaders::sign(&session, key.public(), "GET", MAP_PATH, now(), b"");
    let authority = url
        .strip_prefix("http://")
        .context("the bench streams over plain HTTP")?
        .trim_end_matches('/');
    let addr: std::net::SocketAddr = authority.parse().context("url host:port")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(STREAM_RCVBUF)?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(MAP_PATH).header(hyper::header::HOST, authority);
    for (n, v) in headers.to_pairs() {
        req = req.header(n, v);
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?)
        .await?;
    if !resp.status().is_success() {
        bail!("map stream: HTTP {}", resp.status());
    }
    let body = Body::named(
        resp.headers()
            .get(hyper::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    Ok((body, resp.into_body()))
}

/// Opens one map stream; counts its lines, then waits for each of
/// `needles` in turn (in a delta, or in a later full map if the
/// coordinator sends one instead), returning when each was seen.
async fn stream(
    source: IpAddr,
    url: String,
    key: PrivateKey,
    coord: NodeKey,
    needles: Vec<String>,
    counters: Arc<Counters>,
) -> anyhow::Result<Vec<Instant>> {
    let mut seen = Vec::with_capacity(needles.len());
    let (mut lines, body) = open_stream(&url, source, &key, coord).await?;
    let mut body = body.into_data_stream();
    let mut got_full = false;
    let mut scan = Scan::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        counters.bytes.fetch_add(chunk.len(), Ordering::Relaxed);
        let chunk = lines.decode(chunk)?;
        counters.decoded.fetch_add(chunk.len(), Ordering::Relaxed);
        // The first line (the full map) is not searched: the change comes
        // after it.
        let needle = match needles.get(seen.len()) {
            Some(n) if got_full => n.as_bytes(),
            _ => &b""[..],
        };
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest);
            let (part, done) = match end {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = end.map_or(&[][..], |i| &rest[i + 1..]);
            scan.feed(part, needle);
            if !done {
                break;
            }
            let (kind, hit) = scan.end_line();
            counters.lines.fetch_add(1, Ordering::Relaxed);
            counters.kinds[kind].fetch_add(1, Ordering::Relaxed);
            if kind == 0 {
                counters.fulls.fetch_add(1, Ordering::Relaxed);
            }
            if !got_full {
                got_full = true;
                counters.connected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // One needle per line: two changes are two lines.
            if seen.len() < needles.len() && hit {
                counters.seen[seen.len()].fetch_add(1, Ordering::Relaxed);
                seen.push(Instant::now());
            }
            if seen.len() == needles.len() {
                return Ok(seen);
            }
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
            let (url, token, dir) = (
                a.urls[a.replica(i)].clone(),
                a.token.clone(),
                state.path().to_path_buf(),
            );
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
    a.usage("coordinator after registration");
    // Both share the machine: when their CPU adds up to its cores over
    // the phase, the rate measures the machine, not the coordinator.
    println!(
        "load generator after registration: CPU {} (wall {:.1}s)",
        cpu(std::process::id()),
        reg_time.as_secs_f64()
    );
    if std::env::var_os("REGISTER_ONLY").is_some() {
        return Ok(());
    }

    // 2. A map stream per node.
    let coord = ControlClient::new(&a.urls[0], keys[0].clone(), state.path())?
        .coordinator_key()
        .await?;
    // The coordinator admits at most 1,024 map streams per source address
    // (issue 15), so the streams come from several loopback addresses,
    // 500 a piece, as a network's nodes come from many.
    let sources = (a.nodes / 500 + 1).min(250);
    let marker = format!(
        "203.0.113.{}:{}",
        rand::random::<u8>(),
        10000 + rand::random::<u16>() % 50000
    );
    let needles: Vec<String> = std::iter::once(marker.clone())
        .chain(a.policy_cmds.iter().map(|_| "filter_changed".to_owned()))
        .collect();
    let counters = Arc::new(Counters {
        seen: needles.iter().map(|_| AtomicUsize::new(0)).collect(),
        ..Default::default()
    });
    let t = Instant::now();
    let tcp_before = tcp_trouble();
    let mut tasks = Vec::new();
    for (i, k) in keys.iter().enumerate().skip(1) {
        let fut = stream(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)),
            a.urls[a.replica(i)].clone(),
            k.clone(),
            coord,
            needles.clone(),
            counters.clone(),
        );
        let c = counters.clone();
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            if let Err(e) = &r {
                c.failed.fetch_add(1, Ordering::Relaxed);
                let _ = c.first_error.set(format!("{e:#}"));
            }
            r
        }));
    }
    let want = a.nodes - 1;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counters.connected.load(Ordering::Relaxed) < want {
        let failed = counters.failed.load(Ordering::Relaxed);
        if Instant::now() > deadline || counters.connected.load(Ordering::Relaxed) + failed >= want
        {
            bail!(
                "only {} of {want} streams got their full map; {failed} failed (first: {})",
                counters.connected.load(Ordering::Relaxed),
                counters.first_error.get().map_or("-", String::as_str)
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
    let tcp_after = tcp_trouble();
    println!(
        "host TCP during the storm: {} ms under memory pressure, {} retransmission timeouts",
        tcp_after.0.saturating_sub(tcp_before.0),
        tcp_after.1.saturating_sub(tcp_before.1)
    );
    let fulls = counters.fulls.load(Ordering::Relaxed);
    let storm_bytes = counters.bytes.load(Ordering::Relaxed);
    let storm_decoded = counters.decoded.load(Ordering::Relaxed);
    println!(
        "reconnect storm: {last} lines ({} deltas, {fulls} full maps of which {want} first), \
         {:.1} MB on the wire, {:.1} MB of lines",
        last - fulls,
        storm_bytes as f64 / 1e6,
        storm_decoded as f64 / 1e6
    );
    let by_kind: Vec<String> = KINDS
        .iter()
        .chain(std::iter::once(&"other"))
        .zip(&counters.kinds)
        .map(|(k, n)| (k, n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("reconnect storm lines by kind: {}", by_kind.join(", "));
    a.usage(&format!("coordinator with {want} open streams"));
    // The load generator shares the machine: if it is the busier of the
    // two, the storm's wall-clock time measures it, not the coordinator.
    println!("load generator so far: CPU {}", cpu(std::process::id()));

    // 3. One change, seen by all: node 0 reports an endpoint no line
    // contained before (a random documentation address).
    let c0 = ControlClient::new(&a.urls[0], keys[0].clone(), state.path())?;
    let eps = [Endpoint {
        addr: marker.parse()?,
        kind: EndpointKind::Srflx,
    }];
    // Per change: when it was made, and the counters just before it.
    let snapshot = || {
        (
            counters.lines.load(Ordering::Relaxed),
            counters.fulls.load(Ordering::Relaxed),
            counters.bytes.load(Ordering::Relaxed),
        )
    };
    let mut phases = vec![(Instant::now(), snapshot())];
    c0.report_endpoints(&EndpointsReport::endpoints(&eps))
        .await?;
    // 4. Each --policy-cmd, once every stream saw the change before it.
    for (i, cmd) in a.policy_cmds.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while counters.seen[i].load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = (Instant::now(), snapshot());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()?;
        if !status.success() {
            bail!("{cmd}: {status}");
        }
        println!("policy command {} took {:.1?}", i + 1, start.0.elapsed());
        phases.push(start);
    }
    let mut lat: Vec<Vec<Duration>> = phases.iter().map(|_| Vec::new()).collect();
    // The first change's latency at each replica's streams.
    let mut per_replica: Vec<Vec<Duration>> = a.urls.iter().map(|_| Vec::new()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(at))) => {
                if let (Some(seen), Some((t, _))) = (at.first(), phases.first()) {
                    per_replica[a.replica(i + 1)].push(seen.saturating_duration_since(*t));
                }
                for ((l, (t, _)), seen) in lat.iter_mut().zip(&phases).zip(at) {
                    l.push(seen.saturating_duration_since(*t));
                }
            }
            Ok(Ok(Err(e))) => eprintln!("stream failed: {e:#}"),
            Ok(Err(e)) => eprintln!("stream task: {e}"),
            Err(_) => eprintln!("a stream did not see every change within 120 s"),
        }
    }
    if lat[0].is_empty() {
        bail!("no stream saw the change");
    }
    let end = snapshot();
    for (i, l) in lat.iter_mut().enumerate() {
        let what = match i {
            0 => "one change (endpoint)".to_owned(),
            1 => "policy set (none before)".to_owned(),
            n => format!("policy change {}", n - 1),
        };
        l.sort();
        if l.is_empty() {
            println!("{what} reached no stream");
        } else {
            println!(
                "{what} reached {}/{} streams: p50 {:.1?}, p99 {:.1?}, all {:.1?}",
                l.len(),
                want,
                l[l.len() / 2],
                l[l.len() * 99 / 100],
                l[l.len() - 1]
            );
        }
        let from = phases[i].1;
        let to = phases.get(i + 1).map_or(end, |p| p.1);
        println!(
            "{what}: {} lines, {} of them full maps, {:.2} MB",
            to.0 - from.0,
            to.1 - from.1,
            to.2.saturating_sub(from.2) as f64 / 1e6
        );
    }
    if a.urls.len() > 1 {
        for (r, l) in per_replica.iter_mut().enumerate() {
            l.sort();
            if let (Some(p50), Some(p99)) = (l.get(l.len() / 2), l.get(l.len() * 99 / 100)) {
                println!(
                    "one change (made at replica 1) at replica {}'s {} streams: p50 {p50:.1?}, p99 {p99:.1?}",
                    r + 1,
                    l.len()
                );
            }
        }
    }
    // The storm's bytes beside its floor: one full map of the whole
    // network per stream, measured now on node 0's own first map.
    let (full, full_wire) = full_map_len(&a.urls[0], &keys[0], coord).await?;
    println!(
        "reconnect storm bytes: {:.1} MB on the wire = {:.2} x one full map per stream \
         ({want} x {:.2} MB; {:.2} MB on the wire); {:.1} MB of lines = {:.2} x",
        storm_bytes as f64 / 1e6,
        storm_bytes as f64 / (want as f64 * full as f64),
        full as f64 / 1e6,
        full_wire as f64 / 1e6,
        storm_decoded as f64 / 1e6,
        storm_decoded as f64 / (want as f64 * full as f64),
    );
    a.usage("coordinator at the end");
    Ok(())
}
