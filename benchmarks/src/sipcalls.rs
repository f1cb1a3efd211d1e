//! Calls with media through a proxy that anchors RTP (`media-bench sip-calls`, used by
//! benchmarks/scale and benchmarks/soak).
//!
//! The SIP side is a small UDP user agent client: it places `calls` INVITEs through the
//! proxy (each with a phone-like SDP naming endpoint A of its call, see
//! [`crate::media::Layout`]), ACKs the 200s, keeps the dialogs up while [`crate::media::gen`]
//! sends RTP both ways, and then hangs every call up with a BYE. The PBX is `sbc-uas` in
//! media mode ([`crate::uas::MediaAnswer`]): it answers call `c` with endpoint B's SDP and
//! logs the relay address the proxy offered it, so B knows where to send without the UAS
//! keeping any state.
//!
//! The result is a [`MediaMap`] like the ones `relay-host` and `ng-setup` write, with the
//! proxy as the relay: the same generator then measures packets, latency, CPU and memory.
//! Setup and teardown latency (INVITE sent -> 200 received, BYE sent -> 200 received) and
//! failures are measured here.
//!
//! Bounded: INVITE and BYE are retransmitted per RFC 3261 Timer A/E (T1 = 500 ms doubling)
//! until a final response or `timeout`; the whole setup or teardown ends at a hard deadline
//! whatever arrives. Only loopback addresses are accepted.

use crate::media::{endpoint_sdp, rss_kib, Layout, MediaMap};
use crate::net;
use crate::report::Latencies;
use anyhow::{bail, Context};
use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::scan::trim;
use sbc_sip::{HeaderName, Message};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T1: Duration = Duration::from_millis(500);

/// Options of [`setup`].
#[derive(Clone, Debug)]
pub struct SipCallsOpts {
    /// The proxy's UDP listener.
    pub target: SocketAddr,
    /// Where the client binds (a trunk source the proxy accepts calls from).
    pub local: SocketAddr,
    pub domain: String,
    pub layout: Layout,
    /// New calls per second during setup (open loop).
    pub rate: u32,
    /// Per-transaction limit for a final response.
    pub timeout: Duration,
    /// The `sbc-uas --media-log` file.
    pub uas_log: PathBuf,
    /// The proxy's pid: its RSS goes into the map.
    pub proxy_pid: u32,
}

/// Setup or teardown figures.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PhaseReport {
    pub attempted: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Non-2xx final responses by status.
    pub statuses: HashMap<u16, usize>,
    pub timeouts: usize,
    pub retransmissions: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub seconds: f64,
}

/// A confirmed dialog: what the ACK and the BYE need (RFC 3261 12.2.1.1).
#[derive(Debug, Clone)]
struct Dialog {
    /// The 200's To header value (with the callee's tag).
    to: Vec<u8>,
    /// Remote target: the 200's Contact URI.
    ruri: Vec<u8>,
    /// `Route:` lines, the Record-Route set reversed.
    routes: Vec<u8>,
}

#[derive(Debug, Clone)]
enum State {
    Pending,
    Trying {
        first: Instant,
        next_rtx: Instant,
        interval: Duration,
    },
    Up(Dialog),
    Failed,
}

/// The established calls between [`setup`] and [`teardown`].
pub struct Calls {
    sock: UdpSocket,
    opts: SipCallsOpts,
    run: u32,
    local_hp: String,
    state: Vec<State>,
    buf: Vec<u8>,
}

impl Calls {
    fn call_id(&self, c: usize) -> String {
        format!("mc-{:x}-{c}", self.run)
    }

    fn common(&self, out: &mut String, c: usize, kind: char, to: &str, cseq: &str) {
        let _ = write!(
            out,
            "Via: SIP/2.0/UDP {};branch=z9hG4bKmc{:x}x{c}{kind};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:caller@{}>;tag=f{c}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {cseq}\r\n",
            self.local_hp,
            self.run,
            self.opts.domain,
            self.call_id(c)
        );
    }

    fn invite(&self, c: usize) -> String {
        let sdp = endpoint_sdp(self.opts.layout.a(c), c);
        let mut m = format!("INVITE sip:m{c}@{} SIP/2.0\r\n", self.opts.domain);
        let to = format!("<sip:m{c}@{}>", self.opts.domain);
        self.common(&mut m, c, 'i', &to, "1 INVITE");
        let _ = write!(
            m,
            "Contact: <sip:caller@{}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            self.local_hp,
            sdp.len()
        );
        m
    }

