//! Relay figures on loopback: throughput for one pair and for 50 concurrent
//! pairs, the relay's CPU time and RSS, the fairness of its share among 50
//! pairs sending a mix of packet sizes (Jain's index over each pair's
//! delivered bytes; 1.0 is an equal share), and the latency the relay adds
//! over a direct UDP and TCP echo.
//!
//! The relay runs in a child process (this binary re-executed with
//! `--serve`), so its CPU time and memory can be read from `/proc` apart from
//! the load generator's. Run it through `tests/bench/relay.sh`; it is a
//! measurement, not a test, and asserts nothing.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use warren::keys::{NodeKey, PrivateKey};
use warren::relay_client::{
    RelayClient, RelayClientConfig, RelayEvent, RelayReceiver, RelaySender,
};
use warren_coordinator::listen::{serve, tls_config, Security};
use warren_coordinator::relay::{RelayLimits, RelayServer, StaticAdmission};

const PKT: usize = 1400;
/// The mixed phase's packet sizes, in the proportions of the simple IMIX
/// (7 : 4 : 1 of 64, 576 and 1,400 bytes); each pair starts at another
/// place in the cycle.
const IMIX: [usize; 12] = [64, 576, 64, 64, 576, 64, 1400, 64, 576, 64, 576, 64];
const WINDOW: Duration = Duration::from_secs(3);

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let tls = args.iter().any(|a| a == "--tls");
    let rt = tokio::runtime::Runtime::new()?;
    if args.iter().any(|a| a == "--serve") {
        return rt.block_on(serve_child(tls));
    }
    rt.block_on(bench(tls))
}

/// Child: reads admitted keys from stdin (one per line, then an empty line),
/// serves the relay on an ephemeral port, prints the port.
async fn serve_child(tls: bool) -> Result<()> {
    let mut keys = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.is_empty() {
            break;
        }
        keys.push(line.parse::<NodeKey>()?);
    }
    let admission = StaticAdmission::new(keys);
    let server = RelayServer::new(PrivateKey::generate(), RelayLimits::default(), admission);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let security = if tls {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        std::fs::write(cert_path(), ck.cert.der())?;
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        Security::Tls(tls_config(vec![ck.cert.der().clone()], key.into())?)
    } else {
        Security::Plain
    };
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    serve(listener, server.router(), security).await?;
    Ok(())
}

fn cert_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("warren-relay-bench-{}.der", std::process::id()))
}

/// utime+stime in seconds and VmRSS/VmHWM in KiB of `pid`.
fn proc_usage(pid: u32) -> Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks / USER_HZ, kib("VmRSS:"), kib("VmHWM:")))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so each phase
/// reports its own peak (`clear_refs` value 5, Linux 4.0+). Best effort: a
/// kernel without it leaves the peak cumulative.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Linux reports CPU time in USER_HZ ticks, 100 on every mainstream
/// architecture (the kernel ABI fixes it; sysconf would only repeat it).
const USER_HZ: f64 = 100.0;

struct Relay {
    pid: u32,
    config: RelayClientConfig,
}

async fn connect(relay: &Relay, key: &PrivateKey) -> Result<(RelaySender, RelayReceiver)> {
    let (tx, mut rx) = RelayClient::connect(relay.config.clone(), key);
    match tokio::time::timeout(Duration::from_secs(10), rx.recv_event()).await {
        Ok(Some(RelayEvent::Connected { .. })) => Ok((tx, rx)),
        other => bail!("client did not connect: {other:?}"),
    }
}

/// Senders and their receivers.
type Pairs = [(PrivateKey, PrivateKey)];

/// What one throughput phase measured.
struct Phase {
    pps: f64,
    mbit: f64,
    /// The relay's CPU seconds over the window.
    cpu: f64,
    /// Bytes each pair delivered over the window.
    per_pair: Vec<u64>,
}

/// Jain's fairness index of `x`: (Σx)² / (n Σx²), 1.0 when all are equal,
/// 1/n when one takes everything.
fn jain(x: &[u64]) -> f64 {
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let squares: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (x.len() as f64 * squares)
}

