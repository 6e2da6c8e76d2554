//! The agent's tokio driver: the TUN device, the UDP socket, and the tasks
//! that move packets between them.
//!
//! Tasks, and why each exists (the full tables, with the counts of every
//! spawn site, are in docs/architecture.md, "The tokio driver"):
//! - one outbound reader per TUN queue (1–4): TUN → route → seal → send;
//!   several queues spread flows over the cores;
//! - one inbound reader of the UDP socket: open → TUN, and everything that
//!   is not WireGuard to the mesh task;
//! - `timers`: WireGuard's timers (`Peer::tick(now)` every 250 ms, at the
//!   clock this task reads: the session takes its time from the caller,
//!   `dataplane::wg`), the handshake rate limiter's reset, the drop summary;
//! - the mesh task ([`mesh`]), which owns everything that is not a data
//!   packet, with its sub-tasks: the map stream, relay drivers and their
//!   pumps, the port mapper, TCP streams, background control requests,
//!   birthday sockets. A relay pump and a TCP stream's reader are packet
//!   tasks too: they open WireGuard themselves into their own batched TUN
//!   writer (`streamed`), so relayed data never crosses the mesh task.
//!
//! Channels (bounded, each because a producer must never wait on the mesh
//! task's loop, or the reverse): side datagrams (UDP reader → mesh, 1024,
//! dropped when full), extra-socket datagrams (256), TCP frames (1024:
//! stream news, disco, WireGuard before the stream is proven), relay
//! frames (1024: disco and events), API calls (8, answered on a oneshot), map events
//! (256), per-stream writer queues (1024), relay client queues.
//!
//! Locks: on the packet path, the per-peer session mutex (held for one seal
//! or open, never across a system call) and, while an access policy is on,
//! a connection-table shard when a task's flow cache misses; the peer set, the egress
//! tables, the relay routes and each TCP stream's proven owner are
//! `ArcSwap`s the packet tasks load without locking; the status view is one `std` mutex, written by the mesh task
//! after a change and read by `status`.
//!
//! The packet tasks run on different runtime workers, so sealing and
//! opening use two cores. Shutting down aborts the tasks and drops the
//! device, which removes the TUN interface: nothing is left behind.

pub mod dns;
mod egress;
mod inbound;
pub mod mesh;
mod outbound;
pub mod reload;
pub mod spin;
pub mod state;
mod streamed;
mod tun;
pub mod udp;

pub use egress::{Egress, RelaySink};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::dataplane::{DataPlane, DropCounts};

