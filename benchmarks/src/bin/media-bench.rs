//! `media-bench`: RTP relay benchmark, our relay vs rtpengine. See `sbc_benchmarks::media` and
//! benchmarks/README.md ("Media relay vs rtpengine"); benchmarks/run-media-compare.sh drives
//! it.

use clap::{Args, Parser, Subcommand};
use sbc_benchmarks::media::{self, GenOpts, Layout, MediaMap, NgSetupOpts, RelayHostOpts};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use sbc_benchmarks::sipcalls::{self, SipCallsOpts};

struct SipCallsArgs {
    opts: SipCallsOpts,
    pps: u32,
    seconds: u32,
    windows: u32,
    warmup: u32,
    tick_us: u32,
    relay_core: usize,
    settle: u64,
    label: String,
    json: Option<PathBuf>,
}

/// Setup, `windows` media windows, teardown; one JSON document with all of it.
fn sip_calls(a: SipCallsArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=120).contains(&a.windows), "--windows must be 1..=120");
    anyhow::ensure!(a.settle <= 120, "--settle must be at most 120 s");
    let pid = a.opts.proxy_pid;
    let rate = a.opts.rate;
    let (mut calls, map, setup) = sipcalls::setup(a.opts)?;
    eprintln!(
        "sip-calls: {} of {} calls up in {:.2} s (p50 {:?} ms, p99 {:?} ms); proxy RSS {} -> {} KiB",
        setup.succeeded,
        setup.attempted,
        setup.seconds,
        setup.latency_p50_ms,
        setup.latency_p99_ms,
        map.rss_before_kib,
        map.rss_after_setup_kib
    );
    let mut gens = Vec::new();
    for w in 0..a.windows {
        let r = media::gen(GenOpts {
            map: Some(map.clone()),
            layout: map.layout,
            pps: a.pps,
            seconds: a.seconds,
            warmup: if w == 0 { a.warmup } else { 0 },
            tick_us: a.tick_us,
            relay_core: a.relay_core,
            rx_on_tick: false,
            label: format!("{}-w{w}", a.label),
        });
        match r {
            Ok(r) => {
                eprintln!("{}", r.human());
                gens.push(r);
            }
            Err(e) => {
                // Hang up what is up even if a window failed.
                eprintln!("sip-calls: media window {w} failed: {e:#}");
                break;
            }
        }
    }
    let teardown = sipcalls::teardown(&mut calls, rate);
    std::thread::sleep(std::time::Duration::from_secs(a.settle));
    let rss_end = media::rss_kib(pid);
    eprintln!(
        "sip-calls: {} of {} calls hung up (p50 {:?} ms); proxy RSS after {} KiB",
        teardown.succeeded, teardown.attempted, teardown.latency_p50_ms, rss_end
    );
    let doc = serde_json::json!({
        "label": a.label,
        "calls": map.layout.calls,
        "rss_before_kib": map.rss_before_kib,
        "rss_after_setup_kib": map.rss_after_setup_kib,
        "rss_after_teardown_kib": rss_end,
        "setup": setup,
        "windows": gens,
        "teardown": teardown,
    });
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_vec_pretty(&doc)?)?;
    }
    anyhow::ensure!(
        !gens.is_empty(),
        "no media window completed (see the errors above)"
    );
    Ok(())
}

#[derive(Parser, Debug)]
#[command(name = "media-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the endpoints are: A of call c at A_IP:PEER_BASE+2c, B at B_IP:PEER_BASE+2c.
#[derive(Args, Debug, Clone, Copy)]
struct LayoutArgs {
    /// Calls; each carries two streams (A to B and B to A).
    #[arg(long)]
    calls: usize,
    #[arg(long, default_value = "127.0.0.2")]
    a_ip: IpAddr,
    #[arg(long, default_value = "127.0.0.3")]
    b_ip: IpAddr,
    #[arg(long, default_value_t = 30000)]
    peer_base: u16,
}

