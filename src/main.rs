//! `warren`: the agent daemon and its command-line interface.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren::config::Config;
use warren::keys::PrivateKey;

#[derive(Parser)]
#[command(name = "warren", version, about = "warren mesh VPN agent and CLI")]
struct Cli {
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
    /// Print the version.
    Version {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent { config } => agent(config),
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Version { json } => {
            let v = env!("CARGO_PKG_VERSION");
            if json {
                println!("{}", serde_json::json!({ "version": v }));
            } else {
                println!("warren {v}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
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

fn agent(path: PathBuf) -> anyhow::Result<()> {
    // Parse before logging or any device work: a bad file must fail fast
    // and leave nothing behind.
    let config = Config::load(&path)?;
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warren")
        .build()?;
    rt.block_on(async move {
        warren::agent::run(config, shutdown_signal(), |_| {}).await?;
        Ok(())
    })
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
