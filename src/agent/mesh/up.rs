//! `warren up` in the daemon: join a network, re-join the one left with
//! `down`, or change the settings of a node that is up.
//!
//! Settings are the coordinator URL, the host name, the advertised tags and
//! the CA file. Only what the caller passes is compared or changed: a flag
//! left out keeps its current value, never its default (so nobody has to
//! repeat every flag of the first `up`). When the node is already up and a
//! passed setting differs, `up` answers [`ErrorCode::SettingsDiffer`] with
//! each difference spelt out and changes nothing, unless the caller asked to
//! `reconfigure`: a mistyped URL must not silently move a server to another
//! network. The comparison is a pure function ([`differences`]) so its
//! cases are unit-tested without a coordinator.
//!
//! The answer comes once the coordinator accepted the registration; the CLI
//! then follows the map and tunnel stages through `status` (see
//! [`crate::cli::up`]). One request and one answer keep the socket protocol
//! as simple as every other command.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::handle::MeshReply;
use super::login::{system_hostname, Login};
use super::session::{api_err, Session, UP_TIMEOUT};
use super::Mesh;
use crate::agent::state::AgentState;
use crate::api::mesh::{UpArgs, UpReply};
use crate::api::{ApiError, ErrorCode};
use crate::control::advertise::{self, RouteError};
use crate::control::types::normalize_tags;
use crate::keys::NodeKey;
use ipnet::IpNet;

/// One setting `up` was asked to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The flag's name without dashes: `coordinator`, `hostname`,
    /// `advertise-tags`, `ca-file`.
    pub setting: &'static str,
    pub current: String,
    pub wanted: String,
}

/// The routes `up` asks this node to advertise: the subnets and the exit
/// choice passed, each kept from `current` when not passed; `None` when
/// neither flag was given.
pub fn wanted_routes(
    current: Option<&Login>,
    args: &UpArgs,
) -> Result<Option<Vec<IpNet>>, RouteError> {
    if args.advertise_routes.is_none() && args.advertise_exit_node.is_none() {
        return Ok(None);
    }
    let now: &[IpNet] = current.map_or(&[], |c| &c.routes);
    let subnets: Vec<IpNet> = match &args.advertise_routes {
        Some(r) => r.clone(),
        None => now
            .iter()
            .filter(|r| r.prefix_len() != 0)
            .copied()
            .collect(),
    };
    let exit = args
        .advertise_exit_node
        .unwrap_or_else(|| advertise::is_exit(now));
    advertise::advertised(&subnets, exit, current.and_then(|c| c.ula)).map(Some)
}

/// The settings of `args` (tags already normalised, routes from
/// [`wanted_routes`]) that differ from `current`. Settings not passed are
/// never a difference.
pub fn differences(
    current: &Login,
    args: &UpArgs,
    tags: Option<&[String]>,
    routes: Option<&[IpNet]>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut check = |setting, current: String, wanted: Option<String>| {
        if let Some(wanted) = wanted {
            if wanted != current {
                out.push(Difference {
                    setting,
                    current,
                    wanted,
                });
            }
        }
    };
    let url = |u: &str| u.trim_end_matches('/').to_owned();
    check(
        "coordinator",
        url(&current.coordinator),
        args.coordinator.as_deref().map(url),
    );
    check("hostname", current.hostname.clone(), args.hostname.clone());
    check(
        "advertise-tags",
        tag_list(&current.tags),
        tags.map(tag_list),
    );
    check(
        "ca-file",
        path_text(current.ca_file.as_ref()),
        args.ca_file.as_ref().map(|p| path_text(Some(p))),
    );
    let subnets = |r: &[IpNet]| {
        let list: Vec<String> = r
            .iter()
            .filter(|r| r.prefix_len() != 0)
            .map(ToString::to_string)
            .collect();
        if list.is_empty() {
            "(none)".into()
        } else {
            list.join(",")
        }
    };
    check(
        "advertise-routes",
        subnets(&current.routes),
        routes.map(subnets),
    );
    check(
        "advertise-exit-node",
        advertise::is_exit(&current.routes).to_string(),
        routes.map(|r| advertise::is_exit(r).to_string()),
    );
    check(
        "accept-routes",
        current.accept_routes.to_string(),
        args.accept_routes.map(|a| a.to_string()),
    );
    check(
        "snat-subnet-routes",
        current.snat_subnet_routes.to_string(),
        args.snat_subnet_routes.map(|a| a.to_string()),
    );
    let exit = |k: Option<&str>| match k.map(str::trim) {
        None | Some("") => "(none)".to_string(),
        Some(k) => k.to_string(),
    };
    check(
        "exit-node",
        exit(current.exit_node.map(|k| k.to_string()).as_deref()),
        args.exit_node.as_deref().map(|k| exit(Some(k))),
    );
    check(
        "accept-dns",
        current.accept_dns.to_string(),
        args.accept_dns.map(|a| a.to_string()),
    );
    check(
        "exit-node-allow-lan-access",
        current.exit_node_allow_lan_access.to_string(),
        args.exit_node_allow_lan_access.map(|a| a.to_string()),
    );
    out
}

