//! The NAT lab: a small internet of network namespaces for integration tests.
//!
//! A [`Lab`] owns an "internet" namespace holding a bridge for the public
//! segment 11.11.0.0/24 (a non-reserved range, because miniupnpd refuses to
//! map behind a private WAN; it never leaves the lab), and any number of
//! nodes: public hosts on that segment, gateways of some [`Nat`] kind, and
//! hosts behind gateways on LANs 10.N.0.0/24. Gateways can sit behind other
//! gateways (double NAT). Nothing is connected to the machine's own network:
//! the internet namespace has no route beyond the lab's subnets, so lab
//! traffic cannot leave it.
//!
//! Built with the `ip` and `nft` commands rather than netlink crates: the
//! commands are what people debug the lab with, every step reads like the
//! shell a human would type, and setup cost is dominated by the kernel
//! anyway. Processes run in a namespace via `ip netns exec`; in-process code
//! can join a namespace on a dedicated thread ([`Lab::thread_in`]).
//!
//! Teardown happens in `Drop`, also when the test panics: processes get
//! SIGTERM then SIGKILL, namespaces are deleted, and when panicking every
//! process log is printed and the lab directory is kept for inspection.
//! Names carry the test process's pid, so concurrent labs never collide and
//! a new lab reaps what a killed run left behind.
//!
//! Every scenario starts with `let Some(lab) = Lab::new_or_skip() else {
//! return };`: without root the test is skipped with the reason printed,
//! and under `CI=true` that is a failure instead.

pub mod agent;
pub mod coord;
pub mod ipv6;
pub mod mesh;
pub mod nat;
pub mod netns;
pub mod process;
pub mod upnp;
pub mod wg;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub use nat::{Nat, Proto};
pub use process::{describe, poll_until, wait_for, Output};

use netns::must;
use process::{run_bounded, Proc};

/// Default bound on a one-shot command run with [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long teardown lets processes exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(3);
/// Address of the internet namespace's bridge: every public node's router.
pub const INTERNET_ROUTER: Ipv4Addr = Ipv4Addr::new(11, 11, 0, 1);

/// Returns whether the lab can run. Without root it prints why the test is
/// skipped and returns false, except under CI (`CI=true`) where a lab test
/// that cannot run is a failure. Scenarios call [`Lab::new_or_skip`]; this
/// is for the few that must do something before the lab exists.
#[track_caller]
pub fn can_run() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("lab tests need root (CAP_NET_ADMIN), and CI=true forbids skipping them");
    }
    eprintln!("skipping: lab tests need root (CAP_NET_ADMIN)");
    false
}

/// A namespace in the lab. Cheap to clone; all state lives in the [`Lab`].
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ns: String,
    /// Address on the node's uplink interface, which is always named
    /// `wan`: public for nodes on the internet, a LAN address otherwise.
    pub ip: Ipv4Addr,
    /// For gateways: their LAN.
    pub lan: Option<Lan>,
}

/// A gateway's LAN: a bridge named `lan` in the gateway's namespace.
#[derive(Clone, Debug)]
pub struct Lan {
    /// The gateway's own address on it, the hosts' default route.
    pub router: Ipv4Addr,
    /// First three octets of the /24.
    prefix: [u8; 3],
}

/// Handle to a process started with [`Lab::spawn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId(usize);

#[derive(Default)]
struct State {
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// Last octet of the next address on the public segment.
    next_public: u8,
    /// Next bridge port number in the internet namespace.
    next_port: u32,
    /// Next LAN index (10.N.0.0/24 for NAT, 11.11.N.0/24 when routed).
    next_lan: u8,
    /// Next host octet per gateway namespace.
    next_host: HashMap<String, u8>,
}

/// Where a new node's `wan` interface is plugged in.
enum Uplink<'a> {
    Internet,
    Lan(&'a Node),
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    id: String,
    dir: Option<tempfile::TempDir>,
    internet: String,
    state: Mutex<State>,
}

impl Lab {
    /// The lab, or `None` (with the reason printed) when it cannot run
    /// here: the one preamble of every lab scenario.
    #[track_caller]
    pub fn new_or_skip() -> Option<Lab> {
        can_run().then(Lab::new)
    }

