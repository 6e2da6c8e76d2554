//! A real `warren-coordinator` in a lab node, and its admin commands.
//!
//! The binary is the workspace's own build (`tests/run.sh` builds the
//! whole workspace first); it sits beside the `warren` binary. It serves
//! plain HTTP with `--insecure-http`, which is what the flag is for: the
//! lab's "internet" is made of namespaces this test owns.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::agent::WARREN;
use super::process::Output;
use super::{Lab, Node, ProcId};

/// The port the lab coordinator listens on: 443, the one port a
/// UDP-blocked gateway lets through.
pub const COORD_PORT: u16 = 443;

/// The token every lab coordinator and relay is given to serve its
/// counters off loopback (`--metrics-token-file`); [`relay_metrics`]
/// presents it.
pub const METRICS_TOKEN: &str = "lab-metrics-token-0123456789abcdef";

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(WARREN).with_file_name("warren-coordinator")
}

pub struct Coordinator {
    pub node: Node,
    pub ip: Ipv4Addr,
    pub data_dir: PathBuf,
    pub proc: ProcId,
    /// The `warren-coordinator` binary: the build's or an installed one.
    pub bin: PathBuf,
}

impl Coordinator {
    /// Starts `warren-coordinator serve` on `node` (its first address) with
    /// `extra` flags, and waits until it answers.
    pub fn start(lab: &Lab, node: &Node, extra: &[&str]) -> Coordinator {
        Coordinator::start_bin(lab, node, extra, coordinator_bin())
    }

    /// [`Coordinator::start`] running the binary at `bin`.
    pub fn start_bin(lab: &Lab, node: &Node, extra: &[&str], bin: PathBuf) -> Coordinator {
        let ip = node.ip;
        let data_dir = lab.dir().join(format!("coord-{}", node.name));
        let listen = format!("{ip}:{COORD_PORT}");
        let dir = data_dir.to_string_lossy().into_owned();
        let bin_s = bin.to_string_lossy().into_owned();
        let token = metrics_token_file(lab);
        let mut argv = vec![
            bin_s.as_str(),
            "--data-dir",
            &dir,
            "serve",
            "--listen",
            &listen,
            "--insecure-http",
            "--ephemeral-timeout",
            "30s",
            "--metrics-token-file",
            &token,
        ];
        argv.extend_from_slice(extra);
        let proc = lab.spawn(node, "coordinator", &argv);
        let url = format!("http://{ip}:{COORD_PORT}/key");
        let up = super::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            lab.exit_status(proc).is_some()
                || lab.exec(node, &["curl", "-sf", "-m", "1", &url]).ok()
        });
        assert!(
            up && lab.exit_status(proc).is_none(),
            "coordinator did not come up:\n{}",
            lab.log(proc)
        );
        Coordinator {
            node: node.clone(),
            ip,
            data_dir,
            proc,
            bin,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{COORD_PORT}", self.ip)
    }

    /// Runs an admin command (`token …`, `node …`) against the store.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> Output {
        let bin = self.bin.to_string_lossy();
        let dir = self.data_dir.to_string_lossy();
        let mut argv = vec![bin.as_ref(), "--data-dir", dir.as_ref()];
        argv.extend_from_slice(args);
        lab.exec(&self.node, &argv)
    }

    /// Creates a token with `flags`; returns (token, id).
    pub fn token(&self, lab: &Lab, flags: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(flags);
        let out = self.admin(lab, &args).expect_ok("token create");
        let mut lines = out.stdout.lines();
        let token = lines.next().unwrap_or_default().trim().to_owned();
        let id = lines
            .next()
            .and_then(|l| l.strip_prefix("# id "))
            .and_then(|l| l.split(';').next())
            .unwrap_or_default()
            .to_owned();
        assert!(!token.is_empty() && !id.is_empty(), "{}", out.stdout);
        (token, id)
    }
}

/// A standalone relay region: a `warren-coordinator relay` process on its
/// own node, published by the coordinator through `--relay-map` and let in
/// with a shared relay secret.
pub struct RelayRegion {
    pub node: Node,
    /// `http://<node>:443`, the region's URL in the map.
    pub url: String,
    pub proc: ProcId,
}

