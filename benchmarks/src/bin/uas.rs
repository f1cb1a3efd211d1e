//! `sbc-uas`: a fast, stateless scripted PBX for load tests. See `sbc_benchmarks::uas`.

use clap::Parser;
use sbc_benchmarks::uas::{self, UasConfig};
use std::net::SocketAddr;
use std::time::Duration;

/// Answers REGISTER (200, Contacts and Path echoed), INVITE (100, 180, 200 with SDP,
/// Record-Route copied), BYE/OPTIONS/CANCEL/INFO/UPDATE/PRACK/MESSAGE/NOTIFY (200), ACK
/// (nothing), anything else (501). Responses go to the request's source address.
#[derive(Parser, Debug)]
#[command(name = "sbc-uas", version)]
struct Args {
    /// UDP address to serve; repeat for several PBX nodes in one process (e.g. the
    /// Kamailio dispatcher's 127.0.0.2:5070 and 127.0.0.3:5070). Loopback only.
    #[arg(long, default_value = "127.0.0.1:5070")]
    listen: Vec<SocketAddr>,
    /// Sockets (one thread each) per listen address, sharing it through SO_REUSEPORT.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit by itself after this many seconds (SIGINT/SIGTERM end it earlier).
    #[arg(long, default_value_t = 3600)]
    duration: u64,
    /// Registration lifetime granted when the REGISTER names none.
    #[arg(long, default_value_t = 3600)]
    expires: u32,
    /// Media mode: INVITEs to `m<c>` are answered with SDP naming endpoint B of call c
    /// (MEDIA_B_IP:MEDIA_PEER_BASE+2c) and the offer's RTP address is appended to this file
    /// as `c ip:port` (media-bench sip-calls reads it).
    #[arg(long)]
    media_log: Option<std::path::PathBuf>,
    #[arg(long, default_value = "127.0.0.3")]
    media_b_ip: std::net::IpAddr,
    #[arg(long, default_value_t = 30000)]
    media_peer_base: u16,
}

/// Errors are printed as one line (no backtrace, whatever RUST_BACKTRACE says): they are
/// about arguments or the environment, not bugs.
fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", env!("CARGO_BIN_NAME"));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    uas::install_signal_handlers();
    let media = match a.media_log {
        Some(p) => {
            sbc_benchmarks::net::ensure_loopback(SocketAddr::new(a.media_b_ip, 0), "--media-b-ip")?;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| anyhow::anyhow!("opening {}: {e}", p.display()))?;
            Some(uas::MediaAnswer {
                b_ip: a.media_b_ip,
                peer_base: a.media_peer_base,
                log: std::sync::Arc::new(parking_lot::Mutex::new(f)),
            })
        }
        None => None,
    };
    let st = uas::run(&UasConfig {
        listen: a.listen,
        threads: a.threads,
        duration: Duration::from_secs(a.duration),
        expires: a.expires,
        media,
    })?;
    eprintln!("sbc-uas: {st}");
    Ok(())
}
