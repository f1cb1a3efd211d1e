//! The open-loop UDP SIP load generator behind `sbc-loadgen`.
//!
//! # Shape
//!
//! One thread, a few non-blocking UDP sockets and `ppoll`: no async runtime, no task per
//! call. An operation (a call or a REGISTER) is a slot in a slab with a small state machine;
//! its timers (retransmission, timeout, hold) are entries in one binary heap, checked
//! lazily against the slot's generation and phase so that nothing is ever cancelled.
//!
//! # Ticks
//!
//! By default the loop wakes once per `tick` (1 ms): it reads every queued response in
//! batches ([`crate::rx`]), starts the operations that fell due, fires due timers and
//! sleeps again. Waking per datagram instead costs several times more CPU on the VMs this
//! runs on (sleep/wake, not syscalls, dominates), on both sides of the socket. Latency is
//! unaffected: requests are stamped when sent and responses by the kernel when queued. What
//! the tick does change is burstiness: operations due within one tick leave together, and an
//! ACK or BYE may follow its trigger up to one tick later. `tick = 0` wakes on every
//! readable socket and every due time instead (`ppoll` with a nanosecond timeout), for
//! low-rate runs where that matters more than the generator's CPU.
//!
//! # Open loop
//!
//! Operation `i` is due at `start + i / rate` whether or not earlier ones were answered: a
//! closed loop would slow down with the system under test and hide its saturation. If the
//! generator itself falls behind (noisy machine) it catches up in a burst and reports the
//! worst lateness (`send_lag_max_ms`); operations more than [`START_GRACE`] past the end of
//! the schedule are not started and are reported as `not_started`.
//!
//! # Matching
//!
//! Responses are matched by the branch of their top Via (RFC 3261 17.1.3), which encodes this
//! run's random token, the slot, the slot's generation and the transaction kind. A response
//! for a slot that has since been reused carries an old generation and is counted as stale;
//! one from another run or from nowhere is unmatched. No hash map is needed.
//!
//! # Messages
//!
//! Everything constant (request lines, Via prefix per socket, From/To, SDP) is rendered once
//! into [`Templates`]; each message is a handful of `extend_from_slice` calls and hex numbers
//! into one reused buffer. Retransmissions re-render from the slot's state, which is
//! deterministic, so they are byte-identical as RFC 3261 requires without keeping a copy.

use crate::cpu::CpuWatch;
use crate::net;
use crate::report::{Latencies, Report};
use crate::rx::{self, RxBatch};
use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::scan::trim;
use sbc_sip::uri::Uri;
use sbc_sip::{HeaderName, Message, Span};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// RFC 3261 T1: first retransmission interval of Timer A (INVITE) and Timer E (non-INVITE).
const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2: cap of the Timer E interval.
const T2: Duration = Duration::from_secs(4);
/// How late past the end of the schedule an operation may still be started; beyond that the
/// generator is saturated and starting more would only distort the run's duration.
pub const START_GRACE: Duration = Duration::from_secs(1);
/// `recvmmsg` batches read per socket before the schedule and the timers get a turn, so a
/// flood of responses cannot starve the sending side.
const RECV_BATCHES: usize = 16;
/// Upper bound on operations in one run (rate x duration), to keep every run bounded.
pub const MAX_OPS: u64 = 20_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// REGISTER (no authentication) for users u0..u{users-1}, round robin.
    Register,
    /// INVITE / 100 / 180 / 200 / ACK, optional hold, BYE / 200.
    Call,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Register => "register",
            Scenario::Call => "call",
        }
    }
}

/// What to run; see the `sbc-loadgen` CLI for the meaning of each field.
#[derive(Clone, Debug)]
pub struct Config {
    pub scenario: Scenario,
    pub rate: f64,
    pub duration: Duration,
    pub target: SocketAddr,
    pub local: SocketAddr,
    pub sockets: usize,
    pub domain: String,
    pub callee: String,
    pub users: u32,
    pub expires: u32,
    /// REGISTER: a new Call-ID per request instead of one per user with increasing CSeq.
    pub fresh_call_id: bool,
    pub timeout: Duration,
    pub hold: Duration,
    /// Wake-up granularity of the main loop (see the module docs); zero: wake per event.
    pub tick: Duration,
    pub pids: Vec<u32>,
}

impl Config {
    /// Rejects settings that would make a run unbounded or send off the machine.
    pub fn validate(&self) -> anyhow::Result<()> {
        net::ensure_loopback(self.target, "--target")?;
        net::ensure_loopback(net::advertised(self.local), "--local")?;
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0 && self.rate <= 200_000.0,
            "--rate must be in (0, 200000]"
        );
        anyhow::ensure!(
            self.duration > Duration::ZERO && self.duration <= Duration::from_secs(3600),
            "--duration must be in (0, 3600] s"
        );
        anyhow::ensure!(
            self.total_ops() <= MAX_OPS,
            "rate x duration exceeds {MAX_OPS} operations"
        );
        anyhow::ensure!(
            self.timeout > Duration::ZERO && self.timeout <= Duration::from_secs(120),
            "--timeout must be in (0, 120] s"
        );
        anyhow::ensure!(
            self.hold <= Duration::from_secs(600),
            "--hold-ms must be at most 600000"
        );
        anyhow::ensure!((1..=16).contains(&self.sockets), "--sockets must be 1..=16");
        anyhow::ensure!(
            self.tick <= Duration::from_millis(100),
            "--tick-us must be at most 100000"
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.users),
            "--users must be 1..=10000000"
        );
        for (name, v) in [("--domain", &self.domain), ("--callee", &self.callee)] {
            anyhow::ensure!(
                !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b)),
                "{name} must be a plain host/user token"
            );
        }
        Ok(())
    }

    pub fn total_ops(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Free,
    /// INVITE sent, no final response yet.
    Invite,
    /// 2xx received and ACKed; waiting for the hold time before BYE.
    Hold,
    Bye,
    Register,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Retransmit,
    Timeout,
    Hold,
}