    /// ACK of a non-2xx final: same branch as the INVITE, hop by hop (17.1.1.3).
    fn ack_non2xx(&self, c: usize, to: &[u8]) -> String {
        let mut m = format!("ACK sip:m{c}@{} SIP/2.0\r\n", self.opts.domain);
        self.common(&mut m, c, 'i', &String::from_utf8_lossy(to), "1 ACK");
        m.push_str("Content-Length: 0\r\n\r\n");
        m
    }

    fn in_dialog(&self, c: usize, d: &Dialog, method: &str, kind: char, cseq: &str) -> String {
        let mut m = format!("{method} {} SIP/2.0\r\n", String::from_utf8_lossy(&d.ruri));
        self.common(&mut m, c, kind, &String::from_utf8_lossy(&d.to), cseq);
        m.push_str(&String::from_utf8_lossy(&d.routes));
        m.push_str("Content-Length: 0\r\n\r\n");
        m
    }

    /// Every in-dialog request goes to the proxy: in these runs it is the only hop, and a
    /// Record-Route naming anything but loopback must never be followed.
    fn send(&self, msg: &str) -> bool {
        self.sock.send_to(msg.as_bytes(), self.opts.target).is_ok()
    }

    /// Reads one datagram, waiting at most `wait`; `None` when nothing came.
    fn recv(&mut self, wait: Duration) -> Option<Message> {
        let _ = self
            .sock
            .set_read_timeout(Some(wait.max(Duration::from_micros(100))));
        match self.sock.recv_from(&mut self.buf) {
            Ok((n, _)) => Message::parse(Bytes::copy_from_slice(&self.buf[..n])).ok(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(_) => None,
        }
    }

    /// Call index of a response of ours.
    fn index_of(&self, msg: &Message) -> Option<usize> {
        let id = std::str::from_utf8(msg.call_id()).ok()?;
        let prefix = format!("mc-{:x}-", self.run);
        let c: usize = id.strip_prefix(&prefix)?.parse().ok()?;
        (c < self.state.len()).then_some(c)
    }

    /// Established calls.
    pub fn up(&self) -> usize {
        self.state
            .iter()
            .filter(|s| matches!(s, State::Up(_)))
            .count()
    }
}

fn dialog_of(msg: &Message) -> Option<Dialog> {
    let contact = msg
        .values(HeaderName::Contact)
        .next()
        .and_then(|(_, v)| NameAddr::parse(v).ok())?;
    let to = trim(msg.header_value(HeaderName::To)?).to_vec();
    let mut rr: Vec<&[u8]> = msg
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| v)
        .collect();
    rr.reverse();
    let mut routes = Vec::new();
    for r in rr {
        routes.extend_from_slice(b"Route: ");
        routes.extend_from_slice(r);
        routes.extend_from_slice(b"\r\n");
    }
    Some(Dialog {
        to,
        ruri: contact.uri_raw.to_vec(),
        routes,
    })
}

fn finish(rep: &mut PhaseReport, lat: &mut Latencies, started: Instant) {
    rep.latency_p50_ms = lat.percentile_ms(50.0);
    rep.latency_p99_ms = lat.percentile_ms(99.0);
    rep.latency_max_ms = lat.max_ms();
    rep.seconds = started.elapsed().as_secs_f64();
}

/// The SIP socket. With port 0 the kernel's pick must not land among the media endpoints'
/// ports on the same address (the endpoints bind later and would find one taken): picks
/// inside `peer_base ..= peer_base + 2 x calls + 1` are held (so the next pick differs) and
/// dropped once one outside is found, at most 64 times.
fn signalling_socket(o: &SipCallsOpts) -> anyhow::Result<std::net::UdpSocket> {
    let bind = || net::udp_socket(o.local, false).with_context(|| format!("binding {}", o.local));
    if o.local.port() != 0 {
        return bind();
    }
    let lo = o.layout.peer_base;
    let hi = usize::from(lo) + 2 * o.layout.calls + 1;
    let mut held = Vec::new();
    for _ in 0..64 {
        let s = bind()?;
        let port = s.local_addr()?.port();
        if port < lo || usize::from(port) > hi {
            return Ok(s);
        }
        held.push(s);
    }
    bail!(
        "no port for SIP on {} outside the media endpoints' {lo}-{hi}",
        o.local.ip()
    )
}

