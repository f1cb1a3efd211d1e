//! `sbc-loadgen`: open-loop UDP SIP load generator. See `sbc_benchmarks::loadgen`.

use clap::Parser;
use sbc_benchmarks::cpu;
use sbc_benchmarks::loadgen::{self, Config, Scenario};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Sends REGISTERs or calls at a fixed rate (open loop) to a proxy or directly to a UAS,
/// then reports successes, failures, latency percentiles and the CPU the watched processes
/// spent per successful operation.
#[derive(Parser, Debug)]
#[command(name = "sbc-loadgen", version)]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Operations (calls or REGISTERs) started per second.
    #[arg(long)]
    rate: f64,
    /// Seconds during which operations are started.
    #[arg(long)]
    duration: f64,
    /// Where every initial request goes (the proxy, or the UAS directly). Loopback only.
    #[arg(long, default_value = "127.0.0.1:5060")]
    target: SocketAddr,
    /// Local bind address (port 0: ephemeral). With --sockets N and a fixed port, ports
    /// port..port+N-1 are used.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// Local sockets; operations are spread round robin over them.
    #[arg(long, default_value_t = 1)]
    sockets: usize,
    /// Domain of the Request-URI, From and To.
    #[arg(long, default_value = "bench.test")]
    domain: String,
    /// User part of the INVITE Request-URI and To.
    #[arg(long, default_value = "uas")]
    callee: String,
    /// REGISTER: number of distinct users u0..u{N-1}.
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// REGISTER: Expires asked for.
    #[arg(long, default_value_t = 3600)]
    expires: u32,
    /// REGISTER: a fresh Call-ID per request instead of one per user with increasing CSeq.
    #[arg(long)]
    fresh_call_id: bool,
    /// Seconds a transaction (INVITE, BYE, REGISTER) may take to get a final response
    /// before the operation counts as failed.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Milliseconds between the ACK and the BYE.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Main-loop wake-up period in microseconds: responses are read and due operations
    /// started once per tick (latency still comes from per-datagram kernel timestamps).
    /// 0 wakes on every response and every scheduled send, which costs the generator and the
    /// receiver several times more CPU per call on small VMs.
    #[arg(long, default_value_t = 1000)]
    tick_us: u64,
    /// Process whose CPU time (utime+stime, all threads) is reported; repeatable.
    #[arg(long)]
    pid: Vec<u32>,
    /// Also watch every process with this command name (/proc/PID/comm), e.g. kamailio,
    /// whose workers are separate processes; repeatable.
    #[arg(long)]
    pid_name: Vec<String>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write one CSV line per operation to this file: `num,start_unix_ns,setup_us,
    /// outcome` (when it started, INVITE->200 or REGISTER->2xx, `ok` or the failure cause),
    /// for failover drills (benchmarks/failover-drill/).
    #[arg(long)]
    trace: Option<PathBuf>,
}

fn secs(v: f64, name: &str) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0 && v <= 86_400.0,
        "{name} out of range"
    );
    Ok(Duration::from_secs_f64(v))
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
    let mut pids = a.pid.clone();
    for n in &a.pid_name {
        let found = cpu::pids_by_name(n);
        anyhow::ensure!(!found.is_empty(), "no process named {n}");
        pids.extend(found);
    }
    pids.sort_unstable();
    pids.dedup();
    for &p in &pids {
        anyhow::ensure!(
            cpu::process_ticks(p).is_some(),
            "cannot read /proc/{p}/stat"
        );
    }
    let cfg = Config {
        scenario: a.scenario,
        rate: a.rate,
        duration: secs(a.duration, "--duration")?,
        target: a.target,
        local: a.local,
        sockets: a.sockets,
        domain: a.domain,
        callee: a.callee,
        users: a.users,
        expires: a.expires,
        fresh_call_id: a.fresh_call_id,
        timeout: secs(a.timeout, "--timeout")?,
        hold: Duration::from_millis(a.hold_ms),
        tick: Duration::from_micros(a.tick_us),
        pids,
    };
    let (report, trace) = if a.trace.is_some() {
        loadgen::run_traced(cfg)?
    } else {
        (loadgen::run(cfg)?, Vec::new())
    };
    print!("{}", report.human());
    if let Some(path) = a.trace {
        let mut text = String::with_capacity(64 * (trace.len() + 1));
        text.push_str(loadgen::TraceRecord::CSV_HEADER);
        text.push('\n');
        for t in &trace {
            text.push_str(&t.csv_line());
            text.push('\n');
        }
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    if let Some(path) = a.json {
        std::fs::write(&path, report.json())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}
