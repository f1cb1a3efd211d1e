//! Media relay benchmark (binary `media-bench`): our relay and rtpengine under the same RTP
//! load, each in its own process, so that the relay's CPU is read from /proc for that process
//! alone and the generator's own cost never counts against it.
//!
//! Three steps, three subcommands:
//! - [`relay_host`]: starts `sbc-media-relay` in this process, sets up N calls through its
//!   offer/answer API and writes a [`MediaMap`] (where each endpoint must send), then idles
//!   until killed (or a time bound).
//! - [`ng_setup`]: the same N calls through a running rtpengine, over its ng protocol
//!   (bencode over UDP), and the same [`MediaMap`].
//! - [`gen`]: binds the endpoints, sends RTP both ways on every call at a fixed rate and
//!   measures loss, one-way latency and the relay process's CPU and memory. `--direct` sends
//!   endpoint to endpoint (no relay): the latency baseline of the same machine and harness.
//!
//! Load model: a *stream* is one direction of one call (one SSRC, 50 packets/s of 20 ms
//! PCMU); a call carries two streams, A to B and B to A, on one m= line. N streams are N/2
//! calls. Endpoint A of call `c` is `a_ip:peer_base+2c`, endpoint B `b_ip:peer_base+2c`:
//! fixed addresses, so SDP can name them before the generator runs.
//!
//! Everything is loopback only and bounded in time.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::bencode::{self, Value};
use crate::net::ensure_loopback;

/// RTP header (12) + 20 ms of PCMU at 8 kHz (160).
pub const PACKET_LEN: usize = 12 + 160;
/// Marks our packets: anything else arriving at an endpoint is counted as foreign.
const MAGIC: &[u8; 4] = b"SBCM";

/// Where the endpoints of the benchmark live: two loopback addresses, one port per call each.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    pub calls: usize,
    pub a_ip: IpAddr,
    pub b_ip: IpAddr,
    pub peer_base: u16,
}

impl Layout {
    /// Refuses non-loopback addresses and port ranges that do not fit.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure_loopback(SocketAddr::new(self.a_ip, 0), "endpoint A address")?;
        ensure_loopback(SocketAddr::new(self.b_ip, 0), "endpoint B address")?;
        if self.calls == 0 || self.calls > 5000 {
            bail!("calls must be 1..=5000, not {}", self.calls);
        }
        if usize::from(self.peer_base) + 2 * self.calls > 65535 {
            bail!(
                "peer_base {} + 2 x {} calls exceeds port 65535",
                self.peer_base,
                self.calls
            );
        }
        Ok(())
    }

    /// Endpoint A of call `c` (the caller; even port, RTCP would be the odd one above).
    pub fn a(&self, c: usize) -> SocketAddr {
        SocketAddr::new(self.a_ip, self.peer_base + 2 * c as u16)
    }

    /// Endpoint B of call `c` (the callee).
    pub fn b(&self, c: usize) -> SocketAddr {
        SocketAddr::new(self.b_ip, self.peer_base + 2 * c as u16)
    }
}

/// A plain single-stream PCMU SDP naming `addr`, as a phone would send it.
pub fn endpoint_sdp(addr: SocketAddr, session: usize) -> String {
    let (ip, fam) = match addr.ip() {
        IpAddr::V4(v4) => (v4.to_string(), "IP4"),
        IpAddr::V6(v6) => (v6.to_string(), "IP6"),
    };
    format!(
        "v=0\r\no=bench {session} 1 IN {fam} {ip}\r\ns=-\r\nc=IN {fam} {ip}\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
         a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n",
        addr.port()
    )
}

/// What a setup step hands the generator: the relay process and, per call, the relay address
/// each endpoint sends its RTP to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaMap {
    /// "sbc" or "rtpengine".
    pub relay: String,
    /// The relay process whose CPU and memory are measured.
    pub pid: u32,
    pub layout: Layout,
    /// VmRSS of the relay process (KiB) before the calls were set up (started, idle).
    pub rss_before_kib: u64,
    /// VmRSS right after the last call was set up (no media yet).
    pub rss_after_setup_kib: u64,
    pub setup_seconds: f64,
    /// `a_to[c]`: where endpoint A of call c sends (the relay's socket facing A).
    pub a_to: Vec<SocketAddr>,
    /// `b_to[c]`: where endpoint B of call c sends.
    pub b_to: Vec<SocketAddr>,
}

