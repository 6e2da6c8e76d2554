//! Creating the TUN device.
//!
//! We ask tun-rs for offload (virtio-net header: TSO/GSO super-packets in,
//! GRO coalescing out), which is what makes a userspace tunnel fast. Older
//! kernels refuse it; then we fall back to one packet per read and say so
//! once. Permission errors are turned into a sentence that says what is
//! missing, since "Operation not permitted" alone sends people guessing.

use std::io;
use std::net::IpAddr;

use tun_rs::{AsyncDevice, DeviceBuilder};

use super::AgentError;
use crate::config::InterfaceConfig;

pub struct Tun {
    pub dev: AsyncDevice,
    /// Further queues of the same device (multi-queue TUN). The kernel
    /// spreads flows over the queues by hash, so each queue can be read by
    /// its own task without reordering any one flow.
    pub extra_queues: Vec<AsyncDevice>,
    /// True when the device exchanges virtio-net headers (offload on).
    pub offload: bool,
}

/// Creates the device with up to `queues` queues.
pub fn create(cfg: &InterfaceConfig, queues: usize) -> Result<Tun, AgentError> {
    let mut tun = create_one(cfg)?;
    for _ in 1..queues {
        match tun.dev.try_clone() {
            Ok(q) => tun.extra_queues.push(q),
            Err(e) => {
                tracing::info!(error = %e, "multi-queue TUN unavailable; one queue");
                break;
            }
        }
    }
    Ok(tun)
}

fn create_one(cfg: &InterfaceConfig) -> Result<Tun, AgentError> {
    if cfg.offload {
        match build(cfg, true) {
            Ok(dev) => {
                let offload = dev.tcp_gso();
                return Ok(Tun {
                    dev,
                    extra_queues: Vec::new(),
                    offload,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(permission(cfg, e));
            }
            // Kernels without virtio-net header support refuse the flags
            // with EINVAL or ENOTTY; anything else (a busy name, a missing
            // module) is not about offload and is reported as it is.
            Err(e) if offload_refused(&e) => {
                tracing::info!(error = %e, "TUN offload unavailable; using one packet per read");
            }
            Err(e) => {
                return Err(AgentError::Tun {
                    name: cfg.name.clone(),
                    source: e,
                })
            }
        }
    }
    let dev = build(cfg, false).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            permission(cfg, e)
        } else {
            AgentError::Tun {
                name: cfg.name.clone(),
                source: e,
            }
        }
    })?;
    Ok(Tun {
        dev,
        extra_queues: Vec::new(),
        offload: false,
    })
}

fn offload_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
    ) || e.kind() == io::ErrorKind::Unsupported
}

fn permission(cfg: &InterfaceConfig, source: io::Error) -> AgentError {
    AgentError::Permission {
        what: format!(
            "creating the TUN device `{}` needs CAP_NET_ADMIN: run as root, or grant the \
             capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
            cfg.name
        ),
        source,
    }
}

fn build(cfg: &InterfaceConfig, offload: bool) -> io::Result<AsyncDevice> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "/dev/net/tun is missing (load the `tun` kernel module)",
        ));
    }
    let mut b = DeviceBuilder::new()
        .name(cfg.name.clone())
        .mtu(cfg.mtu)
        .offload(offload)
        .multi_queue(true);
    let mut v4 = cfg.addresses.iter().filter(|a| a.addr().is_ipv4());
    if let Some(first) = v4.next() {
        if let IpAddr::V4(a) = first.addr() {
            b = b.ipv4(a, first.prefix_len(), None);
        }
    }
    for net in cfg.addresses.iter().filter(|a| a.addr().is_ipv6()) {
        if let IpAddr::V6(a) = net.addr() {
            b = b.ipv6(a, net.prefix_len());
        }
    }
    let dev = b.build_async()?;
    for extra in v4 {
        if let IpAddr::V4(a) = extra.addr() {
            dev.add_address_v4(a, extra.prefix_len())?;
        }
    }
    Ok(dev)
}
