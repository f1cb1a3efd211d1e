//! The control surface: offer / answer / delete, in the spirit of rtpengine's ng protocol but
//! in-process and synchronous (each call is a few socket binds and a map update; nothing to
//! await).
//!
//! A call has two legs. Leg 0 is whoever made the first offer, leg 1 the other party; a leg is
//! known by its SIP tag, and its sockets live on its [`Side`]. Each m= line gets an RTP/RTCP
//! pair on each leg's side: leg 0's endpoint sends to leg 0's pair, the relay forwards out of
//! leg 1's pair to leg 1's endpoint, and the reverse. SDP sent to a leg names that leg's pairs.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::config::{RelayConfig, Side};
use crate::error::MediaError;
use crate::ports::{BoundPair, PortPool};
use crate::sdp::{MediaTarget, OriginTracker, Sdp, Transport};
use crate::stats::{StreamCounters, StreamStats};
use crate::worker::{
    Command, EndpointId, EndpointUpdate, NewEndpoint, Worker, WorkerHandle, WorkerTotals,
};

/// Names a call toward the relay: the SIP Call-ID, optionally with a discriminator.
///
/// Tags are not part of the key, on purpose: the offer arrives before the callee's tag
/// exists, forks answer with different tags, and an in-dialog offer may come from either
/// party. The relay tracks tags per leg instead (see [`Relay::offer`]). The discriminator is
/// for the rare call whose Call-ID passes the SBC twice (a PBX that proxies instead of bridging
/// sends it back through the SBC to the callee): the proxy can key each pass apart.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CallKey(Arc<str>);

impl CallKey {
    /// The key of a Call-ID.
    pub fn new(call_id: &str) -> CallKey {
        CallKey(Arc::from(call_id))
    }

    /// The key of one pass of a Call-ID that crosses the SBC more than once.
    pub fn with_discriminator(call_id: &str, discriminator: &str) -> CallKey {
        CallKey(Arc::from(format!("{call_id}\u{0}{discriminator}")))
    }

    /// The Call-ID this key was made from.
    pub fn call_id(&self) -> &str {
        self.0.split('\u{0}').next().unwrap_or_default()
    }

    /// The discriminator of [`CallKey::with_discriminator`], if any, so a caller that keys
    /// passes apart can tell which pass an event names without keeping a second map.
    pub fn discriminator(&self) -> Option<&str> {
        self.0.split_once('\u{0}').map(|(_, d)| d)
    }
}

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.replace('\u{0}', "#"))
    }
}

impl fmt::Display for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.replace('\u{0}', "#"))
    }
}

impl From<&str> for CallKey {
    fn from(s: &str) -> CallKey {
        CallKey::new(s)
    }
}

/// What the relay tells the SIP side without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// No media (and no signalling) for the configured time: the relay has already closed the
    /// call's sockets and freed its ports. The proxy should end the dialog (BYE both ways) and
    /// count it.
    Timeout {
        /// The call.
        call: CallKey,
        /// How long it had been silent.
        idle: Duration,
    },
}

/// A snapshot of one call, for status pages, logs and tests.
#[derive(Debug, Clone)]
pub struct CallStats {
    /// An answer has been seen (early or final).
    pub answered: bool,
    /// Either leg's latest SDP holds every stream.
    pub on_hold: bool,
    /// Since the first offer.
    pub age: Duration,
    /// Leg 0 (first offerer) and leg 1.
    pub legs: [LegStats; 2],
}

/// One leg of a call.
#[derive(Debug, Clone)]
pub struct LegStats {
    /// The SIP tag the leg is known by (none yet for the callee before any answer).
    pub tag: Option<String>,
    /// The side its sockets are on.
    pub side: Side,
    /// This leg's latest SDP holds every stream.
    pub on_hold: bool,
    /// Per m= line.
    pub media: Vec<MediaStats>,
}