impl MediaMap {
    /// Writes the map as JSON, atomically (temporary file + rename): the script polls for the
    /// file and must never read half of it.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn read(path: &Path) -> anyhow::Result<MediaMap> {
        let m: MediaMap = serde_json::from_slice(
            &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        m.layout.check()?;
        if m.a_to.len() != m.layout.calls || m.b_to.len() != m.layout.calls {
            bail!(
                "map {} lists fewer relay addresses than calls",
                path.display()
            );
        }
        for a in m.a_to.iter().chain(&m.b_to) {
            ensure_loopback(*a, "relay address in the map")?;
        }
        Ok(m)
    }
}

/// VmRSS of a process in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Nanoseconds on CPU of all threads of a process (sum of /proc/PID/task/*/schedstat, first
/// field). Finer than utime+stime (10 ms ticks), which matters for a relay that uses a few
/// percent of a core at 100 streams. `None` when the process is gone.
pub fn sched_ns(pid: u32) -> Option<u64> {
    let dir = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for t in dir.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Busy and total jiffies of one CPU from /proc/stat (busy = all but idle and iowait). Counts
/// what no per-process figure sees, softirq work included, but also anything else that ran
/// on that core.
pub fn core_jiffies(core: usize) -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal ...; guest time is already in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// --- relay-host -----------------------------------------------------------------------------

/// Options of [`relay_host`].
pub struct RelayHostOpts {
    pub layout: Layout,
    pub relay_ip: IpAddr,
    pub workers: usize,
    /// `RelayConfig::coalesce` in microseconds; `None` keeps the relay's default.
    pub coalesce_us: Option<u64>,
    /// `RelayConfig::io`: "epoll" or "uring"; `None` keeps the relay's default.
    pub io: Option<String>,
    /// `RelayConfig::connect_latched`.
    pub connect_latched: bool,
    pub map_out: std::path::PathBuf,
    /// The process exits by itself after this long, should the script that started it die.
    pub max_seconds: u64,
}

/// Starts our relay in this process, sets up the calls, writes the map, then idles.
pub fn relay_host(o: RelayHostOpts) -> anyhow::Result<()> {
    use sbc_media_relay::sdp::Sdp;
    use sbc_media_relay::{CallKey, Relay, RelayConfig, Side, SideConfig};
    o.layout.check()?;
    ensure_loopback(SocketAddr::new(o.relay_ip, 0), "relay address")?;
    let pid = std::process::id();
    let mut cfg = RelayConfig::new(
        SideConfig::new(o.relay_ip, 20000..=24999),
        SideConfig::new(o.relay_ip, 25000..=29999),
    );
    cfg.workers = o.workers;
    if let Some(us) = o.coalesce_us {
        cfg.coalesce = Duration::from_micros(us);
    }
    if let Some(io) = &o.io {
        cfg.io = io.parse().map_err(|e| anyhow::anyhow!("--io: {e}"))?;
    }
    cfg.connect_latched = o.connect_latched;
    let (relay, _events) = Relay::start(cfg).map_err(|e| anyhow::anyhow!("relay: {e}"))?;
    let rss_before = rss_kib(pid);
    let t0 = Instant::now();
    let (mut a_to, mut b_to) = (Vec::new(), Vec::new());
    for c in 0..o.layout.calls {
        let key = CallKey::new(&format!("media-bench-{c}"));
        let offer = endpoint_sdp(o.layout.a(c), c);
        let to_b = relay
            .offer(&key, "a", Side::Public, Side::Internal, offer.as_bytes())
            .map_err(|e| anyhow::anyhow!("offer {c}: {e}"))?;
        let answer = endpoint_sdp(o.layout.b(c), c);
        let to_a = relay
            .answer(&key, "a", "b", answer.as_bytes())
            .map_err(|e| anyhow::anyhow!("answer {c}: {e}"))?;
        let addr = |sdp: &[u8]| -> anyhow::Result<SocketAddr> {
            Sdp::parse(sdp)
                .map_err(|e| anyhow::anyhow!("relay SDP: {e}"))?
                .rtp_addr(0)
                .context("relay SDP has no RTP address")
        };
        // SDP sent to B names the relay socket B sends to, and the other way round.
        b_to.push(addr(&to_b)?);
        a_to.push(addr(&to_a)?);
    }
    let map = MediaMap {
        relay: "sbc".into(),
        pid,
        layout: o.layout,
        rss_before_kib: rss_before,
        rss_after_setup_kib: rss_kib(pid),
        setup_seconds: t0.elapsed().as_secs_f64(),
        a_to,
        b_to,
    };
    map.write(&o.map_out)?;
    eprintln!(
        "relay-host: {} calls set up in {:.2} s, map in {}; io {:?}, {} worker(s) on io_uring, connected sends {}",
        o.layout.calls,
        map.setup_seconds,
        o.map_out.display(),
        relay.config().io,
        relay.totals().uring_workers,
        relay.config().connect_latched
    );
    let deadline = Instant::now() + Duration::from_secs(o.max_seconds);
    let mut last_report = Instant::now();
    let mut last = relay.totals();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() >= Duration::from_secs(2) {
            // The log shows when the relay fell behind (buffer waits) and what it dropped.
            let t = relay.totals();
            if t != last {
                eprintln!(
                    "relay-host: {} packets forwarded, {} dropped, {} buffer waits",
                    t.packets, t.dropped, t.buffer_waits
                );
            }
            last = t;
            last_report = Instant::now();
        }
    }
    eprintln!("relay-host: time bound reached, exiting");
    relay.shutdown();
    Ok(())
}