/// Streams from each sender to its receiver for `WINDOW`, packets of
/// `sizes` in turn (pair i starting at `sizes[i % len]`).
async fn throughput(
    relay: &Relay,
    pairs: &[(PrivateKey, PrivateKey)],
    sizes: &[usize],
) -> Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    // Connect everyone first: pumps already running would slow the rest.
    let mut clients = Vec::new();
    for (s, r) in pairs {
        clients.push((
            connect(relay, s).await?,
            connect(relay, r).await?,
            r.public(),
        ));
    }
    let mut keep = Vec::new();
    let mut bytes = Vec::new();
    for (i, ((stx, srx), (rtx, mut rrx), dest)) in clients.into_iter().enumerate() {
        let d = delivered.clone();
        let b = Arc::new(AtomicU64::new(0));
        bytes.push(b.clone());
        tokio::spawn(async move {
            while let Some(p) = rrx.recv().await {
                d.fetch_add(1, Relaxed);
                b.fetch_add(p.1.len() as u64, Relaxed);
            }
        });
        let stop = stop.clone();
        let pkts: Vec<Bytes> = (0..sizes.len())
            .map(|k| Bytes::from(vec![0xa5; sizes[(i + k) % sizes.len()]]))
            .collect();
        let tx = stx.clone();
        tokio::spawn(async move {
            for pkt in pkts.iter().cycle() {
                if stop.load(Relaxed) || tx.send(dest, pkt.clone()).await.is_err() {
                    break;
                }
            }
        });
        keep.push((stx, srx, rtx));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, _, _) = proc_usage(relay.pid)?;
    let n0 = delivered.load(Relaxed);
    let b0: Vec<u64> = bytes.iter().map(|b| b.load(Relaxed)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let n = delivered.load(Relaxed) - n0;
    let per_pair: Vec<u64> = bytes
        .iter()
        .zip(b0)
        .map(|(b, b0)| b.load(Relaxed) - b0)
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, _, _) = proc_usage(relay.pid)?;
    stop.store(true, Relaxed);
    drop(keep);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pps = n as f64 / secs;
    let mbit = per_pair.iter().sum::<u64>() as f64 * 8.0 / 1e6 / secs;
    Ok(Phase {
        pps,
        mbit,
        cpu: cpu1 - cpu0,
        per_pair,
    })
}

/// Round trips through the relay: a→relay→b→relay→a.
async fn relay_rtt(relay: &Relay, (a, b): &(PrivateKey, PrivateKey)) -> Result<Vec<Duration>> {
    let (atx, mut arx) = connect(relay, a).await?;
    let (btx, mut brx) = connect(relay, b).await?;
    let a_pub = a.public();
    tokio::spawn(async move {
        while let Some((_, p)) = brx.recv().await {
            if btx.send(a_pub, p).await.is_err() {
                return;
            }
        }
    });
    let mut rtts = Vec::new();
    let ping = Bytes::from(vec![1u8; 64]);
    for _ in 0..2000 {
        let t = Instant::now();
        atx.send(b.public(), ping.clone()).await?;
        arx.recv().await.context("echo lost")?;
        rtts.push(t.elapsed());
    }
    Ok(rtts)
}

async fn udp_rtt() -> Result<Vec<Duration>> {
    let echo = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = echo.local_addr()?;
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(addr).await?;
    let mut rtts = Vec::new();
    let mut b = [0u8; 2048];
    for _ in 0..2000 {
        let t = Instant::now();
        s.send(&[1u8; 64]).await?;
        s.recv(&mut b).await?;
        rtts.push(t.elapsed());
    }
    Ok(rtts)
}

async fn tcp_rtt() -> Result<Vec<Duration>> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = l.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut c, _)) = l.accept().await {
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 64];
            while c.read_exact(&mut b).await.is_ok() {
                if c.write_all(&b).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut rtts = Vec::new();
    let mut b = [0u8; 64];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&[1u8; 64]).await?;
        s.read_exact(&mut b).await?;
        rtts.push(t.elapsed());
    }
    Ok(rtts)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

