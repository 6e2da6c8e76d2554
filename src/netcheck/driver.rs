//! The tokio driver for [`Netcheck`]: real sockets, the real clock, and the
//! port-mapping probe running beside the STUN probes.
//!
//! It owns its sockets (one per address family), which is what `warren
//! netcheck` wants. The agent, whose single socket is shared with WireGuard
//! and disco, drives the same state machine from its own loop instead.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::{Config, Netcheck, Report, Server};
use crate::portmap::{self, gateway::local_ip_towards};
use crate::proto::stun::{is_stun, MAX_MESSAGE_LEN};

/// Why the driver could not run at all. (An unreachable network is not an
/// error: it is a report saying UDP does not work.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetcheckError {
    #[error("no STUN servers configured")]
    NoServers,
    #[error("could not open a UDP socket: {0}")]
    Bind(#[source] io::Error),
}

/// Runs a full netcheck against `servers` and returns the report, within
/// `deadline` (plus scheduling slack).
///
/// `sockets`: the sockets to probe from; empty means "bind an ephemeral
/// IPv4 and (if available) IPv6 socket". `portmap`: the port-mapping probe
/// settings, or `None` to skip it.
pub async fn run(
    sockets: Vec<UdpSocket>,
    servers: Vec<Server>,
    portmap: Option<portmap::Config>,
    deadline: Duration,
) -> Result<Report, NetcheckError> {
    if servers.iter().all(|s| s.addrs.is_empty()) {
        return Err(NetcheckError::NoServers);
    }
    let sockets = if sockets.is_empty() {
        bind_default().await?
    } else {
        sockets
    };
    let v4 = sockets.iter().find(|s| family_is_v4(s) == Some(true));
    let v6 = sockets.iter().find(|s| family_is_v4(s) == Some(false));
    let config = Config {
        local_v4: v4.and_then(|s| local_endpoint(s, &servers, true)),
        local_v6: v6.and_then(|s| local_endpoint(s, &servers, false)),
        deadline,
        expect_portmap: portmap.is_some(),
        seed: rand::random(),
        servers,
        ..Config::default()
    };
    let mut machine = Netcheck::new(Instant::now(), config);
    let mut portmap_task =
        portmap.map(|cfg| tokio::spawn(async move { portmap::probe(&cfg).await }));
    let mut buf4 = vec![0u8; MAX_MESSAGE_LEN + 1];
    let mut buf6 = vec![0u8; MAX_MESSAGE_LEN + 1];
    loop {
        let now = Instant::now();
        while let Some((dest, bytes)) = machine.poll_transmit(now) {
            // A v4 destination goes out the v4 socket, or a dual-stack v6 one.
            let socket = if dest.is_ipv4() { v4.or(v6) } else { v6 };
            let Some(socket) = socket else { continue };
            let dest = match (dest, socket.local_addr()) {
                (SocketAddr::V4(d), Ok(SocketAddr::V6(_))) => {
                    SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port())
                }
                _ => dest,
            };
            if let Err(e) = socket.send_to(&bytes, dest).await {
                // Unreachable families are normal; the probe just times out.
                tracing::debug!(%dest, error = %e, "netcheck send failed");
            }
        }
        if let Some(report) = machine.poll_report() {
            if let Some(task) = portmap_task {
                task.abort();
            }
            return Ok(report);
        }
        let wake = machine
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(50));
        tokio::select! {
            r = recv(v4, &mut buf4) => feed(&mut machine, r, &buf4),
            r = recv(v6, &mut buf6) => feed(&mut machine, r, &buf6),
            presence = join(&mut portmap_task) => {
                portmap_task = None;
                machine.handle_portmap(presence.unwrap_or_default());
            }
            _ = tokio::time::sleep_until(wake.into()) => machine.handle_timeout(Instant::now()),
        }
    }
}

fn feed(machine: &mut Netcheck, received: io::Result<(usize, SocketAddr)>, buf: &[u8]) {
    match received {
        Ok((n, from)) if is_stun(&buf[..n]) => {
            // Rejections are counted inside the report; no per-packet log.
            let _ = machine.handle_stun(Instant::now(), from, &buf[..n]);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "netcheck receive failed"),
    }
}

async fn join<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn bind_default() -> Result<Vec<UdpSocket>, NetcheckError> {
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(NetcheckError::Bind)?;
    crate::sockmark::apply(&v4);
    let mut sockets = vec![v4];
    // IPv6 may be disabled; then netcheck reports it as absent.
    if let Ok(v6) = bind_v6_only().await {
        sockets.push(v6);
    }
    Ok(sockets)
}

/// An IPv6-only socket, so IPv4 probes keep using the IPv4 socket.
async fn bind_v6_only() -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
    s.set_only_v6(true)?;
    crate::sockmark::apply(&s);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
    UdpSocket::from_std(s.into())
}

fn family_is_v4(socket: &UdpSocket) -> Option<bool> {
    socket.local_addr().ok().map(|a| a.is_ipv4())
}

/// The socket's endpoint with the source IP the kernel would use toward the
/// first server of the family (the socket itself is usually bound to the
/// unspecified address, which tells nothing about NAT).
fn local_endpoint(socket: &UdpSocket, servers: &[Server], v4: bool) -> Option<SocketAddr> {
    let local = socket.local_addr().ok()?;
    if !local.ip().is_unspecified() {
        return Some(SocketAddr::new(local.ip().to_canonical(), local.port()));
    }
    let server = servers
        .iter()
        .flat_map(|s| &s.addrs)
        .find(|a| a.is_ipv4() == v4)?;
    let ip = local_ip_towards(server.ip()).ok()?;
    Some(SocketAddr::new(ip, local.port()))
}
