//! The forwarding threads.
//!
//! Each worker owns whole calls: their sockets are registered in the worker's own epoll
//! instance and their per-stream state lives in the worker's slab, so the packet path takes no
//! lock and shares no cache line with another forwarding thread. Sockets are registered
//! edge-triggered; a ready socket is drained with recvmmsg (a socket still holding packets
//! after its fair share of rounds goes on a pending list, served on the next turn without
//! sleeping); everything accepted from one batch leaves through the partner socket in one
//! sendmmsg (all of a socket's packets go to the same destination). The control side talks to
//! a worker through a command queue and an eventfd doorbell; counters go the other way through
//! single-writer atomics.
//!
//! With `RelayConfig::io = Uring` the same worker runs `run_uring` instead: each socket has a
//! multishot receive in the worker's io_uring (see `uring`), each accepted packet leaves as a
//! send request from the buffer it arrived in, and one `io_uring_enter` per pass submits the
//! sends and waits. Commands, the per-packet checks (`Endpoint::inspect`), counters, sweeps and
//! the coalescing rule are shared with the epoll loop.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use ahash::AHashMap;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::config::IoBackend;
use crate::relay::{CallKey, Shared};
use crate::stats::{bump, RtpEstimator, StreamCounters};
use crate::sys::{monotonic_ns, set_timer_slack, Batch, Epoll, EventFd, RawAddr, BATCH};
use crate::uring::{Cqe, Kind, Ring};

const WAKE_TOKEN: u64 = u64::MAX;
const NO_PARTNER: u32 = u32::MAX;
/// recvmmsg rounds per ready socket before the others get a turn (the socket then goes on
/// the pending list and is served again on the next turn).
const ROUNDS_PER_EVENT: usize = 4;
const EVENTS: usize = 256;
/// Sockets found ready in one pass for the worker to switch to polling (see `run`).
const COALESCE_MIN_READY: usize = 4;

/// Identifies one socket of a call: media line, leg (0 = first offerer), RTP or RTCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndpointId {
    pub media: u16,
    pub leg: u8,
    pub rtcp: bool,
}

impl EndpointId {
    fn partner(self) -> EndpointId {
        EndpointId {
            leg: 1 - self.leg,
            ..self
        }
    }
}

/// A freshly bound socket handed to the worker.
pub(crate) struct NewEndpoint {
    pub id: EndpointId,
    pub socket: UdpSocket,
    /// The port's second socket, connected to the source once latched (ports.rs).
    pub twin: Option<UdpSocket>,
    /// (pool index, RTP port) to give back when the call ends; carried by the RTP socket of the
    /// pair only, so a pair is released once.
    pub release: Option<(usize, u16)>,
    pub counters: Arc<StreamCounters>,
}

/// What the latest SDP says about one socket's endpoint.
pub(crate) struct EndpointUpdate {
    pub id: EndpointId,
    /// The endpoint's address per its latest SDP; `None` leaves it as it is (the update is
    /// about the other leg's SDP).
    pub advertised: Option<Option<SocketAddr>>,
    /// Forget the learned source: the endpoint changed (new address in SDP, another fork).
    pub reset_latch: bool,
    /// Latch on valid RTP/RTCP only (RTP transports) or on any datagram (udptl).
    pub rtp: bool,
    pub clock_rates: SmallVec<[(u8, u32); 8]>,
}

pub(crate) enum Command {
    /// Result of an offer or answer: new sockets, new SDP facts, the call's current timeout.
    Apply {
        call: u64,
        key: CallKey,
        create: bool,
        new: Vec<NewEndpoint>,
        updates: Vec<EndpointUpdate>,
        timeout_ns: u64,
    },
    /// Close the call's sockets and return its ports (queued by `Relay::delete`, which counts
    /// it in `Shared::removing`).
    Remove {
        call: u64,
    },
    /// Acknowledge: everything queued before it has been applied (`Relay::flush`).
    Barrier {
        done: SyncSender<()>,
    },
    /// Join two calls of a hairpin (a PBX bridged them and left media end to end): packets
    /// from `a`'s leg `a_leg` leave through `b`'s leg `b_leg` sockets and back, one hop
    /// instead of two. Undone when either call ends or an SDP moves a joined call's other
    /// leg.
    Join {
        a: u64,
        a_leg: u8,
        b: u64,
        b_leg: u8,
        done: SyncSender<()>,
    },
    /// Sleep for `d` after acknowledging (`Relay::stall_workers`, for tests).
    Stall {
        started: SyncSender<()>,
        d: std::time::Duration,
    },
    Shutdown,
}

/// Relay-wide counters of one worker, summed by `Relay::totals`.
#[derive(Debug, Default)]
pub(crate) struct WorkerTotals {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
    /// io_uring receives that ended for want of a provided buffer.
    pub buffer_waits: AtomicU64,
    /// The worker runs on io_uring.
    pub uring: AtomicBool,
}

/// Commands for a worker, and whether its eventfd has been written since it last took them.
#[derive(Default)]
pub(crate) struct Queue {
    cmds: Vec<Command>,
    notified: bool,
}

/// The control side's handle to a worker.
pub(crate) struct WorkerHandle {
    pub queue: Arc<Mutex<Queue>>,
    pub wake: Arc<EventFd>,
    pub totals: Arc<WorkerTotals>,
}

