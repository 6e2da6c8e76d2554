//! `warren-coordinator`: the control server and its administration.
//!
//! `serve` runs the server (with its STUN server and embedded relay);
//! `relay` runs a standalone relay for another region; `token …` and
//! `node …` work on the store directly (the same `--data-dir` /
//! `--database` as the server's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use warren_coordinator::admin_routes;
use warren_coordinator::relay::RelayLimits;
use warren_coordinator::relay_map::{self, EmbeddedRegion};
use warren_coordinator::store::{NewToken, Store};
use warren_coordinator::{admin, server, standalone};

/// mimalloc rather than the system's allocator: a reconnect storm at
/// 10,000 streams briefly holds hundreds of megabytes of map lines in
/// flight, and glibc kept the freed pages (RSS stayed at the storm's peak,
/// 0.9–1.6 GB from run to run), where mimalloc gives them back (issue 19;
/// docs/architecture.md, "Memory").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "warren-coordinator",
    version,
    about = "warren's control server"
)]
struct Cli {
    /// Where the keys (coordinator.key, relay.key) and the SQLite database live.
    #[arg(
        long,
        global = true,
        env = "WARREN_COORDINATOR_DATA_DIR",
        default_value = "/var/lib/warren-coordinator"
    )]
    data_dir: PathBuf,
    /// A postgres:// URL to use PostgreSQL (shared by replicas) instead of SQLite.
    /// It may hold a password: prefer --database-file, which keeps it out
    /// of the process list and of /etc/default.
    #[arg(
        long,
        global = true,
        env = "WARREN_COORDINATOR_DATABASE",
        conflicts_with = "database_file"
    )]
    database: Option<String>,
    /// A file holding the database URL (one line; keep it mode 0600 or 0640).
    #[arg(
        long,
        global = true,
        env = "WARREN_COORDINATOR_DATABASE_FILE",
        value_name = "FILE"
    )]
    database_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the control server, its STUN server and the embedded relay.
    Serve(ServeArgs),
    /// Run a standalone relay (and STUN server) for another region.
    Relay(RelayArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registered nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Users, the owners of nodes.
    #[command(subcommand)]
    User(UserCmd),
    /// The access policy (Tailscale's format, HuJSON).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Routes nodes advertise (subnet routers, exit nodes): they carry
    /// traffic once approved.
    #[command(subcommand)]
    Route(RouteCmd),
}