// --- rtpengine ng setup ---------------------------------------------------------------------

/// Options of [`ng_setup`].
pub struct NgSetupOpts {
    pub layout: Layout,
    pub ng: SocketAddr,
    /// rtpengine's pid (for the map: CPU and memory are read from it).
    pub pid: u32,
    pub map_out: std::path::PathBuf,
}

/// A client of rtpengine's ng protocol: one UDP socket, one request at a time, retried with
/// the same cookie (rtpengine answers a repeated cookie from its cache, so a retry never
/// creates a call twice).
pub struct NgClient {
    sock: UdpSocket,
    next: u64,
}

impl NgClient {
    pub fn new(server: SocketAddr) -> anyhow::Result<NgClient> {
        ensure_loopback(server, "ng address")?;
        let local: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0".parse()?
        } else {
            "[::1]:0".parse()?
        };
        let sock = UdpSocket::bind(local)?;
        sock.connect(server)?;
        sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
        Ok(NgClient {
            sock,
            next: u64::from(std::process::id()) << 20,
        })
    }

    /// Sends one command; returns the reply dictionary when its "result" is "ok" (or "pong").
    pub fn request(&mut self, msg: &Value) -> anyhow::Result<Value> {
        self.next += 1;
        let cookie = format!("mb{}", self.next);
        let mut out = cookie.clone().into_bytes();
        out.push(b' ');
        msg.encode_into(&mut out);
        let mut buf = vec![0u8; 65536];
        for _attempt in 0..3 {
            self.sock.send(&out)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let n = match self.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e.into()),
                };
                let reply = &buf[..n];
                let Some(sp) = reply.iter().position(|&b| b == b' ') else {
                    continue;
                };
                if &reply[..sp] != cookie.as_bytes() {
                    continue; // a late answer to an earlier attempt
                }
                let v = bencode::decode(&reply[sp + 1..])
                    .map_err(|e| anyhow::anyhow!("ng reply: {e}"))?;
                let result = v.get("result").and_then(Value::as_bytes).unwrap_or(b"");
                if result == b"ok" || result == b"pong" {
                    return Ok(v);
                }
                let reason = v
                    .get("error-reason")
                    .and_then(Value::as_bytes)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                bail!(
                    "ng {} failed: {} {reason}",
                    String::from_utf8_lossy(
                        msg.get("command").and_then(Value::as_bytes).unwrap_or(b"?")
                    ),
                    String::from_utf8_lossy(result)
                );
            }
        }
        bail!("no ng reply after 3 attempts")
    }
}

