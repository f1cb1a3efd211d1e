//! `sbc-phones`: many phones, each on its own UDP socket or TLS connection, registering and
//! refreshing through the SBC. See `sbc_benchmarks::phones`.

use clap::{Parser, Subcommand};
use sbc_benchmarks::phones::{self, PhonesOpts};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "sbc-phones", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Writes ca.pem, cert.pem and key.pem (a fresh CA and a server certificate for --ip)
    /// into --out, for the SBC's TLS listener.
    Pki {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        out: PathBuf,
    },
    /// Registers the phones, refreshes them until --duration, unregisters, reports.
    Run {
        /// The SBC's UDP listener.
        #[arg(long)]
        target: SocketAddr,
        /// The SBC's TLS listener (needed with --tls).
        #[arg(long)]
        target_tls: Option<SocketAddr>,
        /// CA certificate (PEM) that issued the SBC's TLS certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Phones on UDP (one socket each).
        #[arg(long, default_value_t = 1000)]
        udp: usize,
        /// Phones on TLS (one connection each).
        #[arg(long, default_value_t = 0)]
        tls: usize,
        #[arg(long, default_value = "127.0.0.1")]
        local_ip: IpAddr,
        /// Users are PREFIX0, PREFIX1, ... (give each process its own prefix).
        #[arg(long, default_value = "p")]
        user_prefix: String,
        #[arg(long, default_value = "bench.test")]
        domain: String,
        /// Registration lifetime asked for; phones refresh at half of it.
        #[arg(long, default_value_t = 120)]
        expires: u32,
        /// New phones per second at the start.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Seconds until the phones unregister and the run ends.
        #[arg(long, default_value_t = 300)]
        duration: u64,
        /// Seconds to a final response (and for a TLS connection to open).
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Written (JSON) once every phone has had its first answer.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// A TLS phone whose connection closes reconnects and registers again, as real
        /// phones do (RFC 5626 4.5) and as the SBC expects when its re-registration wave
        /// closes flows after a failover. Without it such a phone stops, so that a closed
        /// connection shows as a failure.
        #[arg(long)]
        reconnect: bool,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sbc-phones: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Pki { ip, out } => {
            sbc_benchmarks::net::ensure_loopback(SocketAddr::new(ip, 0), "--ip")?;
            let (ca, cert, key) = phones::make_pki(ip)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("ca.pem"), ca)?;
            std::fs::write(out.join("cert.pem"), cert)?;
            std::fs::write(out.join("key.pem"), key)?;
            Ok(())
        }
        Cmd::Run {
            target,
            target_tls,
            ca,
            udp,
            tls,
            local_ip,
            user_prefix,
            domain,
            expires,
            rate,
            duration,
            timeout,
            ready_file,
            reconnect,
            json,
        } => {
            let ca_pem = match ca {
                Some(p) => Some(
                    std::fs::read(&p)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?,
                ),
                None => None,
            };
            let rep = phones::run(PhonesOpts {
                target_udp: target,
                target_tls,
                ca_pem,
                udp,
                tls,
                local_ip,
                user_prefix,
                domain,
                expires,
                rate,
                duration: Duration::from_secs(duration),
                timeout: Duration::from_secs(timeout),
                ready_file,
                reconnect,
            })?;
            let text = serde_json::to_string_pretty(&rep)?;
            println!("{text}");
            if let Some(p) = json {
                std::fs::write(p, text)?;
            }
            Ok(())
        }
    }
}