/// A heap entry. It is valid only while the slot still has this generation and phase;
/// otherwise it is dropped when popped (lazy cancellation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    slot: u32,
    gen: u32,
    phase: Phase,
    kind: TimerKind,
}

/// Transaction kinds as encoded in the last character of the branch.
const K_INVITE: u8 = b'i';
const K_ACK: u8 = b'a';
const K_BYE: u8 = b'b';
const K_REGISTER: u8 = b'r';

/// One operation in flight. Slots are reused, and with them the capacity of the `Vec`s, so
/// a steady-state run allocates nothing per call here.
struct Op {
    gen: u32,
    phase: Phase,
    sock: usize,
    /// Operation number: from-tag and Call-ID are derived from it.
    num: u64,
    user: u32,
    cseq: u32,
    /// When the current transaction's request was first sent.
    txn_start: Instant,
    /// When the operation's first request (INVITE or REGISTER) was first sent.
    op_start: Instant,
    retx: Duration,
    /// Any response to the current transaction stops its retransmissions.
    answered: bool,
    saw_100: bool,
    saw_180: bool,
    /// Setup latency, kept until the call completes so only successful calls are counted.
    setup_us: u64,
    /// Dialog state from the 2xx (RFC 3261 12.1.2).
    dest: SocketAddr,
    ruri: Vec<u8>,
    routes: Vec<u8>,
    to: Vec<u8>,
    /// The ACK for the 2xx, re-sent if the 2xx is retransmitted (RFC 3261 13.2.2.4).
    ack: Vec<u8>,
}

impl Op {
    fn new(now: Instant, dest: SocketAddr) -> Op {
        Op {
            gen: 0,
            phase: Phase::Free,
            sock: 0,
            num: 0,
            user: 0,
            cseq: 0,
            txn_start: now,
            op_start: now,
            retx: T1,
            answered: false,
            saw_100: false,
            saw_180: false,
            setup_us: 0,
            dest,
            ruri: Vec::new(),
            routes: Vec::new(),
            to: Vec::new(),
            ack: Vec::new(),
        }
    }
}

/// Pre-rendered constant parts of every request.
struct Templates {
    /// `Via: SIP/2.0/UDP host:port;rport;branch=z9hG4bKlg<run>.` per socket.
    via: Vec<Vec<u8>>,
    /// `<sip:lg@host:port>` style Contact lines per socket (calls).
    invite_tail: Vec<Vec<u8>>,
    /// Local host:port per socket, for REGISTER Contacts.
    local_hp: Vec<Vec<u8>>,
    invite_line: Vec<u8>,
    ack_line_initial: Vec<u8>,
    from_head: Vec<u8>,
    to_callee: Vec<u8>,
    callid_tail: Vec<u8>,
    register_line: Vec<u8>,
    domain: Vec<u8>,
    expires: Vec<u8>,
    /// This run's token as it appears in branches (8 hex digits).
    run_hex: [u8; 8],
}

const BRANCH_PREFIX: &[u8] = b"z9hG4bKlg";

impl Templates {
    fn new(cfg: &Config, locals: &[SocketAddr], run: u32) -> Templates {
        let run_hex_s = format!("{run:08x}");
        let mut run_hex = [0u8; 8];
        run_hex.copy_from_slice(run_hex_s.as_bytes());
        let d = &cfg.domain;
        let via = locals
            .iter()
            .map(|a| {
                format!(
                    "Via: SIP/2.0/UDP {};rport;branch={}{run_hex_s}.",
                    net::hostport(*a),
                    std::str::from_utf8(BRANCH_PREFIX).unwrap_or("z9hG4bKlg")
                )
                .into_bytes()
            })
            .collect();
        let invite_tail = locals
            .iter()
            .map(|a| {
                let sdp = format!(
                    "v=0\r\no=lg 1 1 {c}\r\ns=-\r\nc={c}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
                    c = net::sdp_addr(a.ip())
                );
                format!(
                    "CSeq: 1 INVITE\r\nContact: <sip:lg@{}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
                    net::hostport(*a),
                    sdp.len()
                )
                .into_bytes()
            })
            .collect();
        Templates {
            via,
            invite_tail,
            local_hp: locals
                .iter()
                .map(|a| net::hostport(*a).into_bytes())
                .collect(),
            invite_line: format!("INVITE sip:{}@{d} SIP/2.0\r\n", cfg.callee).into_bytes(),
            ack_line_initial: format!("ACK sip:{}@{d} SIP/2.0\r\n", cfg.callee).into_bytes(),
            from_head: format!("Max-Forwards: 70\r\nFrom: <sip:lg@{d}>;tag=").into_bytes(),
            to_callee: format!("To: <sip:{}@{d}>\r\n", cfg.callee).into_bytes(),
            callid_tail: format!(".{run_hex_s}@lg\r\n").into_bytes(),
            register_line: format!("REGISTER sip:{d} SIP/2.0\r\n").into_bytes(),
            domain: d.clone().into_bytes(),
            expires: cfg.expires.to_string().into_bytes(),
            run_hex,
        }
    }