/// The exit node `args` asks for: `None` when not passed, `Some(None)` to
/// stop using one, else a peer that offers one (the API server already
/// turned the name into its key).
fn wanted_exit(state: &AgentState, args: &UpArgs) -> Result<Option<Option<NodeKey>>, ApiError> {
    let Some(given) = args.exit_node.as_deref().map(str::trim) else {
        return Ok(None);
    };
    if given.is_empty() {
        return Ok(Some(None));
    }
    let key: NodeKey = given.parse().map_err(|_| {
        api_err(
            ErrorCode::BadRequest,
            format!("{given:?} is not a peer's key"),
        )
    })?;
    if !state.offers_exit(&key) {
        return Err(api_err(
            ErrorCode::BadRequest,
            format!(
                "{} does not offer an exit node: it must run `warren up --advertise-exit-node` \
                 and an admin approve it (`warren-coordinator route approve`, or the \
                 policy's autoApprovers.exitNode)",
                key.short()
            ),
        ));
    }
    Ok(Some(Some(key)))
}

fn tag_list(tags: &[String]) -> String {
    if tags.is_empty() {
        "(none)".into()
    } else {
        tags.join(",")
    }
}

fn path_text(p: Option<&PathBuf>) -> String {
    p.map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

/// The refusal a person reads: every difference, and how to apply them.
pub fn refusal(diffs: &[Difference]) -> String {
    let mut msg = String::from("this node is already up with other settings; nothing changed:\n");
    for d in diffs {
        msg.push_str(&format!(
            "  --{}: is {}, you asked for {}\n",
            d.setting, d.current, d.wanted
        ));
    }
    msg.push_str(
        "run the same `warren up` with --reconfigure to apply them \
         (settings you leave out keep their current values)",
    );
    msg
}

/// The login `up` asks for: `current` with what `args` passes laid over it.
fn merged(
    current: Option<&Login>,
    args: &UpArgs,
    tags: Option<Vec<String>>,
    routes: Option<Vec<IpNet>>,
    exit: Option<Option<NodeKey>>,
) -> Option<Login> {
    let coordinator = args
        .coordinator
        .clone()
        .or_else(|| current.map(|c| c.coordinator.clone()))?;
    // Another coordinator is another network, with its own /48.
    let ula = current
        .filter(|c| c.coordinator == coordinator)
        .and_then(|c| c.ula);
    Some(Login {
        coordinator,
        hostname: args
            .hostname
            .clone()
            .or_else(|| current.map(|c| c.hostname.clone()))
            .unwrap_or_else(system_hostname),
        ca_file: args
            .ca_file
            .clone()
            .or_else(|| current.and_then(|c| c.ca_file.clone())),
        // The PEM goes with the file it came from: a new `--ca-file`
        // brings its own, else the current one stays.
        ca_pem: match &args.ca_file {
            Some(_) => args.ca_pem.clone(),
            None => current.and_then(|c| c.ca_pem.clone()),
        },
        ula,
        tags: tags
            .or_else(|| current.map(|c| c.tags.clone()))
            .unwrap_or_default(),
        routes: routes
            .or_else(|| current.map(|c| c.routes.clone()))
            .unwrap_or_default(),
        accept_routes: args
            .accept_routes
            .or_else(|| current.map(|c| c.accept_routes))
            .unwrap_or(false),
        snat_subnet_routes: args
            .snat_subnet_routes
            .or_else(|| current.map(|c| c.snat_subnet_routes))
            .unwrap_or(true),
        exit_node: exit.unwrap_or_else(|| current.and_then(|c| c.exit_node)),
        exit_node_allow_lan_access: args
            .exit_node_allow_lan_access
            .or_else(|| current.map(|c| c.exit_node_allow_lan_access))
            .unwrap_or(false),
        accept_dns: args
            .accept_dns
            .or_else(|| current.map(|c| c.accept_dns))
            .unwrap_or(true),
        stopped: false,
    })
}

impl Mesh {
    pub(super) async fn up(&mut self, args: UpArgs) -> Result<MeshReply, ApiError> {
        let tags = match &args.advertise_tags {
            Some(t) => {
                Some(normalize_tags(t).map_err(|e| api_err(ErrorCode::BadRequest, e.to_string()))?)
            }
            None => None,
        };
        if args.token.is_some() && args.coordinator.is_none() {
            return Err(api_err(
                ErrorCode::BadRequest,
                "a token needs --coordinator too",
            ));
        }
        let current = self.session.as_ref().map(|s| s.login.clone());
        let routes = wanted_routes(current.as_ref(), &args)
            .map_err(|e| api_err(ErrorCode::BadRequest, e.to_string()))?;
        let exit = wanted_exit(&self.state, &args)?;
        let diffs = current
            .as_ref()
            .map(|c| differences(c, &args, tags.as_deref(), routes.as_deref()))
            .unwrap_or_default();
        let running = current.as_ref().is_some_and(|c| !c.stopped);
        if running && !diffs.is_empty() && !args.reconfigure {
            return Err(api_err(ErrorCode::SettingsDiffer, refusal(&diffs)));
        }
        let changed: Vec<String> = diffs.iter().map(|d| d.setting.to_string()).collect();
        if let Some(s) = self.session.as_mut().filter(|_| diffs.is_empty()) {
            // Nothing to change: already up, or back up after `down`.
            if s.login.stopped {
                s.login.stopped = false;
                let _ = s.login.save(&self.state_dir);
            }
            let reply = up_reply(&s.login, &self.state, changed);
            if !s.is_active() {
                self.start_following(true);
            }
            return reply;
        }
        let Some(login) = merged(current.as_ref(), &args, tags, routes, exit) else {
            return Err(api_err(
                ErrorCode::NotJoined,
                "not joined to any network: give --coordinator URL and --token",
            ));
        };
        let changed = if current.is_none() {
            vec!["coordinator".to_string()]
        } else {
            changed
        };
        self.register_inline(login, &args, changed).await
    }

    /// Registers with `login`'s settings and, once accepted, follows that
    /// network. A refusal or timeout leaves everything as it was.
    async fn register_inline(
        &mut self,
        login: Login,
        args: &UpArgs,
        changed: Vec<String>,
    ) -> Result<MeshReply, ApiError> {
        let client = login
            .client(
                self.key.clone(),
                &self.state_dir,
                self.relays.insecure_http(),
            )
            .map_err(|e| api_err(ErrorCode::BadRequest, e))?;
        // The API server gives a request 30 s in all; stay well inside it.
        let wait = args
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(UP_TIMEOUT)
            .min(UP_TIMEOUT);
        let reg = tokio::time::timeout(
            wait,
            client.register_advertising(
                args.token.as_deref(),
                &login.hostname,
                self.disco_key(),
                &login.advertised(),
            ),
        )
        .await
        .map_err(|_| {
            api_err(
                ErrorCode::Coordinator,
                format!(
                    "no answer from the coordinator {} within {}s: check the URL and that it is reachable from this host",
                    login.coordinator,
                    wait.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            api_err(
                ErrorCode::Coordinator,
                format!("the coordinator {} refused: {e}", login.coordinator),
            )
        })?;
        // Accepted: whatever network this node followed before is left.
        let same_network = self
            .session
            .as_ref()
            .is_some_and(|s| s.login.coordinator == login.coordinator);
        if self.session.is_some() && !same_network {
            self.leave();
        }
        if let Err(e) = login.save(&self.state_dir) {
            tracing::warn!(error = %e, "cannot save the login; a restart will need `warren up`");
        }
        let relay_tls = login
            .ca_pem()
            .ok()
            .flatten()
            .and_then(|pem| crate::dial::tls_config_with_ca(&pem).ok());
        self.relays.set_tls(relay_tls);
        // Same network again: the open map stream carries on, and (it
        // sends no new `Connected`) so does the state's standing.
        let stream = self.session.take().and_then(|s| s.stream);
        let keep_stream = stream.is_some();
        self.session = Some(Session {
            login,
            client,
            stream,
        });
        self.state.registered(Instant::now(), &reg, keep_stream);
        if let Some(l) = self.session.as_ref().map(|s| &s.login) {
            let (accept, exit, lan) = (l.accept_routes, l.exit_node, l.exit_node_allow_lan_access);
            self.state.set_accept_routes(Instant::now(), accept);
            self.state.set_exit_node(Instant::now(), exit, lan);
        }
        // A changed --snat-subnet-routes applies to what is served now.
        self.serve();
        if !keep_stream {
            self.start_following(false);
        }
        let s = self
            .session
            .as_ref()
            .ok_or_else(|| api_err(ErrorCode::Internal, "session vanished during `up`"))?;
        up_reply(&s.login, &self.state, changed)
    }
}

fn up_reply(
    login: &Login,
    state: &AgentState,
    changed: Vec<String>,
) -> Result<MeshReply, ApiError> {
    let control = state.control();
    let reply = UpReply {
        coordinator: login.coordinator.clone(),
        name: control.and_then(|c| c.name.clone()).unwrap_or_default(),
        addresses: control.map(|c| c.addresses.clone()).unwrap_or_default(),
        tags: login.tags.clone(),
        changed,
    };
    Ok(MeshReply::Up(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Login {
        Login {
            coordinator: "https://coord.example:8443".into(),
            hostname: "web1".into(),
            ca_file: None,
            ca_pem: None,
            ula: None,
            tags: vec!["tag:web".into()],
            routes: vec![],
            accept_routes: false,
            snat_subnet_routes: true,
            exit_node: None,
            exit_node_allow_lan_access: false,
            accept_dns: true,
            stopped: false,
        }
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_left_out_are_never_a_difference() {
        let args = UpArgs::default();
        assert!(differences(&login(), &args, None, None).is_empty());
        let m = merged(Some(&login()), &args, None, None, None).unwrap();
        assert_eq!(m, login());
    }

    #[test]
    fn same_values_are_no_difference() {
        let args = UpArgs {
            coordinator: Some("https://coord.example:8443/".into()),
            hostname: Some("web1".into()),
            token: Some("ignored".into()),
            ..Default::default()
        };
        let t = tags(&["tag:web"]);
        assert!(differences(&login(), &args, Some(&t), None).is_empty());
    }

    #[test]
    fn each_differing_setting_is_named_with_both_values() {
        let args = UpArgs {
            coordinator: Some("https://other:8443".into()),
            hostname: Some("web2".into()),
            ca_file: Some("/etc/warren/ca.pem".into()),
            ca_pem: None,
            ..Default::default()
        };
        let t = tags(&["tag:db", "tag:web"]);
        let d = differences(&login(), &args, Some(&t), None);
        let names: Vec<_> = d.iter().map(|d| d.setting).collect();
        assert_eq!(
            names,
            ["coordinator", "hostname", "advertise-tags", "ca-file"]
        );
        assert_eq!(d[1].current, "web1");
        assert_eq!(d[1].wanted, "web2");
        assert_eq!(d[2].current, "tag:web");
        assert_eq!(d[2].wanted, "tag:db,tag:web");
        assert_eq!(d[3].current, "(none)");
        let msg = refusal(&d);
        assert!(msg.contains("nothing changed"), "{msg}");
        assert!(
            msg.contains("--hostname: is web1, you asked for web2"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "--coordinator: is https://coord.example:8443, you asked for https://other:8443"
            ),
            "{msg}"
        );
        assert!(msg.contains("--reconfigure"), "{msg}");
    }

    #[test]
    fn clearing_tags_is_a_difference() {
        let d = differences(&login(), &UpArgs::default(), Some(&[]), None);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].wanted, "(none)");
    }

    #[test]
    fn merge_changes_only_what_is_passed() {
        let args = UpArgs {
            hostname: Some("web2".into()),
            ..Default::default()
        };
        let m = merged(Some(&login()), &args, None, None, None).unwrap();
        assert_eq!(m.hostname, "web2");
        assert_eq!(m.coordinator, login().coordinator);
        assert_eq!(m.tags, login().tags);
        let m = merged(Some(&login()), &UpArgs::default(), Some(vec![]), None, None).unwrap();
        assert!(m.tags.is_empty());
        assert_eq!(m.hostname, "web1");
        // A first join needs a coordinator.
        assert!(merged(None, &UpArgs::default(), None, None, None).is_none());
        let first = UpArgs {
            coordinator: Some("http://c".into()),
            ..Default::default()
        };
        let m = merged(None, &first, None, None, None).unwrap();
        assert_eq!(m.hostname, system_hostname());
        assert!(m.tags.is_empty());
    }

    #[test]
    fn routes_change_only_as_passed_and_are_compared_as_set_and_exit_choice() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut current = login();
        current.routes = vec![net("0.0.0.0/0"), net("10.0.0.0/24"), net("::/0")];
        // Nothing passed: nothing wanted, no difference.
        assert_eq!(wanted_routes(Some(&current), &UpArgs::default()), Ok(None));
        // Only --advertise-routes: the exit choice is kept.
        let args = UpArgs {
            advertise_routes: Some(vec![net("10.0.1.0/24")]),
            ..Default::default()
        };
        let routes = wanted_routes(Some(&current), &args).unwrap().unwrap();
        assert_eq!(
            routes,
            vec![net("0.0.0.0/0"), net("10.0.1.0/24"), net("::/0")]
        );
        let d = differences(&current, &args, None, Some(&routes));
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].setting, d[0].current.as_str(), d[0].wanted.as_str()),
            ("advertise-routes", "10.0.0.0/24", "10.0.1.0/24")
        );
        // Only --advertise-exit-node=false: the subnets are kept.
        let args = UpArgs {
            advertise_exit_node: Some(false),
            ..Default::default()
        };
        let routes = wanted_routes(Some(&current), &args).unwrap().unwrap();
        assert_eq!(routes, vec![net("10.0.0.0/24")]);
        let d = differences(&current, &args, None, Some(&routes));
        assert_eq!(
            d.iter().map(|d| d.setting).collect::<Vec<_>>(),
            ["advertise-exit-node"]
        );
        let m = merged(Some(&current), &args, None, Some(routes.clone()), None).unwrap();
        assert_eq!(m.routes, routes);
        // A bad route is refused before anything is asked of anyone.
        let args = UpArgs {
            advertise_routes: Some(vec![net("100.64.1.0/24")]),
            ..Default::default()
        };
        assert!(wanted_routes(Some(&current), &args).is_err());
    }
}
