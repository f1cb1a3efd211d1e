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
    let st = uas::run(&UasConfig {
        listen: a.listen,
        threads: a.threads,
        duration: Duration::from_secs(a.duration),
        expires: a.expires,
    })?;
    eprintln!("sbc-uas: {st}");
    Ok(())
}