    /// Builds an empty lab: just the internet namespace. Reaps namespaces of
    /// dead earlier runs first.
    pub fn new() -> Lab {
        netns::reap_stale();
        let id = netns::new_lab_id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("warren-lab-{id}-"))
            .tempdir()
            .expect("lab: create temp dir");
        let internet = netns::ns_name(&id, "inet");
        let lab = Lab {
            id,
            dir: Some(dir),
            internet: internet.clone(),
            state: Mutex::new(State {
                next_public: 10,
                next_lan: 1,
                ..State::default()
            }),
        };
        lab.new_ns(&internet);
        let r = format!("{INTERNET_ROUTER}/24");
        must(&[
            "ip", "-n", &internet, "link", "add", "br0", "type", "bridge",
        ]);
        must(&["ip", "-n", &internet, "addr", "add", &r, "dev", "br0"]);
        must(&["ip", "-n", &internet, "link", "set", "br0", "up"]);
        // Routes to public LANs behind `Nat::None` gateways go through here.
        netns::sysctl(&internet, "net.ipv4.ip_forward=1");
        lab
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not turn teardown into an abort.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_ns(&self, ns: &str) {
        // Record before creating, so a half-built namespace is still deleted.
        self.state().namespaces.push(ns.to_owned());
        netns::create(ns);
    }

