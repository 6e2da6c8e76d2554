//! What `status` shows of the agent state: this node's standing and each
//! peer as the map, traversal and the relays see it.
//!
//! Built from the state alone; the driver adds what only IO knows (whether
//! the relay connection is up, the login's coordinator and tags, the data
//! plane's policy rules). Instants become wall-clock times here, at the
//! edge where the state's `Instant`s meet the clock a person reads; the
//! driver passes `now` and the wall clock read together.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::AgentState;
use crate::api::mesh::{MeshStatus, PeerMesh, TriedPath};
use crate::keys::NodeKey;
use crate::path::Path;

/// Renders an instant as wall-clock time, "HH:MM:SS" in UTC (`now` and
/// `wall` are taken together).
pub fn wall_clock(now: Instant, wall: SystemTime, t: Instant) -> String {
    let at = wall
        .checked_sub(now.saturating_duration_since(t))
        .unwrap_or(wall);
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

impl AgentState {
    /// Each peer in the map, as `status` shows it.
    pub fn peer_views(&self, now: Instant, wall: SystemTime) -> HashMap<NodeKey, PeerMesh> {
        let clock = |t: Instant| wall_clock(now, wall, t);
        let at = |t: Instant| format!("at {} UTC", clock(t));
        self.follow
            .peers()
            .values()
            .map(|p| {
                let st = self.node.status_with(&p.key, &at);
                let relayed = st.as_ref().is_none_or(|s| matches!(s.path, Path::Relay));
                let mesh = PeerMesh {
                    hostname: p.name.clone(),
                    online: p.online,
                    os: p.os.clone(),
                    version: p.version.clone(),
                    tags: p.tags.clone(),
                    routes: p.routes.clone(),
                    routed: self
                        .subnets
                        .iter()
                        .filter(|(_, k)| *k == p.key)
                        .map(|(n, _)| *n)
                        .collect(),
                    relay_region: relayed
                        .then(|| self.peer_region(&p.key).and_then(|r| self.region_name(r)))
                        .flatten(),
                    latency_ms: st
                        .as_ref()
                        .and_then(|s| s.rtt)
                        .map(|d| d.as_secs_f64() * 1e3),
                    relay_reason: st.as_ref().and_then(|s| s.relay_reason.clone()),
                    candidates: p.endpoints.iter().map(|e| e.addr).collect(),
                    nat: p.nat,
                    pings_sent: st.as_ref().map_or(0, |s| s.stats.pings_sent),
                    pongs_received: st.as_ref().map_or(0, |s| s.stats.pongs_received),
                    direct_since_secs: self
                        .direct_since
                        .get(&p.key)
                        .map(|t| now.duration_since(*t).as_secs()),
                    tried: st.as_ref().map_or_else(Vec::new, |s| {
                        s.tried
                            .iter()
                            .map(|t| TriedPath {
                                addr: t.path.addr,
                                kind: t.kind.name().into(),
                                last_ping: t.last_ping.map(clock),
                                last_pong: t.last_pong.map(clock),
                                rtt_ms: t.rtt.map(|d| d.as_secs_f64() * 1e3),
                            })
                            .collect()
                    }),
                    // Filled in per request (`api::view`, `api::server`).
                    allows_you: None,
                    you_allow: None,
                };
                (p.key, mesh)
            })
            .collect()
    }

    /// This node's standing, as far as the state knows it (the driver adds
    /// the coordinator, the tags, the relay connection and the policy).
    pub fn status(&self) -> MeshStatus {
        let Some(c) = &self.control else {
            return MeshStatus::default();
        };
        let names = |id: u16| self.region_name(id).unwrap_or_else(|| id.to_string());
        MeshStatus {
            state: c.state,
            name: c.name.clone(),
            addresses: c.addresses.clone(),
            home_relay: self.home().map(names),
            relay_latency_ms: self
                .disc
                .region_latency()
                .into_iter()
                .map(|(id, d)| (names(id), d.as_secs_f64() * 1e3))
                .collect(),
            endpoints: c
                .reported
                .as_ref()
                .map(|r| r.endpoints.clone())
                .unwrap_or_default(),
            nat: self.disc.nat(),
            udp: self.disc.last.as_ref().map(|r| r.udp),
            last_error: c.last_error.clone(),
            map_received: c.map_received,
            served_routes: self.follow.self_routes().to_vec(),
            exit_node: self.exit_node.map(|k| {
                self.follow
                    .peers()
                    .get(&k)
                    .map_or_else(|| k.short(), |p| p.name.clone())
            }),
            exit_node_lan: self.lan_bypass.clone(),
            exit_node_problem: self.exit_problem.clone(),
            ..MeshStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn instants_become_utc_clock_times() {
        let now = Instant::now();
        // 1970-01-02 14:02:05 UTC.
        let wall = UNIX_EPOCH + Duration::from_secs(86_400 + 14 * 3600 + 2 * 60 + 5);
        assert_eq!(wall_clock(now, wall, now), "14:02:05");
        let earlier = now.checked_sub(Duration::from_secs(65)).unwrap();
        assert_eq!(wall_clock(now, wall, earlier), "14:01:00");
    }
}