/// Sets up the calls through rtpengine (offer with A's SDP, answer with B's) and writes the
/// map from the SDP it returns.
pub fn ng_setup(o: NgSetupOpts) -> anyhow::Result<()> {
    use sbc_media_relay::sdp::Sdp;
    o.layout.check()?;
    let mut ng = NgClient::new(o.ng)?;
    // rtpengine may still be starting: ping until it answers (bounded). Before it binds its
    // ng port a ping fails at once (ICMP port unreachable), so pause between attempts: up to
    // 10 s in all.
    let ping = Value::dict(vec![("command", Value::str("ping"))]);
    let mut up = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ng.request(&ping).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !up {
        bail!("rtpengine at {} does not answer ng ping", o.ng);
    }
    let rss_before = rss_kib(o.pid);
    let t0 = Instant::now();
    let (mut a_to, mut b_to) = (Vec::new(), Vec::new());
    let sdp_of = |v: &Value| -> anyhow::Result<SocketAddr> {
        let sdp = v
            .get("sdp")
            .and_then(Value::as_bytes)
            .context("ng reply without sdp")?;
        Sdp::parse(sdp)
            .map_err(|e| anyhow::anyhow!("rtpengine SDP: {e}"))?
            .rtp_addr(0)
            .context("rtpengine SDP has no RTP address")
    };
    for c in 0..o.layout.calls {
        let call_id = format!("media-bench-{c}");
        let offer = Value::dict(vec![
            ("command", Value::str("offer")),
            ("call-id", Value::str(&call_id)),
            ("from-tag", Value::str("a")),
            ("sdp", Value::str(&endpoint_sdp(o.layout.a(c), c))),
        ]);
        b_to.push(sdp_of(&ng.request(&offer)?)?);
        let answer = Value::dict(vec![
            ("command", Value::str("answer")),
            ("call-id", Value::str(&call_id)),
            ("from-tag", Value::str("a")),
            ("to-tag", Value::str("b")),
            ("sdp", Value::str(&endpoint_sdp(o.layout.b(c), c))),
        ]);
        a_to.push(sdp_of(&ng.request(&answer)?)?);
    }
    let map = MediaMap {
        relay: "rtpengine".into(),
        pid: o.pid,
        layout: o.layout,
        rss_before_kib: rss_before,
        rss_after_setup_kib: rss_kib(o.pid),
        setup_seconds: t0.elapsed().as_secs_f64(),
        a_to,
        b_to,
    };
    map.write(&o.map_out)?;
    eprintln!(
        "ng-setup: {} calls set up in {:.2} s, map in {}",
        o.layout.calls,
        map.setup_seconds,
        o.map_out.display()
    );
    Ok(())
}

// --- generator ------------------------------------------------------------------------------

/// Options of [`gen`].
pub struct GenOpts {
    /// From a setup step; `None` with `direct`.
    pub map: Option<MediaMap>,
    /// Used when there is no map (direct mode).
    pub layout: Layout,
    pub pps: u32,
    pub seconds: u32,
    /// Sent but not measured first: latching, first-packet paths, caches.
    pub warmup: u32,
    /// Pacing tick: every tick sends what is due since the last one.
    pub tick_us: u32,
    /// Core the relay is pinned to, for the core-busy figure.
    pub relay_core: usize,
    /// Read arrivals once per tick instead of sleeping on the endpoints' sockets. On
    /// loopback the kernel delivers a packet in its sender's context, so a relay that sends
    /// while the generator sleeps in `epoll_wait` also pays for waking the generator: the
    /// measuring tool's wake-up charged to the relay, which a far end on another host never
    /// costs. The kernel stamps arrivals, so reading late leaves the latency figures alone.
    pub rx_on_tick: bool,
    pub label: String,
}