impl WorkerHandle {
    /// Queues a command the worker must see soon: new sockets (nothing reads them until the
    /// worker does), a barrier, a join, shutdown. Only the first such command since the
    /// worker's last take writes the eventfd: the worker drains the eventfd before it takes
    /// the whole queue, so a command queued meanwhile is taken with the others, and one
    /// queued after the take writes it again. A burst of calls costs one wake-up.
    pub fn send(&self, cmd: Command) {
        let ring = {
            let mut q = self.queue.lock();
            q.cmds.push(cmd);
            !std::mem::replace(&mut q.notified, true)
        };
        if ring {
            self.wake.notify();
        }
    }

    /// Queues a command that can wait for the worker's next pass, whatever wakes it (a
    /// packet, a command sent with [`WorkerHandle::send`], the sweep timer, at most a second
    /// away): an answer or a re-offer on existing sockets, a delete. Every pass applies the
    /// queue before it handles a packet, so no packet is relayed by an SDP that an applied
    /// command would have changed; a delete's sockets close and its ports come back by the
    /// next pass (`Relay::flush` forces it). On this VM a wake-up costs more than the
    /// command: this takes two of the three per call off the worker.
    pub fn send_lazy(&self, cmd: Command) {
        self.queue.lock().cmds.push(cmd);
    }
}

#[derive(Clone, Copy)]
enum Class {
    Rtp {
        ssrc: u32,
        seq: u16,
        ts: u32,
        pt: u8,
    },
    Rtcp,
    Other,
}

#[inline]
fn classify(data: &[u8], rtcp_socket: bool) -> Class {
    if data.len() < 8 || data[0] >> 6 != 2 {
        return Class::Other;
    }
    // RFC 5761 section 4: second byte 192-223 is RTCP (SR 200, RR 201, ...), also on a
    // multiplexed RTP port.
    if (192..=223).contains(&data[1]) {
        return Class::Rtcp;
    }
    if rtcp_socket {
        return Class::Other;
    }
    match rtp_rs::RtpReader::new(data) {
        Ok(r) => Class::Rtp {
            ssrc: r.ssrc(),
            seq: r.sequence_number().into(),
            ts: r.timestamp(),
            pt: r.payload_type(),
        },
        Err(_) => Class::Other,
    }
}

enum Verdict {
    Accept,
    Foreign,
    Invalid,
}

struct Endpoint {
    socket: UdpSocket,
    fd: RawFd,
    call: u64,
    id: EndpointId,
    partner: u32,
    rtp: bool,
    advertised: Option<SocketAddr>,
    learned: Option<SocketAddr>,
    /// Where packets leaving through this socket go: learned, else advertised.
    dest: Option<RawAddr>,
    /// The port's second socket (ports.rs) and its descriptor (-1 without one).
    twin: Option<UdpSocket>,
    twin_fd: RawFd,
    /// The address the twin is connected to.
    twin_peer: Option<SocketAddr>,
    /// Last packet accepted from the latched source (timeouts, re-latch guard).
    last_rx_ns: u64,
    est: RtpEstimator,
    rates: SmallVec<[(u8, u32); 8]>,
    cached_pt: u8,
    cached_rate: u32,
    counters: Arc<StreamCounters>,
    release: Option<(usize, u16)>,
}

impl Endpoint {
    /// The checks every received datagram goes through, whichever backend received it:
    /// source known, not truncated, class (RTP/RTCP/other), latching; feeds RTP to the loss
    /// and jitter estimator. Returns the verdict and whether the packet was RTP.
    #[inline]
    fn inspect(
        &mut self,
        data: &[u8],
        src: Option<SocketAddr>,
        truncated: bool,
        now: u64,
        relatch_ns: u64,
    ) -> (Verdict, bool) {
        let Some(src) = src else {
            return (Verdict::Invalid, false);
        };
        if truncated || data.is_empty() {
            return (Verdict::Invalid, false);
        }
        let class = classify(data, self.id.rtcp);
        match self.admit(src, class, now, relatch_ns) {
            Verdict::Accept => {}
            v => return (v, false),
        }
        if let Class::Rtp { ssrc, seq, ts, pt } = class {
            let rate = self.rate(pt);
            self.est.on_packet(ssrc, seq, ts, now, rate);
            return (Verdict::Accept, true);
        }
        (Verdict::Accept, false)
    }

    #[inline]
    fn admit(&mut self, src: SocketAddr, class: Class, now: u64, relatch_ns: u64) -> Verdict {
        let latchable = if !self.rtp {
            true
        } else if self.id.rtcp {
            matches!(class, Class::Rtcp)
        } else {
            matches!(class, Class::Rtp { .. })
        };
        match self.learned {
            Some(l) if l == src => {
                self.last_rx_ns = now;
                Verdict::Accept
            }
            Some(old) => {
                if latchable && now.saturating_sub(self.last_rx_ns) >= relatch_ns {
                    tracing::info!(from = %old, to = %src, "media source re-latched after silence");
                    self.learn(src, now);
                    Verdict::Accept
                } else {
                    Verdict::Foreign
                }
            }
            None if latchable => {
                tracing::debug!(source = %src, advertised = ?self.advertised, "media source latched");
                self.learn(src, now);
                Verdict::Accept
            }
            None => Verdict::Invalid,
        }
    }