/// One m= line of one leg: traffic received from that leg's endpoint.
#[derive(Debug, Clone)]
pub struct MediaStats {
    /// m= index.
    pub index: usize,
    /// The relay's RTP port facing this leg (RTCP is the next port), if allocated.
    pub relay_port: Option<u16>,
    /// RTP from the leg.
    pub rtp: StreamStats,
    /// RTCP from the leg (on the RTP socket when muxed, counted under `rtp`).
    pub rtcp: StreamStats,
}

/// Relay-wide numbers for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayTotals {
    /// Calls with media state.
    pub sessions: usize,
    /// Packets forwarded since start.
    pub packets: u64,
    /// Bytes forwarded since start.
    pub bytes: u64,
    /// Packets dropped since start (foreign source, invalid, no destination, send errors).
    pub dropped: u64,
    /// Times a socket's receive paused because every packet buffer of its worker was in use
    /// (io_uring backend): the relay fell behind its packets, which waited in the socket
    /// queues (and were dropped by the kernel where those overflowed).
    pub buffer_waits: u64,
    /// Calls ended by media timeout since start.
    pub timeouts: u64,
    /// Free port pairs on the public and internal sides (the same pool when shared).
    pub free_pairs: [usize; 2],
    /// Port pairs in the public and internal ranges.
    pub total_pairs: [usize; 2],
    /// Forwarding threads that run on io_uring (`RelayConfig::io`); the others use epoll,
    /// because it was asked for or because the kernel refused io_uring. A worker decides when
    /// it starts, so this is final once a first call has been set up.
    pub uring_workers: usize,
}

struct Leg {
    tag: Option<Box<str>>,
    side: Side,
    origin: OriginTracker,
    held: bool,
}

struct MediaSlot {
    /// RTP port of each leg's pair (on that leg's side).
    ports: [Option<u16>; 2],
    /// [leg][0 = RTP, 1 = RTCP].
    counters: [[Arc<StreamCounters>; 2]; 2],
}

impl MediaSlot {
    fn new() -> MediaSlot {
        MediaSlot {
            ports: [None, None],
            counters: Default::default(),
        }
    }
}

struct Session {
    uid: u64,
    worker: usize,
    legs: [Leg; 2],
    media: Vec<MediaSlot>,
    answered: bool,
    created: Instant,
}

impl Session {
    /// Which leg sent SDP with this tag. Leg 0's tag is fixed by the first offer; any other
    /// tag is the other party (a fork, or the callee before we learnt its tag), so it is leg 1,
    /// and the bool says whether leg 1's tag changed.
    fn leg_of(&mut self, tag: &str) -> (usize, bool) {
        if self.legs[0].tag.as_deref() == Some(tag) {
            return (0, false);
        }
        (1, self.legs[1].tag.as_deref() != Some(tag))
    }
}

pub(crate) struct Shared {
    pub config: RelayConfig,
    pub pools: Vec<Mutex<PortPool>>,
    /// Pool index of each side.
    side_pool: [usize; 2],
    /// Held only for map updates and binds, never across I/O waits or `.await`.
    sessions: Mutex<AHashMap<CallKey, Session>>,
    /// RTP port -> the call it was last given to, so that a hairpin (an SDP naming one of our
    /// own ports) finds its call without a scan of every session. Entries are not removed
    /// when a call ends: a lookup checks that the call still holds the port, and a port given
    /// out again overwrites its entry. Locked after `sessions`.
    port_owner: Mutex<AHashMap<u16, CallKey>>,
    events: mpsc::UnboundedSender<MediaEvent>,
    timeouts: AtomicU64,
    /// Deletes queued to a worker and not yet applied: their ports are not back in the pool
    /// yet, so an offer that finds the pool empty waits for them before it gives up.
    pub removing: AtomicUsize,
}