/// How often WireGuard's timers run. boringtun's own device uses 250 ms;
/// handshake retries and keepalives need no finer grain.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Most TUN queues read in parallel; past the core count they only add
/// contention.
const MAX_QUEUES: usize = 4;
/// How often dropped-packet counts are summarised in the log.
const DROP_REPORT: Duration = Duration::from_secs(30);
/// How long a stopping agent waits for the port mapping to be deleted:
/// above the mapper's own bound (twice its 2 s request timeout).
const PORTMAP_RELEASE_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what}")]
    Permission {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the TUN device `{name}`")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding UDP port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{task} stopped")]
    Io {
        task: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What a running agent exposes to its caller (status, tests).
pub struct Running {
    pub dataplane: Arc<DataPlane>,
    pub listen: SocketAddr,
    pub offload: bool,
    /// The mesh task (coordinator, traversal, relays).
    pub mesh: mesh::MeshHandle,
    /// The resolver, unless `[dns] enabled = false`.
    pub dns: Option<dns::DnsHandle>,
}

/// Non-WireGuard datagrams waiting for the mesh task; past this they are
/// dropped (they are disco and STUN: a few per second per peer).
const SIDE_QUEUE: usize = 1024;

/// Runs the agent until `shutdown` completes or a packet task fails.
/// `on_ready` is called once the device is up and packets flow.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&Running),
) -> Result<(), AgentError> {
    // Everything that can fail on bad input is checked before the device
    // exists, so a bad config leaves nothing behind.
    let key = config.private_key()?;
    // Every socket the agent opens from here on carries warren's mark,
    // so that its own routes never catch its own traffic.
    crate::sockmark::enable();
    let started = std::time::Instant::now();
    let dp = Arc::new(DataPlane::new(key, started));
    dp.upsert_peers(started, config.peers.iter().map(reload::peer_spec));
    if let Some(rules) = config.packet_filter() {
        dp.firewall
            .set_base(crate::policy::PacketFilter::new(rules.to_vec()));
    }
    let iface = &config.interface;
    let udp = udp::Udp::bind(iface.listen_port, iface.offload).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            AgentError::Permission {
                what: format!("binding UDP port {}: permission denied", iface.listen_port),
                source,
            }
        } else {
            AgentError::Bind {
                port: iface.listen_port,
                source,
            }
        }
    })?;
    let listen = udp.local_addr().map_err(|source| AgentError::Bind {
        port: iface.listen_port,
        source,
    })?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tun = tun::create(iface, cores.min(MAX_QUEUES))?;
    let offload = tun.offload;
    let dev = Arc::new(tun.dev);
    let udp = Arc::new(udp);
    let egress = Arc::new(Egress::new(udp.clone(), dp.drops.clone()));
    let mtu = usize::from(iface.mtu);

    let mut tasks = tokio::task::JoinSet::new();
    let queues = std::iter::once(dev.clone()).chain(tun.extra_queues.into_iter().map(Arc::new));
    spin::watch(std::os::fd::AsRawFd::as_raw_fd(&*udp));
    for queue in queues {
        spin::watch(std::os::fd::AsRawFd::as_raw_fd(&*queue));
        let out = outbound::Outbound {
            dp: dp.clone(),
            tun: queue,
            egress: egress.clone(),
            offload,
            mtu,
        };
        tasks.spawn(async move {
            out.run().await.map_err(|source| AgentError::Io {
                task: "TUN reader",
                source,
            })
        });
    }
    let dns = if config.dns.enabled {
        // The resolver's address, on the TUN: this host reaches it, and a
        // peer's packet to it is not one the firewall lets in.
        if let Err(e) = dev.add_address_v4(config.dns.address, 32) {
            tracing::debug!(error = %e, "adding the resolver's address");
        }
        Some(
            dns::DnsHandle::start(
                config.dns.address,
                config.dns.address_v6,
                dev.if_index().unwrap_or(0),
                config.dns.resolv_conf.clone(),
                &config.agent.state_dir,
            )
            .await,
        )
    } else {
        None
    };
    let (side_tx, side_rx) = tokio::sync::mpsc::channel(SIDE_QUEUE);
    let (mesh, mesh_task) = mesh::spawn(mesh::MeshParts {
        dns: dns.clone(),
        dp: dp.clone(),
        egress: egress.clone(),
        tun: dev.clone(),
        key: config.private_key()?,
        state_dir: config.agent.state_dir.clone(),
        listen,
        side: side_rx,
        portmap: config.agent.portmap_config(),
        relay: mesh::RelayOptions {
            transport: config.agent.relay_transport,
            idle_close: std::time::Duration::from_secs(config.agent.relay_idle_timeout),
            insecure_http: config.agent.insecure_http,
        },
        tcp_port: config.agent.tcp_port.unwrap_or(listen.port()),
        traversal: crate::traversal::Config {
            birthday_sockets: config.agent.birthday_ports,
            ..Default::default()
        },
        mtu,
        tun_index: dev.if_index().unwrap_or(0),
        tun_name: iface.name.clone(),
    });
    let inb = inbound::Inbound {
        dp: dp.clone(),
        tun: dev.clone(),
        egress: egress.clone(),
        mtu,
        side: Some(side_tx),
    };
    tasks.spawn(async move {
        inb.run().await.map_err(|source| AgentError::Io {
            task: "UDP reader",
            source,
        })
    });
    let timer_dp = dp.clone();
    let timer_egress = egress.clone();
    tasks.spawn(async move {
        timers(timer_dp, timer_egress).await;
        Ok(())
    });

    let running = Running {
        dataplane: dp.clone(),
        listen,
        offload,
        mesh,
        dns,
    };
    tracing::info!(
        interface = %iface.name,
        %listen,
        public_key = %dp.public_key(),
        peers = dp.peers().len(),
        offload,
        udp_gso_segments = udp.max_segments(),
        "agent ready"
    );
    on_ready(&running);

    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(res) = tasks.join_next() => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(AgentError::Io { task: "packet task", source: std::io::Error::other(join.to_string()) }),
        },
    };
    // Give the port mapping back before the runtime goes (the mapper's own
    // timeouts bound it; this bound is for a mesh task that is stuck), and
    // before the packet tasks stop, so nothing the mesh task waits on is
    // gone while it does.
    let _ = tokio::time::timeout(
        PORTMAP_RELEASE_TIMEOUT,
        running.mesh.call(mesh::Command::Shutdown),
    )
    .await;
    tasks.shutdown().await;
    // The descriptors close below; a number the kernel reuses must not
    // end a spin.
    spin::unwatch_all();
    mesh_task.abort();
    let _ = mesh_task.await;
    // The last reference to the device goes here; closing it removes the
    // interface.
    drop(dev);
    tracing::info!(interface = %iface.name, "agent stopped; device removed");
    result
}