async fn bench(tls: bool) -> Result<()> {
    let pairs: Vec<(PrivateKey, PrivateKey)> = (0..52)
        .map(|_| (PrivateKey::generate(), PrivateKey::generate()))
        .collect();
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .args(tls.then_some("--tls"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    {
        let mut stdin = child.stdin.take().context("child stdin")?;
        for (s, r) in &pairs {
            writeln!(stdin, "{}\n{}", s.public(), r.public())?;
        }
        writeln!(stdin)?;
    }
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
    let port: u16 = line.trim().parse().context("relay port")?;
    let mut config = RelayClientConfig::new(if tls {
        format!("https://localhost:{port}")
    } else {
        format!("http://127.0.0.1:{port}")
    });
    config.allow_plain = !tls;
    if tls {
        let der = std::fs::read(cert_path_of(pid))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(der))?;
        let c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.tls = Some(Arc::new(c));
    }
    let relay = Relay { pid, config };
    let result = run_all(&relay, &pairs, tls).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(cert_path_of(pid));
    result
}

fn cert_path_of(pid: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("warren-relay-bench-{pid}.der"))
}

async fn run_all(relay: &Relay, pairs: &[(PrivateKey, PrivateKey)], tls: bool) -> Result<()> {
    let (_, rss0, _) = proc_usage(relay.pid)?;
    println!(
        "relay bench on loopback, {} , {PKT}-byte packets, {WINDOW:?} windows",
        if tls { "TLS" } else { "plain TCP (lab mode)" }
    );
    println!("relay RSS idle: {rss0} KiB");
    let phases: [(&str, &Pairs, &[usize]); 3] = [
        ("1 pair:  ", &pairs[..1], &[PKT]),
        ("50 pairs:", &pairs[1..51], &[PKT]),
        ("50 mixed:", &pairs[1..51], &IMIX),
    ];
    for (label, phase, sizes) in phases {
        reset_peak(relay.pid);
        let Phase {
            pps,
            mbit,
            cpu,
            per_pair,
        } = throughput(relay, phase, sizes).await?;
        let (_, rss, peak) = proc_usage(relay.pid)?;
        println!(
            "{label} {pps:>9.0} pkt/s {mbit:>8.1} Mbit/s  relay CPU {cpu:.2} s in {:.0} s \
             ({:.0}% of one core, {:.1} µs/pkt)  RSS {rss} KiB, peak {peak} KiB",
            WINDOW.as_secs_f64(),
            cpu / WINDOW.as_secs_f64() * 100.0,
            cpu / (pps * WINDOW.as_secs_f64()) * 1e6
        );
        if per_pair.len() > 1 {
            let secs = WINDOW.as_secs_f64();
            let min = per_pair.iter().min().copied().unwrap_or(0) as f64 * 8.0 / 1e6 / secs;
            let max = per_pair.iter().max().copied().unwrap_or(0) as f64 * 8.0 / 1e6 / secs;
            println!(
                "          fairness over {} pairs: Jain {:.3} (target >= 0.95), \
                 per pair {min:.1} to {max:.1} Mbit/s",
                per_pair.len(),
                jain(&per_pair)
            );
        }
    }
    let mut u = udp_rtt().await?;
    let mut t = tcp_rtt().await?;
    let mut r = relay_rtt(relay, &pairs[51]).await?;
    let (u50, t50, r50) = (pct(&mut u, 0.5), pct(&mut t, 0.5), pct(&mut r, 0.5));
    let (u99, t99, r99) = (pct(&mut u, 0.99), pct(&mut t, 0.99), pct(&mut r, 0.99));
    println!("RTT 64 B, 2000 round trips (p50 / p99 µs):");
    println!("  direct UDP echo  {u50:>7.1} / {u99:>7.1}");
    println!("  direct TCP echo  {t50:>7.1} / {t99:>7.1}");
    println!("  via relay        {r50:>7.1} / {r99:>7.1}   (two relay hops per round trip)");
    println!(
        "  added vs UDP: {:.1} µs p50; vs TCP: {:.1} µs p50",
        r50 - u50,
        r50 - t50
    );
    Ok(())
}
