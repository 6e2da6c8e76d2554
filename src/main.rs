//! `warren`: the agent daemon and its command-line interface.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use warren::config::Config;
use warren::keys::PrivateKey;

#[derive(Parser)]
#[command(name = "warren", version, about = "warren mesh VPN agent and CLI")]
struct Cli {
    #[command(flatten)]
    global: warren::cli::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon in the foreground (what systemd runs).
    Agent {
        /// Configuration file.
        #[arg(long, short, default_value = "/etc/warren/warren.toml")]
        config: PathBuf,
    },
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (as `wg pubkey`).
    Pubkey,
    /// Client commands, answered by the running daemon (`warren::cli`).
    #[command(flatten)]
    Client(warren::cli::ClientCommand),
}

fn main() -> ExitCode {
    // One TLS provider for the whole process (the control client and the
    // relay client use rustls): ring, installed before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent { config } => agent(config, cli.global.socket),
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Client(cmd) => {
            warren::cli::run(&cmd, &cli.global.client_socket()).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {}", warren::text::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn pubkey() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let key: PrivateKey = text
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid private key on stdin: {e}"))?;
    writeln!(std::io::stdout(), "{}", key.public())?;
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn agent(path: PathBuf, socket: Option<PathBuf>) -> anyhow::Result<()> {
    // Parse before logging or any device work: a bad file must fail fast
    // and leave nothing behind.
    let config = Config::load(&path)?;
    init_logging();
    warren::agent::spin::set_window(config.agent.busy_poll_us);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warren")
        .on_thread_park(warren::agent::spin::on_park)
        .build()?;
    rt.block_on(async move {
        // The API socket is bound before the device exists, so a second
        // daemon fails here without touching the first one's interface.
        let socket = socket.unwrap_or_else(|| config.agent.socket.clone());
        let listener = warren::api::server::Listener::bind(&socket)?;
        let mut service = Vec::new();
        let running_config = config.clone();
        warren::agent::run(config, shutdown_signal(), |running| {
            let view = warren::api::server::AgentView::new(running, &running_config);
            service.push(tokio::spawn(warren::api::server::serve(
                listener,
                Arc::new(view),
            )));
            let dp = running.dataplane.clone();
            match warren::agent::reload::watch_sighup(path, dp, running_config) {
                Ok(task) => service.push(task),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGHUP; reloading needs a restart")
                }
            }
            notify_systemd_ready(running);
        })
        .await?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        for task in service {
            // Dropping the API task removes the socket file.
            task.abort();
            let _ = task.await;
        }
        Ok(())
    })
}

/// Tells systemd (`Type=notify`) that the device is up and the API answers.
/// Without `NOTIFY_SOCKET` (not under systemd) this does nothing.
fn notify_systemd_ready(running: &warren::agent::Running) {
    let status = format!(
        "{} peers; listening on {}",
        running.dataplane.peers().len(),
        running.listen
    );
    use sd_notify::NotifyState;
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        tracing::warn!(error = %e, "cannot notify systemd that the agent is ready");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
    }
}