    fn via(&self, out: &mut Vec<u8>, sock: usize, slot: u32, gen: u32, kind: u8) {
        out.extend_from_slice(&self.via[sock]);
        let _ = write!(out, "{slot:x}.{gen:x}.");
        out.push(kind);
        out.extend_from_slice(b"\r\n");
    }

    /// `From` (with Max-Forwards before it) and `Call-ID` of a call.
    fn call_ids(&self, out: &mut Vec<u8>, num: u64) {
        out.extend_from_slice(&self.from_head);
        let _ = write!(out, "{num:x}\r\nCall-ID: c{num:x}");
        out.extend_from_slice(&self.callid_tail);
    }

    fn invite(&self, out: &mut Vec<u8>, slot: u32, op: &Op) {
        out.clear();
        out.extend_from_slice(&self.invite_line);
        self.via(out, op.sock, slot, op.gen, K_INVITE);
        self.call_ids(out, op.num);
        out.extend_from_slice(&self.to_callee);
        out.extend_from_slice(&self.invite_tail[op.sock]);
    }

    /// ACK for a non-2xx final: part of the INVITE transaction, so same branch, Request-URI
    /// and (empty) route set as the INVITE, and the To of the response (RFC 3261 17.1.1.3).
    fn ack_non2xx(&self, out: &mut Vec<u8>, slot: u32, op: &Op, to: &[u8]) {
        out.clear();
        out.extend_from_slice(&self.ack_line_initial);
        self.via(out, op.sock, slot, op.gen, K_INVITE);
        self.call_ids(out, op.num);
        out.extend_from_slice(b"To: ");
        out.extend_from_slice(to);
        out.extend_from_slice(b"\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n");
    }

    /// An in-dialog request (ACK for the 2xx, BYE) built from the dialog state.
    fn in_dialog(&self, out: &mut Vec<u8>, slot: u32, op: &Op, method: &[u8], kind: u8, cseq: u32) {
        out.clear();
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(&op.ruri);
        out.extend_from_slice(b" SIP/2.0\r\n");
        self.via(out, op.sock, slot, op.gen, kind);
        out.extend_from_slice(&op.routes);
        self.call_ids(out, op.num);
        out.extend_from_slice(b"To: ");
        out.extend_from_slice(&op.to);
        let _ = write!(out, "\r\nCSeq: {cseq} ");
        out.extend_from_slice(method);
        out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    }

    fn register(&self, out: &mut Vec<u8>, slot: u32, op: &Op, fresh_call_id: bool) {
        let u = op.user;
        out.clear();
        out.extend_from_slice(&self.register_line);
        self.via(out, op.sock, slot, op.gen, K_REGISTER);
        out.extend_from_slice(b"Max-Forwards: 70\r\nFrom: <sip:u");
        let _ = write!(out, "{u}@");
        out.extend_from_slice(&self.domain);
        if fresh_call_id {
            let _ = write!(out, ">;tag={:x}\r\nCall-ID: c{:x}", op.num, op.num);
        } else {
            let _ = write!(out, ">;tag=u{u:x}\r\nCall-ID: r{u:x}");
        }
        out.extend_from_slice(&self.callid_tail);
        let _ = write!(out, "To: <sip:u{u}@");
        out.extend_from_slice(&self.domain);
        let _ = write!(
            out,
            ">\r\nCSeq: {} REGISTER\r\nContact: <sip:u{u}@",
            op.cseq
        );
        out.extend_from_slice(&self.local_hp[op.sock]);
        out.extend_from_slice(b">\r\nExpires: ");
        out.extend_from_slice(&self.expires);
        out.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    }

    /// Splits one of our branches into (slot, generation, kind); `None` for anything else.
    fn decode_branch(&self, branch: &[u8]) -> Option<(u32, u32, u8)> {
        let rest = branch.strip_prefix(BRANCH_PREFIX)?;
        let rest = rest.strip_prefix(&self.run_hex[..])?;
        let rest = rest.strip_prefix(b".")?;
        let mut parts = rest.split(|&b| b == b'.');
        let slot = parse_hex(parts.next()?)?;
        let gen = parse_hex(parts.next()?)?;
        let kind = parts.next()?;
        if kind.len() != 1 || parts.next().is_some() {
            return None;
        }
        Some((slot, gen, kind[0]))
    }
}

fn parse_hex(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    let mut v = 0u32;
    for &b in s {
        let d = (b as char).to_digit(16)?;
        v = (v << 4) | d;
    }
    Some(v)
}

/// One operation of a traced run ([`run_traced`], `sbc-loadgen --trace`): when it started,
/// its setup latency, how it ended. For failover drills, which need to know *when* the
/// failed or delayed operations started, not only how many there were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// Operation number (the schedule's index).
    pub num: u64,
    /// When its INVITE or REGISTER was first sent, in nanoseconds since the Unix epoch.
    pub start_unix_ns: u128,
    /// INVITE -> 200 (calls) or REGISTER -> 2xx, when that much happened; a call whose BYE
    /// then failed keeps its setup latency.
    pub setup_us: Option<u64>,
    /// `ok`, or the failure cause as in the report (`timeout_invite`, `status_503`, ...).
    pub outcome: String,
}