    fn learn(&mut self, src: SocketAddr, now: u64) {
        self.learned = Some(src);
        self.dest = Some(RawAddr::new(&src));
        self.last_rx_ns = now;
        if let Some(twin) = &self.twin {
            if self.twin_peer != Some(src) {
                // Once per latch: the kernel resolves the route now and keeps it.
                self.twin_peer = match twin.connect(src) {
                    Ok(()) => Some(src),
                    Err(e) => {
                        tracing::debug!(source = %src, error = %e, "connect failed; stream sends unconnected");
                        None
                    }
                };
            }
        }
        let mut addrs = self.counters.addrs.lock();
        addrs.learned = Some(src);
        addrs.connected = self.via_twin();
    }

    /// Packets for this endpoint leave through the connected twin, without an address: the
    /// twin is connected to the latched source (`dest` is then that source too).
    #[inline]
    fn via_twin(&self) -> bool {
        self.learned.is_some() && self.twin_peer == self.learned
    }

    /// The socket and address a packet for this endpoint leaves through: the connected twin
    /// (no address) when it points at the latched source, else the socket itself and `dest`.
    #[inline]
    fn route(&self) -> Option<(RawFd, Option<&RawAddr>)> {
        if self.via_twin() {
            Some((self.twin_fd, None))
        } else {
            self.dest.as_ref().map(|d| (self.fd, Some(d)))
        }
    }

    #[inline]
    fn rate(&mut self, pt: u8) -> u32 {
        if pt != self.cached_pt {
            self.cached_pt = pt;
            self.cached_rate = self
                .rates
                .iter()
                .find(|(p, _)| *p == pt)
                .map(|(_, r)| *r)
                .unwrap_or(0);
        }
        self.cached_rate
    }
}

struct Slot {
    gen: u32,
    ep: Option<Endpoint>,
}

