//! Loopback throughput and latency of the media relay.
//!
//! Sets up `streams / 2` calls through the relay (each call carries two one-way RTP streams, A
//! to B and B to A), sends 50 packets/s per stream (20 ms packetisation; stream start times
//! spread over the period, sent on a 200 us tick), and measures for a bounded time:
//! - packets/s relayed and the CPU time of the relay's worker threads (from
//!   /proc/self/task/*/stat), hence packets per CPU-second ("per core");
//! - latency from send to receive (send timestamp in the payload, CLOCK_MONOTONIC), through
//!   the relay and, as a baseline with the same load and the same sender/receiver threads,
//!   peer to peer without the relay; the difference is what the relay adds;
//! - packets lost.
//!
//! Loopback only, bounded in count and time. Prints one line per scenario.
//!
//! ```text
//! cargo run --release -p sbc-media-relay --example relay_bench -- [--streams 100,1000] [--seconds 5] [--workers 0]
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbc_media_relay::sdp::Sdp;
use sbc_media_relay::{monotonic_ns, CallKey, Relay, RelayConfig, Side, SideConfig};

const RATE: u64 = 50;
const PAYLOAD: usize = 160;
const TICK_US: u64 = 200;

struct Args {
    streams: Vec<usize>,
    seconds: u64,
    workers: usize,
}

fn args() -> Args {
    let mut a = Args {
        streams: vec![100, 1000],
        seconds: 5,
        workers: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < argv.len() {
        let v = &argv[i + 1];
        match argv[i].as_str() {
            "--streams" => {
                a.streams = v.split(',').filter_map(|s| s.parse().ok()).collect();
            }
            "--seconds" => a.seconds = v.parse().unwrap_or(5).clamp(1, 60),
            "--workers" => a.workers = v.parse().unwrap_or(0),
            other => eprintln!("ignored argument {other}"),
        }
        i += 2;
    }
    a.streams.retain(|&n| (2..=4000).contains(&n));
    a
}

/// One stream: the socket it is sent from, and where to send it.
struct Flow {
    from: Arc<UdpSocket>,
    to: SocketAddr,
    ssrc: u32,
}

fn peer() -> Arc<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
    s.set_nonblocking(true).unwrap();
    Arc::new(s)
}

fn sdp(port: u16) -> String {
    format!(
        "v=0\r\no=bench 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )
}

/// Sum of utime+stime (in clock ticks) of this process's threads whose name starts with
/// `prefix`.
fn threads_cpu_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in dir.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            total += ut + st;
        }
    }
    total
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Outcome {
    sent: u64,
    received: u64,
    latencies_ns: Vec<u64>,
}