impl LayoutArgs {
    fn layout(self) -> Layout {
        Layout {
            calls: self.calls,
            a_ip: self.a_ip,
            b_ip: self.b_ip,
            peer_base: self.peer_base,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs sbc-media-relay in this process, sets up the calls, writes the map, idles.
    RelayHost {
        #[command(flatten)]
        layout: LayoutArgs,
        /// Address of the relay's sockets (both sides; disjoint port ranges 20000-24999 and
        /// 25000-29999).
        #[arg(long, default_value = "127.0.0.1")]
        relay_ip: IpAddr,
        /// Forwarding threads (0: one per core this process may run on).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Relay's coalescing wait in microseconds (default: the relay's own default).
        #[arg(long)]
        coalesce_us: Option<u64>,
        /// Relay's I/O backend: epoll or uring (default: the relay's own default).
        #[arg(long)]
        io: Option<String>,
        /// Send latched RTP unconnected (RelayConfig::connect_latched = false), as the relay
        /// did before connected sockets.
        #[arg(long)]
        unconnected: bool,
        #[arg(long)]
        map_out: PathBuf,
        /// Exit after this long even if nobody kills the process.
        #[arg(long, default_value_t = 900)]
        max_seconds: u64,
    },
    /// Sets up the calls through a running rtpengine over ng and writes the map.
    NgSetup {
        #[command(flatten)]
        layout: LayoutArgs,
        /// rtpengine's --listen-ng address.
        #[arg(long, default_value = "127.0.0.1:22222")]
        ng: SocketAddr,
        /// rtpengine's pid (its CPU and memory are measured).
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        map_out: PathBuf,
    },
    /// Places the calls through a media-anchoring SIP proxy (the SBC), sends RTP both ways
    /// through it, hangs up; setup/teardown latency, packets, CPU and RSS (sbc-uas must run
    /// with --media-log).
    SipCalls {
        #[command(flatten)]
        layout: LayoutArgs,
        /// The proxy's UDP listener.
        #[arg(long, default_value = "127.0.0.1:25060")]
        target: SocketAddr,
        /// Bind address (a trunk source of the proxy).
        #[arg(long, default_value = "127.0.0.12:0")]
        local: SocketAddr,
        #[arg(long, default_value = "bench.test")]
        domain: String,
        /// New calls per second during setup, and BYEs per second during teardown.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Seconds to a final response.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// sbc-uas --media-log file.
        #[arg(long)]
        uas_log: PathBuf,
        /// The proxy's pid (CPU and RSS).
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 50)]
        pps: u32,
        /// Measured seconds per media window.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Media windows in a row (the soak keeps 500 calls up for an hour in 60 s windows).
        #[arg(long, default_value_t = 1)]
        windows: u32,
        #[arg(long, default_value_t = 2)]
        warmup: u32,
        #[arg(long, default_value_t = 1000)]
        tick_us: u32,
        #[arg(long, default_value_t = 1)]
        relay_core: usize,
        /// Seconds to wait after the hang-up before the last RSS sample.
        #[arg(long, default_value_t = 2)]
        settle: u64,
        #[arg(long, default_value = "sip-calls")]
        label: String,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Sends RTP both ways on every call and measures.
    Gen {
        /// The map written by relay-host or ng-setup.
        #[arg(long, conflicts_with = "direct")]
        map: Option<PathBuf>,
        /// Endpoint to endpoint, no relay (the baseline); needs --calls.
        #[arg(long)]
        direct: bool,
        #[arg(long)]
        calls: Option<usize>,
        #[arg(long, default_value = "127.0.0.2")]
        a_ip: IpAddr,
        #[arg(long, default_value = "127.0.0.3")]
        b_ip: IpAddr,
        #[arg(long, default_value_t = 30000)]
        peer_base: u16,
        /// Packets per second per stream.
        #[arg(long, default_value_t = 50)]
        pps: u32,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Seconds of load before the measured window.
        #[arg(long, default_value_t = 2)]
        warmup: u32,
        /// Pacing tick in microseconds.
        #[arg(long, default_value_t = 1000)]
        tick_us: u32,
        /// Core the relay is pinned to (for its core's busy share).
        #[arg(long, default_value_t = 1)]
        relay_core: usize,
        /// Read arrivals once per tick instead of sleeping on the sockets, so that the
        /// relay's sends never pay for waking the generator (see `GenOpts::rx_on_tick`).
        #[arg(long)]
        rx_on_tick: bool,
        #[arg(long, default_value = "run")]
        label: String,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::RelayHost {
            layout,
            relay_ip,
            workers,
            coalesce_us,
            io,
            unconnected,
            map_out,
            max_seconds,
        } => media::relay_host(RelayHostOpts {
            layout: layout.layout(),
            relay_ip,
            workers,
            coalesce_us,
            io,
            connect_latched: !unconnected,
            map_out,
            max_seconds,
        }),
        Cmd::NgSetup {
            layout,
            ng,
            pid,
            map_out,
        } => media::ng_setup(NgSetupOpts {
            layout: layout.layout(),
            ng,
            pid,
            map_out,
        }),
        Cmd::SipCalls {
            layout,
            target,
            local,
            domain,
            rate,
            timeout,
            uas_log,
            pid,
            pps,
            seconds,
            windows,
            warmup,
            tick_us,
            relay_core,
            settle,
            label,
            json,
        } => sip_calls(SipCallsArgs {
            opts: SipCallsOpts {
                target,
                local,
                domain,
                layout: layout.layout(),
                rate,
                timeout: std::time::Duration::from_secs(timeout),
                uas_log,
                proxy_pid: pid,
            },
            pps,
            seconds,
            windows,
            warmup,
            tick_us,
            relay_core,
            settle,
            label,
            json,
        }),
        Cmd::Gen {
            map,
            direct,
            calls,
            a_ip,
            b_ip,
            peer_base,
            pps,
            seconds,
            warmup,
            tick_us,
            relay_core,
            rx_on_tick,
            label,
            json,
        } => {
            let map = match (map, direct) {
                (Some(p), _) => Some(MediaMap::read(&p)?),
                (None, true) => None,
                (None, false) => anyhow::bail!("give --map FILE or --direct"),
            };
            let layout = Layout {
                calls: calls.or(map.as_ref().map(|m| m.layout.calls)).unwrap_or(0),
                a_ip,
                b_ip,
                peer_base,
            };
            let report = media::gen(GenOpts {
                map,
                layout,
                pps,
                seconds,
                warmup,
                tick_us,
                relay_core,
                rx_on_tick,
                label,
            })?;
            println!("{}", report.human());
            if let Some(p) = json {
                report.write_json(&p)?;
            }
            Ok(())
        }
    }
}