impl TraceRecord {
    /// The CSV header of [`TraceRecord::csv_line`].
    pub const CSV_HEADER: &'static str = "num,start_unix_ns,setup_us,outcome";

    /// `num,start_unix_ns,setup_us,outcome` (setup empty when unknown).
    pub fn csv_line(&self) -> String {
        let setup = self.setup_us.map(|u| u.to_string()).unwrap_or_default();
        format!(
            "{},{},{setup},{}",
            self.num, self.start_unix_ns, self.outcome
        )
    }
}

/// How an operation ended.
enum Outcome {
    Success,
    Timeout(Phase),
    Status(u16),
    Bad2xx,
    Abandoned,
}

struct Engine {
    cfg: Config,
    socks: Vec<UdpSocket>,
    tmpl: Templates,
    ops: Vec<Op>,
    free: Vec<u32>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// The one output buffer every request is rendered into.
    out: Vec<u8>,
    rx: RxBatch,
    /// Record-Route spans of the 2xx being processed (reused).
    rr: Vec<Span>,
    user_cseq: Vec<u32>,
    in_flight: u64,
    lat: Latencies,
    r: Report,
    /// Per-operation records when tracing, and the clock pair that maps `Instant`s to
    /// wall-clock time.
    trace: Option<Vec<TraceRecord>>,
    epoch: (Instant, std::time::SystemTime),
}

/// Runs one load test to completion and returns what it measured.
pub fn run(cfg: Config) -> anyhow::Result<Report> {
    run_inner(cfg, false).map(|(r, _)| r)
}

/// [`run`], also returning one [`TraceRecord`] per operation, in completion order.
pub fn run_traced(cfg: Config) -> anyhow::Result<(Report, Vec<TraceRecord>)> {
    run_inner(cfg, true)
}

fn run_inner(cfg: Config, trace: bool) -> anyhow::Result<(Report, Vec<TraceRecord>)> {
    cfg.validate()?;
    let mut socks = Vec::with_capacity(cfg.sockets);
    let mut locals = Vec::with_capacity(cfg.sockets);
    for i in 0..cfg.sockets {
        let mut addr = cfg.local;
        if addr.port() != 0 {
            addr.set_port(addr.port().wrapping_add(i as u16));
        }
        let s = net::udp_socket(addr, false).map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        s.set_nonblocking(true)?;
        rx::enable_timestamps(s.as_raw_fd())
            .map_err(|e| anyhow::anyhow!("SO_TIMESTAMPNS on {addr}: {e}"))?;
        locals.push(net::advertised(s.local_addr()?));
        socks.push(s);
    }
    // Linux turns receive timestamping on system-wide from a deferred work item; datagrams
    // queued before it runs are stamped when read, i.e. up to a tick late.
    std::thread::sleep(Duration::from_millis(50));
    let run_token: u32 = rand::random();
    let total = cfg.total_ops();
    let mut e = Engine {
        tmpl: Templates::new(&cfg, &locals, run_token),
        socks,
        ops: Vec::new(),
        free: Vec::new(),
        timers: BinaryHeap::new(),
        out: Vec::with_capacity(2048),
        rx: RxBatch::new(),
        rr: Vec::new(),
        user_cseq: vec![0; cfg.users as usize],
        in_flight: 0,
        lat: Latencies::with_capacity(total.min(4_000_000) as usize),
        trace: trace.then(|| Vec::with_capacity(total.min(4_000_000) as usize)),
        epoch: (Instant::now(), std::time::SystemTime::now()),
        r: Report {
            scenario: cfg.scenario.as_str().to_string(),
            target: cfg.target.to_string(),
            rate: cfg.rate,
            duration_s: cfg.duration.as_secs_f64(),
            ..Default::default()
        },
        cfg,
    };
    e.main_loop(total)?;
    let trace = e.trace.take().unwrap_or_default();
    Ok((e.r, trace))
}

