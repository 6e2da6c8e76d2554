//! The agent's resolver and the host's DNS (README, "Names and DNS").
//!
//! [`DnsHandle`] is started with the agent: it puts the resolver's address
//! (`100.100.100.100` unless configured) on the TUN device, where only
//! this host can reach it (the firewall accepts peers' packets to the
//! node's own overlay addresses and served routes only), and serves DNS
//! there over UDP and TCP (`server.rs`). The mesh task gives it the names
//! (`set_view`, from the state's `Output::Dns`) and says when the host's
//! DNS should point at it (`set_host`: joined, running, `--accept-dns`).
//!
//! The host's DNS, by what manages it:
//! - `/etc/resolv.conf` is systemd-resolved's stub (a link into
//!   `/run/systemd/resolve/`, or `nameserver 127.0.0.53`): warren never
//!   writes the file (that is the fight users complain of) but sets the TUN
//!   link's DNS and routing domains over D-Bus (`resolved.rs`), and
//!   reverts them on stop. The resolver forwards to resolved's own
//!   upstreams.
//! - Otherwise the file itself (`resolvconf.rs`), watched with inotify.
//!
//! Tasks: the UDP and TCP listeners and their per-query tasks
//! (`server.rs`), one watcher of the resolv.conf file, and one task that
//! keeps resolved's link settings (fed by a `watch` channel). Locks: the
//! resolver's mutex (one call at a time, never across an await), and the
//! host state's mutex (the mesh task and the watcher both change the
//! file).

mod resolvconf;
mod resolved;
pub mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::dns::{DnsView, Resolver, Upstream};
use resolvconf::{Change, ResolvConf};

/// The resolver's address when the config names none.
pub const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// Where systemd-resolved keeps the real upstreams.
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// How the host's DNS is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `/etc/resolv.conf` is warren's while it runs.
    ResolvConf,
    /// systemd-resolved manages the host's DNS.
    Resolved,
    /// The host's DNS is left alone (`--accept-dns=false`, not joined, or
    /// warren gave up a fight over the file).
    Off,
}

/// `warren dns status`, and the DNS line of `warren status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub mode: Mode,
    /// Where the resolver listens.
    pub address: Vec<SocketAddr>,
    pub domain: String,
    /// Names it answers itself.
    pub names: usize,
    /// Where other names go.
    pub host_resolvers: Vec<String>,
    pub nameservers: Vec<String>,
    pub override_local: bool,
    pub split: Vec<(String, Vec<String>)>,
    pub cached: usize,
    pub stats: crate::dns::resolver::Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `warren dns query`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryReply {
    pub name: String,
    pub qtype: String,
    pub rcode: String,
    pub answers: Vec<String>,
    /// Where the answer came from ("the network's names", "split DNS for
    /// corp.example", "the cache", …).
    pub source: String,
    pub elapsed_ms: f64,
}

#[derive(Debug)]
struct Host {
    rc: ResolvConf,
    mode: Mode,
    /// The host's DNS should point at the resolver.
    wanted: bool,
    domains: Vec<String>,
    /// The network's `override_local`: resolved's link then takes `~.`.
    override_local: bool,
    problem: Option<String>,
}

struct Inner {
    resolver: server::Shared,
    forwards: Arc<Semaphore>,
    address: Ipv4Addr,
    /// `[dns] address_v6`; else the network's /48 with `::53`.
    address_v6: Option<std::net::Ipv6Addr>,
    /// The TUN device's index, for resolved's link settings.
    ifindex: i32,
    /// What resolved's link should say (`resolved.rs`).
    resolved: tokio::sync::watch::Sender<resolved::Desired>,
    /// Where it listens: the IPv4 address from the start, the IPv6 one
    /// once the network's /48 is known.
    listening: Mutex<Vec<SocketAddr>>,
    host: Mutex<Host>,
}

/// The running resolver. Cheap to clone.
#[derive(Clone)]
pub struct DnsHandle {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether systemd-resolved owns the file at `path`.
fn resolved_manages(path: &Path) -> bool {
    let link = std::fs::read_link(path)
        .map(|t| t.to_string_lossy().contains("/run/systemd/resolve/"))
        .unwrap_or(false);
    link || std::fs::read_to_string(path).is_ok_and(|t| {
        resolvconf::parse(&t)
            .nameservers
            .iter()
            .any(|n| *n == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)))
    })
}