struct WorkerCall {
    key: CallKey,
    endpoints: SmallVec<[(EndpointId, u32); 8]>,
    timeout_ns: u64,
    last_signal_ns: u64,
    /// Joined with another call: (its uid, this call's joined leg).
    joined: Option<(u64, u8)>,
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<EventFd>,
    totals: Arc<WorkerTotals>,
    epoll: Epoll,
    slab: Vec<Slot>,
    free: Vec<u32>,
    calls: AHashMap<u64, WorkerCall>,
    batch: Box<Batch>,
    /// Sockets that may still hold packets: their edge was consumed but they were not read
    /// empty (fair-share limit or a receive error). Served on the next turn, which then does
    /// not sleep.
    pending: Vec<u64>,
    /// The previous turn's `pending`, being served (kept to reuse its allocation).
    serving: Vec<u64>,
    relatch_ns: u64,
    /// `RelayConfig::coalesce`.
    coalesce: std::time::Duration,
    /// `RelayConfig::io`.
    io: IoBackend,
    /// The io_uring backend's ring, set up by the worker thread itself when `io` asks for it
    /// (a ring is used by the thread that created it); `None`: epoll.
    uring: Option<Box<Ring>>,
    /// io_uring: tokens of sockets whose receive ended because every provided buffer was in
    /// use (ENOBUFS), in the order they ended, waiting for buffers before they are re-armed.
    starved: std::collections::VecDeque<u64>,
    sweep_every_ns: u64,
    next_sweep_ns: u64,
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        queue: Arc<Mutex<Queue>>,
        wake: Arc<EventFd>,
        totals: Arc<WorkerTotals>,
    ) -> std::io::Result<Worker> {
        let epoll = Epoll::new()?;
        epoll.add(wake.raw(), WAKE_TOKEN)?;
        let cfg = &shared.config;
        let shortest = cfg
            .timeout
            .min(cfg.hold_timeout)
            .min(cfg.setup_timeout)
            .as_nanos() as u64;
        // Timeouts fire at most an eighth late; never spin faster than 5 ms nor sleep over 1 s.
        let sweep_every_ns = (shortest / 8).clamp(5_000_000, 1_000_000_000);
        Ok(Worker {
            relatch_ns: cfg.relatch_after.as_nanos() as u64,
            coalesce: cfg.coalesce.min(std::time::Duration::from_millis(5)),
            io: cfg.io,
            uring: None,
            starved: std::collections::VecDeque::new(),
            shared,
            queue,
            wake,
            totals,
            epoll,
            slab: Vec::new(),
            free: Vec::new(),
            calls: AHashMap::default(),
            batch: Batch::new(),
            pending: Vec::new(),
            serving: Vec::new(),
            sweep_every_ns,
            next_sweep_ns: monotonic_ns() + sweep_every_ns,
        })
    }

    /// The thread body: wait, forward, apply commands, sweep timeouts, until shut down.
    pub fn run(mut self) {
        if self.io == IoBackend::Uring {
            match Ring::new() {
                Ok(ring) => {
                    self.uring = Some(Box::new(ring));
                    self.totals.uring.store(true, Relaxed);
                    return self.run_uring();
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "io_uring unavailable; media worker falls back to epoll"
                ),
            }
        }
        self.run_epoll();
    }

    /// The io_uring loop: the same passes as [`Worker::run_epoll`] (commands, packets, sweep,
    /// coalescing), but packets arrive as completions of one multishot receive per socket and
    /// leave as send requests; one `io_uring_enter` per pass submits the sends and waits.
    fn run_uring(mut self) {
        if !self.coalesce.is_zero() {
            set_timer_slack(5_000);
        }
        let coalesce_us = u32::try_from(self.coalesce.as_micros())
            .unwrap_or(5_000)
            .max(u32::from(!self.coalesce.is_zero()));
        let wake_fd = self.wake.raw();
        if let Some(ring) = self.uring.as_deref_mut() {
            ring.arm_poll(wake_fd, WAKE_TOKEN);
        }
        let mut cqes: Vec<Cqe> = Vec::with_capacity(4096);
        let mut dense = false;
        loop {
            let Some(ring) = self.uring.as_deref_mut() else {
                return;
            };
            let now = monotonic_ns();
            let timeout_ns = self.next_sweep_ns.saturating_sub(now);
            // Interrupt moderation as in run_epoll: after a dense pass, the next wait lasts
            // the coalescing time once something has arrived (the kernel's min-wait), so one
            // wake-up serves everything that came meanwhile; a sparse pass waits for the
            // first completion only.
            let wait_us = if dense { coalesce_us } else { 0 };
            // Receives wait for buffers that this submission's sends hold: come back as soon
            // as the sends have completed, so the buffers return and the receives resume.
            let hurry = !self.starved.is_empty();
            if let Err(e) = ring.submit_and_wait(timeout_ns, wait_us, hurry) {
                tracing::error!(error = %e, "io_uring_enter failed; media worker stops");
                self.shutdown();
                return;
            }
            ring.reap(&mut cqes);
            let now = monotonic_ns();
            let mut woken = false;
            let mut rearm_wake = false;
            for c in &cqes {
                if matches!(c.kind(WAKE_TOKEN), Kind::Wake) {
                    woken = true;
                    rearm_wake |= !c.more();
                }
            }
            if !self.run_commands(woken, now) {
                self.shutdown();
                return;
            }
            if rearm_wake {
                if let Some(ring) = self.uring.as_deref_mut() {
                    ring.arm_poll(wake_fd, WAKE_TOKEN);
                }
            }
            let mut received = 0usize;
            for c in cqes.drain(..) {
                match c.kind(WAKE_TOKEN) {
                    Kind::Wake => {}
                    Kind::Control => {
                        if c.res != -libc::ENOENT {
                            tracing::debug!(
                                error = %std::io::Error::from_raw_os_error(-c.res),
                                "io_uring cancel or fixed-file update"
                            );
                        }
                    }
                    Kind::Send(bid) => self.on_sent(bid, c.res),
                    Kind::Recv(token) => {
                        received += usize::from(c.buffer().is_some());
                        self.on_received(token, &c, now);
                    }
                }
            }
            self.rearm_starved();
            if now >= self.next_sweep_ns {
                self.sweep(now);
                self.next_sweep_ns = now + self.sweep_every_ns;
            }
            dense = !self.coalesce.is_zero() && received >= COALESCE_MIN_READY;
        }
    }

    /// io_uring: re-arms receives that ended for want of a buffer, oldest first, as many as
    /// the free buffers can serve. Their packets wait in the socket queues meanwhile. A
    /// socket re-armed takes its whole backlog at once, so re-arming every starved socket
    /// whenever some buffers are back would have most of them fail again at once, on every
    /// pass: an overloaded relay then spent more time on failed receives than on packets.
    fn rearm_starved(&mut self) {
        if self.starved.is_empty() {
            return;
        }
        let Some(ring) = self.uring.as_deref_mut() else {
            return;
        };
        let budget = ring.rearm_budget().min(self.starved.len());
        for token in self.starved.drain(..budget) {
            if let Some(ep) = live_endpoint(&self.slab, token) {
                arm(ring, ep, token);
            }
        }
    }

    /// io_uring: one datagram (or the end of a socket's multishot receive). The same checks,
    /// counters and forwarding rule as `on_readable`, one packet at a time.
    fn on_received(&mut self, token: u64, c: &Cqe, now: u64) {
        let Worker {
            slab,
            uring,
            totals,
            relatch_ns,
            starved,
            ..
        } = self;
        let Some(ring) = uring.as_deref_mut() else {
            return;
        };
        let idx = split_token(token).0;
        let live = live_endpoint(slab, token).is_some();
        if live && !c.more() {
            // The multishot receive ended: no provided buffer was left, an error (ICMP, ...),
            // or the kernel's own limit. Arm it again, unless the socket cannot take it.
            match -c.res {
                libc::EINVAL
                | libc::EBADF
                | libc::ENOTSOCK
                | libc::EOPNOTSUPP
                | libc::ECANCELED => {
                    tracing::error!(
                        error = %std::io::Error::from_raw_os_error(-c.res),
                        "io_uring receive refused; stream not relayed"
                    );
                }
                libc::ENOBUFS => {
                    bump(&totals.buffer_waits, 1);
                    starved.push_back(token);
                }
                _ => {
                    if let Some(ep) = live_endpoint(slab, token) {
                        arm(ring, ep, token);
                    }
                }
            }
        }
        let Some(bid) = c.buffer() else {
            if c.res < 0 && c.res != -libc::ENOBUFS {
                tracing::trace!(error = %std::io::Error::from_raw_os_error(-c.res), "recvmsg");
            }
            return;
        };
        let Some(ep) = slab
            .get_mut(idx)
            .filter(|_| live)
            .and_then(|s| s.ep.as_mut())
        else {
            // A packet for a socket removed since.
            ring.recycle(bid);
            return;
        };
        let rx = ring.received(bid, c.res);
        let (verdict, rtp) = ep.inspect(
            ring.payload(bid, rx.len),
            rx.src,
            rx.truncated,
            now,
            *relatch_ns,
        );
        let counters = &ep.counters;
        match verdict {
            Verdict::Accept => {}
            Verdict::Foreign | Verdict::Invalid => {
                let which = if matches!(verdict, Verdict::Foreign) {
                    &counters.dropped_foreign
                } else {
                    &counters.dropped_invalid
                };
                bump(which, 1);
                bump(&totals.dropped, 1);
                ring.recycle(bid);
                return;
            }
        }
        if rtp {
            counters.lost.store(ep.est.lost(), Relaxed);
            counters.jitter_us.store(ep.est.jitter_us(), Relaxed);
        }
        let partner = ep.partner;
        let target = slab
            .get(partner as usize)
            .and_then(|s| s.ep.as_ref())
            .and_then(Endpoint::route);
        match target {
            // Counted when the send completes (`on_sent`).
            Some((fd, dest)) => {
                if !ring.send(bid, rx.len, fd, dest, token) {
                    if let Some(ep) = slab[idx].ep.as_ref() {
                        bump(&ep.counters.send_errors, 1);
                    }
                    bump(&totals.dropped, 1);
                    ring.recycle(bid);
                }
            }
            None => {
                if let Some(ep) = slab[idx].ep.as_ref() {
                    bump(&ep.counters.dropped_no_peer, 1);
                }
                bump(&totals.dropped, 1);
                ring.recycle(bid);
            }
        }
    }

    /// io_uring: a send finished; count it on the stream it came from, return its buffer.
    fn on_sent(&mut self, bid: u16, res: i32) {
        let Worker {
            slab,
            uring,
            totals,
            ..
        } = self;
        let Some(ring) = uring.as_deref_mut() else {
            return;
        };
        let meta = ring.send_meta(bid);
        ring.recycle(bid);
        let ep = live_endpoint(slab, meta.from);
        if res >= 0 {
            bump(&totals.packets, 1);
            bump(&totals.bytes, u64::from(meta.len));
            if let Some(ep) = ep {
                bump(&ep.counters.packets, 1);
                bump(&ep.counters.bytes, u64::from(meta.len));
            }
        } else {
            tracing::trace!(error = %std::io::Error::from_raw_os_error(-res), "send");
            bump(&totals.dropped, 1);
            if let Some(ep) = ep {
                bump(&ep.counters.send_errors, 1);
            }
        }
    }

    /// The epoll loop.
    fn run_epoll(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        if !self.coalesce.is_zero() {
            // The coalescing sleep should last what it says, not up to 50 us more.
            set_timer_slack(5_000);
        }
        loop {
            let now = monotonic_ns();
            let wait_ms = if self.pending.is_empty() {
                (self.next_sweep_ns.saturating_sub(now)).div_ceil(1_000_000) as i32
            } else {
                0
            };
            let n = match self.epoll.wait(&mut events, wait_ms) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; media worker stops");
                    return;
                }
            };
            let now = monotonic_ns();
            let woken = events[..n].iter().any(|ev| ev.u64 == WAKE_TOKEN);
            if !self.run_commands(woken, now) {
                self.shutdown();
                return;
            }
            std::mem::swap(&mut self.pending, &mut self.serving);
            for ev in &events[..n] {
                if ev.u64 != WAKE_TOKEN && self.on_readable(ev.u64, now) {
                    self.pending.push(ev.u64);
                }
            }
            // A token both reported and pending is read twice; the second read finds the
            // socket empty, which is cheaper than deduplicating.
            let mut serving = std::mem::take(&mut self.serving);
            for &token in &serving {
                if self.on_readable(token, now) {
                    self.pending.push(token);
                }
            }
            serving.clear();
            self.serving = serving;
            if now >= self.next_sweep_ns {
                self.sweep(now);
                self.next_sweep_ns = now + self.sweep_every_ns;
            }
            // Interrupt moderation (RelayConfig::coalesce), as NAPI does it: once a pass
            // finds several sockets ready, traffic is dense enough that sleeping a little and
            // then looking again without being woken (one timer expiry for many packets) beats
            // a wake-up (context switch and cross-core interrupt) per packet; polling goes on
            // while each look finds that many, and ends when one finds fewer: then the next
            // packet wakes us again. Sparse traffic is never charged an extra timer wake-up.
            // No sleep when the event buffer was full or sockets are pending: there is more
            // work right now.
            let ready = events[..n].iter().filter(|ev| ev.u64 != WAKE_TOKEN).count();
            if !self.coalesce.is_zero()
                && ready >= COALESCE_MIN_READY
                && n < EVENTS
                && self.pending.is_empty()
            {
                std::thread::sleep(self.coalesce);
            }
        }
    }

    /// The hot path: drain one socket, latch, count, forward in one sendmmsg per batch.
    /// Returns true when the socket may still hold packets (it gets no new edge for those).
    fn on_readable(&mut self, token: u64, now: u64) -> bool {
        let idx = split_token(token).0;
        let Worker {
            slab,
            batch,
            totals,
            relatch_ns,
            ..
        } = self;
        let relatch_ns = *relatch_ns;
        if live_endpoint(slab, token).is_none() {
            return false; // event for a socket removed earlier in this round
        }
        for _ in 0..ROUNDS_PER_EVENT {
            let Some(ep) = slab[idx].ep.as_mut() else {
                return false;
            };
            let n = match batch.recv(token_fd(ep, token)) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; packets may be queued
                    // behind the error, so come back to the socket on the next turn.
                    tracing::trace!(error = %e, "recvmmsg");
                    return true;
                }
            };
            let mut accepted = [0u8; BATCH];
            let (mut count, mut bytes) = (0usize, 0u64);
            let (mut foreign, mut invalid) = (0u64, 0u64);
            let mut rtp_seen = false;
            for i in 0..n {
                let (data, truncated) = batch.packet(i);
                let (verdict, rtp) = ep.inspect(data, batch.source(i), truncated, now, relatch_ns);
                match verdict {
                    Verdict::Accept => {}
                    Verdict::Foreign => {
                        foreign += 1;
                        continue;
                    }
                    Verdict::Invalid => {
                        invalid += 1;
                        continue;
                    }
                }
                rtp_seen |= rtp;
                bytes += data.len() as u64;
                accepted[count] = i as u8;
                count += 1;
            }
            let c = &ep.counters;
            bump(&c.dropped_foreign, foreign);
            bump(&c.dropped_invalid, invalid);
            if rtp_seen {
                c.lost.store(ep.est.lost(), Relaxed);
                c.jitter_us.store(ep.est.jitter_us(), Relaxed);
            }
            let partner = ep.partner;
            let mut dropped = foreign + invalid;
            let (mut sent, mut failed, mut sent_bytes, mut no_peer) = (0usize, 0usize, 0u64, 0u64);
            if count > 0 {
                let target = slab
                    .get(partner as usize)
                    .and_then(|s| s.ep.as_ref())
                    .and_then(Endpoint::route);
                match target {
                    Some((fd, dest)) => {
                        for (slot, &i) in accepted[..count].iter().enumerate() {
                            batch.queue(slot, usize::from(i));
                        }
                        (sent, failed) = batch.send(fd, count, dest);
                        // Bytes of failed sends are not told apart; they are rare.
                        sent_bytes = if failed == 0 {
                            bytes
                        } else {
                            bytes * sent as u64 / count as u64
                        };
                        dropped += failed as u64;
                    }
                    None => {
                        no_peer = count as u64;
                        dropped += no_peer;
                    }
                }
            }
            if let Some(ep) = slab[idx].ep.as_ref() {
                let c = &ep.counters;
                bump(&c.packets, sent as u64);
                bump(&c.bytes, sent_bytes);
                bump(&c.send_errors, failed as u64);
                bump(&c.dropped_no_peer, no_peer);
            }
            bump(&totals.packets, sent as u64);
            bump(&totals.bytes, sent_bytes);
            bump(&totals.dropped, dropped);
            if n < BATCH {
                // Read empty; a packet arriving from now on raises a new edge.
                return false;
            }
        }
        true
    }

    /// Commands come first in every pass, so a packet handled in it already sees every SDP
    /// change queued before the packet arrived: `Relay::offer` and `answer` return without
    /// waiting, and the peer's reply to the SDP they return can only arrive after that. The
    /// queue is looked at in every pass, not only when the eventfd reports, because nothing
    /// orders that report against a packet's. False means shut down.
    fn run_commands(&mut self, woken: bool, now: u64) -> bool {
        if woken {
            self.wake.drain();
        }
        let cmds = {
            let mut q = self.queue.lock();
            q.notified = false;
            if q.cmds.is_empty() {
                return true;
            }
            std::mem::take(&mut q.cmds)
        };
        for cmd in cmds {
            if !self.apply(cmd, now) {
                return false;
            }
        }
        true
    }

    /// Applies one command; false means shut down.
    fn apply(&mut self, cmd: Command, now: u64) -> bool {
        match cmd {
            Command::Apply {
                call,
                key,
                create,
                new,
                updates,
                timeout_ns,
            } => {
                if !create && !self.calls.contains_key(&call) {
                    // The call timed out here while the control side was still working on it.
                    self.release(new.into_iter().filter_map(|e| e.release).collect());
                    return true;
                }
                let entry = self.calls.entry(call).or_insert_with(|| WorkerCall {
                    key,
                    endpoints: SmallVec::new(),
                    timeout_ns,
                    last_signal_ns: now,
                    joined: None,
                });
                entry.timeout_ns = timeout_ns;
                entry.last_signal_ns = now;
                let mut failed = Vec::new();
                for ne in new {
                    match self.insert(call, ne, now) {
                        Ok(()) => {}
                        Err(release) => failed.extend(release),
                    }
                }
                self.release(failed);
                for u in updates {
                    self.update(call, u);
                }
            }
            Command::Remove { call } => {
                self.remove_call(call);
                self.shared.removing.fetch_sub(1, Relaxed);
            }
            Command::Barrier { done } => {
                let _ = done.try_send(());
            }
            Command::Stall { started, d } => {
                let _ = started.try_send(());
                std::thread::sleep(d);
            }
            Command::Join {
                a,
                a_leg,
                b,
                b_leg,
                done,
            } => {
                self.join(a, a_leg, b, b_leg);
                let _ = done.try_send(());
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn insert(&mut self, call: u64, ne: NewEndpoint, now: u64) -> Result<(), Option<(usize, u16)>> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(Slot { gen: 0, ep: None });
                (self.slab.len() - 1) as u32
            }
        };
        let fd = ne.socket.as_raw_fd();
        let gen = self.slab[idx as usize].gen;
        let Some(wc) = self.calls.get_mut(&call) else {
            self.free.push(idx);
            return Err(ne.release);
        };
        let token = slot_token(idx, gen);
        if let Err(e) = watch(self.uring.as_deref_mut(), &self.epoll, fd, token) {
            tracing::error!(error = %e, "epoll_ctl ADD failed; stream not relayed");
            self.free.push(idx);
            return Err(ne.release);
        }
        // The stream works without its twin, unconnected.
        let (uring, epoll) = (&mut self.uring, &self.epoll);
        let twin = ne.twin.filter(|t| {
            watch(uring.as_deref_mut(), epoll, t.as_raw_fd(), token | TWIN_BIT)
                .inspect_err(
                    |e| tracing::debug!(error = %e, "epoll_ctl ADD of the second socket failed"),
                )
                .is_ok()
        });
        let twin_fd = twin.as_ref().map_or(-1, |t| t.as_raw_fd());
        let partner_id = ne.id.partner();
        let partner = wc
            .endpoints
            .iter()
            .find(|(id, _)| *id == partner_id)
            .map(|(_, k)| *k)
            .unwrap_or(NO_PARTNER);
        wc.endpoints.push((ne.id, idx));
        if partner != NO_PARTNER {
            if let Some(p) = self.slab[partner as usize].ep.as_mut() {
                p.partner = idx;
            }
        }
        self.slab[idx as usize].ep = Some(Endpoint {
            socket: ne.socket,
            fd,
            call,
            id: ne.id,
            partner,
            rtp: true,
            advertised: None,
            learned: None,
            dest: None,
            twin,
            twin_fd,
            twin_peer: None,
            last_rx_ns: now,
            est: RtpEstimator::default(),
            rates: SmallVec::new(),
            cached_pt: u8::MAX,
            cached_rate: 0,
            counters: ne.counters,
            release: ne.release,
        });
        Ok(())
    }

    /// Points each stream of `a`'s leg `a_leg` at the same stream of `b`'s leg `b_leg` and
    /// back (see [`Command::Join`]).
    fn join(&mut self, a: u64, a_leg: u8, b: u64, b_leg: u8) {
        if a == b {
            return;
        }
        let (Some(wa), Some(wb)) = (self.calls.get(&a), self.calls.get(&b)) else {
            return;
        };
        if wa.joined.is_some() || wb.joined.is_some() {
            return;
        }
        let mut links: SmallVec<[(u32, u32); 8]> = SmallVec::new();
        for &(id, ia) in wa.endpoints.iter().filter(|(id, _)| id.leg == a_leg) {
            let want = EndpointId { leg: b_leg, ..id };
            if let Some(&(_, ib)) = wb.endpoints.iter().find(|(i, _)| *i == want) {
                links.push((ia, ib));
            }
        }
        if links.is_empty() {
            return;
        }
        for (ia, ib) in links {
            if let Some(ep) = self.slab[ia as usize].ep.as_mut() {
                ep.partner = ib;
            }
            if let Some(ep) = self.slab[ib as usize].ep.as_mut() {
                ep.partner = ia;
            }
        }
        if let Some(w) = self.calls.get_mut(&a) {
            w.joined = Some((b, a_leg));
        }
        if let Some(w) = self.calls.get_mut(&b) {
            w.joined = Some((a, b_leg));
        }
        tracing::debug!(a, b, "hairpin joined: one relay hop");
    }

    /// Undoes a join: every stream of both calls points at its own call's other leg again.
    fn unjoin(&mut self, call: u64) {
        let Some((other, _)) = self.calls.get_mut(&call).and_then(|w| w.joined.take()) else {
            return;
        };
        if let Some(w) = self.calls.get_mut(&other) {
            w.joined = None;
        }
        for uid in [call, other] {
            let Some(wc) = self.calls.get(&uid) else {
                continue;
            };
            let natural: SmallVec<[(u32, u32); 8]> = wc
                .endpoints
                .iter()
                .map(|&(id, idx)| {
                    let p = wc
                        .endpoints
                        .iter()
                        .find(|(i, _)| *i == id.partner())
                        .map_or(NO_PARTNER, |&(_, k)| k);
                    (idx, p)
                })
                .collect();
            for (idx, p) in natural {
                if let Some(ep) = self.slab[idx as usize].ep.as_mut() {
                    ep.partner = p;
                }
            }
        }
        tracing::debug!(call, other, "hairpin unjoined");
    }

    fn update(&mut self, call: u64, u: EndpointUpdate) {
        let Some(wc) = self.calls.get(&call) else {
            return;
        };
        // The PBX moved the media of a joined call's other leg (a transfer, music on hold):
        // the two calls are no longer one.
        if let (Some((_, joined_leg)), Some(adv)) = (wc.joined, u.advertised) {
            if u.id.leg != joined_leg {
                let moved = wc
                    .endpoints
                    .iter()
                    .find(|(id, _)| *id == u.id)
                    .and_then(|&(_, idx)| self.slab[idx as usize].ep.as_ref())
                    .is_some_and(|ep| ep.advertised.is_some() && ep.advertised != adv);
                if moved {
                    self.unjoin(call);
                }
            }
        }
        let Some(wc) = self.calls.get(&call) else {
            return;
        };
        let Some(&(_, idx)) = wc.endpoints.iter().find(|(id, _)| *id == u.id) else {
            return;
        };
        let Some(ep) = self.slab[idx as usize].ep.as_mut() else {
            return;
        };
        ep.rtp = u.rtp;
        for (pt, rate) in u.clock_rates {
            match ep.rates.iter_mut().find(|(p, _)| *p == pt) {
                Some(e) => e.1 = rate,
                None => ep.rates.push((pt, rate)),
            }
        }
        ep.cached_pt = u8::MAX;
        let mut reset = u.reset_latch;
        if let Some(advertised) = u.advertised {
            // A new address in SDP means a new endpoint (call moved, device changed): learn
            // again rather than keep sending to the old source.
            // (Not the first address: a source latched before the SDP arrived stays.)
            reset |= ep.advertised.is_some() && ep.advertised != advertised;
            ep.advertised = advertised;
        }
        if reset && ep.learned.is_some() {
            ep.learned = None;
            // Until a source is latched again, packets leave unconnected toward the SDP's
            // address. The twin stays connected: the old source's packets still reach it and
            // are judged as on the first socket.
            let mut addrs = ep.counters.addrs.lock();
            addrs.learned = None;
            addrs.connected = false;
        }
        ep.dest = ep.learned.or(ep.advertised).map(|a| RawAddr::new(&a));
    }

    /// Closes a call's sockets (so their ports are really free) and then returns the ports.
    fn remove_call(&mut self, call: u64) -> Option<WorkerCall> {
        // The joined call must stop pointing at sockets about to close.
        self.unjoin(call);
        let wc = self.calls.remove(&call)?;
        if let Some(ring) = self.uring.as_deref_mut() {
            // A receive in flight holds its socket open: stop them before the ports go back.
            // Each receive was armed with its slot's token (the twin's with TWIN_BIT).
            let socks: SmallVec<[(RawFd, u64); 8]> = wc
                .endpoints
                .iter()
                .filter_map(|&(_, idx)| {
                    let slot = &self.slab[idx as usize];
                    slot.ep.as_ref().map(|ep| (ep, slot_token(idx, slot.gen)))
                })
                .flat_map(|(ep, token)| [(ep.fd, token), (ep.twin_fd, token | TWIN_BIT)])
                .filter(|(fd, _)| *fd >= 0)
                .collect();
            ring.cancel(&socks);
        }
        let mut releases = Vec::new();
        for &(_, idx) in &wc.endpoints {
            let slot = &mut self.slab[idx as usize];
            if let Some(ep) = slot.ep.take() {
                debug_assert_eq!(ep.call, call);
                if self.uring.is_none() {
                    let _ = self.epoll.delete(ep.fd);
                    if ep.twin_fd >= 0 {
                        let _ = self.epoll.delete(ep.twin_fd);
                    }
                }
                releases.extend(ep.release);
                drop(ep.socket);
                slot.gen = slot.gen.wrapping_add(1);
                self.free.push(idx);
            }
        }
        self.release(releases);
        Some(wc)
    }

    fn release(&self, ports: Vec<(usize, u16)>) {
        for (pool, port) in ports {
            if let Some(p) = self.shared.pools.get(pool) {
                p.lock().release(port);
            }
        }
    }

    fn sweep(&mut self, now: u64) {
        let mut expired: SmallVec<[(u64, u64); 4]> = SmallVec::new();
        for (&uid, wc) in &self.calls {
            let mut last = wc.last_signal_ns;
            for &(_, idx) in &wc.endpoints {
                if let Some(ep) = &self.slab[idx as usize].ep {
                    last = last.max(ep.last_rx_ns);
                }
            }
            let idle = now.saturating_sub(last);
            if idle >= wc.timeout_ns {
                expired.push((uid, idle));
            }
        }
        for (uid, idle) in expired {
            if let Some(wc) = self.remove_call(uid) {
                self.shared
                    .on_timeout(uid, wc.key, std::time::Duration::from_nanos(idle));
            }
        }
    }

    fn shutdown(&mut self) {
        let uids: Vec<u64> = self.calls.keys().copied().collect();
        for uid in uids {
            self.remove_call(uid);
        }
    }
}