impl Engine {
    fn main_loop(&mut self, total: u64) -> anyhow::Result<()> {
        let watch = CpuWatch::start(&self.cfg.pids);
        let cpu0 = crate::cpu::self_cpu_seconds();
        let start = Instant::now();
        let schedule_end = start + self.cfg.duration;
        // Every operation is resolved by its own per-step timeouts well before this; it is a
        // backstop so the run ends by itself whatever happens.
        let hard_end = schedule_end
            + START_GRACE
            + self.cfg.timeout * 2
            + self.cfg.hold
            + Duration::from_secs(1);
        let interval = 1.0 / self.cfg.rate;
        let due = |i: u64| start + Duration::from_secs_f64(i as f64 * interval);
        let mut next = 0u64;
        let mut pfds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut readable = vec![true; self.socks.len()];
        loop {
            let mut backlog = false;
            for (i, r) in readable.iter().enumerate() {
                if *r {
                    backlog |= self.drain(i);
                }
            }
            let now = Instant::now();
            while next < total {
                let d = due(next);
                if d > now {
                    break;
                }
                if now > schedule_end + START_GRACE {
                    // Saturated: the rest of the schedule is abandoned, not crammed in.
                    self.r.not_started = total - next;
                    next = total;
                    break;
                }
                let lag = now.duration_since(d).as_secs_f64() * 1000.0;
                if lag > self.r.send_lag_max_ms {
                    self.r.send_lag_max_ms = lag;
                }
                self.start_op(next, now);
                next += 1;
            }
            while let Some(Reverse(t)) = self.timers.peek().copied() {
                if t.at > now {
                    break;
                }
                self.timers.pop();
                self.on_timer(t, now);
            }
            if next >= total && self.in_flight == 0 {
                break;
            }
            if now >= hard_end {
                break;
            }
            let mut wake = hard_end;
            if next < total {
                wake = wake.min(due(next));
            }
            if let Some(Reverse(t)) = self.timers.peek() {
                wake = wake.min(t.at);
            }
            if self.cfg.tick.is_zero() {
                poll(&mut pfds, wake.saturating_duration_since(Instant::now()))?;
                for (r, p) in readable.iter_mut().zip(&pfds) {
                    *r = p.revents != 0;
                }
            } else {
                // Never sooner than one tick after this wake-up; sockets are not watched,
                // everything queued meanwhile is read in batches on the next round.
                let wake = if backlog {
                    now
                } else {
                    wake.max(now + self.cfg.tick)
                };
                poll(&mut [], wake.saturating_duration_since(Instant::now()))?;
            }
        }
        let end = Instant::now();
        // Whatever is still open at the backstop failed.
        for slot in 0..self.ops.len() {
            if self.ops[slot].phase != Phase::Free {
                self.finish(slot as u32, Outcome::Abandoned);
            }
        }
        self.r.elapsed_s = end.duration_since(start).as_secs_f64();
        self.r.loadgen_cpu_seconds = crate::cpu::self_cpu_seconds() - cpu0;
        self.r.cpu = watch.finish();
        self.r.latency_p50_ms = self.lat.percentile_ms(50.0);
        self.r.latency_p90_ms = self.lat.percentile_ms(90.0);
        self.r.latency_p99_ms = self.lat.percentile_ms(99.0);
        self.r.latency_max_ms = self.lat.max_ms();
        Ok(())
    }

    /// Reads what is queued on one socket; `true` when the budget ran out before the queue
    /// did (the loop must then come back without sleeping).
    fn drain(&mut self, sock: usize) -> bool {
        let fd = self.socks[sock].as_raw_fd();
        for _ in 0..RECV_BATCHES {
            // Unconnected UDP sockets get no ICMP errors on Linux; any error is transient
            // from our point of view: try again on the next wake-up.
            let n = self.rx.recv(fd).unwrap_or(0);
            for i in 0..n {
                let Some(d) = self.rx.get(i) else { break };
                self.r.received += 1;
                if d.truncated {
                    self.r.parse_errors += 1;
                    continue;
                }
                let (data, at) = (Bytes::copy_from_slice(d.data), d.at);
                self.on_datagram(data, at);
            }
            if n < rx::BATCH {
                return false;
            }
        }
        true
    }

    fn send(&mut self, sock: usize, dest: SocketAddr) {
        // Every destination passed here is the target or a loopback hop (checked when the
        // dialog was built), so no request leaves the machine.
        match self.socks[sock].send_to(&self.out, dest) {
            Ok(_) => self.r.sent += 1,
            // A full socket buffer drops the datagram; retransmission covers it, as on a
            // real network.
            Err(_) => self.r.send_errors += 1,
        }
    }