impl Shared {
    /// Called by a worker after it has closed the call's sockets and freed its ports.
    pub fn on_timeout(&self, uid: u64, key: CallKey, idle: Duration) {
        let removed = {
            let mut sessions = self.sessions.lock();
            match sessions.get(&key) {
                Some(s) if s.uid == uid => sessions.remove(&key).is_some(),
                _ => false,
            }
        };
        if removed {
            self.timeouts.fetch_add(1, Relaxed);
            tracing::info!(call = %key, idle_ms = idle.as_millis() as u64, "media timeout");
            let _ = self.events.send(MediaEvent::Timeout { call: key, idle });
        }
    }
}

/// The media relay. Start it once; share the `Arc` with the proxy.
pub struct Relay {
    shared: Arc<Shared>,
    workers: Vec<WorkerHandle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_uid: AtomicU64,
    closed: AtomicBool,
}

impl Relay {
    /// Validates the config, starts the worker threads and returns the relay with the receiver
    /// of its [`MediaEvent`]s. Dropping the receiver is allowed (events are then discarded).
    pub fn start(
        config: RelayConfig,
    ) -> Result<(Arc<Relay>, mpsc::UnboundedReceiver<MediaEvent>), MediaError> {
        config.validate()?;
        let mut pools = Vec::new();
        let mut side_pool = [0usize; 2];
        let mut keys: Vec<(std::net::IpAddr, std::ops::RangeInclusive<u16>)> = Vec::new();
        for side in Side::ALL {
            let s = config.side(side);
            let key = (s.bind, s.ports.clone());
            side_pool[side.index()] = match keys.iter().position(|k| *k == key) {
                Some(i) => i,
                None => {
                    keys.push(key);
                    pools.push(Mutex::new(PortPool::new(s.bind, &s.ports)));
                    pools.len() - 1
                }
            };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let n = config.worker_count();
        let shared = Arc::new(Shared {
            config,
            pools,
            side_pool,
            sessions: Mutex::new(AHashMap::default()),
            port_owner: Mutex::new(AHashMap::default()),
            events: tx,
            timeouts: AtomicU64::new(0),
            removing: AtomicUsize::new(0),
        });
        let mut workers = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let queue = Arc::new(Mutex::new(crate::worker::Queue::default()));
            let wake = Arc::new(crate::sys::EventFd::new()?);
            let totals = Arc::new(WorkerTotals::default());
            let worker = Worker::new(
                Arc::clone(&shared),
                Arc::clone(&queue),
                Arc::clone(&wake),
                Arc::clone(&totals),
            )?;
            let handle = std::thread::Builder::new()
                .name(format!("media-relay-{i}"))
                .spawn(move || worker.run())?;
            workers.push(WorkerHandle {
                queue,
                wake,
                totals,
            });
            threads.push(handle);
        }
        // Wait until every worker runs with its I/O backend set up (an io_uring ring and its
        // buffers, or epoll): `totals().uring_workers` is then final, and that memory is the
        // relay's own, not the first calls'. A barrier is acknowledged once the worker has
        // taken its first commands.
        for w in &workers {
            let (done, applied) = std::sync::mpsc::sync_channel(1);
            w.send(Command::Barrier { done });
            let _ = applied.recv_timeout(Duration::from_secs(2));
        }
        tracing::info!(
            workers = n,
            public = %shared.config.public.bind,
            internal = %shared.config.internal.bind,
            "media relay started"
        );
        let relay = Arc::new(Relay {
            shared,
            workers,
            threads: Mutex::new(threads),
            next_uid: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        Ok((relay, rx))
    }

    /// Anchors the media of an offer and returns the SDP to forward, naming the relay's address
    /// and ports on the side the offer is going to.
    ///
    /// - `offerer_tag`: the tag of the party that made the offer. For a request that is the
    ///   From tag (also for an UPDATE or re-INVITE from the callee); for an offer in a 2xx
    ///   (late offer, INVITE without SDP) it is the To tag.
    /// - `offer_side` / `answer_side`: where the offerer and the answerer are. Only used when
    ///   the call is new; later offers reuse the legs' sides.
    ///
    /// A first offer creates the call. A later offer (re-INVITE, UPDATE, hold/resume, an offer
    /// from the other party) keeps every port already allocated, so the far end never sees the
    /// media address move; new m= lines get new pairs. On any error nothing is allocated or
    /// changed.
    ///
    /// Returns without waiting for the media worker: it applies the change before it handles
    /// any packet that arrives after this call returned (commands come first in each of its
    /// passes), which is every packet the peer sends in reply to the SDP returned here. The
    /// SIP path then never waits on the media path: under load that wait was a context
    /// switch each way per offer, up to the worker's coalescing wait (200 us) while media
    /// flows. [`Relay::flush`] waits when a caller needs the change applied.
    pub fn offer(
        &self,
        call: &CallKey,
        offerer_tag: &str,
        offer_side: Side,
        answer_side: Side,
        sdp: &[u8],
    ) -> Result<Vec<u8>, MediaError> {
        let r = match self.offer_once(call, offerer_tag, offer_side, answer_side, sdp) {
            // Ports of calls deleted a moment ago come back when their worker has closed the
            // sockets: wait for that once before answering "exhausted".
            Err(MediaError::PortsExhausted { .. }) if self.shared.removing.load(Relaxed) > 0 => {
                tracing::debug!(call = %call, "pool empty: waiting for the deletes in flight");
                self.flush();
                self.offer_once(call, offerer_tag, offer_side, answer_side, sdp)
            }
            r => r,
        };
        if let Err(MediaError::PortsExhausted { side }) = &r {
            tracing::warn!(call = %call, %side, "RTP ports exhausted");
        }
        r
    }

    fn offer_once(
        &self,
        call: &CallKey,
        offerer_tag: &str,
        offer_side: Side,
        answer_side: Side,
        sdp: &[u8],
    ) -> Result<Vec<u8>, MediaError> {
        if self.closed.load(Relaxed) {
            return Err(MediaError::ShutDown);
        }
        let parsed = Sdp::parse(sdp)?;
        let mut sessions = self.shared.sessions.lock();
        let create = !sessions.contains_key(call);
        // A hairpin (the SDP names one of our own ports: a PBX bridged this call to another
        // one and left media end to end) goes to the other call's worker, so the two can be
        // joined into one hop.
        let hairpin = if create {
            self.hairpin_worker(&sessions, &parsed)
        } else {
            None
        };
        let mut fresh = None;
        let session = match sessions.get_mut(call) {
            Some(s) => s,
            None => {
                let uid = self.next_uid.fetch_add(1, Relaxed);
                fresh.insert(Session {
                    uid,
                    worker: hairpin.unwrap_or((uid as usize) % self.workers.len()),
                    legs: [
                        Leg {
                            tag: Some(offerer_tag.into()),
                            side: offer_side,
                            origin: OriginTracker::default(),
                            held: false,
                        },
                        Leg {
                            tag: None,
                            side: answer_side,
                            origin: OriginTracker::default(),
                            held: false,
                        },
                    ],
                    media: Vec::new(),
                    answered: false,
                    created: Instant::now(),
                })
            }
        };
        let (from, tag_changed) = session.leg_of(offerer_tag);
        let to = 1 - from;
        self.check_families(&parsed, session.legs[from].side)?;

        // Allocate what is missing first; on failure give it all back and change nothing.
        let mut bound: Vec<(usize, usize, BoundPair)> = Vec::new();
        for (i, m) in parsed.media.iter().enumerate() {
            if m.port == 0 || m.transport == Transport::Unsupported {
                continue;
            }
            for leg in 0..2 {
                let has = session.media.get(i).is_some_and(|s| s.ports[leg].is_some());
                if has {
                    continue;
                }
                let side = session.legs[leg].side;
                // The pool lock must be gone before `give_back` takes it again.
                let twin = self.shared.config.connect_latched;
                let allocated = self.shared.pools[self.pool_of(side)].lock().allocate(twin);
                match allocated {
                    Some(pair) => bound.push((i, leg, pair)),
                    None => {
                        self.give_back(bound, session.legs.each_ref().map(|l| l.side));
                        return Err(MediaError::PortsExhausted { side });
                    }
                }
            }
        }
        while session.media.len() < parsed.media.len() {
            session.media.push(MediaSlot::new());
        }

        let mut new = Vec::with_capacity(bound.len() * 2);
        if !bound.is_empty() {
            let mut owners = self.shared.port_owner.lock();
            for (_, _, pair) in &bound {
                owners.insert(pair.rtp_port, call.clone());
            }
        }
        for (i, leg, pair) in bound {
            let slot = &mut session.media[i];
            slot.ports[leg] = Some(pair.rtp_port);
            let pool = self.pool_of(session.legs[leg].side);
            new.extend(new_endpoints(i, leg, pair, pool, &slot.counters[leg]));
        }
        if tag_changed {
            session.legs[1].tag = Some(offerer_tag.into());
            session.legs[1].origin.reset();
        }
        let updates = sdp_updates(&parsed, session, from, tag_changed);
        let out = self.rewrite(&parsed, session, from, to);
        session.legs[from].held = parsed.is_held();
        let timeout_ns = self.timeout_of(session);
        let (uid, worker) = (session.uid, session.worker);
        tracing::debug!(call = %call, leg = from, create, media = parsed.media.len(), "offer anchored");
        // Queued under the sessions lock: two offers or answers of one call reach the worker
        // in the order they changed the session. New sockets need the worker to read them;
        // a re-offer on the call's sockets can wait for its next pass.
        let urgent = create || !new.is_empty();
        let cmd = Command::Apply {
            call: uid,
            key: call.clone(),
            create,
            timeout_ns,
            updates,
            new,
        };
        if urgent {
            self.workers[worker].send(cmd);
        } else {
            self.workers[worker].send_lazy(cmd);
        }
        if let Some(s) = fresh {
            sessions.insert(call.clone(), s);
        }
        Ok(out)
    }

    /// Completes an offer with its answer and returns the SDP to forward to the offerer.
    ///
    /// `offerer_tag` / `answerer_tag` are the tags of the two parties as in the message that
    /// carries the answer: for a response to a request, the From and To tags. Call it for every
    /// answer: a 183 with SDP (early media), then the 200 (same or different SDP, same or
    /// another fork's tag: a new tag replaces the old answerer and its latched address), an
    /// answer in an ACK or PRACK, the answer to a re-INVITE or UPDATE from either party.
    /// Like [`Relay::offer`], it does not wait for the worker.
    pub fn answer(
        &self,
        call: &CallKey,
        offerer_tag: &str,
        answerer_tag: &str,
        sdp: &[u8],
    ) -> Result<Vec<u8>, MediaError> {
        if self.closed.load(Relaxed) {
            return Err(MediaError::ShutDown);
        }
        let parsed = Sdp::parse(sdp)?;
        let mut sessions = self.shared.sessions.lock();
        let session = sessions.get_mut(call).ok_or(MediaError::UnknownCall)?;
        if parsed.media.len() > session.media.len() {
            return Err(MediaError::MediaCountMismatch {
                offer: session.media.len(),
                answer: parsed.media.len(),
            });
        }
        let offerer = if session.legs[0].tag.as_deref() == Some(offerer_tag) {
            0
        } else {
            1
        };
        let from = 1 - offerer;
        let tag_changed = from == 1 && session.legs[1].tag.as_deref() != Some(answerer_tag);
        self.check_families(&parsed, session.legs[from].side)?;
        if tag_changed {
            if session.legs[1].tag.is_some() {
                tracing::debug!(call = %call, tag = answerer_tag, "answer from another fork");
            }
            session.legs[1].tag = Some(answerer_tag.into());
            session.legs[1].origin.reset();
        }
        let updates = sdp_updates(&parsed, session, from, tag_changed);
        let out = self.rewrite(&parsed, session, from, offerer);
        session.legs[from].held = parsed.is_held();
        session.answered = true;
        let timeout_ns = self.timeout_of(session);
        self.workers[session.worker].send_lazy(Command::Apply {
            call: session.uid,
            key: call.clone(),
            create: false,
            new: Vec::new(),
            updates,
            timeout_ns,
        });
        Ok(out)
    }

    /// Waits (without any lock held) until the worker has applied a change. One worker
    /// wake-up; bounded in case a worker is wedged.
    fn wait_applied(&self, applied: std::sync::mpsc::Receiver<()>, what: &dyn fmt::Display) {
        if applied.recv_timeout(Duration::from_secs(2)).is_err() {
            tracing::warn!(%what, "media worker slow to apply a change");
        }
    }

    /// Returns once every worker has applied every offer, answer and delete queued before
    /// this call: their sockets relay by the new SDP, and deleted calls' ports are back in the
    /// pool. Offer, answer and delete do not wait for that themselves (see [`Relay::offer`]);
    /// this is for a caller that must know, such as a test reading the pool.
    pub fn flush(&self) {
        self.on_every_worker("flush", |done| Command::Barrier { done });
    }

    /// Stops every worker for `d`, as if the OS did not run it (CPU contention, a VM's
    /// stolen time), and returns once they all have stopped: packets then wait in the socket
    /// queues. For tests of what the relay does with a backlog.
    #[doc(hidden)]
    pub fn stall_workers(&self, d: Duration) {
        self.on_every_worker("stall", |started| Command::Stall { started, d });
    }

    /// Queues the command `make` builds on every worker and waits until each has
    /// acknowledged it through the sender it was given (all queued first, then one wait
    /// each, so the workers take them side by side).
    fn on_every_worker(
        &self,
        what: &str,
        make: impl Fn(std::sync::mpsc::SyncSender<()>) -> Command,
    ) {
        if self.closed.load(Relaxed) {
            return;
        }
        let waits: Vec<_> = self
            .workers
            .iter()
            .map(|w| {
                let (ack, acked) = std::sync::mpsc::sync_channel(1);
                w.send(make(ack));
                acked
            })
            .collect();
        for acked in waits {
            self.wait_applied(acked, &what);
        }
    }

    /// Ends a call's media: its sockets close and its ports go back to the pool when the
    /// worker takes the command (without waiting for it; an offer that finds the pool empty
    /// meanwhile waits for these deletes first). Idempotent: false when the call was not
    /// known.
    pub fn delete(&self, call: &CallKey) -> bool {
        let Some(session) = self.shared.sessions.lock().remove(call) else {
            return false;
        };
        self.shared.removing.fetch_add(1, Relaxed);
        self.workers[session.worker].send_lazy(Command::Remove { call: session.uid });
        tracing::debug!(call = %call, "media deleted");
        true
    }

    /// The worker of the call that owns the relay port an SDP names, when the SDP names one
    /// of our own addresses.
    fn hairpin_worker(
        &self,
        sessions: &AHashMap<CallKey, Session>,
        sdp: &Sdp<'_>,
    ) -> Option<usize> {
        let addr = (0..sdp.media.len()).find_map(|i| sdp.rtp_addr(i).filter(|a| a.port() != 0))?;
        let c = &self.shared.config;
        let ours = [&c.public, &c.internal]
            .iter()
            .any(|s| s.advertised() == addr.ip() || s.bind == addr.ip());
        if !ours {
            return None;
        }
        let owner = self.shared.port_owner.lock().get(&addr.port()).cloned()?;
        sessions
            .get(&owner)
            .filter(|s| s.media.iter().any(|m| m.ports.contains(&Some(addr.port()))))
            .map(|s| s.worker)
    }

    /// Joins two calls a PBX bridged with media end to end (each one's internal leg sends to
    /// the other's): packets from `a`'s public leg leave straight through `b`'s public leg
    /// and back, one relay hop instead of two. Returns false when the calls cannot be joined
    /// (unknown, not one public and one internal leg each, or on different workers, which
    /// only happens when the hairpin was not visible in the first offer); they then keep
    /// relaying in two hops. Undone by the worker when either call ends or a new SDP moves
    /// the internal leg of either.
    pub fn join(&self, a: &CallKey, b: &CallKey) -> bool {
        let sessions = self.shared.sessions.lock();
        let (Some(sa), Some(sb)) = (sessions.get(a), sessions.get(b)) else {
            return false;
        };
        let public = |s: &Session| -> Option<u8> {
            let p = s.legs.iter().position(|l| l.side == Side::Public)?;
            (s.legs[1 - p].side == Side::Internal).then_some(p as u8)
        };
        let (Some(a_leg), Some(b_leg)) = (public(sa), public(sb)) else {
            return false;
        };
        if sa.worker != sb.worker || sa.uid == sb.uid {
            return false;
        }
        let (done, applied) = std::sync::mpsc::sync_channel(1);
        self.workers[sa.worker].send(Command::Join {
            a: sa.uid,
            a_leg,
            b: sb.uid,
            b_leg,
            done,
        });
        drop(sessions);
        self.wait_applied(applied, a);
        true
    }

    /// Whether a call exists and has seen an answer: what the SIP side asks on every final
    /// response, without the per-stream snapshot [`Relay::stats`] builds.
    pub fn answered(&self, call: &CallKey) -> Option<bool> {
        self.shared.sessions.lock().get(call).map(|s| s.answered)
    }

    /// A snapshot of a call's legs and streams; `None` for an unknown call.
    pub fn stats(&self, call: &CallKey) -> Option<CallStats> {
        let sessions = self.shared.sessions.lock();
        let s = sessions.get(call)?;
        let leg = |l: usize| LegStats {
            tag: s.legs[l].tag.as_deref().map(str::to_owned),
            side: s.legs[l].side,
            on_hold: s.legs[l].held,
            media: s
                .media
                .iter()
                .enumerate()
                .map(|(index, m)| MediaStats {
                    index,
                    relay_port: m.ports[l],
                    rtp: m.counters[l][0].snapshot(),
                    rtcp: m.counters[l][1].snapshot(),
                })
                .collect(),
        };
        Some(CallStats {
            answered: s.answered,
            on_hold: s.legs.iter().any(|l| l.held),
            age: s.created.elapsed(),
            legs: [leg(0), leg(1)],
        })
    }

    /// Calls with media state.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.lock().len()
    }

    /// Relay-wide counters for metrics export.
    pub fn totals(&self) -> RelayTotals {
        let mut t = RelayTotals {
            sessions: self.sessions(),
            timeouts: self.shared.timeouts.load(Relaxed),
            ..Default::default()
        };
        for w in &self.workers {
            t.packets += w.totals.packets.load(Relaxed);
            t.bytes += w.totals.bytes.load(Relaxed);
            t.dropped += w.totals.dropped.load(Relaxed);
            t.buffer_waits += w.totals.buffer_waits.load(Relaxed);
            t.uring_workers += usize::from(w.totals.uring.load(Relaxed));
        }
        for side in Side::ALL {
            let pool = self.shared.pools[self.pool_of(side)].lock();
            t.free_pairs[side.index()] = pool.available();
            t.total_pairs[side.index()] = pool.total();
        }
        t
    }

    /// The configuration the relay runs with.
    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// Stops the workers, closes every socket and returns every port. Later offers fail with
    /// [`MediaError::ShutDown`]. Also done on drop.
    pub fn shutdown(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        self.shared.sessions.lock().clear();
        for w in &self.workers {
            w.send(Command::Shutdown);
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        tracing::info!("media relay stopped");
    }

    fn pool_of(&self, side: Side) -> usize {
        self.shared.side_pool[side.index()]
    }

    fn give_back(&self, bound: Vec<(usize, usize, BoundPair)>, sides: [Side; 2]) {
        for (_, leg, pair) in bound {
            let port = pair.rtp_port;
            drop(pair);
            self.shared.pools[self.pool_of(sides[leg])]
                .lock()
                .release(port);
        }
    }

    /// The relay sends to an SDP address from the sender's side, so the families must match.
    fn check_families(&self, sdp: &Sdp<'_>, side: Side) -> Result<(), MediaError> {
        let ours = self.shared.config.side(side).bind;
        for i in 0..sdp.media.len() {
            for addr in [sdp.rtp_addr(i), sdp.rtcp_addr(i)].into_iter().flatten() {
                if addr.is_ipv4() != ours.is_ipv4() {
                    return Err(MediaError::AddressFamily {
                        side,
                        addr: addr.ip(),
                    });
                }
            }
        }
        Ok(())
    }

    fn rewrite(&self, sdp: &Sdp<'_>, session: &mut Session, from: usize, to: usize) -> Vec<u8> {
        let targets: Vec<Option<MediaTarget>> = session
            .media
            .iter()
            .map(|m| {
                m.ports[to].map(|p| MediaTarget {
                    rtp_port: p,
                    rtcp_port: p + 1,
                })
            })
            .collect();
        let addr = self.shared.config.side(session.legs[to].side).advertised();
        let mut out = sdp.rewrite(addr, &targets);
        session.legs[from].origin.apply(sdp, &mut out);
        out.sdp
    }

    fn timeout_of(&self, s: &Session) -> u64 {
        let c = &self.shared.config;
        let d = if !s.answered {
            c.setup_timeout.max(c.timeout)
        } else if s.legs.iter().any(|l| l.held) {
            c.hold_timeout.max(c.timeout)
        } else {
            c.timeout
        };
        d.as_nanos().min(u128::from(u64::MAX)) as u64
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn new_endpoints(
    media: usize,
    leg: usize,
    pair: BoundPair,
    pool: usize,
    counters: &[Arc<StreamCounters>; 2],
) -> [NewEndpoint; 2] {
    let id = |rtcp| EndpointId {
        media: media as u16,
        leg: leg as u8,
        rtcp,
    };
    [
        NewEndpoint {
            id: id(false),
            socket: pair.rtp,
            twin: pair.rtp_twin,
            release: Some((pool, pair.rtp_port)),
            counters: Arc::clone(&counters[0]),
        },
        NewEndpoint {
            id: id(true),
            socket: pair.rtcp,
            // RTCP: a packet every few seconds; a route lookup there costs nothing worth a
            // descriptor.
            twin: None,
            release: None,
            counters: Arc::clone(&counters[1]),
        },
    ]
}

/// What one leg's new SDP means for the worker: its advertised addresses (the destination
/// until a source is learned), transport, and clock rates for both legs' jitter.
fn sdp_updates(
    sdp: &Sdp<'_>,
    session: &Session,
    from: usize,
    reset_all: bool,
) -> Vec<EndpointUpdate> {
    let mut out = Vec::new();
    for (i, slot) in session.media.iter().enumerate() {
        let m = sdp.media.get(i);
        for leg in 0..2 {
            if slot.ports[leg].is_none() {
                continue;
            }
            for rtcp in [false, true] {
                let id = EndpointId {
                    media: i as u16,
                    leg: leg as u8,
                    rtcp,
                };
                let advertised = if leg == from {
                    let a = if rtcp {
                        sdp.rtcp_addr(i)
                    } else {
                        sdp.rtp_addr(i)
                    };
                    // The control side owns the advertised address; the worker only learns.
                    slot.counters[leg][usize::from(rtcp)]
                        .addrs
                        .lock()
                        .advertised = a;
                    Some(a)
                } else {
                    None
                };
                let rtp = !matches!(m, Some(m) if m.transport != Transport::Rtp);
                let clock_rates = if rtcp {
                    Default::default()
                } else {
                    m.map(|m| m.clock_rates.clone()).unwrap_or_default()
                };
                out.push(EndpointUpdate {
                    id,
                    advertised,
                    reset_latch: reset_all && leg == from,
                    rtp,
                    clock_rates,
                });
            }
        }
    }
    out
}