    /// Directory for this lab's files (configs, keys, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("lab dir lives until drop").path()
    }

    /// Writes `contents` to `name` in the lab directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::write(&path, contents).expect("lab: write file");
        path
    }

    /// A fresh interface name unique on the whole machine (≤ 15 bytes).
    pub fn ifname(&self) -> String {
        netns::unique_ifname()
    }

    /// Plugs namespace `ns`'s new `wan` interface into `uplink`, addresses
    /// it and sets its default route. Returns its address.
    fn attach(&self, ns: &str, uplink: Uplink<'_>) -> Ipv4Addr {
        let (peer_ns, peer_if, bridge, ip, router) = match uplink {
            Uplink::Internet => {
                let mut st = self.state();
                let port = st.next_port;
                st.next_port += 1;
                let octet = st.next_public;
                st.next_public = octet.checked_add(1).expect("lab: public segment full");
                let ip = Ipv4Addr::new(11, 11, 0, octet);
                (
                    self.internet.clone(),
                    format!("p{port}"),
                    "br0",
                    ip,
                    INTERNET_ROUTER,
                )
            }
            Uplink::Lan(gw) => {
                let lan = gw.lan.as_ref().expect("lab: uplink node is not a gateway");
                let mut st = self.state();
                let next = st.next_host.entry(gw.ns.clone()).or_insert(2);
                let octet = *next;
                *next = octet.checked_add(1).expect("lab: LAN full");
                let [a, b, c] = lan.prefix;
                let ip = Ipv4Addr::new(a, b, c, octet);
                (gw.ns.clone(), format!("h{octet}"), "lan", ip, lan.router)
            }
        };
        must(&[
            "ip", "link", "add", "wan", "netns", ns, "type", "veth", "peer", "name", &peer_if,
            "netns", &peer_ns,
        ]);
        must(&[
            "ip", "-n", &peer_ns, "link", "set", &peer_if, "master", bridge, "up",
        ]);
        let cidr = format!("{ip}/24");
        must(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "wan"]);
        must(&["ip", "-n", ns, "link", "set", "wan", "up"]);
        let router = router.to_string();
        must(&["ip", "-n", ns, "route", "add", "default", "via", &router]);
        ip
    }

    /// A public host on the internet segment, with no NAT in front of it.
    pub fn public(&self, name: &str) -> Node {
        let ns = netns::ns_name(&self.id, name);
        self.new_ns(&ns);
        let ip = self.attach(&ns, Uplink::Internet);
        Node {
            name: name.into(),
            ns,
            ip,
            lan: None,
        }
    }

    /// A gateway of kind `nat` on the internet segment.
    pub fn gateway(&self, name: &str, nat: Nat) -> Node {
        self.build_gateway(name, nat, Uplink::Internet)
    }

    /// A gateway whose WAN is on `upstream`'s LAN: with two translating
    /// kinds this is double NAT.
    pub fn gateway_behind(&self, upstream: &Node, name: &str, nat: Nat) -> Node {
        assert!(
            nat.translates(),
            "lab: a routed (Nat::None) LAN is only reachable directly on the internet"
        );
        self.build_gateway(name, nat, Uplink::Lan(upstream))
    }

    fn build_gateway(&self, name: &str, nat: Nat, uplink: Uplink<'_>) -> Node {
        let ns = netns::ns_name(&self.id, name);
        self.new_ns(&ns);
        let ip = self.attach(&ns, uplink);
        let index = {
            let mut st = self.state();
            let i = st.next_lan;
            st.next_lan = i.checked_add(1).expect("lab: too many LANs");
            i
        };
        let prefix = if nat.translates() {
            [10, index, 0]
        } else {
            [11, 11, index]
        };
        let router = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 1);
        netns::sysctl(&ns, "net.ipv4.ip_forward=1");
        must(&["ip", "-n", &ns, "link", "add", "lan", "type", "bridge"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{router}/24"),
            "dev",
            "lan",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "lan", "up"]);
        // Hosts on one LAN talk through the bridge, as through a home
        // router's switch. Where br_netfilter is loaded (Docker loads it),
        // bridged frames would also cross this namespace's forward chain
        // and its drop policy; the knob is per namespace since Linux 5.3,
        // and absent without the module, hence no `must`.
        let _ = run_bounded(
            &[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=0",
            ],
            None,
            EXEC_TIMEOUT,
        );
        let rules = self.write_file(&format!("{name}.nft"), &nat.ruleset(ip));
        let rules = rules.to_string_lossy();
        must(&["ip", "netns", "exec", &ns, "nft", "-f", &rules]);
        if !nat.translates() {
            let net = format!("{}.{}.{}.0/24", prefix[0], prefix[1], prefix[2]);
            let via = ip.to_string();
            must(&[
                "ip",
                "-n",
                &self.internet,
                "route",
                "add",
                &net,
                "via",
                &via,
            ]);
        }
        let node = Node {
            name: name.into(),
            ns,
            ip,
            lan: Some(Lan { router, prefix }),
        };
        if nat == Nat::Upnp {
            let cidr = format!("{}.{}.{}.0/24", prefix[0], prefix[1], prefix[2]);
            upnp::start(self, &node, router, &cidr);
        }
        node
    }

    /// A host on `gateway`'s LAN, default route via the gateway.
    pub fn host_behind(&self, gateway: &Node, name: &str) -> Node {
        let ns = netns::ns_name(&self.id, name);
        self.new_ns(&ns);
        let ip = self.attach(&ns, Uplink::Lan(gateway));
        Node {
            name: name.into(),
            ns,
            ip,
            lan: None,
        }
    }

    /// Forwards `proto` traffic reaching `gateway`'s WAN at `public_port` to
    /// `host:host_port` (DNAT), like a port forward set up by hand on a
    /// home router.
    pub fn forward(
        &self,
        gateway: &Node,
        proto: Proto,
        public_port: u16,
        host: &Node,
        host_port: u16,
    ) {
        assert!(
            gateway.lan.is_some(),
            "lab: {} is not a gateway",
            gateway.name
        );
        let to = std::net::SocketAddrV4::new(host.ip, host_port);
        let rule = nat::forward_rule(proto, public_port, to);
        let mut argv = vec!["ip", "netns", "exec", &gateway.ns, "nft"];
        argv.extend(rule.iter().map(String::as_str));
        must(&argv);
    }

    /// Puts `rule` (nft words such as `["iifname", "lan", "drop"]`) first in
    /// `gateway`'s forward filter, ahead of its NAT kind's own rules: how a
    /// test closes a path that kind of gateway leaves open.
    pub fn filter_first(&self, gateway: &Node, rule: &[&str]) {
        let mut argv = vec![
            "nft",
            "insert",
            "rule",
            "inet",
            nat::FILTER_TABLE,
            "forward",
        ];
        argv.extend_from_slice(rule);
        self.exec(gateway, &argv)
            .expect_ok(&format!("nft forward rule `{}`", rule.join(" ")));
    }

    /// Runs `argv` in `node` to completion, bounded by [`EXEC_TIMEOUT`].
    pub fn exec(&self, node: &Node, argv: &[&str]) -> Output {
        self.exec_with(node, argv, None, EXEC_TIMEOUT)
    }

    /// Runs `argv` in `node` with `input` on stdin, bounded by `timeout`.
    pub fn exec_with(
        &self,
        node: &Node,
        argv: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Output {
        let mut full = vec!["ip", "netns", "exec", &node.ns];
        full.extend_from_slice(argv);
        run_bounded(&full, input, timeout)
            .unwrap_or_else(|e| panic!("lab: cannot run {argv:?}: {e}"))
    }

    /// Starts `argv` in `node` in the background, output to `<name>.log` in
    /// the lab directory. It is stopped at teardown if still running.
    pub fn spawn(&self, node: &Node, name: &str, argv: &[&str]) -> ProcId {
        let mut full = vec!["ip", "netns", "exec", &node.ns];
        full.extend_from_slice(argv);
        let log = self.dir().join(format!("{name}.log"));
        let proc =
            Proc::start(name, &full, &log).unwrap_or_else(|e| panic!("lab: spawn {argv:?}: {e}"));
        let mut st = self.state();
        st.procs.push(proc);
        ProcId(st.procs.len() - 1)
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to a spawned process.
    pub fn signal(&self, id: ProcId, sig: i32) {
        self.state().procs[id.0].signal(sig);
    }

    /// Waits at most `timeout` for a spawned process to exit.
    pub fn wait_exit(&self, id: ProcId, timeout: Duration) -> Option<ExitStatus> {
        process::poll_until(timeout, Duration::from_millis(20), || {
            self.exit_status(id).is_some()
        });
        self.exit_status(id)
    }

    /// The exit status of a spawned process, if it has exited.
    pub fn exit_status(&self, id: ProcId) -> Option<ExitStatus> {
        self.state().procs[id.0].try_status()
    }

    /// The pid of a spawned process.
    pub fn pid(&self, id: ProcId) -> i32 {
        self.state().procs[id.0].pid()
    }

    /// Everything a spawned process has written so far.
    pub fn log(&self, id: ProcId) -> String {
        self.state().procs[id.0].read_log()
    }

    /// Runs `f` on a new thread inside `node`'s namespace: sockets it opens
    /// live there. Join the handle to get the result.
    pub fn thread_in<T, F>(&self, node: &Node, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = node.ns.clone();
        std::thread::Builder::new()
            .name(format!("lab-{}", node.name))
            .spawn(move || {
                netns::enter(&ns);
                f()
            })
            .expect("lab: spawn thread")
    }

    /// One ICMP echo from `from` to `to`, waiting at most a second.
    pub fn ping(&self, from: &Node, to: impl ToString) -> bool {
        let to = to.to_string();
        self.exec_with(
            from,
            &["ping", "-n", "-q", "-c", "1", "-W", "1", &to],
            None,
            Duration::from_secs(5),
        )
        .ok()
    }

    /// Polls [`Lab::ping`] until it succeeds or `timeout` passes.
    pub fn ping_within(&self, from: &Node, to: impl ToString, timeout: Duration) -> bool {
        let to = to.to_string();
        process::poll_until(timeout, Duration::from_millis(100), || self.ping(from, &to))
    }

    /// Names of the network interfaces in `node`.
    pub fn links(&self, node: &Node) -> Vec<String> {
        let out = self
            .exec(node, &["ip", "-o", "link", "show"])
            .expect_ok("ip link show");
        // Lines look like "3: wan@if4: <...>": the name is the second field.
        out.stdout
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }

    /// Whether interface `ifname` exists in `node`.
    pub fn has_link(&self, node: &Node, ifname: &str) -> bool {
        self.links(node).iter().any(|l| l == ifname)
    }

    /// Names of every namespace this lab created (for the cleanup test).
    pub fn namespaces(&self) -> Vec<String> {
        self.state().namespaces.clone()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let mut st = self.state();
        // Signal everything first so the grace periods overlap.
        for p in &st.procs {
            p.signal(libc::SIGTERM);
        }
        for p in &mut st.procs {
            p.terminate(GRACE);
        }
        if panicking {
            for p in &st.procs {
                eprintln!("===== lab process {} ({}) =====", p.name, p.log.display());
                let log = p.read_log();
                let lines: Vec<&str> = log.lines().collect();
                let from = lines.len().saturating_sub(200);
                for line in &lines[from..] {
                    eprintln!("{line}");
                }
            }
        }
        for ns in st.namespaces.iter().rev() {
            netns::destroy(ns);
        }
        drop(st);
        // `WARREN_LAB_KEEP=1` keeps the logs of a passing test too, to read
        // how long each step took.
        if panicking || std::env::var_os("WARREN_LAB_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("lab files kept in {}", dir.keep().display());
            }
        }
    }
}