    fn alloc(&mut self, now: Instant) -> u32 {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.ops.push(Op::new(now, self.cfg.target));
                (self.ops.len() - 1) as u32
            }
        }
    }

    fn arm(&mut self, slot: u32, at: Instant, kind: TimerKind) {
        let op = &self.ops[slot as usize];
        self.timers.push(Reverse(Timer {
            at,
            slot,
            gen: op.gen,
            phase: op.phase,
            kind,
        }));
    }

    /// Sends the first request of a transaction and arms its retransmission and timeout.
    /// The clock is read here, just before the send, because the latency starts here.
    fn begin_txn(&mut self, slot: u32, phase: Phase) {
        let now = Instant::now();
        let op = &mut self.ops[slot as usize];
        op.phase = phase;
        op.txn_start = now;
        if matches!(phase, Phase::Invite | Phase::Register) {
            op.op_start = now;
        }
        op.retx = T1;
        op.answered = false;
        self.render_current(slot);
        let (sock, dest) = {
            let op = &self.ops[slot as usize];
            (op.sock, op.dest)
        };
        self.send(sock, dest);
        self.arm(slot, now + T1, TimerKind::Retransmit);
        self.arm(slot, now + self.cfg.timeout, TimerKind::Timeout);
    }

    /// Renders the request of the slot's current transaction into `out`.
    fn render_current(&mut self, slot: u32) {
        let op = &self.ops[slot as usize];
        match op.phase {
            Phase::Invite => self.tmpl.invite(&mut self.out, slot, op),
            Phase::Bye => self
                .tmpl
                .in_dialog(&mut self.out, slot, op, b"BYE", K_BYE, 2),
            Phase::Register => self
                .tmpl
                .register(&mut self.out, slot, op, self.cfg.fresh_call_id),
            Phase::Hold | Phase::Free => self.out.clear(),
        }
    }

    fn start_op(&mut self, num: u64, now: Instant) {
        let slot = self.alloc(now);
        let nsocks = self.socks.len();
        let users = self.cfg.users;
        let target = self.cfg.target;
        let op = &mut self.ops[slot as usize];
        op.num = num;
        op.sock = (num % nsocks as u64) as usize;
        op.saw_100 = false;
        op.saw_180 = false;
        op.setup_us = 0;
        op.dest = target;
        self.in_flight += 1;
        self.r.attempted += 1;
        match self.cfg.scenario {
            Scenario::Call => self.begin_txn(slot, Phase::Invite),
            Scenario::Register => {
                let user = (num % users as u64) as u32;
                let c = &mut self.user_cseq[user as usize];
                *c = c.wrapping_add(1) & 0x7fff_ffff;
                let cseq = (*c).max(1);
                let op = &mut self.ops[slot as usize];
                op.user = user;
                op.cseq = cseq;
                self.begin_txn(slot, Phase::Register);
            }
        }
    }

    fn finish(&mut self, slot: u32, outcome: Outcome) {
        let op = &mut self.ops[slot as usize];
        let cause = match outcome {
            Outcome::Success => {
                self.r.succeeded += 1;
                self.lat.record_us(op.setup_us);
                if op.saw_100 {
                    self.r.calls_with_100 += 1;
                }
                if op.saw_180 {
                    self.r.calls_with_180 += 1;
                }
                None
            }
            Outcome::Timeout(p) => Some(match p {
                Phase::Invite => "timeout_invite".to_string(),
                Phase::Bye => "timeout_bye".to_string(),
                Phase::Register => "timeout_register".to_string(),
                Phase::Hold | Phase::Free => "timeout".to_string(),
            }),
            Outcome::Status(s) => Some(format!("status_{s}")),
            Outcome::Bad2xx => Some("bad_2xx".to_string()),
            Outcome::Abandoned => Some("abandoned".to_string()),
        };
        if let Some(trace) = self.trace.as_mut() {
            let (i0, w0) = self.epoch;
            let wall = if op.op_start >= i0 {
                w0 + op.op_start.duration_since(i0)
            } else {
                w0 - i0.duration_since(op.op_start)
            };
            trace.push(TraceRecord {
                num: op.num,
                start_unix_ns: wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
                setup_us: (op.setup_us > 0).then_some(op.setup_us),
                outcome: cause.clone().unwrap_or_else(|| "ok".to_string()),
            });
        }
        if let Some(c) = cause {
            self.r.failed += 1;
            *self.r.failures.entry(c).or_insert(0) += 1;
        }
        op.phase = Phase::Free;
        op.gen = op.gen.wrapping_add(1);
        self.free.push(slot);
        self.in_flight -= 1;
    }

    fn on_timer(&mut self, t: Timer, now: Instant) {
        let Some(op) = self.ops.get(t.slot as usize) else {
            return;
        };
        if op.gen != t.gen || op.phase != t.phase {
            return;
        }
        let (answered, sock, dest) = (op.answered, op.sock, op.dest);
        match t.kind {
            TimerKind::Retransmit => {
                if answered {
                    return;
                }
                self.render_current(t.slot);
                self.send(sock, dest);
                self.r.retransmissions += 1;
                let op = &mut self.ops[t.slot as usize];
                // Timer A doubles without bound; Timer E is capped at T2.
                op.retx = if op.phase == Phase::Invite {
                    op.retx * 2
                } else {
                    (op.retx * 2).min(T2)
                };
                let at = now + op.retx;
                self.arm(t.slot, at, TimerKind::Retransmit);
            }
            TimerKind::Timeout => self.finish(t.slot, Outcome::Timeout(t.phase)),
            TimerKind::Hold => self.begin_txn(t.slot, Phase::Bye),
        }
    }

    fn on_datagram(&mut self, data: Bytes, now: Instant) {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(_) => {
                self.r.parse_errors += 1;
                return;
            }
        };
        let Some(status) = msg.status() else {
            // A request to the generator (e.g. an OPTIONS probe): not part of the test.
            self.r.unmatched += 1;
            return;
        };
        let Some((slot, gen, kind)) = msg
            .top_via()
            .and_then(|v| v.branch.and_then(|b| self.tmpl.decode_branch(b)))
        else {
            self.r.unmatched += 1;
            return;
        };
        let Some(op) = self.ops.get_mut(slot as usize) else {
            self.r.unmatched += 1;
            return;
        };
        if op.gen != gen || op.phase == Phase::Free {
            self.r.stale += 1;
            return;
        }
        match (kind, op.phase) {
            (K_INVITE, Phase::Invite) => self.on_invite_response(slot, &msg, status, now),
            (K_INVITE, Phase::Hold | Phase::Bye) if (200..300).contains(&status) => {
                // The 2xx was retransmitted: our ACK was lost. ACK it again.
                let (sock, dest) = (op.sock, op.dest);
                std::mem::swap(&mut self.out, &mut self.ops[slot as usize].ack);
                self.send(sock, dest);
                std::mem::swap(&mut self.out, &mut self.ops[slot as usize].ack);
                self.r.duplicates += 1;
            }
            (K_BYE, Phase::Bye) | (K_REGISTER, Phase::Register) => {
                if status < 200 {
                    if op.answered {
                        self.r.duplicates += 1;
                    }
                    op.answered = true;
                } else if status < 300 {
                    if op.phase == Phase::Register {
                        op.setup_us = now.duration_since(op.txn_start).as_micros() as u64;
                    }
                    self.finish(slot, Outcome::Success);
                } else {
                    self.finish(slot, Outcome::Status(status));
                }
            }
            (K_ACK, _) => self.r.unmatched += 1,
            _ => self.r.duplicates += 1,
        }
    }

    fn on_invite_response(&mut self, slot: u32, msg: &Message, status: u16, now: Instant) {
        let op = &mut self.ops[slot as usize];
        if status < 200 {
            op.answered = true;
            match status {
                100 => op.saw_100 = true,
                180 | 183 => op.saw_180 = true,
                _ => {}
            }
            return;
        }
        let to = msg.header_value(HeaderName::To).map(trim).unwrap_or(b"");
        if status >= 300 {
            self.tmpl.ack_non2xx(&mut self.out, slot, op, to);
            let sock = op.sock;
            let target = self.cfg.target;
            self.send(sock, target);
            self.finish(slot, Outcome::Status(status));
            return;
        }
        op.setup_us = now.duration_since(op.txn_start).as_micros() as u64;
        if !self.build_dialog(slot, msg) {
            self.finish(slot, Outcome::Bad2xx);
            return;
        }
        let op = &mut self.ops[slot as usize];
        op.phase = Phase::Hold;
        self.tmpl
            .in_dialog(&mut self.out, slot, op, b"ACK", K_ACK, 1);
        op.ack.clear();
        op.ack.extend_from_slice(&self.out);
        let (sock, dest) = (op.sock, op.dest);
        self.send(sock, dest);
        if self.cfg.hold.is_zero() {
            self.begin_txn(slot, Phase::Bye);
        } else {
            self.arm(slot, now + self.cfg.hold, TimerKind::Hold);
        }
    }

    /// UAC dialog state from a 2xx (RFC 3261 12.1.2): remote target from Contact, route set
    /// from Record-Route in reverse order, remote tag in To. Requests go to the first route
    /// hop (with a strict router as first hop, that hop becomes the Request-URI and the
    /// remote target the last Route, 12.2.1.1). `false` when the 2xx lacks what a dialog
    /// needs.
    fn build_dialog(&mut self, slot: u32, msg: &Message) -> bool {
        let Some(contact) = msg
            .values(HeaderName::Contact)
            .next()
            .and_then(|(_, v)| NameAddr::parse(v).ok())
        else {
            return false;
        };
        let to = msg.header_value(HeaderName::To).map(trim).unwrap_or(b"");
        if to.is_empty() {
            return false;
        }
        self.rr.clear();
        for (_, v) in msg.values(HeaderName::RecordRoute) {
            self.rr.push(msg.span_of(v));
        }
        self.rr.reverse();
        let target = self.cfg.target;
        let op = &mut self.ops[slot as usize];
        op.to.clear();
        op.to.extend_from_slice(to);
        op.ruri.clear();
        op.routes.clear();
        let first = match self.rr.first() {
            Some(&s) => match NameAddr::parse(msg.slice(s)) {
                Ok(na) => Some(na),
                Err(_) => return false,
            },
            None => None,
        };
        let hop: Uri<'_> = match &first {
            Some(na) if na.uri.param(b"lr").is_none() => {
                // Strict router.
                op.ruri.extend_from_slice(na.uri_raw);
                for &s in &self.rr[1..] {
                    push_route(&mut op.routes, msg.slice(s));
                }
                op.routes.extend_from_slice(b"Route: <");
                op.routes.extend_from_slice(contact.uri_raw);
                op.routes.extend_from_slice(b">\r\n");
                na.uri.clone()
            }
            Some(na) => {
                op.ruri.extend_from_slice(contact.uri_raw);
                for &s in &self.rr {
                    push_route(&mut op.routes, msg.slice(s));
                }
                na.uri.clone()
            }
            None => {
                op.ruri.extend_from_slice(contact.uri_raw);
                contact.uri.clone()
            }
        };
        // Only a literal loopback hop is followed; a name or any other address (which a
        // benchmark should never see) falls back to the configured target.
        op.dest = match hop.host_ip() {
            Some(ip) if net::is_loopback(ip) => SocketAddr::new(ip, hop.port_or_default()),
            _ => target,
        };
        true
    }
}

