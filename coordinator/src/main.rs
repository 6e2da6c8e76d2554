//! `warren-coordinator`: the control server and its administration.
//!
//! `serve` runs the server; `token …` and `node …` work on the store
//! directly (the same `--data-dir` / `--database` as the server's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use warren_coordinator::store::{NewToken, Store};
use warren_coordinator::{admin, server};

#[derive(Parser, Debug)]
#[command(
    name = "warren-coordinator",
    version,
    about = "warren's control server"
)]
struct Cli {
    /// Where the coordinator key and the SQLite database live.
    #[arg(
        long,
        global = true,
        env = "WARREN_COORDINATOR_DATA_DIR",
        default_value = "/var/lib/warren-coordinator"
    )]
    data_dir: PathBuf,
    /// A postgres:// URL to use PostgreSQL (shared by replicas) instead of SQLite.
    #[arg(long, global = true, env = "WARREN_COORDINATOR_DATABASE")]
    database: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the control server.
    Serve(ServeArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registered nodes.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// PEM certificate chain for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (test labs only).
    #[arg(long)]
    insecure_http: bool,
    /// How long an ephemeral node may stay offline before it is removed.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    ephemeral_timeout: Duration,
    /// Map stream keepalive interval.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
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
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Serve(args) = cli.cmd {
        let mut cfg = server::Config::new(args.listen, cli.data_dir);
        cfg.database = cli.database;
        cfg.tls_cert = args.tls_cert;
        cfg.tls_key = args.tls_key;
        cfg.insecure_http = args.insecure_http;
        cfg.ephemeral_timeout = args.ephemeral_timeout;
        cfg.keepalive = args.keepalive;
        let running = server::start(cfg).await?;
        tokio::select! {
            _ = running_wait(running) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        }
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
        Cmd::Serve(_) => unreachable!("handled above"),
        Cmd::Token(TokenCmd::Create {
            reusable,
            ephemeral,
            expires,
            tags,
        }) => {
            let spec = NewToken {
                reusable,
                ephemeral,
                expires_in: expires,
                tags,
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
    };
    print!("{out}");
    Ok(())
}

async fn running_wait(r: server::Running) {
    r.wait().await
}