/// Places every call and returns them with the media map (calls that failed keep their
/// slot: the generator still binds their endpoints, and their packets count as lost).
pub fn setup(o: SipCallsOpts) -> anyhow::Result<(Calls, MediaMap, PhaseReport)> {
    o.layout.check()?;
    net::ensure_loopback(o.target, "--target")?;
    net::ensure_loopback(o.local, "--local")?;
    if o.rate == 0 || o.rate > 10_000 {
        bail!("--rate must be 1..=10000");
    }
    let sock = signalling_socket(&o)?;
    let local_hp = net::hostport(net::advertised(sock.local_addr()?));
    let n = o.layout.calls;
    let run = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() << 4);
    let mut calls = Calls {
        sock,
        opts: o.clone(),
        run,
        local_hp,
        state: vec![State::Pending; n],
        buf: vec![0u8; 65536],
    };
    let rss_before = rss_kib(o.proxy_pid);
    let mut a_to: Vec<Option<SocketAddr>> = vec![None; n];
    let mut rep = PhaseReport {
        attempted: n,
        ..PhaseReport::default()
    };
    let mut lat = Latencies::with_capacity(n);
    let start = Instant::now();
    let hard_deadline =
        start + Duration::from_secs_f64(n as f64 / f64::from(o.rate)) + o.timeout * 2 + T1;
    let mut next = 0usize;
    let mut last_scan = start;
    loop {
        let now = Instant::now();
        while next < n && start + Duration::from_secs_f64(next as f64 / f64::from(o.rate)) <= now {
            let m = calls.invite(next);
            calls.send(&m);
            calls.state[next] = State::Trying {
                first: now,
                next_rtx: now + T1,
                interval: T1,
            };
            next += 1;
        }
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            for c in 0..n {
                let State::Trying {
                    first,
                    next_rtx,
                    interval,
                } = calls.state[c].clone()
                else {
                    continue;
                };
                if now.duration_since(first) >= o.timeout {
                    calls.state[c] = State::Failed;
                    rep.timeouts += 1;
                } else if now >= next_rtx {
                    let m = calls.invite(c);
                    calls.send(&m);
                    rep.retransmissions += 1;
                    let interval = interval * 2;
                    calls.state[c] = State::Trying {
                        first,
                        next_rtx: now + interval,
                        interval,
                    };
                }
            }
        }
        let trying = calls
            .state
            .iter()
            .any(|s| matches!(s, State::Trying { .. } | State::Pending));
        if !trying || now >= hard_deadline {
            break;
        }
        while let Some(msg) = calls.recv(Duration::from_millis(1)) {
            let (Some(status), Some(c)) = (msg.status(), calls.index_of(&msg)) else {
                continue;
            };
            if msg.cseq_method_bytes() != b"INVITE" || status < 200 {
                continue;
            }
            let got = Instant::now();
            if (200..300).contains(&status) {
                if let State::Trying { first, .. } = calls.state[c] {
                    match dialog_of(&msg) {
                        Some(d) => {
                            lat.record_us(got.duration_since(first).as_micros() as u64);
                            a_to[c] = sbc_media_relay::sdp::Sdp::parse(msg.body())
                                .ok()
                                .and_then(|s| s.rtp_addr(0));
                            calls.state[c] = State::Up(d);
                        }
                        None => calls.state[c] = State::Failed,
                    }
                }
                // A retransmitted 2xx is ACKed again (13.2.2.4).
                if let State::Up(d) = &calls.state[c] {
                    let m = calls.in_dialog(c, d, "ACK", 'a', "1 ACK");
                    calls.send(&m);
                }
            } else {
                let to = trim(msg.header_value(HeaderName::To).unwrap_or(b"")).to_vec();
                let m = calls.ack_non2xx(c, &to);
                calls.send(&m);
                if matches!(calls.state[c], State::Trying { .. }) {
                    *rep.statuses.entry(status).or_default() += 1;
                    calls.state[c] = State::Failed;
                }
            }
        }
    }
    for s in calls.state.iter_mut() {
        if matches!(s, State::Trying { .. } | State::Pending) {
            *s = State::Failed;
            rep.timeouts += 1;
        }
    }
    rep.succeeded = calls.up();
    rep.failed = n - rep.succeeded;
    finish(&mut rep, &mut lat, start);
    let rss_after = rss_kib(o.proxy_pid);
    let b_to = read_uas_log(&o.uas_log, &calls, Duration::from_secs(2))?;
    // A call that failed keeps a harmless placeholder: the generator sends to it, nothing
    // answers, and its packets count as lost.
    let fallback = SocketAddr::new(o.target.ip(), 9);
    let map = MediaMap {
        relay: "sbc".into(),
        pid: o.proxy_pid,
        layout: o.layout,
        rss_before_kib: rss_before,
        rss_after_setup_kib: rss_after,
        setup_seconds: rep.seconds,
        a_to: a_to.iter().map(|a| a.unwrap_or(fallback)).collect(),
        b_to: b_to.iter().map(|b| b.unwrap_or(fallback)).collect(),
    };
    for m in map.a_to.iter().chain(&map.b_to) {
        net::ensure_loopback(*m, "relay address in SDP")?;
    }
    Ok((calls, map, rep))
}