/// One run's figures, written as JSON.
#[derive(Debug, Serialize)]
pub struct GenReport {
    pub label: String,
    pub mode: String,
    pub calls: usize,
    pub streams: usize,
    pub pps_per_stream: u32,
    pub seconds: u32,
    pub warmup: u32,
    pub tick_us: u32,
    /// Arrivals read once per tick (`GenOpts::rx_on_tick`) rather than on wake-up.
    pub rx_on_tick: bool,
    /// Packets sent in the measured window.
    pub sent: u64,
    /// Of those, received at the far endpoint (through the relay, or directly).
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    /// Arrived at the wrong endpoint, or not ours at all.
    pub misrouted: u64,
    /// Send (CLOCK_REALTIME just before sendto) to the kernel's receive timestamp
    /// (SO_TIMESTAMPNS) at the far endpoint, microseconds.
    pub lat_p50_us: f64,
    pub lat_p90_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_max_us: f64,
    /// The same to when the generator read the packet (adds its own wake-up delay).
    pub app_lat_p50_us: f64,
    pub app_lat_p99_us: f64,
    /// Largest delay of a send behind its schedule (the generator's own hiccups).
    pub send_lag_max_us: f64,
    pub send_lag_p99_us: f64,
    pub relay_pid: Option<u32>,
    /// CPU seconds of the relay process in the window: schedstat (ns) and utime+stime.
    pub relay_cpu_s: Option<f64>,
    pub relay_cpu_ticks_s: Option<f64>,
    pub relay_core_pct: Option<f64>,
    /// received / window seconds.
    pub pps_relayed: f64,
    /// received / relay CPU seconds (schedstat): packets forwarded per CPU-second.
    pub pps_per_core: Option<f64>,
    /// Busy share of the relay's core (all processes, softirq included) in the window.
    pub relay_core_busy_pct: Option<f64>,
    pub gen_cpu_s: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_setup_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// (rss after setup - before) / calls.
    pub rss_per_call_setup_kib: Option<f64>,
    /// (rss at the end of the media window - before) / calls.
    pub rss_per_call_media_kib: Option<f64>,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn monotonic_ns() -> u64 {
    sbc_media_relay::monotonic_ns()
}

fn pct_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn endpoint_socket(addr: SocketAddr, peer: SocketAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(256 << 10);
    s.bind(&addr.into())
        .with_context(|| format!("binding endpoint {addr}"))?;
    // Connected: sends skip the route lookup, and only the relay socket facing this
    // endpoint (symmetric RTP: it sends from where it receives) gets through.
    s.connect(&peer.into())?;
    s.set_nonblocking(true)?;
    let on: libc::c_int = 1;
    // SAFETY: valid fd and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
    }
    Ok(s.into())
}

/// Receives one datagram with its kernel receive timestamp (CLOCK_REALTIME ns).
fn recv_stamped(fd: libc::c_int, buf: &mut [u8]) -> Option<(usize, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msg points at iov/buf/cbuf, all alive for the call; MSG_DONTWAIT never blocks.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, within
    // msg_controllen; the SCM_TIMESTAMPNS payload is a timespec.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some((n as usize, stamp))
}

struct TimerFd(libc::c_int);

impl TimerFd {
    fn periodic(period_ns: u64) -> anyhow::Result<TimerFd> {
        // SAFETY: plain syscall.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            bail!("timerfd_create: {}", std::io::Error::last_os_error());
        }
        let ts = libc::timespec {
            tv_sec: (period_ns / 1_000_000_000) as _,
            tv_nsec: (period_ns % 1_000_000_000) as _,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: valid fd and itimerspec.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } != 0 {
            bail!("timerfd_settime: {}", std::io::Error::last_os_error());
        }
        Ok(TimerFd(fd))
    }

    fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a u64; EAGAIN is fine.
        unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for TimerFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

struct Epoll(libc::c_int);