#[derive(Subcommand, Debug)]
enum RouteCmd {
    /// Every node's advertised and approved routes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Approve routes of a node (by id, name or key); an exit node's are
    /// 0.0.0.0/0 and ::/0.
    Approve {
        node: String,
        #[arg(required = true)]
        routes: Vec<ipnet::IpNet>,
        #[arg(long)]
        json: bool,
    },
    /// Withdraw the approval of routes of a node.
    Reject {
        node: String,
        #[arg(required = true)]
        routes: Vec<ipnet::IpNet>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create a user; their tokens join nodes they own.
    Create {
        email: String,
        /// Short name (default: the email's local part).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "")]
        display_name: String,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a user (refused while they own nodes, unless --force, which
    /// removes those nodes too).
    Remove {
        user: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validate a policy file, run its tests, then store and apply it.
    Set {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the stored policy as it was written.
    Get {
        #[arg(long)]
        json: bool,
    },
    /// Remove the policy: every node may reach every other again.
    Clear {
        #[arg(long)]
        json: bool,
    },
    /// Validate a policy file and run its tests, storing nothing.
    Check {
        file: PathBuf,
        /// Judge it against this inventory (offline) instead of the network.
        #[arg(long)]
        nodes: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The compiled packet filter of NODE, or of every node (JSON).
    Filter {
        node: Option<String>,
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        nodes: Option<PathBuf>,
        /// Accepted for symmetry: the output is always JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which rule lets SRC reach DST[:PORT], or that none does.
    Explain {
        src: String,
        dst: String,
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        nodes: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// The policy commands that need no store: with an inventory file given.
async fn offline(cmd: &Cmd) -> Option<anyhow::Result<String>> {
    use warren_coordinator::admin_policy as ap;
    let r = match cmd {
        Cmd::Policy(PolicyCmd::Check {
            file,
            nodes: Some(n),
            json,
        }) => ap::policy_check(None, file, Some(n), *json).await,
        Cmd::Policy(PolicyCmd::Filter {
            node,
            policy: Some(p),
            nodes: Some(n),
            ..
        }) => ap::policy_filter(None, node.as_deref(), Some(p), Some(n)).await,
        Cmd::Policy(PolicyCmd::Explain {
            src,
            dst,
            proto,
            policy: Some(p),
            nodes: Some(n),
            json,
        }) => ap::policy_explain(None, src, dst, proto, Some(p), Some(n), *json).await,
        _ => return None,
    };
    Some(r.map_err(anyhow::Error::from))
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// How long an ephemeral node may stay offline before it is removed.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    ephemeral_timeout: Duration,
    /// Map stream keepalive interval.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// Send map streams as zstd frames to agents that ask (about a third
    /// of the bytes; see the README's figures before turning it on).
    #[arg(long)]
    compress_maps: bool,
    /// The URL agents use for this coordinator (https://host[:port]); the
    /// embedded relay is published at <URL>/relay. Needed when --listen is
    /// a wildcard address.
    #[arg(long)]
    public_url: Option<String>,
    #[command(flatten)]
    stun: StunArgs,
    /// STUN address to publish in the relay map (repeatable; default: the
    /// STUN listening addresses).
    #[arg(long = "stun-advertise", value_name = "ADDR")]
    stun_advertise: Vec<SocketAddr>,
    /// The embedded relay's region id.
    #[arg(long, default_value_t = 1)]
    region_id: u16,
    /// The embedded relay's region name.
    #[arg(long, default_value = "default")]
    region_name: String,
    /// Run no embedded relay (and publish no region for it).
    #[arg(long)]
    no_relay: bool,
    /// TOML file listing standalone relays' regions ([[region]] id, name,
    /// url, stun = [...]) to publish after the embedded one.
    #[arg(long, value_name = "FILE")]
    relay_map: Option<PathBuf>,
    /// File holding the secret standalone relays prove on the node feed
    /// (GET /api/v1/relay/nodes); without it the feed is off.
    #[arg(long, value_name = "FILE")]
    relay_secret_file: Option<PathBuf>,
    /// The network's DNS domain: nodes are NAME.DOMAIN [default: the
    /// file's, else warren.internal].
    #[arg(long, value_name = "DOMAIN")]
    dns_domain: Option<String>,
    /// TOML file with the network's DNS settings: a [dns] table with
    /// domain, nameservers, override_local, [dns.split] and
    /// [[dns.extra_records]] (README, "Names and DNS").
    #[arg(long, value_name = "FILE")]
    dns_config: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// TLS, or the lab's plain HTTP (same rule for `serve` and `relay`).
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// PEM certificate chain for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address, and for `relay` to a
    /// coordinator off loopback (test labs only).
    #[arg(long)]
    insecure_http: bool,
}

#[derive(clap::Args, Debug)]
struct StunArgs {
    /// STUN (UDP) address [default: the listen IP, port 3478].
    #[arg(long, value_name = "ADDR")]
    stun_listen: Option<SocketAddr>,
    /// A second STUN port, so agents can tell endpoint-dependent mappings
    /// [default: the STUN IP, port + 1].
    #[arg(long, value_name = "ADDR")]
    stun_alt_listen: Option<SocketAddr>,
    /// Only one STUN port: agents then cannot tell EIM from EDM unless
    /// another region's STUN server answers too.
    #[arg(long, conflicts_with = "stun_alt_listen")]
    no_stun_alt: bool,
    /// Run no STUN server.
    #[arg(long, conflicts_with_all = ["stun_listen", "stun_alt_listen"])]
    no_stun: bool,
}

impl StunArgs {
    fn sockets(&self, listen: SocketAddr) -> Vec<SocketAddr> {
        if self.no_stun {
            return Vec::new();
        }
        let primary = self
            .stun_listen
            .unwrap_or_else(|| SocketAddr::new(listen.ip(), 3478));
        // Netcheck tells endpoint-dependent mapping by comparing what two
        // server addresses see, so a lone coordinator serves two ports.
        let alt = match (self.stun_alt_listen, self.no_stun_alt) {
            (Some(a), _) => Some(a),
            (None, true) => None,
            (None, false) => primary
                .port()
                .checked_add(1)
                .map(|p| SocketAddr::new(primary.ip(), p)),
        };
        std::iter::once(primary).chain(alt).collect()
    }
}

#[derive(clap::Args, Debug)]
struct RelayArgs {
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// The coordinator's URL, whose node feed says who may connect.
    #[arg(long, value_name = "URL")]
    coordinator: String,
    /// PEM CA certificates to trust for the coordinator (default: public roots).
    #[arg(long, value_name = "FILE")]
    coordinator_ca: Option<PathBuf>,
    /// File holding the relay secret (the coordinator's --relay-secret-file).
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    #[command(flatten)]
    stun: StunArgs,
    /// How often to log the relay's counters.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    health_every: Duration,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Who may read `GET /relay/metrics` (same rule for `serve` and `relay`).
#[derive(clap::Args, Debug)]
struct MetricsArgs {
    /// File holding a token (16+ characters) that reads the relay's
    /// counters as `Authorization: Bearer <token>`; without it only
    /// loopback clients may.
    #[arg(long, value_name = "FILE")]
    metrics_token_file: Option<PathBuf>,
}

impl MetricsArgs {
    fn token(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(match &self.metrics_token_file {
            Some(path) => Some(server::read_metrics_token(path)?),
            None => None,
        })
    }
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token (printed once).
    Create {
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// e.g. 24h, 30m, 7days.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The user its nodes belong to (email or name).
        #[arg(long)]
        user: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a node (by id, name or key): it is cut off at once.
    Remove {
        node: String,
    },
    Rename {
        node: String,
        name: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once (`warren::text::error_chain`), as `warren` does.
            eprintln!(
                "warren-coordinator: {}",
                warren::text::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cli = Cli::parse();
    if let Some(file) = &cli.database_file {
        let url = std::fs::read_to_string(file)
            .with_context(|| format!("reading the database URL from {}", file.display()))?;
        let url = url.trim();
        anyhow::ensure!(!url.is_empty(), "{} holds no database URL", file.display());
        cli.database = Some(url.to_owned());
    }
    let cli = match cli.cmd {
        Cmd::Serve(args) => return serve(args, cli.data_dir, cli.database).await,
        Cmd::Relay(args) => return relay(args, cli.data_dir).await,
        _ => cli,
    };
    if let Some(out) = offline(&cli.cmd).await {
        print!("{}", out?);
        return Ok(());
    }
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("creating {}", cli.data_dir.display()))?;
    let url = cli
        .database
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&cli.data_dir));
    let store = Store::open(&url).await.context("opening the store")?;
    let out = match cli.cmd {
        Cmd::Serve(_) | Cmd::Relay(_) => unreachable!("handled above"),
        Cmd::Token(TokenCmd::Create {
            reusable,
            ephemeral,
            expires,
            tags,
            user,
        }) => {
            let user_id = match &user {
                Some(u) => Some(store.find_user(u).await?.id),
                None => None,
            };
            let spec = NewToken {
                reusable,
                ephemeral,
                expires_in: expires,
                tags,
                user_id,
            };
            admin::token_create(&store, &spec).await?
        }
        Cmd::Token(TokenCmd::List { json }) => admin::token_list(&store, json).await?,
        Cmd::Token(TokenCmd::Revoke { id }) => {
            store.revoke_token(&id).await?;
            format!("revoked token {id}\n")
        }
        Cmd::Node(NodeCmd::List { json }) => admin::node_list(&store, json).await?,
        Cmd::Node(NodeCmd::Remove { node }) => admin::node_remove(&store, &node).await?,
        Cmd::Node(NodeCmd::Rename { node, name }) => {
            admin::node_rename(&store, &node, &name).await?
        }
        Cmd::User(cmd) => user_cmd(&store, cmd).await?,
        Cmd::Policy(cmd) => policy_cmd(&store, cmd).await?,
        Cmd::Route(RouteCmd::List { json }) => admin_routes::route_list(&store, json).await?,
        Cmd::Route(RouteCmd::Approve { node, routes, json }) => {
            admin_routes::route_change(&store, &node, &routes, true, json).await?
        }
        Cmd::Route(RouteCmd::Reject { node, routes, json }) => {
            admin_routes::route_change(&store, &node, &routes, false, json).await?
        }
    };
    print!("{out}");
    Ok(())
}

async fn serve(args: ServeArgs, data_dir: PathBuf, database: Option<String>) -> anyhow::Result<()> {
    let mut cfg = server::Config::new(args.listen, data_dir);
    cfg.database = database;
    cfg.tls_cert = args.tls.tls_cert;
    cfg.tls_key = args.tls.tls_key;
    cfg.insecure_http = args.tls.insecure_http;
    cfg.ephemeral_timeout = args.ephemeral_timeout;
    cfg.keepalive = args.keepalive;
    cfg.compress_maps = args.compress_maps;
    cfg.stun_listen = args.stun.sockets(args.listen);
    cfg.embedded_relay = (!args.no_relay).then_some(EmbeddedRegion {
        id: args.region_id,
        name: args.region_name,
        public_url: args.public_url,
        stun_advertise: args.stun_advertise,
    });
    let reserved = cfg.embedded_relay.as_ref().map(|r| r.id);
    if let Some(path) = &args.relay_map {
        cfg.relay_map = relay_map::load(path, reserved)?;
    }
    if let Some(path) = &args.relay_secret_file {
        cfg.relay_secret = Some(server::read_relay_secret(path)?);
    }
    cfg.dns = warren_coordinator::dns_config::load(
        args.dns_config.as_deref(),
        args.dns_domain.as_deref(),
    )?;
    cfg.metrics_token = args.metrics.token()?;
    let running = server::start(cfg).await?;
    tokio::select! {
        _ = running.wait() => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}

async fn relay(args: RelayArgs, data_dir: PathBuf) -> anyhow::Result<()> {
    let opts = standalone::Options {
        listen: args.listen,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        insecure_http: args.tls.insecure_http,
        coordinator: args.coordinator,
        coordinator_ca: args.coordinator_ca,
        secret: server::read_relay_secret(&args.secret_file)?,
        data_dir,
        stun_listen: args.stun.sockets(args.listen),
        limits: RelayLimits::default(),
        health_every: Some(args.health_every),
        metrics_token: args.metrics.token()?,
    };
    let running = standalone::start(opts).await?;
    tokio::select! {
        r = running.wait() => r.context("relay listener")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}

async fn user_cmd(store: &Store, cmd: UserCmd) -> anyhow::Result<String> {
    use warren_coordinator::admin_policy as ap;
    Ok(match cmd {
        UserCmd::Create {
            email,
            name,
            display_name,
            json,
        } => ap::user_create(store, &email, name.as_deref(), &display_name, json).await?,
        UserCmd::List { json } => ap::user_list(store, json).await?,
        UserCmd::Remove { user, force, json } => ap::user_remove(store, &user, force, json).await?,
    })
}

async fn policy_cmd(store: &Store, cmd: PolicyCmd) -> anyhow::Result<String> {
    use warren_coordinator::admin_policy as ap;
    let s = Some(store);
    Ok(match cmd {
        PolicyCmd::Set { file, json } => ap::policy_set(store, &file, json).await?,
        PolicyCmd::Get { json } => ap::policy_get(store, json).await?,
        PolicyCmd::Clear { json } => ap::policy_clear(store, json).await?,
        PolicyCmd::Check { file, nodes, json } => {
            ap::policy_check(s, &file, nodes.as_deref(), json).await?
        }
        PolicyCmd::Filter {
            node,
            policy,
            nodes,
            json: _,
        } => ap::policy_filter(s, node.as_deref(), policy.as_deref(), nodes.as_deref()).await?,
        PolicyCmd::Explain {
            src,
            dst,
            proto,
            policy,
            nodes,
            json,
        } => {
            ap::policy_explain(
                s,
                &src,
                &dst,
                &proto,
                policy.as_deref(),
                nodes.as_deref(),
                json,
            )
            .await?
        }
    })
}