/// `CLOCK_BOOTTIME`: like `Instant`, but it keeps counting while the host
/// is suspended.
fn boottime() -> Option<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::from(t))
}

/// How long the host was suspended, from how much time passed on a clock
/// that stops while it is (`awake`) and on one that does not (`boot`).
/// Differences under 10 ms are the two reads' own gap, not sleep.
fn slept(awake: Duration, boot: Duration) -> Duration {
    let d = boot.saturating_sub(awake);
    if d < Duration::from_millis(10) {
        Duration::ZERO
    } else {
        d
    }
}

async fn timers(dp: Arc<DataPlane>, egress: Arc<Egress>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 512];
    let mut n: u64 = 0;
    let mut last = DropCounts::default();
    let ticks_per_second = (Duration::from_secs(1).as_millis() / TIMER_TICK.as_millis()) as u64;
    let ticks_per_report = DROP_REPORT.as_secs() * ticks_per_second;
    let start = (std::time::Instant::now(), boottime());
    loop {
        tick.tick().await;
        n += 1;
        let set = dp.peers();
        // The driver's clock reading: WireGuard's timers run at this time
        // (dataplane::wg).
        let at = std::time::Instant::now();
        for peer in set.iter() {
            let sealed = peer.tick(at, &mut buf);
            egress.send(peer.key, sealed, &buf).await;
        }
        if n % ticks_per_second == 0 {
            // Time asleep counts for WireGuard, as on boringtun's own clock
            // (dataplane::wg).
            if let (Some(boot0), Some(boot)) = (start.1, boottime()) {
                crate::dataplane::wg::set_suspended(slept(
                    at - start.0,
                    boot.saturating_sub(boot0),
                ));
            }
            dp.reset_rate_limiter(at);
        }
        if n % ticks_per_report == 0 {
            let now = dp.drop_counts();
            if now != last {
                tracing::info!(
                    auth = now.auth - last.auth,
                    unknown_peer = now.unknown_peer - last.unknown_peer,
                    no_route = now.no_route - last.no_route,
                    no_endpoint = now.no_endpoint - last.no_endpoint,
                    malformed = now.malformed - last.malformed,
                    policy = now.policy - last.policy,
                    not_ours = now.not_ours - last.not_ours,
                    "packets dropped in the last {}s",
                    DROP_REPORT.as_secs()
                );
                last = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspended_time_is_what_the_boot_clock_saw_beyond_the_awake_one() {
        let s = Duration::from_secs;
        assert_eq!(slept(s(100), s(100)), Duration::ZERO);
        assert_eq!(
            slept(s(100), s(100) + Duration::from_millis(3)),
            Duration::ZERO
        );
        assert_eq!(slept(s(100), s(400)), s(300));
        assert_eq!(slept(s(100), s(90)), Duration::ZERO, "never negative");
    }
}