/// The UAS's log, `c ip:port` per answered INVITE (the last line of a call wins: a
/// retransmitted INVITE is logged again with the same address). Waits up to `wait` for every
/// established call to appear.
fn read_uas_log(
    path: &std::path::Path,
    calls: &Calls,
    wait: Duration,
) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    let n = calls.state.len();
    let deadline = Instant::now() + wait;
    loop {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the UAS media log {}", path.display()))?;
        let mut out = vec![None; n];
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(c), Some(a)) = (it.next(), it.next()) else {
                continue;
            };
            let (Ok(c), Ok(a)) = (c.parse::<usize>(), a.parse::<SocketAddr>()) else {
                continue;
            };
            if c < n {
                out[c] = Some(a);
            }
        }
        let missing = (0..n)
            .filter(|&c| matches!(calls.state[c], State::Up(_)) && out[c].is_none())
            .count();
        if missing == 0 || Instant::now() >= deadline {
            if missing > 0 {
                eprintln!("sip-calls: {missing} established calls missing from the UAS log");
            }
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Hangs up every established call (BYE, retransmitted per Timer E) and waits for the 200s.
pub fn teardown(calls: &mut Calls, rate: u32) -> PhaseReport {
    let n = calls.state.len();
    let targets: Vec<usize> = (0..n)
        .filter(|&c| matches!(calls.state[c], State::Up(_)))
        .collect();
    let mut rep = PhaseReport {
        attempted: targets.len(),
        ..PhaseReport::default()
    };
    let mut lat = Latencies::with_capacity(targets.len());
    // Per call: (first sent, next retransmission, interval), None once answered.
    let mut pending: HashMap<usize, (Instant, Instant, Duration)> = HashMap::new();
    let rate = rate.clamp(1, 10_000);
    let timeout = calls.opts.timeout;
    let start = Instant::now();
    let hard_deadline =
        start + Duration::from_secs_f64(targets.len() as f64 / f64::from(rate)) + timeout * 2 + T1;
    let mut next = 0usize;
    let mut last_scan = start;
    loop {
        let now = Instant::now();
        while next < targets.len()
            && start + Duration::from_secs_f64(next as f64 / f64::from(rate)) <= now
        {
            let c = targets[next];
            if let State::Up(d) = &calls.state[c] {
                let m = calls.in_dialog(c, d, "BYE", 'b', "2 BYE");
                calls.send(&m);
                pending.insert(c, (now, now + T1, T1));
            }
            next += 1;
        }
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            let mut expired = Vec::new();
            for (&c, e) in pending.iter_mut() {
                if now.duration_since(e.0) >= timeout {
                    expired.push(c);
                } else if now >= e.1 {
                    if let State::Up(d) = &calls.state[c] {
                        let m = calls.in_dialog(c, d, "BYE", 'b', "2 BYE");
                        calls.send(&m);
                    }
                    rep.retransmissions += 1;
                    e.2 = (e.2 * 2).min(Duration::from_secs(4));
                    e.1 = now + e.2;
                }
            }
            for c in expired {
                pending.remove(&c);
                rep.timeouts += 1;
                calls.state[c] = State::Failed;
            }
        }
        if (next >= targets.len() && pending.is_empty()) || now >= hard_deadline {
            break;
        }
        while let Some(msg) = calls.recv(Duration::from_millis(1)) {
            let (Some(status), Some(c)) = (msg.status(), calls.index_of(&msg)) else {
                continue;
            };
            if msg.cseq_method_bytes() != b"BYE" || status < 200 {
                continue;
            }
            if let Some((first, _, _)) = pending.remove(&c) {
                if (200..300).contains(&status) {
                    lat.record_us(first.elapsed().as_micros() as u64);
                    rep.succeeded += 1;
                } else {
                    *rep.statuses.entry(status).or_default() += 1;
                }
                calls.state[c] = State::Failed;
            }
        }
    }
    rep.timeouts += pending.len();
    rep.failed = rep.attempted - rep.succeeded;
    finish(&mut rep, &mut lat, start);
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialog_from_a_200_reverses_record_route() {
        let raw = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.12:5000;branch=z9hG4bKx\r\n\
            Record-Route: <sip:a@127.0.0.1:5060;lr>, <sip:b@127.0.0.1:5061;lr>\r\n\
            From: <sip:caller@d>;tag=f1\r\nTo: <sip:m1@d>;tag=t1\r\nCall-ID: mc-1-1\r\n\
            CSeq: 1 INVITE\r\nContact: <sip:uas@127.0.0.2:5070>\r\nContent-Length: 0\r\n\r\n";
        let msg = Message::parse(Bytes::from(raw)).expect("test message parses");
        let d = dialog_of(&msg).expect("dialog");
        assert_eq!(d.ruri, b"sip:uas@127.0.0.2:5070");
        assert_eq!(d.to, b"<sip:m1@d>;tag=t1");
        assert_eq!(
            String::from_utf8_lossy(&d.routes),
            "Route: <sip:b@127.0.0.1:5061;lr>\r\nRoute: <sip:a@127.0.0.1:5060;lr>\r\n"
        );
    }

    /// The whole exchange against sbc-uas's handler in media mode with no proxy in between:
    /// A's answer names B, B's log names A, every call is set up and hung up.
    #[test]
    fn setup_and_teardown_against_a_media_uas() {
        use crate::uas::{Handler, MediaAnswer, UasStats};
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind uas");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let uas_addr = sock.local_addr().expect("addr");
        let log = std::env::temp_dir().join(format!("sipcalls-test-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("log");
        let mut h = Handler::new(uas_addr, 60);
        h.media = Some(MediaAnswer {
            b_ip: "127.0.0.1".parse().expect("ip"),
            peer_base: 41000,
            log: std::sync::Arc::new(parking_lot::Mutex::new(file)),
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let server = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut st = UasStats::default();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, src)) = sock.recv_from(&mut buf) {
                    h.handle(
                        Bytes::copy_from_slice(&buf[..n]),
                        &mut st,
                        &mut |r: &[u8]| u64::from(sock.send_to(r, src).is_ok()),
                    );
                }
            }
            st
        });
        let layout = Layout {
            calls: 20,
            a_ip: "127.0.0.1".parse().expect("ip"),
            b_ip: "127.0.0.1".parse().expect("ip"),
            peer_base: 41000,
        };
        let (mut calls, map, rep) = setup(SipCallsOpts {
            target: uas_addr,
            local: "127.0.0.1:0".parse().expect("addr"),
            domain: "bench.test".into(),
            layout,
            rate: 1000,
            timeout: Duration::from_secs(3),
            uas_log: log.clone(),
            proxy_pid: std::process::id(),
        })
        .expect("setup");
        assert_eq!((rep.succeeded, rep.failed), (20, 0), "{rep:?}");
        assert!(rep.latency_p50_ms.is_some());
        // No proxy: A sends to B's SDP address and B to A's.
        for c in 0..20 {
            assert_eq!(map.a_to[c], layout.b(c));
            assert_eq!(map.b_to[c], layout.a(c));
        }
        let td = teardown(&mut calls, 1000);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let st = server.join().expect("uas thread");
        let _ = std::fs::remove_file(&log);
        assert_eq!(
            (td.attempted, td.succeeded, td.failed),
            (20, 20, 0),
            "{td:?}"
        );
        assert_eq!((st.invite, st.ack, st.bye), (20, 20, 20));
        assert_eq!(calls.up(), 0);
    }

    #[test]
    fn a_200_without_contact_makes_no_dialog() {
        let raw = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.12:5000;branch=z9hG4bKx\r\n\
            From: <sip:caller@d>;tag=f1\r\nTo: <sip:m1@d>;tag=t1\r\nCall-ID: mc-1-1\r\n\
            CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let msg = Message::parse(Bytes::from(raw)).expect("test message parses");
        assert!(dialog_of(&msg).is_none());
    }
}
