//! `media-bench`: RTP relay benchmark, our relay vs rtpengine. See `sbc_benchmarks::media` and
//! benchmarks/README.md ("Media relay vs rtpengine"); benchmarks/run-media-compare.sh drives
//! it.

use clap::{Args, Parser, Subcommand};
use sbc_benchmarks::media::{self, GenOpts, Layout, MediaMap, NgSetupOpts, RelayHostOpts};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

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
            map_out,
            max_seconds,
        } => media::relay_host(RelayHostOpts {
            layout: layout.layout(),
            relay_ip,
            workers,
            coalesce_us,
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
