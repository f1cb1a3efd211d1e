//! The `sbc` command: run the SBC from a config file, check a config, or run the demo.

mod demo;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sbc",
    version,
    about = "SIP session border controller for a PBX pair"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the SBC with a TOML config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without starting; exits non-zero with file:line on error.
    CheckConfig { file: PathBuf },
    /// Run the SBC with built-in phones, trunk and PBX on loopback and narrate what happens.
    Demo,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { file } => match sbc_config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listeners, {} pools, {} trunks)",
                    file.display(),
                    cfg.listen.len(),
                    cfg.pools.len(),
                    cfg.trunks.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        },
        Cmd::Run { config } => {
            init_tracing("info");
            let cfg = sbc_config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let sbc = sbc::Sbc::start(&cfg).await.context("starting the SBC")?;
                tracing::info!(name = %cfg.general.name, "sbc running");
                wait_for_shutdown().await;
                tracing::info!("shutting down");
                sbc.shutdown();
                anyhow::Ok(())
            })
        }
        Cmd::Demo => {
            init_tracing("warn");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(demo::run())
        }
    }
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