/// Starts a coordinator on `coord_node` with `extra` flags that publishes
/// one more region, `name` (id 2, STUN on 3478 and 3479), served by a
/// standalone relay on `relay_node`; waits until both answer.
pub fn start_with_region(
    lab: &Lab,
    coord_node: &Node,
    extra: &[&str],
    relay_node: &Node,
    name: &str,
) -> (Coordinator, RelayRegion) {
    start_with_keyed_region(lab, coord_node, extra, relay_node, name, None)
}

/// [`start_with_region`] whose relay map names `key` (a `warren genkey`
/// public key) as the region's relay key, whatever key the relay has.
pub fn start_with_keyed_region(
    lab: &Lab,
    coord_node: &Node,
    extra: &[&str],
    relay_node: &Node,
    name: &str,
    key: Option<&str>,
) -> (Coordinator, RelayRegion) {
    let ip = relay_node.ip;
    let url = format!("http://{ip}:{COORD_PORT}");
    let key_line = key.map(|k| format!("key = \"{k}\"\n")).unwrap_or_default();
    let map = lab.write_file(
        &format!("relay-map-{name}.toml"),
        &format!(
            "[[region]]\nid = 2\nname = \"{name}\"\nurl = \"{url}\"\n\
             stun = [\"{ip}:3478\", \"{ip}:3479\"]\n{key_line}"
        ),
    );
    let secret = lab.write_file("relay-secret", "lab-relay-secret-0123456789abcdef\n");
    let (map, secret) = (map.to_string_lossy(), secret.to_string_lossy());
    let mut flags = extra.to_vec();
    flags.extend_from_slice(&["--relay-map", &map, "--relay-secret-file", &secret]);
    let coord = Coordinator::start(lab, coord_node, &flags);

    let bin = coord.bin.to_string_lossy();
    let dir = lab.dir().join(format!("relay-{name}"));
    let dir = dir.to_string_lossy();
    let listen = format!("{ip}:{COORD_PORT}");
    let coord_url = coord.url();
    let token = metrics_token_file(lab);
    let proc = lab.spawn(
        relay_node,
        &format!("relay-{name}"),
        &[
            &bin,
            "--data-dir",
            &dir,
            "relay",
            "--listen",
            &listen,
            "--insecure-http",
            "--coordinator",
            &coord_url,
            "--secret-file",
            &secret,
            "--metrics-token-file",
            &token,
        ],
    );
    let metrics = format!("{url}/relay/metrics");
    let bearer = format!("Authorization: Bearer {METRICS_TOKEN}");
    let up = super::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        lab.exit_status(proc).is_some()
            || lab
                .exec(
                    relay_node,
                    &["curl", "-sf", "-m", "1", "-H", &bearer, &metrics],
                )
                .ok()
    });
    assert!(
        up && lab.exit_status(proc).is_none(),
        "relay {name} did not come up:\n{}",
        lab.log(proc)
    );
    let region = RelayRegion {
        node: relay_node.clone(),
        url,
        proc,
    };
    (coord, region)
}

/// The counters a relay serves on `GET <base_url>/relay/metrics`, fetched
/// from `from` (the relay's own node does: it is never firewalled).
pub fn relay_metrics(lab: &Lab, from: &Node, base_url: &str) -> serde_json::Value {
    let url = format!("{base_url}/relay/metrics");
    let bearer = format!("Authorization: Bearer {METRICS_TOKEN}");
    let out = lab
        .exec(from, &["curl", "-sf", "-m", "2", "-H", &bearer, &url])
        .expect_ok("relay metrics");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{url}: {e}: {}", out.stdout))
}

/// The HTTP status `GET <base_url>/relay/metrics` gets from `from` without
/// the token.
pub fn relay_metrics_status_anonymous(lab: &Lab, from: &Node, base_url: &str) -> String {
    let url = format!("{base_url}/relay/metrics");
    lab.exec(
        from,
        &[
            "curl",
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
    )
    .stdout
}

/// Writes [`METRICS_TOKEN`] to the lab's directory; returns its path.
fn metrics_token_file(lab: &Lab) -> String {
    lab.write_file("metrics-token", &format!("{METRICS_TOKEN}\n"))
        .to_string_lossy()
        .into_owned()
}
