//! The `aether` binary: `aether` (or `aether serve`) runs the server; `aether migrate`
//! applies migrations and exits.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use aether::config::Config;

/// mimalloc instead of glibc malloc: the resume window frees and reallocates
/// changes from many threads, which glibc's per-thread arenas turn into memory
/// that is never returned (see BENCHMARKS.md, big-tx).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use aether::server::{self, Server};

#[derive(Parser)]
#[command(
    version,
    about = "Realtime backend: PostgreSQL logical replication to WebSocket subscribers.\nConfigured from the environment: see README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    aether::logging::init();
    let config = Config::from_env().map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    aether::runtime::build(config.pin_workers)
        .context("starting the async runtime")?
        .block_on(run(cli, config))
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Migrate => {
            let (pg, embedded) = server::database(&config).await?;
            let mut client = server::connect(&pg)
                .await
                .context("connecting to PostgreSQL")?;
            let applied = aether_postgres::store::migrate::migrate(&mut client)
                .await
                .context("applying migrations")?;
            println!(
                "applied {} migration(s): {}",
                applied.len(),
                applied.join(", ")
            );
            drop(embedded);
            Ok(())
        }
        Cmd::Serve => {
            let server = Server::start(config).await?;
            println!("aether listening on {}", server.addr);
            // Ready-made Supabase keys (`createClient(url, anonKey)`), stable for a
            // given JWT_SECRET: see docs/supabase.md.
            println!("anon key: {}", server.state.jwt.api_key("anon"));
            println!(
                "service_role key: {}",
                server.state.jwt.api_key("service_role")
            );
            let token = server.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutdown signal received");
                token.cancel();
            });
            match server.run_until_stopped().await {
                None => Ok(()),
                // Non-zero, so a supervisor restarts it.
                Some(why) => Err(anyhow::anyhow!("stopped because {why}")),
            }
        }
    }
}