/// Drives the flows at RATE packets/s each for `warmup + seconds`, receiving on `sinks`.
/// Latency and counts cover only packets sent after the warm-up.
fn drive(flows: &[Flow], sinks: &[Arc<UdpSocket>], warmup: Duration, seconds: u64) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let received = Arc::new(AtomicU64::new(0));
    // Receiver: one epoll over all sinks.
    let rx = {
        let sinks: Vec<Arc<UdpSocket>> = sinks.to_vec();
        let (stop, measure_from, received) = (stop.clone(), measure_from.clone(), received.clone());
        let cap = sinks.len() * RATE as usize * (seconds as usize + 2);
        std::thread::Builder::new()
            .name("bench-rx".into())
            .spawn(move || {
                // SAFETY (whole block): plain epoll calls on fds owned by `sinks`, which live
                // until the thread ends.
                let ep = unsafe { libc::epoll_create1(0) };
                assert!(ep >= 0);
                for (i, s) in sinks.iter().enumerate() {
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: i as u64,
                    };
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
                }
                let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
                let mut lat = Vec::with_capacity(cap);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, 50) };
                    for ev in events.iter().take(n.max(0) as usize) {
                        let s = &sinks[ev.u64 as usize];
                        while let Ok(len) = s.recv(&mut buf) {
                            let now = monotonic_ns();
                            if len < 20 {
                                continue;
                            }
                            let sent_at = u64::from_be_bytes(buf[12..20].try_into().unwrap());
                            if sent_at >= measure_from.load(Ordering::Relaxed) {
                                received.fetch_add(1, Ordering::Relaxed);
                                lat.push(now.saturating_sub(sent_at));
                            }
                        }
                    }
                }
                unsafe { libc::close(ep) };
                lat
            })
            .unwrap()
    };
    // Sender: every tick, send what is due; flow i is offset by i/N of the period. A short
    // tick keeps bursts small, closer to independent phones than one burst per millisecond.
    let n = flows.len() as u64;
    let period_ns = 1_000_000_000 / RATE;
    let start = monotonic_ns();
    let warm_ns = warmup.as_nanos() as u64;
    let end = start + warm_ns + seconds * 1_000_000_000;
    let mut next: Vec<u64> = (0..n).map(|i| start + i * period_ns / n).collect();
    let mut seq = vec![0u16; flows.len()];
    let mut pkt = [0u8; 12 + PAYLOAD];
    pkt[0] = 0x80;
    let mut sent = 0u64;
    let mut measuring = false;
    loop {
        let now = monotonic_ns();
        if now >= end {
            break;
        }
        if !measuring && now >= start + warm_ns {
            measuring = true;
            measure_from.store(now, Ordering::Relaxed);
        }
        for (i, f) in flows.iter().enumerate() {
            while next[i] <= now {
                let ts = monotonic_ns();
                pkt[2..4].copy_from_slice(&seq[i].to_be_bytes());
                pkt[4..8].copy_from_slice(&(u32::from(seq[i]) * 160).to_be_bytes());
                pkt[8..12].copy_from_slice(&f.ssrc.to_be_bytes());
                pkt[12..20].copy_from_slice(&ts.to_be_bytes());
                if f.from.send_to(&pkt, f.to).is_ok() && measuring {
                    sent += 1;
                }
                seq[i] = seq[i].wrapping_add(1);
                next[i] += period_ns;
            }
        }
        std::thread::sleep(Duration::from_micros(TICK_US));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let latencies_ns = rx.join().unwrap();
    Outcome {
        sent,
        received: received.load(Ordering::Relaxed),
        latencies_ns,
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run(streams: usize, seconds: u64, workers: usize) {
    let calls = streams / 2;
    let mut cfg = RelayConfig::new(
        SideConfig::new("127.0.0.1".parse().unwrap(), 16000..=23999),
        SideConfig::new("127.0.0.1".parse().unwrap(), 24000..=31999),
    );
    cfg.workers = workers;
    let (relay, _events) = Relay::start(cfg).expect("relay");
    let worker_count = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        w => w,
    };
    let mut via_relay = Vec::with_capacity(streams);
    let mut direct = Vec::with_capacity(streams);
    let mut sinks = Vec::with_capacity(streams);
    let rss1 = rss_kib();
    for c in 0..calls {
        let (a, b) = (peer(), peer());
        let key = CallKey::new(&format!("bench-{c}"));
        let pa = a.local_addr().unwrap().port();
        let pb = b.local_addr().unwrap().port();
        let to_b = relay
            .offer(&key, "a", Side::Public, Side::Internal, sdp(pa).as_bytes())
            .expect("offer");
        let to_a = relay
            .answer(&key, "a", "b", sdp(pb).as_bytes())
            .expect("answer");
        let ra = Sdp::parse(&to_a).unwrap().rtp_addr(0).unwrap();
        let rb = Sdp::parse(&to_b).unwrap().rtp_addr(0).unwrap();
        let ssrc = c as u32 * 2;
        via_relay.push(Flow {
            from: a.clone(),
            to: ra,
            ssrc,
        });
        via_relay.push(Flow {
            from: b.clone(),
            to: rb,
            ssrc: ssrc + 1,
        });
        direct.push(Flow {
            from: a.clone(),
            to: b.local_addr().unwrap(),
            ssrc,
        });
        direct.push(Flow {
            from: b.clone(),
            to: a.local_addr().unwrap(),
            ssrc: ssrc + 1,
        });
        sinks.push(a);
        sinks.push(b);
    }
    let rss2 = rss_kib();

    let warmup = Duration::from_millis(500);
    // Baseline first (relay idle), then through the relay.
    let base = drive(&direct, &sinks, warmup, seconds);
    let pkts0 = relay.totals().packets;
    let cpu0 = threads_cpu_ticks("media-relay");
    let t0 = Instant::now();
    let out = drive(&via_relay, &sinks, warmup, seconds);
    let wall = t0.elapsed().as_secs_f64();
    let cpu_ticks = threads_cpu_ticks("media-relay") - cpu0;
    let relayed = relay.totals().packets - pkts0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = cpu_ticks as f64 / hz;
    let pps = relayed as f64 / wall;
    let per_cpu_s = if cpu_s > 0.0 {
        relayed as f64 / cpu_s
    } else {
        f64::INFINITY
    };
    let mut l = out.latencies_ns;
    l.sort_unstable();
    let mut b = base.latencies_ns;
    b.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let lost = out.sent.saturating_sub(out.received);
    let per_call_kib = (rss2.saturating_sub(rss1)) as f64 / calls.max(1) as f64;
    println!(
        "relay_bench streams={streams} calls={calls} secs={seconds} workers={worker_count} \
         sent={} received={} lost={lost} relayed_pps={pps:.0} relay_cpu={:.1}% \
         pkts_per_cpu_s={per_cpu_s:.0} lat_p50={:.0}us lat_p99={:.0}us \
         direct_p50={:.0}us direct_p99={:.0}us added_p50={:.0}us added_p99={:.0}us \
         rss_per_call={per_call_kib:.1}KiB(user space, incl. peers)",
        out.sent,
        out.received,
        100.0 * cpu_s / wall,
        us(pct(&l, 0.5)),
        us(pct(&l, 0.99)),
        us(pct(&b, 0.5)),
        us(pct(&b, 0.99)),
        us(pct(&l, 0.5).saturating_sub(pct(&b, 0.5))),
        us(pct(&l, 0.99).saturating_sub(pct(&b, 0.99))),
    );
    relay.shutdown();
}

fn main() {
    let a = args();
    for &n in &a.streams {
        run(n, a.seconds, a.workers);
    }
}