impl DnsHandle {
    /// Serves DNS on `address` (already on the TUN device) and takes back
    /// a resolv.conf a killed run left behind.
    pub async fn start(
        address: Ipv4Addr,
        address_v6: Option<std::net::Ipv6Addr>,
        ifindex: u32,
        resolv_conf: PathBuf,
        state_dir: &Path,
    ) -> DnsHandle {
        let resolver: server::Shared = Arc::new(Mutex::new(Resolver::default()));
        let forwards = Arc::new(Semaphore::new(server::MAX_FORWARDS));
        let mut rc = ResolvConf::new(resolv_conf, state_dir);
        match rc.recover() {
            Ok(true) => {
                tracing::info!(file = %rc.path().display(), "DNS: restored the host's file a killed run left ours over")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "DNS: cannot restore the host's resolv.conf from the backup")
            }
        }
        let addr = SocketAddr::from((address, 53));
        let mut listening = Vec::new();
        let mut problem = None;
        match server::listen(addr, &resolver, &forwards) {
            Ok(()) => {
                listening.push(addr);
                tracing::info!(%addr, "DNS: resolver listening");
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "DNS: cannot listen; names will not resolve");
                problem = Some(format!("the resolver cannot listen on {addr}: {e}"));
            }
        }
        let (resolved_tx, resolved_rx) = tokio::sync::watch::channel(resolved::Desired::default());
        let ifindex = i32::try_from(ifindex).unwrap_or(0);
        let handle = DnsHandle {
            inner: Arc::new(Inner {
                resolver,
                forwards,
                address,
                address_v6,
                ifindex,
                resolved: resolved_tx,
                listening: Mutex::new(listening),
                host: Mutex::new(Host {
                    rc,
                    mode: Mode::Off,
                    wanted: false,
                    domains: Vec::new(),
                    override_local: false,
                    problem,
                }),
            }),
        };
        handle.refresh_host_resolvers();
        handle.spawn_watcher();
        let me = handle.clone();
        tokio::spawn(resolved::run(ifindex, resolved_rx, move |problem| {
            let mut h = lock(&me.inner.host);
            if h.mode == Mode::Resolved {
                h.problem = problem;
            }
        }));
        handle
    }

    /// The names and settings to answer from.
    pub fn set_view(&self, view: &DnsView) {
        {
            let mut r = lock(&self.inner.resolver);
            r.set_zone(Arc::new(view.zone()));
            r.set_settings(view.settings.clone());
        }
        let mut domains = vec![view.settings.domain.clone()];
        domains.extend(view.settings.split.keys().cloned());
        let override_local = view.settings.override_local;
        let changed = {
            let mut h = lock(&self.inner.host);
            let changed = h.domains != domains || h.override_local != override_local;
            h.domains = domains;
            h.override_local = override_local;
            changed
        };
        if changed {
            self.apply_host();
        }
    }

    /// The resolver's IPv6 address in the network with /48 `ula`.
    pub fn address_v6(&self, ula: ipnet::Ipv6Net) -> std::net::Ipv6Addr {
        self.inner
            .address_v6
            .unwrap_or_else(|| std::net::Ipv6Addr::from(u128::from(ula.network()) | 0x53))
    }

    /// Whether the resolver already serves on `ip`.
    pub fn listens_on(&self, ip: IpAddr) -> bool {
        lock(&self.inner.listening).iter().any(|a| a.ip() == ip)
    }

    /// Also serves on `addr` (already on the TUN device), once.
    pub fn listen_v6(&self, addr: std::net::Ipv6Addr) {
        let sock = SocketAddr::from((addr, 53));
        if lock(&self.inner.listening).contains(&sock) {
            return;
        }
        match server::listen(sock, &self.inner.resolver, &self.inner.forwards) {
            Ok(()) => {
                tracing::info!(addr = %sock, "DNS: resolver listening");
                lock(&self.inner.listening).push(sock);
                // The host's DNS names both addresses.
                let wanted = lock(&self.inner.host).wanted;
                if wanted {
                    self.apply_host();
                }
            }
            Err(e) => tracing::warn!(addr = %sock, error = %e, "DNS: cannot listen on IPv6"),
        }
    }

    /// Points the host's DNS at the resolver (`true`) or gives it back.
    pub fn set_host(&self, wanted: bool) {
        let changed = {
            let mut h = lock(&self.inner.host);
            let changed = h.wanted != wanted;
            h.wanted = wanted;
            changed
        };
        if changed {
            self.apply_host();
        }
    }

    /// Gives the host's DNS back (the agent stops): the file at once,
    /// resolved's link within a few seconds.
    pub async fn stop(&self) {
        let was_resolved = lock(&self.inner.host).mode == Mode::Resolved;
        self.set_host(false);
        if was_resolved {
            resolved::revert_now(self.inner.ifindex).await;
        }
    }

    fn apply_host(&self) {
        let addrs: Vec<IpAddr> = lock(&self.inner.listening)
            .iter()
            .map(SocketAddr::ip)
            .collect();
        let mut h = lock(&self.inner.host);
        if !h.wanted || addrs.is_empty() {
            if h.rc.active() {
                match h.rc.restore() {
                    Ok(()) => {
                        tracing::info!(file = %h.rc.path().display(), "DNS: the host's resolv.conf is back")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "DNS: cannot restore the host's resolv.conf")
                    }
                }
            }
            if h.mode == Mode::Resolved {
                self.inner
                    .resolved
                    .send_replace(resolved::Desired::default());
            }
            h.mode = Mode::Off;
        } else if resolved_manages(h.rc.path()) {
            h.mode = Mode::Resolved;
            self.inner.resolved.send_replace(resolved::Desired {
                wanted: true,
                servers: addrs,
                domains: h.domains.clone(),
                override_local: h.override_local,
            });
        } else if h.rc.gave_up {
            h.mode = Mode::Off;
        } else {
            let domains = h.domains.clone();
            match h.rc.apply(&addrs, &domains) {
                Ok(()) => {
                    h.mode = Mode::ResolvConf;
                    h.problem = None;
                }
                Err(e) => {
                    h.mode = Mode::Off;
                    h.problem = Some(format!("cannot write {}: {e}", h.rc.path().display()));
                }
            }
        }
        drop(h);
        self.refresh_host_resolvers();
    }

    /// The host's own resolvers become the forwarders.
    fn refresh_host_resolvers(&self) {
        let h = lock(&self.inner.host);
        let parsed = if h.mode == Mode::Resolved || resolved_manages(h.rc.path()) {
            std::fs::read_to_string(RESOLVED_UPSTREAMS)
                .map(|t| resolvconf::parse(&t))
                .unwrap_or_default()
        } else {
            h.rc.host()
        };
        drop(h);
        let ours: Vec<IpAddr> = lock(&self.inner.listening)
            .iter()
            .map(SocketAddr::ip)
            .collect();
        let upstreams: Vec<Upstream> = parsed
            .nameservers
            .into_iter()
            .filter(|ip| !ours.contains(ip))
            .map(|ip| Upstream(SocketAddr::new(ip, 53)))
            .collect();
        lock(&self.inner.resolver).set_host_resolvers(upstreams);
    }

    /// Watches the resolv.conf file (and its directory, for a rename over
    /// it) while the agent runs.
    fn spawn_watcher(&self) {
        let path = lock(&self.inner.host).rc.path().to_owned();
        let me = self.clone();
        let inotify = match inotify::Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "DNS: no inotify; rewrites of resolv.conf go unseen");
                return;
            }
        };
        use inotify::WatchMask as M;
        let file_mask = M::MODIFY | M::CLOSE_WRITE | M::ATTRIB | M::DELETE_SELF | M::MOVE_SELF;
        let _ = inotify.watches().add(&path, file_mask);
        if let Some(dir) = path.parent() {
            let _ = inotify
                .watches()
                .add(dir, M::CREATE | M::MOVED_TO | M::CLOSE_WRITE);
        }
        let name = path.file_name().map(ToOwned::to_owned);
        let Ok(mut events) = inotify.into_event_stream(vec![0u8; 4096]) else {
            return;
        };
        tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { continue };
                // Directory events for other files are not ours to see.
                if ev.name.is_some() && ev.name.as_deref() != name.as_deref() {
                    continue;
                }
                // Let a burst of writes settle into one look.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                // A rename put a new file in place: watch the new one.
                let _ = events.watches().add(&path, file_mask);
                me.file_changed();
            }
        });
    }

    fn file_changed(&self) {
        let mut h = lock(&self.inner.host);
        let domains = h.domains.clone();
        let addrs: Vec<IpAddr> = lock(&self.inner.listening)
            .iter()
            .map(SocketAddr::ip)
            .collect();
        match h.rc.changed(Instant::now(), &addrs, &domains) {
            Ok(Change::Ours) => return,
            Ok(Change::Reapplied) => {
                tracing::info!(file = %h.rc.path().display(), "DNS: another program rewrote resolv.conf; its servers are forwarded to and ours is back")
            }
            Ok(Change::GaveUp) => {
                tracing::error!(file = %h.rc.path().display(), "DNS: another program keeps rewriting resolv.conf; warren stops writing it");
                h.mode = Mode::Off;
                h.problem = Some(format!(
                    "another program rewrote {} more than {} times in {} s; warren left it \
                     alone (its names still answer at {}): configure that program to use \
                     {} or run `warren up --accept-dns=false`",
                    h.rc.path().display(),
                    resolvconf::MAX_FIGHTS,
                    resolvconf::FIGHT_WINDOW.as_secs(),
                    self.inner.address,
                    self.inner.address
                ));
            }
            Err(e) => tracing::warn!(error = %e, "DNS: cannot follow a change to resolv.conf"),
        }
        drop(h);
        self.refresh_host_resolvers();
    }

    /// What `warren dns status` shows.
    pub fn status(&self) -> DnsStatus {
        let (mode, problem) = {
            let h = lock(&self.inner.host);
            (h.mode, h.problem.clone())
        };
        let r = lock(&self.inner.resolver);
        let s = r.settings();
        DnsStatus {
            mode,
            address: lock(&self.inner.listening).clone(),
            domain: s.domain.clone(),
            names: r.zone().len(),
            host_resolvers: r.host_resolvers().iter().map(ToString::to_string).collect(),
            nameservers: s.nameservers.iter().map(ToString::to_string).collect(),
            override_local: s.override_local,
            split: s
                .split
                .iter()
                .map(|(d, v)| (d.clone(), v.iter().map(ToString::to_string).collect()))
                .collect(),
            cached: r.cached(),
            stats: r.stats,
            problem,
        }
    }

    /// Resolves `name` (of type `qtype`: A, AAAA, PTR, …) as a client of
    /// the resolver would, saying where the answer came from.
    pub async fn query(&self, name: &str, qtype: &str) -> Result<QueryReply, String> {
        let rtype: hickory_proto::rr::RecordType =
            qtype.to_ascii_uppercase().parse().map_err(|_| {
                format!("{qtype:?} is not a DNS record type (A, AAAA, PTR, MX, TXT, …)")
            })?;
        // A single label is a short name, as the search domain makes it.
        let domain = lock(&self.inner.resolver).settings().domain.clone();
        let full = if !name.contains('.') && name.parse::<IpAddr>().is_err() {
            format!("{name}.{domain}")
        } else {
            name.to_owned()
        };
        let wire = crate::dns::resolver::build_query(rand::random(), &full, rtype)
            .ok_or_else(|| format!("{name:?} is not a DNS name"))?;
        let t = Instant::now();
        let (reply, source) =
            server::resolve(&self.inner.resolver, &self.inner.forwards, &wire, false)
                .await
                .ok_or_else(|| "the resolver dropped the query".to_string())?;
        let (rcode, answers) = crate::dns::resolver::answer_summary(&reply)
            .ok_or_else(|| "the answer does not parse".to_string())?;
        Ok(QueryReply {
            name: full,
            qtype: rtype.to_string(),
            rcode,
            answers,
            source: source.to_string(),
            elapsed_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