/// A socket's token: its slab index and the slot's generation, so that a completion or event
/// for a socket removed since (whose slot was reused) is recognised as stale.
fn slot_token(idx: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(idx)
}

/// Starts receiving on `fd` under `token`: a multishot receive on the ring (a refusal arrives
/// as its completion, see `Worker::on_received`), else an edge-triggered epoll entry.
fn watch(uring: Option<&mut Ring>, epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    match uring {
        Some(ring) => {
            ring.arm_recv(fd, token);
            Ok(())
        }
        None => epoll.add_edge(fd, token),
    }
}

/// Marks a token as the endpoint's second socket (its twin): same slot, other descriptor.
/// Slab indexes stay far below 2^31 (one slot per socket).
const TWIN_BIT: u64 = 1 << 31;

/// The slab index and generation of a [`slot_token`] (with or without [`TWIN_BIT`]).
fn split_token(token: u64) -> (usize, u32) {
    ((token & 0x7fff_ffff) as usize, (token >> 32) as u32)
}

/// The endpoint whose socket (or twin) `token` names, unless that socket was removed since
/// (its slot empty or reused under another generation).
#[inline]
fn live_endpoint(slab: &[Slot], token: u64) -> Option<&Endpoint> {
    let (idx, gen) = split_token(token);
    slab.get(idx).filter(|s| s.gen == gen)?.ep.as_ref()
}

/// Arms the multishot receive of the socket `token` names on `ep`.
fn arm(ring: &mut Ring, ep: &Endpoint, token: u64) {
    let fd = token_fd(ep, token);
    if fd >= 0 {
        ring.arm_recv(fd, token);
    }
}

/// The descriptor a token names: the endpoint's socket or its twin.
#[inline]
fn token_fd(ep: &Endpoint, token: u64) -> RawFd {
    if token & TWIN_BIT != 0 {
        ep.twin_fd
    } else {
        ep.fd
    }
}