impl Epoll {
    fn new() -> anyhow::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn add(&self, fd: libc::c_int, token: u64) -> anyhow::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid fds and event pointer.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: the buffer holds events.len() entries.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        n.max(0) as usize
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// Relay-process figures sampled at the start and the end of the measured window.
struct Sample {
    sched_ns: Option<u64>,
    ticks: Option<u64>,
    core: Option<(u64, u64)>,
    gen_cpu: f64,
}

fn sample(pid: Option<u32>, core: usize) -> Sample {
    Sample {
        sched_ns: pid.and_then(sched_ns),
        ticks: pid.and_then(crate::cpu::process_ticks),
        core: core_jiffies(core),
        gen_cpu: crate::cpu::self_cpu_seconds(),
    }
}

/// Runs the load and returns the report. One thread: a 1 ms (tick_us) timerfd paces the
/// sends, epoll reports arrivals; arrivals are timestamped by the kernel, so the generator's
/// own scheduling delay does not enter the latency (it is in `app_lat_*`).
pub fn gen(o: GenOpts) -> anyhow::Result<GenReport> {
    let layout = o.map.as_ref().map_or(o.layout, |m| m.layout);
    layout.check()?;
    if o.pps == 0 || o.pps > 1000 || o.seconds == 0 || o.seconds > 600 || o.warmup > 60 {
        bail!("pps 1..=1000, seconds 1..=600, warmup 0..=60");
    }
    let calls = layout.calls;
    let flows = 2 * calls;
    // Flow f = 2c + dir: dir 0 is A -> B (sent from A's socket 2c, read on B's socket 2c+1),
    // dir 1 is B -> A. Socket index = flow index of the flow it sends.
    let mut socks = Vec::with_capacity(flows);
    for c in 0..calls {
        let (to_from_a, to_from_b) = match &o.map {
            Some(m) => (m.a_to[c], m.b_to[c]),
            None => (layout.b(c), layout.a(c)),
        };
        socks.push(endpoint_socket(layout.a(c), to_from_a)?);
        socks.push(endpoint_socket(layout.b(c), to_from_b)?);
    }
    let pid = o.map.as_ref().map(|m| m.pid);
    let epoll = Epoll::new()?;
    let tick_ns = u64::from(o.tick_us.clamp(50, 20_000)) * 1000;
    let timer = TimerFd::periodic(tick_ns)?;
    const TIMER: u64 = u64::MAX;
    // With rx_on_tick the generator sleeps on the timer alone and looks at the sockets
    // without waiting, so nothing the relay sends has a sleeper to wake.
    let tick_epoll = if o.rx_on_tick {
        let e = Epoll::new()?;
        e.add(timer.0, TIMER)?;
        Some(e)
    } else {
        epoll.add(timer.0, TIMER)?;
        None
    };
    let mut tick_events = [libc::epoll_event { events: 0, u64: 0 }; 1];
    let mut backlog = false;
    for (i, s) in socks.iter().enumerate() {
        epoll.add(s.as_raw_fd(), i as u64)?;
    }

    let period_ns = 1_000_000_000 / u64::from(o.pps);
    let rounds_warm = u64::from(o.pps) * u64::from(o.warmup);
    let rounds_total = rounds_warm + u64::from(o.pps) * u64::from(o.seconds);
    let total = flows as u64 * rounds_total;
    let measured = |s: u64| {
        let r = s / flows as u64;
        r >= rounds_warm && r < rounds_total
    };
    let t0 = monotonic_ns() + 20_000_000;
    // Stream phases spread evenly over the 20 ms period, as independent phones would be.
    let due = |s: u64| {
        let (r, f) = (s / flows as u64, s % flows as u64);
        t0 + r * period_ns + f * period_ns / flows as u64
    };
    let win_start = t0 + rounds_warm * period_ns;
    let win_end = t0 + rounds_total * period_ns;
    let grace_ns = 300_000_000;
    let hard_deadline = win_end + 5_000_000_000;

    let mut seen = vec![0u64; (total as usize).div_ceil(64)];
    let n_measured = (flows as u64 * (rounds_total - rounds_warm)) as usize;
    let mut lat: Vec<u64> = Vec::with_capacity(n_measured);
    let mut app_lat: Vec<u64> = Vec::with_capacity(n_measured);
    let mut lags: Vec<u64> = Vec::with_capacity(n_measured);
    let (mut sent, mut received, mut dups, mut misrouted) = (0u64, 0u64, 0u64, 0u64);
    let mut pkt = [0u8; PACKET_LEN];
    pkt[0] = 0x80; // V=2, no padding/extension/CSRC
    pkt[1] = 0; // PT 0 (PCMU), no marker
    pkt[28..32].copy_from_slice(MAGIC);
    let mut rbuf = [0u8; 2048];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut s = 0u64;
    let (mut start_sample, mut end_sample, mut rss_end) = (None, None, None);
    let load_start = loadavg();
    loop {
        let n = if let Some(tick_epoll) = &tick_epoll {
            if !backlog && tick_epoll.wait(&mut tick_events, 10) > 0 {
                timer.drain();
            }
            let n = epoll.wait(&mut events, 0);
            backlog = n == events.len();
            n
        } else {
            epoll.wait(&mut events, 10)
        };
        for ev in &events[..n] {
            if ev.u64 == TIMER {
                timer.drain();
                continue;
            }
            let idx = ev.u64 as usize;
            let Some(sock) = socks.get(idx) else { continue };
            let Some((len, kstamp)) = recv_stamped(sock.as_raw_fd(), &mut rbuf) else {
                continue;
            };
            let app = realtime_ns();
            if len < 32 || &rbuf[28..32] != MAGIC {
                misrouted += 1;
                continue;
            }
            let mut b8 = [0u8; 8];
            b8.copy_from_slice(&rbuf[12..20]);
            let sent_at = u64::from_be_bytes(b8);
            b8.copy_from_slice(&rbuf[20..28]);
            let slot = u64::from_be_bytes(b8);
            if slot >= total || (slot % flows as u64) as usize != idx ^ 1 {
                misrouted += 1;
                continue;
            }
            let (w, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
            if seen[w] & bit != 0 {
                dups += 1;
                continue;
            }
            seen[w] |= bit;
            if measured(slot) {
                received += 1;
                lat.push(kstamp.unwrap_or(app).saturating_sub(sent_at));
                app_lat.push(app.saturating_sub(sent_at));
            }
        }
        let now = monotonic_ns();
        if start_sample.is_none() && now >= win_start {
            start_sample = Some(sample(pid, o.relay_core));
        }
        if end_sample.is_none() && now >= win_end {
            end_sample = Some(sample(pid, o.relay_core));
            rss_end = pid.map(rss_kib);
        }
        while s < total && due(s) <= now {
            let f = (s % flows as u64) as usize;
            let seq = (s / flows as u64) as u16;
            pkt[2..4].copy_from_slice(&seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&(u32::from(seq).wrapping_mul(160)).to_be_bytes());
            pkt[8..12].copy_from_slice(&(f as u32).to_be_bytes());
            pkt[20..28].copy_from_slice(&s.to_be_bytes());
            let stamp = realtime_ns();
            pkt[12..20].copy_from_slice(&stamp.to_be_bytes());
            let ok = socks[f].send(&pkt).is_ok();
            if measured(s) {
                lags.push(monotonic_ns().saturating_sub(due(s)));
                if ok {
                    sent += 1;
                }
            }
            s += 1;
        }
        if (s >= total && now >= win_end + grace_ns) || now >= hard_deadline {
            break;
        }
    }
    let load_end = loadavg();
    let (Some(a), Some(b)) = (start_sample, end_sample) else {
        bail!("the measured window never closed (deadline hit)");
    };
    let win_s = (win_end - win_start) as f64 / 1e9;
    let hz = crate::cpu::clock_ticks_per_second() as f64;
    let relay_cpu_s = match (a.sched_ns, b.sched_ns) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / 1e9),
        _ => None,
    };
    let relay_cpu_ticks_s = match (a.ticks, b.ticks) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / hz),
        _ => None,
    };
    let relay_core_busy_pct = match (a.core, b.core) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some(100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
        }
        _ => None,
    };
    lat.sort_unstable();
    app_lat.sort_unstable();
    lags.sort_unstable();
    let lost = sent.saturating_sub(received);
    let per_call = |x: Option<u64>, base: Option<u64>| match (x, base) {
        (Some(x), Some(b)) => Some(x.saturating_sub(b) as f64 / calls as f64),
        _ => None,
    };
    let rss_before = o.map.as_ref().map(|m| m.rss_before_kib);
    let rss_setup = o.map.as_ref().map(|m| m.rss_after_setup_kib);
    Ok(GenReport {
        label: o.label,
        mode: o
            .map
            .as_ref()
            .map_or_else(|| "direct".to_string(), |m| m.relay.clone()),
        calls,
        streams: flows,
        pps_per_stream: o.pps,
        seconds: o.seconds,
        warmup: o.warmup,
        tick_us: (tick_ns / 1000) as u32,
        rx_on_tick: o.rx_on_tick,
        sent,
        received,
        lost,
        loss_pct: if sent > 0 {
            100.0 * lost as f64 / sent as f64
        } else {
            0.0
        },
        duplicates: dups,
        misrouted,
        lat_p50_us: pct_us(&lat, 50.0),
        lat_p90_us: pct_us(&lat, 90.0),
        lat_p99_us: pct_us(&lat, 99.0),
        lat_p999_us: pct_us(&lat, 99.9),
        lat_max_us: pct_us(&lat, 100.0),
        app_lat_p50_us: pct_us(&app_lat, 50.0),
        app_lat_p99_us: pct_us(&app_lat, 99.0),
        send_lag_max_us: pct_us(&lags, 100.0),
        send_lag_p99_us: pct_us(&lags, 99.0),
        relay_pid: pid,
        relay_cpu_s,
        relay_cpu_ticks_s,
        relay_core_pct: relay_cpu_s.map(|c| 100.0 * c / win_s),
        pps_relayed: received as f64 / win_s,
        pps_per_core: relay_cpu_s
            .filter(|&c| c > 0.0)
            .map(|c| received as f64 / c),
        relay_core_busy_pct,
        gen_cpu_s: b.gen_cpu - a.gen_cpu,
        rss_before_kib: rss_before,
        rss_after_setup_kib: rss_setup,
        rss_end_kib: rss_end,
        rss_per_call_setup_kib: per_call(rss_setup, rss_before),
        rss_per_call_media_kib: per_call(rss_end, rss_before),
        loadavg_start: load_start,
        loadavg_end: load_end,
    })
}