fn push_route(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(b"Route: ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Waits until a socket is readable or `timeout` passes. `ppoll` takes a timespec, so the
/// schedule is followed to the microsecond rather than poll(2)'s millisecond.
fn poll(pfds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    for p in pfds.iter_mut() {
        p.revents = 0;
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: pfds is a valid, exclusively borrowed array of pollfd of the given length, ts
    // lives across the call, and a null sigmask means "leave it unchanged".
    let r = unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uas::{Handler, UasStats};
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn cfg() -> Config {
        Config {
            scenario: Scenario::Call,
            rate: 10.0,
            duration: Duration::from_secs(1),
            target: "127.0.0.1:5060".parse().unwrap(),
            local: "127.0.0.1:0".parse().unwrap(),
            sockets: 1,
            domain: "bench.test".into(),
            callee: "uas".into(),
            users: 10,
            expires: 3600,
            fresh_call_id: false,
            timeout: Duration::from_secs(5),
            hold: Duration::ZERO,
            tick: Duration::from_millis(1),
            pids: vec![],
        }
    }

    #[test]
    fn templates_parse_and_branch_roundtrip() {
        let local: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let t = Templates::new(&cfg(), &[local], 0xdeadbeef);
        let mut op = Op::new(Instant::now(), local);
        op.num = 77;
        op.gen = 3;
        op.user = 5;
        op.cseq = 9;
        let mut out = Vec::new();
        t.invite(&mut out, 12, &op);
        let m = Message::parse(Bytes::from(out.clone())).unwrap();
        assert_eq!(m.method(), Some(sbc_sip::Method::Invite));
        assert_eq!(m.body().len(), m.body_span().len());
        assert!(m.body().starts_with(b"v=0"));
        let b = m.top_via().unwrap().branch.unwrap().to_vec();
        assert_eq!(t.decode_branch(&b), Some((12, 3, K_INVITE)));
        assert_eq!(t.decode_branch(b"z9hG4bKlgdeadbeee.c.3.i"), None);
        assert_eq!(t.decode_branch(b"z9hG4bKlgdeadbeef.c.3.i.x"), None);
        assert_eq!(t.decode_branch(b"z9hG4bKlgdeadbeef.zz.3.i"), None);

        t.register(&mut out, 1, &op, false);
        let m = Message::parse(Bytes::from(out.clone())).unwrap();
        assert_eq!(m.cseq(), 9);
        assert_eq!(m.call_id(), b"r5.deadbeef@lg");

        op.ruri = b"sip:uas@127.0.0.1:5070".to_vec();
        op.routes = b"Route: <sip:127.0.0.1;lr>\r\n".to_vec();
        op.to = b"<sip:uas@bench.test>;tag=x".to_vec();
        t.in_dialog(&mut out, 1, &op, b"BYE", K_BYE, 2);
        let m = Message::parse(Bytes::from(out.clone())).unwrap();
        assert_eq!(m.method(), Some(sbc_sip::Method::Bye));
        assert_eq!(m.to_tag(), Some(&b"x"[..]));
        assert_eq!(m.first_route().unwrap().1.uri.host, b"127.0.0.1");

        t.ack_non2xx(&mut out, 1, &op, b"<sip:uas@bench.test>;tag=y");
        let m = Message::parse(Bytes::from(out)).unwrap();
        assert_eq!(m.method(), Some(sbc_sip::Method::Ack));
    }

    /// A peer that answers like `sbc-uas` but also sends garbage, responses for other runs,
    /// every response twice and a cut-off copy of each; with `mutate`, random bytes of
    /// the real responses are flipped as well.
    fn noisy_peer(mutate: bool) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = peer.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut h = Handler::new(addr, 3600);
            let mut st = UasStats::default();
            let mut buf = vec![0u8; 65536];
            let mut rng = rand::thread_rng();
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, src)) = peer.recv_from(&mut buf) else {
                    continue;
                };
                let junk: Vec<u8> = (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect();
                let _ = peer.send_to(&junk, src);
                let _ = peer.send_to(
                    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKlg00000000.0.0.i\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",
                    src,
                );
                let mut resps: Vec<Vec<u8>> = Vec::new();
                h.handle(
                    Bytes::copy_from_slice(&buf[..n]),
                    &mut st,
                    &mut |r: &[u8]| {
                        resps.push(r.to_vec());
                        1
                    },
                );
                for r in &mut resps {
                    // Cut inside the start line: a datagram cut after the mandatory headers
                    // would still parse (the parser accepts headers ending the datagram).
                    let _ = peer.send_to(&r[..r.len().min(12)], src);
                    if mutate && rng.gen_bool(0.3) {
                        let i = rng.gen_range(0..r.len());
                        r[i] = rng.gen();
                    }
                    let _ = peer.send_to(r, src);
                    let _ = peer.send_to(r, src);
                }
            }
        });
        (addr, stop, t)
    }

    #[test]
    fn survives_garbage_and_duplicates() {
        for scenario in [Scenario::Call, Scenario::Register] {
            let (addr, stop, t) = noisy_peer(false);
            let mut c = cfg();
            c.scenario = scenario;
            c.target = addr;
            c.rate = 100.0;
            c.duration = Duration::from_millis(500);
            let r = run(c).unwrap();
            stop.store(true, Ordering::Relaxed);
            t.join().unwrap();
            assert_eq!(r.attempted, 50, "{scenario:?}");
            assert_eq!(r.succeeded, 50, "{scenario:?} {}", r.human());
            assert!(r.parse_errors > 0 && r.unmatched > 0, "{}", r.human());
            assert!(r.duplicates + r.stale > 0, "{}", r.human());
            assert_eq!(r.retransmissions, 0, "{}", r.human());
        }
    }

    #[test]
    fn survives_mutated_responses() {
        let (addr, stop, t) = noisy_peer(true);
        let mut c = cfg();
        c.target = addr;
        c.rate = 200.0;
        c.duration = Duration::from_millis(500);
        c.timeout = Duration::from_millis(700);
        let r = run(c).unwrap();
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(r.attempted, 100);
        assert_eq!(r.succeeded + r.failed, 100, "{}", r.human());
    }

    #[test]
    fn validation_refuses_off_machine_targets() {
        let mut c = cfg();
        assert!(c.validate().is_ok());
        c.target = "10.0.0.1:5060".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.rate = 0.0;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.domain = "a b".into();
        assert!(c.validate().is_err());
    }
}
