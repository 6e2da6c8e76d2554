//! Reloading the config file on SIGHUP (`systemctl reload warren`) without
//! dropping tunnels.
//!
//! Only the peers are applied live, through [`DataPlane::upsert_peer`] and
//! [`DataPlane::remove_peer`]: an unchanged peer keeps its session, a peer
//! whose endpoint alone changed keeps it too, a changed peer gets a fresh
//! tunnel, and a removed one goes. Removal is computed against the *previous
//! file*, not against the data plane, so peers that came from elsewhere (the
//! coordinator's map) are never removed by a reload. Settings that
//! need a new device or socket (name, port, MTU, addresses, offload, key,
//! API socket) are reported as needing a restart and otherwise ignored.
//!
//! A file that no longer parses changes nothing: the error is logged and the
//! running config stays.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, PeerConfig};
use crate::dataplane::{DataPlane, PeerSpec};

/// The data plane's view of a configured peer.
pub fn peer_spec(p: &PeerConfig) -> PeerSpec {
    let mut spec = PeerSpec::new(p.public_key, p.allowed_ips.clone()).with_psk(p.preshared_key);
    spec.endpoint = p.endpoint;
    spec.persistent_keepalive = p.persistent_keepalive;
    spec
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Keys whose new value only takes effect after a restart.
    pub needs_restart: Vec<&'static str>,
    /// `interface.filter_file` gave other rules, now in force.
    pub filter_changed: bool,
}

/// Applies the peers of `new` to `dp`, given that `old` is what it runs.
pub fn apply(dp: &DataPlane, old: &Config, new: &Config) -> ReloadReport {
    let mut report = ReloadReport::default();
    let current = dp.peers();
    let specs: Vec<_> = new.peers.iter().map(peer_spec).collect();
    for spec in &specs {
        match current.by_key(&spec.key) {
            Some(cur) if &cur.spec == spec => report.unchanged += 1,
            Some(_) => report.changed += 1,
            None => report.added += 1,
        }
    }
    drop(current);
    // One rebuild of the peer set for the whole file, not one per peer.
    dp.upsert_peers(std::time::Instant::now(), specs);
    for p in &old.peers {
        if !new.peers.iter().any(|q| q.public_key == p.public_key) && dp.remove_peer(&p.public_key)
        {
            report.removed += 1;
        }
    }
    if old.packet_filter() != new.packet_filter() {
        let rules = new.packet_filter().map(<[_]>::to_vec);
        dp.firewall.set_base(match rules {
            Some(r) => crate::policy::PacketFilter::new(r),
            None => crate::policy::PacketFilter::allow_all(),
        });
        report.filter_changed = true;
    }
    crate::agent::spin::set_window(new.agent.busy_poll_us);
    let (a, b) = (&old.interface, &new.interface);
    let checks = [
        ("interface.name", a.name != b.name),
        ("interface.listen_port", a.listen_port != b.listen_port),
        ("interface.mtu", a.mtu != b.mtu),
        ("interface.addresses", a.addresses != b.addresses),
        ("interface.offload", a.offload != b.offload),
        ("interface.private_key", node_key(old) != node_key(new)),
        ("agent.socket", old.agent.socket != new.agent.socket),
    ];
    report.needs_restart = checks.iter().filter(|c| c.1).map(|c| c.0).collect();
    report
}

fn node_key(c: &Config) -> Option<crate::keys::NodeKey> {
    c.private_key().ok().map(|k| k.public())
}

/// Re-reads `path` and applies it on every SIGHUP, for as long as the
/// returned task runs. Registering the handler happens before this returns,
/// so a SIGHUP sent once the agent reports ready can no longer kill it.
pub fn watch_sighup(
    path: PathBuf,
    dp: Arc<DataPlane>,
    mut running: Config,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let new = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: config not reloaded; keeping the running one");
                    continue;
                }
            };
            let r = apply(&dp, &running, &new);
            tracing::info!(
                added = r.added,
                changed = r.changed,
                removed = r.removed,
                unchanged = r.unchanged,
                filter_changed = r.filter_changed,
                "SIGHUP: config reloaded"
            );
            if !r.needs_restart.is_empty() {
                tracing::warn!(
                    keys = ?r.needs_restart,
                    "SIGHUP: these settings take effect after a restart"
                );
            }
            running = new;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use std::path::Path;
    use std::time::Instant;

    fn config(peers: &str, port: u16) -> Config {
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        Config::parse(
            &format!("[interface]\nprivate_key = \"{key}\"\nlisten_port = {port}\n{peers}"),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn peer(key: &crate::keys::NodeKey, ip: &str, endpoint: Option<&str>) -> String {
        let ep = endpoint
            .map(|e| format!("endpoint = \"{e}\"\n"))
            .unwrap_or_default();
        format!("[[peer]]\npublic_key = \"{key}\"\nallowed_ips = [\"{ip}\"]\n{ep}")
    }

    #[test]
    fn reload_keeps_unchanged_peers_and_applies_the_rest() {
        let keys: Vec<_> = (0..4).map(|_| PrivateKey::generate().public()).collect();
        let old = config(
            &[
                peer(&keys[0], "100.64.0.2/32", None),
                peer(&keys[1], "100.64.0.3/32", Some("192.0.2.1:1")),
                peer(&keys[2], "100.64.0.4/32", None),
            ]
            .concat(),
            51820,
        );
        let dp = DataPlane::new(old.private_key().unwrap(), Instant::now());
        for p in &old.peers {
            dp.upsert_peer(Instant::now(), peer_spec(p));
        }
        // A peer from elsewhere (the coordinator): a reload must keep it.
        let other = PrivateKey::generate().public();
        dp.upsert_peer(
            Instant::now(),
            PeerSpec::new(other, vec!["100.64.9.9/32".parse().unwrap()]),
        );
        let before: Vec<u32> = keys[..2]
            .iter()
            .map(|k| dp.peers().by_key(k).unwrap().index)
            .collect();

        let new = config(
            &[
                peer(&keys[0], "100.64.0.2/32", None),
                // Endpoint moved: same tunnel, new address.
                peer(&keys[1], "100.64.0.3/32", Some("192.0.2.9:1")),
                peer(&keys[3], "100.64.0.5/32", None),
            ]
            .concat(),
            51821,
        );
        let r = apply(&dp, &old, &new);
        assert_eq!((r.added, r.changed, r.removed, r.unchanged), (1, 1, 1, 1));
        assert_eq!(r.needs_restart, ["interface.listen_port"]);
        let set = dp.peers();
        // Same index means the same Peer (and boringtun session) survived.
        assert_eq!(set.by_key(&keys[0]).unwrap().index, before[0]);
        assert_eq!(set.by_key(&keys[1]).unwrap().index, before[1]);
        assert_eq!(
            set.by_key(&keys[1]).unwrap().endpoint(),
            Some("192.0.2.9:1".parse().unwrap())
        );
        assert!(set.by_key(&keys[2]).is_none());
        assert!(set.by_key(&keys[3]).is_some());
        assert!(set.by_key(&other).is_some(), "non-config peer removed");
    }
}