impl GenReport {
    /// One line for the console.
    pub fn human(&self) -> String {
        let opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
        };
        format!(
            "{} {}: streams={} sent={} received={} lost={} ({:.3}%) dup={} misrouted={} \
             lat p50={:.1}us p99={:.1}us max={:.0}us | relay cpu={}s ({}% of a core) \
             pps/core={} core busy={}% | rss/call setup={}KiB media={}KiB | \
             send lag max={:.0}us | load {}",
            self.label,
            self.mode,
            self.streams,
            self.sent,
            self.received,
            self.lost,
            self.loss_pct,
            self.duplicates,
            self.misrouted,
            self.lat_p50_us,
            self.lat_p99_us,
            self.lat_max_us,
            opt(self.relay_cpu_s, 3),
            opt(self.relay_core_pct, 1),
            opt(self.pps_per_core, 0),
            opt(self.relay_core_busy_pct, 1),
            opt(self.rss_per_call_setup_kib, 2),
            opt(self.rss_per_call_media_kib, 2),
            self.send_lag_max_us,
            self.loadavg_start,
        )
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.write_all(b"\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_sdp() {
        let l = Layout {
            calls: 3,
            a_ip: "127.0.0.2".parse().unwrap(),
            b_ip: "127.0.0.3".parse().unwrap(),
            peer_base: 30000,
        };
        l.check().unwrap();
        assert_eq!(l.a(2), "127.0.0.2:30004".parse().unwrap());
        let sdp = endpoint_sdp(l.b(1), 1);
        let parsed = sbc_media_relay::sdp::Sdp::parse(sdp.as_bytes()).unwrap();
        assert_eq!(parsed.rtp_addr(0), Some(l.b(1)));
        let bad = Layout {
            a_ip: "10.0.0.1".parse().unwrap(),
            ..l
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct_us(&v, 50.0), 50.0);
        assert_eq!(pct_us(&v, 99.0), 99.0);
        assert_eq!(pct_us(&v, 100.0), 100.0);
        assert_eq!(pct_us(&[], 50.0), 0.0);
    }

    #[test]
    fn direct_run_on_loopback_delivers_everything() {
        // Both ways of reading arrivals: on wake-up, and once per tick.
        for (i, rx_on_tick) in [false, true].into_iter().enumerate() {
            let l = Layout {
                calls: 4,
                a_ip: "127.0.0.2".parse().unwrap(),
                b_ip: "127.0.0.3".parse().unwrap(),
                peer_base: 36000 + (std::process::id() % 1000) as u16 * 8 + i as u16 * 8_000,
            };
            let r = gen(GenOpts {
                map: None,
                layout: l,
                pps: 50,
                seconds: 1,
                warmup: 0,
                tick_us: 1000,
                relay_core: 0,
                rx_on_tick,
                label: "test".into(),
            })
            .unwrap();
            assert_eq!(r.sent, 8 * 50);
            assert_eq!(r.received, r.sent, "rx_on_tick {rx_on_tick}");
            assert_eq!(r.misrouted + r.duplicates, 0);
            assert!(r.lat_p50_us > 0.0);
            assert_eq!(r.rx_on_tick, rx_on_tick);
        }
    }
}
