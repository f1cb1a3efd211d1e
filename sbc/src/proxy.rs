//! The stateful proxy core (RFC 3261 section 16), driven synchronously by the transports.
//!
//! Every received message enters [`Proxy::on_message`] on the task that read it. The proxy
//! decides what to do, updates its transaction table under one short lock, and returns the
//! datagrams to send, which go out after the lock is released. Timers (retransmissions,
//! timeouts, Timer C) are deadlines in the same table; a single tokio task sleeps until the
//! earliest and calls [`Proxy::handle_timers`]. Nothing here awaits, so the lock is never held
//! across an `.await`.
//!
//! Shape of a proxied request: a server transaction toward the sender, one client branch
//! toward the next hop, both the sans-IO machines of `sbc_sip::transaction`. Responses are
//! matched to the branch by our Via branch, then forwarded through the server transaction.
//! ACK for a non-2xx is hop by hop (absorbed and regenerated); ACK for a 2xx and every other
//! in-dialog request follows Route like any request.

use crate::flow_token::FlowTokens;
use crate::media::{MediaAction, MediaAnchor};
use crate::registrations::Registrations;
use crate::timer_wheel::TimerWheel;
use crate::transport::{Dest, Flow, Handler, Inbound, SendError, Transports};
use ahash::AHashMap;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use sbc_config::Side;
use sbc_media_relay::Side as MediaSide;
use sbc_routing::{RouteTable, Source};
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits, ResponseOpts};
use sbc_sip::message::{HeaderName, Message, Method, ParseLimits};
use sbc_sip::transaction::{
    ClientEvent, ClientTransaction, ResponseAction, ServerEvent, ServerTransaction, State,
    TimerConfig,
};
use sbc_sip::uri::{Scheme, Uri};
use sbc_sip::Transport;
use smallvec::SmallVec;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A listener as the proxy writes it into Via, Record-Route and Path.
#[derive(Clone, Debug)]
pub struct LocalListener {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// Host text for headers (IPv6 in brackets).
    pub host: String,
    pub port: u16,
    pub side: Side,
}

/// Settings the core needs, taken from the config at start.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub name: String,
    pub secret: Option<String>,
    pub limits: ParseLimits,
    pub timers: TimerConfig,
    pub timer_c: Duration,
    /// `limits.overload_queue_ms`: a new INVITE that waited longer in the socket queue is
    /// answered 503 at once (zero: never).
    pub overload_queue: Duration,
}

type Out = SmallVec<[(Dest, Bytes); 4]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MethodKey {
    Invite,
    Cancel,
    Other(Method),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TxKey {
    branch: Box<[u8]>,
    method: MethodKey,
}

struct Branch {
    tx: ClientTransaction,
    key: TxKey,
    dest: Dest,
    /// The request as forwarded (for ACK and CANCEL construction).
    out: Bytes,
    cancel: Option<(ClientTransaction, TxKey)>,
    /// Record-Route entries the forwarded request gained from us (0, 1, or 2 when the
    /// transport or interface changes): where our entries sit in a 2xx's Record-Route.
    record_routes: u8,
}

/// What a transaction sent to a PBX node came to; live traffic is health evidence too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeOutcome {
    Answered(u16),
    Timeout,
    TransportError,
    /// No response yet after the pool's `suspect_after`: a hint, not a failure.
    Slow,
}

/// Chooses the nodes a new transaction tries, in order, and hears how each attempt went.
/// The health monitor implements it; without one, a pool's nodes are tried in config order.
pub trait NodeSelector: Send + Sync {
    fn candidates(&self, pool: usize) -> SmallVec<[usize; 4]>;
    fn observe(&self, node: usize, outcome: NodeOutcome);
    /// The pool's active node (the one registrations belong on).
    fn active(&self, pool: usize) -> Option<usize> {
        self.candidates(pool).first().copied()
    }
    /// Whether health has judged `node` Down: an in-dialog request whose route set leads
    /// through it and back to us skips it (the call outlives its PBX).
    fn is_down(&self, _node: usize) -> bool {
        false
    }
}

/// How an in-dialog request reaches the far end of a proxied call around a dead PBX: the
/// PBX's Route entries are dropped with ours around them, and the request goes where the
/// second pass through the SBC would have sent it. Both relay passes see it.
#[derive(Clone, Debug)]
struct SkipHop {
    dest: Dest,
    public_flow: Option<Flow>,
    /// Route values to remove from the top (ours, the dead node's, ours again).
    pops: usize,
    node: usize,
}

/// An in-dialog request sent to a PBX node that could skip it: if the node sends nothing
/// within its pool's branch timeout, or fails at the transport, the request goes around it.
struct SkipAlt {
    node: usize,
    deadline: Instant,
    answered: bool,
}

/// A new INVITE or REGISTER routed to a pool: the nodes it may still try. A node that sends
/// nothing within the pool's branch timeout, fails at the transport, or answers 503 before
/// any provisional is skipped at once, so callers see no failure while health detection is
/// still counting (far below Timer B).
struct Failover {
    nodes: SmallVec<[(usize, Dest); 4]>,
    pos: usize,
    public_flow: Option<Flow>,
    deadline: Option<Instant>,
    timeout: Duration,
    answered: bool,
    /// When the current node becomes Suspect if it still has not answered.
    suspect_at: Option<Instant>,
    suspect_after: Option<Duration>,
}

struct ProxyTx {
    server: ServerTransaction,
    server_key: TxKey,
    in_flow: Flow,
    request: Message,
    method: Method,
    branch: Option<Branch>,
    final_sent: bool,
    cancel_pending: bool,
    timer_c: Option<Instant>,
    scheduled: Option<Instant>,
    /// A REGISTER's phone flow, or a new call's trunk channel (see [`TxExtra`]).
    extra: TxExtra,
    /// Topology hiding: the phone's Via lines, put back on every response returned to it.
    hidden_vias: Option<Bytes>,
    local_tag: u64,
    failover: Option<Failover>,
    /// Media: the request carried an offer (so SDP in the response is the answer).
    media_offer: bool,
    /// Media: where the request came from and went to; `None` without anchoring.
    media_sides: Option<(MediaSide, MediaSide)>,
    /// Media: the request's rewritten SDP, reused when the request is retried on another node.
    media_body: Option<Bytes>,
    /// Counts this transaction against its source's cap (`limits.max_transactions_per_source`)
    /// for as long as it lives.
    _tx_slot: Option<crate::ratelimit::TxSlot>,
    /// An in-dialog request toward a PBX that can go around it if the PBX is dead.
    skip_alt: Option<SkipAlt>,
    /// The request went around a dead PBX: its media crossed both relay passes (sides
    /// `media_sides.0` -> internal, then internal -> `media_sides.1`).
    media_skip: bool,
}

/// What only one kind of transaction carries, in one field: a live `ProxyTx` must stay in
/// its allocator bin (2,552 bytes at most; see the size test below), and a REGISTER never
/// holds a trunk channel nor an INVITE a phone's flow to record.
enum TxExtra {
    None,
    /// A REGISTER: the phone's flow, to record on a 2xx.
    Register(Flow),
    /// A new call with a trunk holds one of its channels (see [`crate::trunk_calls`]) until
    /// its final response; a 2xx hands it to the dialog.
    Call(crate::trunk_calls::CallSlot),
}

impl TxExtra {
    fn register_flow(&self) -> Option<Flow> {
        match self {
            TxExtra::Register(f) => Some(*f),
            _ => None,
        }
    }

    /// Takes the call's trunk channel, if it holds one.
    fn take_call_slot(&mut self) -> Option<crate::trunk_calls::CallSlot> {
        match std::mem::replace(self, TxExtra::None) {
            TxExtra::Call(slot) => Some(slot),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// A transaction whose work is done but whose RFC 3261 linger is not: the server side still
/// answers retransmitted requests with its last response (Timer J, 32 s on UDP) or absorbs
/// ACKs (Timer I), and a finished non-INVITE branch still swallows retransmitted responses
/// (Timer K). Neither needs the request, the forwarded copy, the branch's state or the media
/// bookkeeping, so the transaction moves here, about a tenth of its live size: at thousands of
/// transactions per second the linger holds most of them, and the memory they kept fresh
/// (page faults, zeroed pages) was a fifth of the SBC's CPU per REGISTER.
struct Lingering {
    server: ServerTransaction,
    server_key: TxKey,
    in_flow: Flow,
    /// The finished branch's key (still in `client_idx`) and when its Timer K ends.
    client: Option<(TxKey, Instant)>,
    scheduled: Option<Instant>,
    _tx_slot: Option<crate::ratelimit::TxSlot>,
}

struct Core {
    /// Boxed: a transaction is ~1.5 KB, and growing the table must only move pointers, not
    /// stall the SIP path copying every entry.
    txs: IdMap<Box<ProxyTx>>,
    /// Finished transactions in their linger, under the same ids (see [`Lingering`]).
    linger: IdMap<Box<Lingering>>,
    server_idx: AHashMap<TxKey, u64>,
    client_idx: AHashMap<TxKey, u64>,
    wheel: TimerWheel,
    /// The deadline the timer task sleeps until; an earlier one must wake it.
    timer_sleep: Option<Instant>,
    next_id: u64,
    /// Re-INVITEs the SBC answered 2xx itself for a dead PBX, by [`own_2xx_key`]: their
    /// transaction retransmits the 2xx until the ACK, which has its own branch and is matched
    /// here (under the core lock every ACK takes anyway).
    own_2xx: AHashMap<Box<[u8]>, Own2xx>,
}

/// A request as it leaves: its bytes, the branch of our Via, how many Record-Route entries
/// we added, and (topology hiding) the phone's Via lines to restore on its responses.
struct Forwarded {
    bytes: Bytes,
    branch: Box<[u8]>,
    record_routes: u8,
    hidden_vias: Option<Bytes>,
}

pub struct Proxy {
    core: Mutex<Core>,
    routes: RwLock<Arc<RouteTable>>,
    transports: OnceLock<Arc<Transports>>,
    locals: OnceLock<Vec<LocalListener>>,
    tokens: FlowTokens,
    pub registrations: Registrations,
    /// Phones following a failover (see [`crate::rereg`]).
    pub rereg: crate::rereg::Rereg,
    settings: ProxySettings,
    timer_wake: tokio::sync::Notify,
    selector: RwLock<Option<Arc<dyn NodeSelector>>>,
    media: OnceLock<Arc<MediaAnchor>>,
    /// Per-source rate limits and transaction caps (see [`crate::ratelimit`]); unset in a bare
    /// proxy built by tests.
    limiter: OnceLock<Arc<crate::ratelimit::Limiter>>,
    /// Requests the SBC originates itself (a BYE when a call's media died), by branch: the
    /// response wakes the task that retransmits it.
    local: Mutex<AHashMap<Box<[u8]>, tokio::sync::oneshot::Sender<Message>>>,
    /// Nodes an in-dialog request recently timed out on, before health calls them Down: the
    /// ACK and the requests after it skip them at once instead of each waiting out a branch
    /// timeout. Any response from the node clears it.
    dead_hops: Mutex<AHashMap<usize, Instant>>,
    /// Draining (see [`crate::drain`]): new calls and keep-alive OPTIONS to the SBC get 503.
    draining: std::sync::atomic::AtomicBool,
    /// Calls in progress per trunk (`trunk.max_calls`).
    trunk_calls: crate::trunk_calls::TrunkCalls,
    /// Itself, for work started from under the core lock that outlives the call (the BYE
    /// on the other leg of a call whose PBX died).
    me: std::sync::Weak<Proxy>,
}

/// A 2xx the SBC sent as a re-INVITE's UAS, awaiting its ACK.
struct Own2xx {
    /// The transaction that retransmits it.
    id: u64,
    /// Timer L: past it the transaction is gone and the entry stale.
    until: Instant,
}

/// What matches an ACK to its INVITE when they do not share a branch (an ACK for a 2xx):
/// Call-ID, From tag and CSeq number. The From tag tells apart the two dialogs of a call the
/// PBX record-routed back through the SBC, which share the Call-ID.
fn own_2xx_key(msg: &Message) -> Box<[u8]> {
    let call_id = msg.call_id();
    let tag = msg.from_tag().unwrap_or_default();
    let mut key = Vec::with_capacity(call_id.len() + tag.len() + 12);
    key.extend_from_slice(call_id);
    key.push(0);
    key.extend_from_slice(tag);
    key.push(0);
    key.extend_from_slice(&msg.cseq().to_be_bytes());
    key.into_boxed_slice()
}

/// `Retry-After` of the 503 to a new call while draining: long enough that a client with
/// another SBC to try does not come back to this one during the drain.
const DRAIN_RETRY_AFTER: u32 = 30;

/// How long a node stays in `dead_hops` without news.
const DEAD_HOP_TTL: Duration = Duration::from_secs(30);

/// Branch prefix of requests the SBC originates, so their responses are not stray.
const LOCAL_BRANCH: &[u8] = b"z9hG4bK-sbcl-";
/// Branch prefix of the Via the SBC adds to requests it forwards (loop detection finds it).
const OUR_BRANCH: &[u8] = b"z9hG4bK-sbc-";

/// Granularity of transaction timers: SIP timers (T1 = 500 ms) tolerate tens of milliseconds
/// of lateness (Kamailio's tm ticks at 1/16 s), and coalescing bounds the timer task's
/// wake-ups: each is a context switch costing tens of microseconds on a VM, and while
/// transactions are pending the task wakes on every tick.
const TIMER_TICK: Duration = Duration::from_millis(20);
/// One revolution of the wheel covers 64 x T1 with the default T1 (Timers B, F, H, J, L, M).
const TIMER_SLOTS: usize = 2048;
/// Granularity of a lingering transaction's deadlines, in ticks. What is left then is only
/// the end of absorbing retransmissions (Timers J and K), which may come a little late:
/// thousands of lingering transactions then come due in a few wake-ups a second instead of
/// one per tick. An INVITE server still retransmitting its final response (Timer G) keeps
/// the fine tick.
const LINGER_TICKS: u64 = 10;
/// Only deadlines at least this far ahead are rounded coarsely, so the lateness stays a
/// small share of the wait (short timers, as in tests with a tiny T1, keep the fine tick).
const LINGER_COARSE_AHEAD: Duration = Duration::from_secs(1);
/// A table keyed by the proxy's own transaction ids, which it hands out in sequence.
type IdMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes a transaction id to itself in the low bits, so consecutive transactions sit in
/// neighbouring buckets: at 4,000 REGISTER/s ~130,000 lingering transactions fill a table of
/// megabytes, and a random hash sent every insert and every removal to a cold cache line
/// (hash table inserts were ~5% of the SBC's CPU). The top 7 bits, which the table keeps as
/// its per-bucket tag to filter a probe, come from a multiplicative mix. Ids are not chosen by
/// senders, so no flooding can aim at a bucket.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; any other input still gets a usable hash.
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = id ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (0x7F << 57));
    }
}

/// Initial capacity of the transaction tables.
const INITIAL_TXS: usize = 16 * 1024;

/// What a request is routed to.
enum Target {
    Forward {
        dest: Dest,
        /// The public-side flow of this dialog, written into Record-Route.
        public_flow: Option<Flow>,
    },
    /// A new dialog or registration for a pool: its nodes in the order to try.
    Pool {
        pool: usize,
        public_flow: Option<Flow>,
    },
    /// An in-dialog request around a dead PBX (see [`SkipHop`]).
    Skip(SkipHop),
    /// An in-dialog request for a dead PBX node with no way around it: the SBC answers it
    /// for the PBX (see [`Proxy::answer_orphan`]).
    Orphan {
        node: usize,
        dest: Dest,
    },
    Local(u16, &'static str),
    Drop,
}

impl Proxy {
    pub fn new(settings: ProxySettings, routes: RouteTable) -> Arc<Proxy> {
        Arc::new_cyclic(|me| Proxy {
            me: me.clone(),
            core: Mutex::new(Core {
                // Room for a few seconds of a busy SBC before the first growth.
                txs: IdMap::with_capacity_and_hasher(INITIAL_TXS, Default::default()),
                linger: IdMap::with_capacity_and_hasher(INITIAL_TXS, Default::default()),
                server_idx: AHashMap::with_capacity(INITIAL_TXS),
                client_idx: AHashMap::with_capacity(INITIAL_TXS),
                wheel: TimerWheel::new(Instant::now(), TIMER_TICK, TIMER_SLOTS),
                timer_sleep: None,
                next_id: 0,
                own_2xx: AHashMap::default(),
            }),
            routes: RwLock::new(Arc::new(routes)),
            transports: OnceLock::new(),
            locals: OnceLock::new(),
            tokens: FlowTokens::new(settings.secret.as_deref()),
            registrations: Registrations::default(),
            rereg: crate::rereg::Rereg::default(),
            settings,
            timer_wake: tokio::sync::Notify::new(),
            selector: RwLock::new(None),
            media: OnceLock::new(),
            limiter: OnceLock::new(),
            local: Mutex::new(AHashMap::default()),
            dead_hops: Mutex::new(AHashMap::default()),
            draining: std::sync::atomic::AtomicBool::new(false),
            trunk_calls: crate::trunk_calls::TrunkCalls::default(),
        })
    }

    /// Anchors the media of every call from now on (set once, at start).
    pub fn set_media(&self, media: Arc<MediaAnchor>) {
        let _ = self.media.set(media);
    }

    pub fn media(&self) -> Option<&Arc<MediaAnchor>> {
        self.media.get()
    }

    /// The dialog a 2xx to a dialog-creating INVITE establishes, seen from the SBC: what it
    /// needs to send a BYE to either end by itself.
    fn dialog_info(
        &self,
        request: &Message,
        ours: usize,
        ok: &Message,
        caller_flow: Flow,
        callee_dest: &Dest,
    ) -> Option<crate::media::DialogInfo> {
        let text = |b: &[u8]| -> Box<str> { String::from_utf8_lossy(b).into() };
        let contact = |m: &Message| {
            m.header_value(HeaderName::Contact)
                .and_then(|v| NameAddr::parse(v).ok())
                .map(|na| text(na.uri_raw))
        };
        // Record-Route as the 2xx carries it: the entries the INVITE arrived with (toward the
        // caller) at the bottom, ours above them, then those of hops toward the callee. Ours
        // are found by count, not by address: a call that crosses the SBC twice carries two
        // groups of our entries.
        let rr: Vec<Box<str>> = ok
            .values(HeaderName::RecordRoute)
            .map(|(_, v)| text(sbc_sip::scan::trim(v)))
            .collect();
        let below = request.values(HeaderName::RecordRoute).count();
        let above = rr.len().checked_sub(below + ours)?;
        let routes_to_callee = rr[..above].iter().rev().cloned().collect();
        let routes_to_caller = rr[above + ours..].to_vec();
        let node = {
            let routes = self.routes.read();
            let callee = match callee_dest {
                Dest::Flow(f) => f.remote,
                Dest::Addr { remote, .. } => *remote,
            };
            routes
                .node_by_addr(callee)
                .or_else(|| routes.node_by_addr(caller_flow.remote))
        };
        Some(crate::media::DialogInfo {
            node,
            call_id: text(request.call_id()),
            caller_from: text(request.header_value(HeaderName::From)?),
            callee_to: text(ok.header_value(HeaderName::To)?),
            caller_target: contact(request)?,
            callee_target: contact(ok)?,
            routes_to_caller,
            routes_to_callee,
            caller_flow,
            callee_dest: callee_dest.clone(),
            caller_cseq: request.cseq(),
        })
    }

    /// Whether in-dialog requests treat `node` as dead: health has it Down, or an in-dialog
    /// request timed out on it lately.
    pub fn node_dead(&self, node: usize) -> bool {
        if self
            .selector
            .read()
            .as_ref()
            .is_some_and(|s| s.is_down(node))
        {
            return true;
        }
        self.dead_hops
            .lock()
            .get(&node)
            .is_some_and(|at| at.elapsed() < DEAD_HOP_TTL)
    }

    /// A node's configured name (for `/status`).
    pub fn node_name(&self, node: usize) -> Option<String> {
        self.routes.read().nodes.get(node).map(|n| n.name.clone())
    }

    /// Whether a destination is a PBX node that is dead for in-dialog requests.
    fn dest_dead_node(&self, dest: &Dest) -> Option<usize> {
        let remote = match dest {
            Dest::Flow(f) => f.remote,
            Dest::Addr { remote, .. } => *remote,
        };
        let n = self.routes.read().node_by_addr(remote)?;
        self.node_dead(n).then_some(n)
    }

    /// Hangs a dialog up from the middle: a BYE to each end, each as if the other end sent
    /// it (its tags, its route set), with a Reason. Used when the relay saw the call's media
    /// die, so both phones stop showing a dead call and both ends' accounting closes. An end
    /// that is a dead PBX node is spared the BYE.
    pub fn end_dialog(self: &Arc<Self>, d: &crate::media::DialogInfo, reason: &str) {
        self.end_leg(d, true, reason);
        self.end_leg(d, false, reason);
    }

    /// Sends a BYE to one end of a dialog (`toward_caller` or the callee), in the dialog's
    /// own terms, as if the other end sent it; nothing if that end is a dead PBX node.
    pub fn end_leg(
        self: &Arc<Self>,
        d: &crate::media::DialogInfo,
        toward_caller: bool,
        reason: &str,
    ) {
        // Toward the callee: as the caller, CSeq well above the caller's INVITE (the caller
        // may have sent re-INVITEs since). Toward the caller: as the callee, CSeq above any
        // the callee is likely to have used.
        let to_callee = (
            d.callee_dest.clone(),
            &*d.callee_target,
            &d.routes_to_callee,
            &*d.caller_from,
            &*d.callee_to,
            d.caller_cseq.saturating_add(10_000),
        );
        let to_caller = (
            Dest::Flow(d.caller_flow),
            &*d.caller_target,
            &d.routes_to_caller,
            &*d.callee_to,
            &*d.caller_from,
            2_000_000_000,
        );
        let end = if toward_caller { to_caller } else { to_callee };
        {
            let (dest, target, routes, from, to, cseq) = end;
            if self.dest_dead_node(&dest).is_some() {
                return;
            }
            let listener = match &dest {
                Dest::Flow(f) => self.listener_for_flow(f),
                Dest::Addr {
                    transport, remote, ..
                } => self.pick_listener(*transport, *remote, true),
            };
            let Some(l) = listener else { return };
            let n: u64 = rand::random();
            let branch = format!("{}{n:x}", String::from_utf8_lossy(LOCAL_BRANCH));
            let mut req = String::with_capacity(512);
            let _ = write!(
                req,
                "BYE {target} SIP/2.0\r\nVia: SIP/2.0/{} {}:{};branch={branch};rport\r\nMax-Forwards: 70\r\n",
                l.transport.via_token(),
                l.host,
                l.port
            );
            for r in routes.iter() {
                let _ = write!(req, "Route: {r}\r\n");
            }
            let _ = write!(
                req,
                "From: {from}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {cseq} BYE\r\nReason: SIP;text=\"{reason}\"\r\nUser-Agent: {}\r\nContent-Length: 0\r\n\r\n",
                d.call_id, self.settings.name
            );
            metrics::counter!("sbc_local_requests_total", "method" => "BYE").increment(1);
            tokio::spawn(self.clone().run_local(
                dest,
                Bytes::from(req),
                branch.into_bytes().into_boxed_slice(),
            ));
        }
    }

    /// Sends a request the SBC originated through its own client transaction (retransmitted
    /// on UDP per Timer E, given up at Timer F) and returns the final status, if any.
    async fn run_local(
        self: Arc<Self>,
        dest: Dest,
        bytes: Bytes,
        branch: Box<[u8]>,
    ) -> Option<u16> {
        self.run_local_msg(dest, bytes, branch)
            .await
            .and_then(|m| m.status())
    }

    /// As [`Proxy::run_local`], returning the final response itself (a shadow REGISTER
    /// needs the expiry the registrar granted).
    pub(crate) async fn run_local_msg(
        self: Arc<Self>,
        dest: Dest,
        bytes: Bytes,
        branch: Box<[u8]>,
    ) -> Option<Message> {
        let (done, mut rx) = tokio::sync::oneshot::channel();
        self.local.lock().insert(branch.clone(), done);
        let reliable = dest_transport(&dest).is_reliable();
        let mut ct =
            ClientTransaction::new(false, reliable, bytes, Instant::now(), self.settings.timers);
        let status = loop {
            let mut out = Out::new();
            while let Some(b) = ct.poll_transmit() {
                out.push((dest.clone(), b));
            }
            self.flush(out);
            let Some(deadline) = ct.poll_timeout() else {
                break None;
            };
            tokio::select! {
                r = &mut rx => break r.ok(),
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                    ct.handle_timeout(Instant::now());
                }
            }
        };
        self.local.lock().remove(&branch);
        tracing::debug!(status = ?status.as_ref().and_then(|m| m.status()), "locally originated request done");
        status
    }

    /// Ends a transaction's current client branch (its retransmissions and CANCEL included)
    /// before the request goes elsewhere or is answered by the SBC.
    fn drop_branch(tx: &mut ProxyTx, client_idx: &mut AHashMap<TxKey, u64>) {
        if let Some(old) = tx.branch.take() {
            let mut old_tx = old.tx;
            old_tx.terminate();
            client_idx.remove(&old.key);
            if let Some((_, k)) = old.cancel {
                client_idx.remove(&k);
            }
        }
        tx.timer_c = None;
    }

    /// Sends a transaction's request again on a new client branch: to the next node of its
    /// pool, or around a dead hop of its route set.
    #[allow(clippy::too_many_arguments)]
    fn send_new_branch(
        &self,
        tx: &mut ProxyTx,
        client_idx: &mut AHashMap<TxKey, u64>,
        id: u64,
        dest: Dest,
        public_flow: Option<Flow>,
        body: Option<&[u8]>,
        pops: Option<usize>,
        now: Instant,
    ) -> bool {
        let Some(via) = tx.request.top_via() else {
            return false;
        };
        let Some(Forwarded {
            bytes,
            branch,
            record_routes,
            ..
        }) = self.forward(
            &tx.request,
            &tx.in_flow,
            &dest,
            public_flow,
            &via,
            body,
            pops,
        )
        else {
            return false;
        };
        let key = TxKey {
            branch,
            method: method_key(tx.method),
        };
        tx.branch = Some(Branch {
            tx: ClientTransaction::new(
                tx.method == Method::Invite,
                dest_transport(&dest).is_reliable(),
                bytes.clone(),
                now,
                self.settings.timers,
            ),
            key: key.clone(),
            dest,
            out: bytes,
            cancel: None,
            record_routes,
        });
        client_idx.insert(key, id);
        true
    }

    /// Which side of the media relay a peer is on: PBX nodes are internal, everyone else
    /// (phones, trunks) public.
    fn media_side(&self, remote: SocketAddr, stream: bool) -> MediaSide {
        match self.routes.read().classify(remote, stream) {
            Source::Node(_) => MediaSide::Internal,
            _ => MediaSide::Public,
        }
    }

    fn media_side_of_dest(&self, dest: &Dest) -> MediaSide {
        match dest {
            Dest::Flow(f) => self.media_side(f.remote, f.transport.is_reliable()),
            Dest::Addr {
                transport, remote, ..
            } => self.media_side(*remote, transport.is_reliable()),
        }
    }

    /// Completes start-up once the transports are bound (the transports need the proxy as
    /// their handler first, hence two steps).
    pub fn attach(&self, transports: Arc<Transports>, locals: Vec<LocalListener>) {
        let _ = self.transports.set(transports);
        let _ = self.locals.set(locals);
    }

    /// Swaps the route table; transactions in flight keep the destinations they chose.
    pub fn set_routes(&self, routes: RouteTable) {
        if let Some(l) = self.limiter.get() {
            l.set_routes(&routes);
        }
        *self.routes.write() = Arc::new(routes);
    }

    /// Installs the per-source limiter (set once, at start).
    pub fn set_limiter(&self, limiter: Arc<crate::ratelimit::Limiter>) {
        let _ = self.limiter.set(limiter);
    }

    /// The installed limiter: a reload reconfigures it, tests read its state.
    pub fn limiter(&self) -> Option<&Arc<crate::ratelimit::Limiter>> {
        self.limiter.get()
    }

    /// Installs the health monitor that orders nodes and hears outcomes.
    pub fn set_selector(&self, selector: Arc<dyn NodeSelector>) {
        *self.selector.write() = Some(selector);
    }

    fn observe(&self, node: usize, outcome: NodeOutcome) {
        if let Some(s) = self.selector.read().as_ref() {
            s.observe(node, outcome);
        }
    }

    fn candidates(&self, routes: &RouteTable, pool: usize) -> SmallVec<[usize; 4]> {
        if let Some(s) = self.selector.read().as_ref() {
            return s.candidates(pool);
        }
        routes
            .pools
            .get(pool)
            .map(|p| p.nodes.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Moves a new transaction to its next candidate node after `outcome` on the current
    /// one. Returns false when no node is left (the caller answers upstream).
    fn next_node(
        &self,
        tx: &mut ProxyTx,
        client_idx: &mut AHashMap<TxKey, u64>,
        id: u64,
        outcome: NodeOutcome,
        now: Instant,
    ) -> bool {
        let Some(f) = tx.failover.as_mut() else {
            return false;
        };
        let failed = f.nodes[f.pos].0;
        if f.pos + 1 >= f.nodes.len() {
            f.deadline = None;
            return false;
        }
        f.pos += 1;
        let (node, dest) = f.nodes[f.pos].clone();
        let public_flow = f.public_flow;
        self.observe(failed, outcome);
        metrics::counter!("sbc_branch_retries_total", "reason" => outcome_label(outcome))
            .increment(1);
        tracing::debug!(failed, node, ?outcome, "retrying on the next node");
        Self::drop_branch(tx, client_idx);
        if tx.cancel_pending {
            // The caller gave up meanwhile: nothing to retry for.
            self.local_final(tx, 487, "Request Terminated", now);
            return true;
        }
        let body = tx.media_body.clone();
        if !self.send_new_branch(
            tx,
            client_idx,
            id,
            dest,
            public_flow,
            body.as_deref(),
            None,
            now,
        ) {
            return false;
        }
        if let Some(f) = tx.failover.as_mut() {
            f.answered = false;
            f.deadline = Some(branch_deadline(now, f.timeout));
            f.suspect_at = f.suspect_after.map(|d| now + d);
        }
        true
    }

    /// The way around the PBX for an in-dialog request sent to `dest`, if `dest` is a PBX
    /// node that record-routed between two passes of this dialog through us.
    fn skip_alternative(&self, msg: &Message, dest: &Dest, now: Instant) -> Option<SkipAlt> {
        // Only the node and the deadline: the way around is worked out when (if) the node
        // fails, so the in-dialog requests of healthy PBXs (nearly all) are routed once.
        msg.to_tag()?;
        let remote = match dest {
            Dest::Flow(f) => f.remote,
            Dest::Addr { remote, .. } => *remote,
        };
        let routes = self.routes.read();
        let node = routes.node_by_addr(remote)?;
        let pool = routes.nodes.get(node)?.pool;
        let timeout = routes
            .pools
            .get(pool)
            .map_or(Duration::from_secs(1), |p| p.branch_timeout);
        Some(SkipAlt {
            node,
            deadline: branch_deadline(now, timeout),
            answered: false,
        })
    }

    /// The way around a dead node for an in-dialog request: the hop after it in the route
    /// set (`Some`), or `None` when the SBC must answer for the PBX itself (a call the relay
    /// anchors); `Err` when there is neither.
    fn way_around(&self, tx: &ProxyTx, node: usize, now: Instant) -> Result<Option<SkipHop>, ()> {
        let inb = Inbound {
            flow: tx.in_flow,
            data: Bytes::new(),
            received_at: now,
            queued: Duration::ZERO,
        };
        match self.route_around(&tx.request, &inb, Some(node)) {
            Target::Skip(hop) => Ok(Some(hop)),
            // Only calls the relay anchors can be answered for.
            Target::Orphan { .. } if self.media.get().is_some() => Ok(None),
            _ => Err(()),
        }
    }

    /// An in-dialog request's PBX failed it (`outcome`): the request goes around the PBX to
    /// the far end, through both relay passes. Returns false when there is no way around.
    fn skip_hop(
        &self,
        tx: &mut ProxyTx,
        client_idx: &mut AHashMap<TxKey, u64>,
        own_2xx: &mut AHashMap<Box<[u8]>, Own2xx>,
        id: u64,
        outcome: NodeOutcome,
        now: Instant,
    ) -> bool {
        if tx.final_sent {
            return false;
        }
        let Some(alt) = tx.skip_alt.take() else {
            return false;
        };
        let Ok(hop) = self.way_around(tx, alt.node, now) else {
            // Nothing to go around to: the request waits out its own transaction.
            return false;
        };
        self.observe(alt.node, outcome);
        self.dead_hops.lock().insert(alt.node, now);
        let Some(hop) = hop else {
            // No way around: the SBC answers for the dead PBX.
            let Some(dest) = tx.branch.as_ref().map(|b| b.dest.clone()) else {
                return false;
            };
            let Some((status, bytes)) = self.answer_orphan(&tx.request, &tx.in_flow, &dest) else {
                return false;
            };
            Self::drop_branch(tx, client_idx);
            let sent = if tx.method == Method::Invite && (200..300).contains(&status) {
                // The SBC is this re-INVITE's UAS now: its 2xx is retransmitted until the
                // ACK, which is matched by dialog and CSeq (it has its own branch).
                let sent = tx.server.send_own_2xx(status, bytes, now);
                if sent && tx.server.retransmitting() {
                    let until = now + self.settings.timers.t1x64();
                    own_2xx.retain(|_, o| o.until > now);
                    own_2xx.insert(own_2xx_key(&tx.request), Own2xx { id, until });
                }
                sent
            } else {
                tx.server.send_response(status, bytes, now)
            };
            if sent {
                tx.final_sent = true;
                count_response(tx.method, status, "local");
            }
            return true;
        };
        metrics::counter!("sbc_dead_hop_skips_total", "cause" => outcome_label(outcome))
            .increment(1);
        tracing::info!(node = hop.node, ?outcome, call_id = %String::from_utf8_lossy(tx.request.call_id()), "in-dialog request goes around its dead PBX");
        Self::drop_branch(tx, client_idx);
        let mut body = tx.media_body.clone();
        if let (Some(m), Some((si, _))) = (self.media.get(), tx.media_sides) {
            let so = self.media_side_of_dest(&hop.dest);
            let src: &[u8] = body.as_deref().unwrap_or(tx.request.body());
            match m.on_request_body(&tx.request, src, MediaSide::Internal, so) {
                MediaAction::Body(b) => body = Some(Bytes::from(b)),
                MediaAction::Pass => {}
                MediaAction::Refuse(status, err) => {
                    tracing::warn!(error = %err, status, "media of a request around a dead PBX refused");
                    self.local_final(tx, status, "Service Unavailable", now);
                    return true;
                }
            }
            tx.media_sides = Some((si, so));
            tx.media_skip = true;
        }
        if !self.send_new_branch(
            tx,
            client_idx,
            id,
            hop.dest,
            hop.public_flow,
            body.as_deref(),
            Some(hop.pops),
            now,
        ) {
            return false;
        }
        true
    }

    /// Answers an in-dialog request for a dead PBX that has no way around it, as the PBX
    /// would have: a BYE gets 200 and the SBC hangs up the other leg of the hairpin in that
    /// dialog's own terms; a session refresh (re-INVITE, UPDATE) of a call whose media runs
    /// end to end through the relay gets 200 with the SDP its sender last received from us;
    /// an in-dialog OPTIONS gets 200; anything else a clear 503, and a dialog the SBC does
    /// not know 481. An ACK gets nothing (it completes a 200 the SBC sent). `dest` is where
    /// the request would have gone.
    fn answer_orphan(&self, msg: &Message, in_flow: &Flow, dest: &Dest) -> Option<(u16, Bytes)> {
        let method = msg.method()?;
        if matches!(method, Method::Ack | Method::Cancel) {
            return None;
        }
        let in_side = self.media_side(in_flow.remote, in_flow.transport.is_reliable());
        let out_side = self.media_side_of_dest(dest);
        let media = self.media.get();
        let orphan = media.and_then(|m| m.orphan(msg, in_side, out_side));
        let mut extra = String::new();
        let mut body: Option<Arc<[u8]>> = None;
        let (status, reason) = match (&orphan, media) {
            (Some(o), Some(m)) => {
                m.count_outlived(&o.key);
                if let Some(d) = &o.dialog {
                    let target = if o.from_caller {
                        &d.callee_target
                    } else {
                        &d.caller_target
                    };
                    let _ = write!(extra, "Contact: <{target}>\r\n");
                }
                match method {
                    Method::Bye => {
                        m.end(&o.key);
                        if let Some(peer) = &o.peer {
                            if let Some(pd) = m.dialog(peer) {
                                // Hang up the end of the other leg that is not the PBX.
                                let pbx_is_callee = {
                                    let r = match &pd.callee_dest {
                                        Dest::Flow(f) => f.remote,
                                        Dest::Addr { remote, .. } => *remote,
                                    };
                                    self.routes.read().node_by_addr(r).is_some()
                                };
                                if let Some(me) = self.me.upgrade() {
                                    me.end_leg(&pd, pbx_is_callee, "PBX unavailable");
                                }
                                metrics::counter!("sbc_calls_ended_locally_total").increment(1);
                            }
                            m.end(peer);
                        }
                        (200, "OK")
                    }
                    Method::Invite | Method::Update if o.saveable == Some(true) => {
                        if crate::media::has_sdp(msg) {
                            // The sender's new SDP still steers the relay (a moved address).
                            let _ = m.on_request(msg, in_side, out_side);
                        }
                        body = o.current_sdp.clone();
                        if let Some(se) = msg.header_value(HeaderName::SessionExpires) {
                            let se = sbc_sip::scan::trim(se);
                            let secs = se.split(|&b| b == b';').next().unwrap_or_default();
                            let _ = write!(
                                extra,
                                "Session-Expires: {};refresher=uac\r\nRequire: timer\r\n",
                                String::from_utf8_lossy(sbc_sip::scan::trim(secs))
                            );
                        }
                        (200, "OK")
                    }
                    Method::Options => (200, "OK"),
                    _ => (503, "Service Unavailable (PBX down)"),
                }
            }
            _ => (481, "Call/Transaction Does Not Exist"),
        };
        let bytes = edit::response(
            msg,
            status,
            reason,
            &ResponseOpts {
                extra: extra.as_bytes(),
                body: body.as_deref().map(|b| ("application/sdp", b)),
                source: Some((in_flow.remote.ip(), in_flow.remote.port())),
                server: Some(&self.settings.name),
                ..Default::default()
            },
        );
        Some((status, Bytes::from(bytes)))
    }

    pub fn transaction_count(&self) -> usize {
        let core = self.core.lock();
        core.txs.len() + core.linger.len()
    }

    /// Transactions still working and those only lingering (RFC 3261 Timers J, I, K): the
    /// second kind is the bulk at high rates and costs a tenth of the first.
    pub fn transaction_counts(&self) -> (usize, usize) {
        let core = self.core.lock();
        (core.txs.len(), core.linger.len())
    }

    fn locals(&self) -> &[LocalListener] {
        self.locals.get().map_or(&[], |v| v.as_slice())
    }

    fn flush(&self, out: Out) {
        let Some(t) = self.transports.get() else {
            return;
        };
        for (dest, bytes) in out {
            if let Err(e) = t.send(&dest, bytes.clone()) {
                self.send_failed(&dest, &bytes, &e);
            }
        }
    }

    fn send_failed(&self, dest: &Dest, data: &Bytes, err: &SendError) {
        tracing::debug!(?dest, %err, "send failed");
        metrics::counter!("sbc_send_errors_total").increment(1);
        // A request that could not be sent fails its branch at once (RFC 3261 17.1.4).
        let Ok(msg) = Message::parse(data.clone()) else {
            return;
        };
        if !msg.is_request() || msg.method() == Some(Method::Ack) {
            return;
        }
        let Some(via) = msg.top_via() else { return };
        let Some(branch) = via.branch else { return };
        let key = TxKey {
            branch: branch.into(),
            method: method_key(msg.method().unwrap_or(Method::Other)),
        };
        let mut out = Out::new();
        {
            let mut core = self.core.lock();
            if let Some(&id) = core.client_idx.get(&key) {
                if let Some(tx) = core.txs.get_mut(&id) {
                    if let Some(b) = tx.branch.as_mut() {
                        b.tx.handle_transport_error();
                    }
                }
                self.drive(&mut core, id, Instant::now(), &mut out);
            }
        }
        self.flush(out);
    }

    /// The earliest timer deadline, for the timer task.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.core.lock().wheel.next_deadline()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timers(&self, now: Instant) {
        let mut out = Out::new();
        {
            let mut core = self.core.lock();
            let mut due = Vec::new();
            core.wheel.expire(now, &mut due);
            for id in due {
                let Core {
                    txs,
                    client_idx,
                    linger,
                    own_2xx,
                    ..
                } = &mut *core;
                let Some(tx) = txs.get_mut(&id) else {
                    if let Some(l) = linger.get_mut(&id) {
                        match l.scheduled {
                            // A stale entry: the deadlines still due come no earlier than
                            // the pending one, which fires later.
                            Some(s) if s > now => continue,
                            Some(_) => l.scheduled = None,
                            None => {}
                        }
                        l.server.handle_timeout(now);
                        self.drive_linger(&mut core, id, now, &mut out);
                    }
                    continue;
                };
                if let Some(f) = tx.failover.as_mut() {
                    if !f.answered && f.suspect_at.is_some_and(|s| s <= now) {
                        f.suspect_at = None;
                        let node = f.nodes[f.pos].0;
                        self.observe(node, NodeOutcome::Slow);
                    }
                }
                if tx
                    .skip_alt
                    .as_ref()
                    .is_some_and(|a| !a.answered && a.deadline <= now)
                {
                    self.skip_hop(tx, client_idx, own_2xx, id, NodeOutcome::Timeout, now);
                }
                let branch_expired = tx
                    .failover
                    .as_ref()
                    .is_some_and(|f| !f.answered && f.deadline.is_some_and(|d| d <= now));
                // Last node: keep waiting under the normal timers.
                if branch_expired && !self.next_node(tx, client_idx, id, NodeOutcome::Timeout, now)
                {
                    if let Some(f) = tx.failover.as_mut() {
                        f.deadline = None;
                    }
                }
                if tx.scheduled.is_some_and(|s| s <= now) {
                    tx.scheduled = None;
                }
                tx.server.handle_timeout(now);
                if let Some(b) = tx.branch.as_mut() {
                    b.tx.handle_timeout(now);
                    if let Some((c, _)) = b.cancel.as_mut() {
                        c.handle_timeout(now);
                    }
                }
                if tx.timer_c.is_some_and(|c| c <= now) {
                    tx.timer_c = None;
                    // RFC 3261 16.8: Timer C fired; cancel the branch if it ever answered,
                    // else act as if a 408 arrived.
                    let provisional = tx.branch.as_ref().is_some_and(|b| b.tx.got_provisional());
                    if provisional {
                        self.start_cancel(tx, now);
                    } else {
                        self.local_final(tx, 408, "Request Timeout", now);
                        if let Some(b) = tx.branch.as_mut() {
                            b.tx.terminate();
                        }
                    }
                }
                self.drive(&mut core, id, now, &mut out);
            }
        }
        self.flush(out);
    }

    /// The timer task body: sleeps until the next deadline or until an earlier one appears.
    pub async fn run_timers(self: Arc<Self>) {
        let mut last_sweep = Instant::now();
        loop {
            let next = {
                let mut core = self.core.lock();
                let next = core
                    .wheel
                    .next_deadline()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                core.timer_sleep = Some(next);
                next
            };
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
            tokio::select! {
                _ = sleep => {}
                _ = self.timer_wake.notified() => {}
            }
            let now = Instant::now();
            self.handle_timers(now);
            if now.duration_since(last_sweep) >= Duration::from_secs(5) {
                last_sweep = now;
                self.registrations.expire(now);
            }
        }
    }

    /// Drains a transaction's outputs and events; removes it when both sides are done.
    fn drive(&self, core: &mut Core, id: u64, now: Instant, out: &mut Out) {
        let Some(tx) = core.txs.get_mut(&id) else {
            return self.drive_linger(core, id, now, out);
        };
        // Upstream responses already queued (100 Trying) go out before the request is
        // forwarded, so the caller stops retransmitting as early as possible.
        while let Some(bytes) = tx.server.poll_transmit() {
            out.push((Dest::Flow(tx.in_flow), bytes));
        }
        // Client side next: its events may produce more upstream responses.
        let mut branch_done = false;
        let mut retry: Option<NodeOutcome> = None;
        let mut cancel_done = None;
        if let Some(b) = tx.branch.as_mut() {
            while let Some(bytes) = b.tx.poll_transmit() {
                out.push((b.dest.clone(), bytes));
            }
            if let Some((c, key)) = b.cancel.as_mut() {
                while let Some(bytes) = c.poll_transmit() {
                    out.push((b.dest.clone(), bytes));
                }
                while let Some(ev) = c.poll_event() {
                    if ev == ClientEvent::Terminated {
                        cancel_done = Some(key.clone());
                    }
                }
            }
            let mut events: SmallVec<[ClientEvent; 2]> = SmallVec::new();
            while let Some(ev) = b.tx.poll_event() {
                events.push(ev);
            }
            for ev in events {
                match ev {
                    ClientEvent::Timeout => {
                        metrics::counter!("sbc_branch_failures_total", "reason" => "timeout")
                            .increment(1);
                        retry = Some(NodeOutcome::Timeout);
                    }
                    ClientEvent::TransportError => {
                        metrics::counter!("sbc_branch_failures_total", "reason" => "transport")
                            .increment(1);
                        retry = Some(NodeOutcome::TransportError);
                    }
                    ClientEvent::Terminated => branch_done = true,
                }
            }
        }
        if let Some(outcome) = retry {
            let Core {
                txs,
                client_idx,
                own_2xx,
                ..
            } = &mut *core;
            if let Some(tx) = txs.get_mut(&id) {
                if tx.skip_alt.is_some() && self.skip_hop(tx, client_idx, own_2xx, id, outcome, now)
                {
                    return self.drive(core, id, now, out);
                }
                if self.next_node(tx, client_idx, id, outcome, now) {
                    // A fresh branch: drive again to send it.
                    return self.drive(core, id, now, out);
                }
                if let Some(f) = tx.failover.as_ref() {
                    self.observe(f.nodes[f.pos].0, outcome);
                }
                // A phone's TCP/TLS flow (named by a flow token) that has closed: RFC 5626
                // 5.3 wants 430 Flow Failed at once, so the registrar drops that binding and
                // the caller hears now, not after a timeout.
                let flow_failed = tx
                    .branch
                    .as_ref()
                    .is_some_and(|b| matches!(&b.dest, Dest::Flow(f) if f.transport.is_reliable()));
                match outcome {
                    NodeOutcome::TransportError if flow_failed => {
                        self.local_final(tx, 430, "Flow Failed", now)
                    }
                    NodeOutcome::TransportError => {
                        self.local_final(tx, 503, "Service Unavailable", now)
                    }
                    _ => self.local_final(tx, 408, "Request Timeout", now),
                }
            }
        }
        if let Some(key) = cancel_done {
            core.client_idx.remove(&key);
            if let Some(tx) = core.txs.get_mut(&id) {
                if let Some(b) = tx.branch.as_mut() {
                    b.cancel = None;
                }
            }
        }
        let Some(tx) = core.txs.get_mut(&id) else {
            return;
        };
        if branch_done {
            if let Some(b) = tx.branch.as_ref() {
                if b.cancel.is_none() {
                    let key = b.key.clone();
                    tx.branch = None;
                    core.client_idx.remove(&key);
                }
            }
        }
        let Some(tx) = core.txs.get_mut(&id) else {
            return;
        };
        while let Some(bytes) = tx.server.poll_transmit() {
            out.push((Dest::Flow(tx.in_flow), bytes));
        }
        let mut server_done = false;
        while let Some(ev) = tx.server.poll_event() {
            match ev {
                ServerEvent::Terminated => server_done = true,
                ServerEvent::AckTimeout | ServerEvent::TransportError => {}
            }
        }
        if server_done || tx.server.state() == State::Terminated {
            // Nobody upstream is left to tell; let the branch finish quietly unless it is an
            // INVITE still waiting for a 2xx to pass through.
            if tx
                .branch
                .as_ref()
                .is_some_and(|b| b.tx.state() == State::Terminated)
            {
                if let Some(b) = tx.branch.take() {
                    core.client_idx.remove(&b.key);
                }
            }
        }
        let Some(tx) = core.txs.get_mut(&id) else {
            return;
        };
        if tx.server.state() == State::Terminated && tx.branch.is_none() {
            if let Some(tx) = core.txs.remove(&id) {
                core.server_idx.remove(&tx.server_key);
            }
            hot::transactions().set((core.txs.len() + core.linger.len()) as f64);
            return;
        }
        if Self::finished(tx) {
            return self.start_linger(core, id, now, out);
        }
        // Schedule the next deadline.
        let mut next = tx.server.poll_timeout();
        if let Some(b) = tx.branch.as_ref() {
            next = min_opt(next, b.tx.poll_timeout());
            if let Some((c, _)) = b.cancel.as_ref() {
                next = min_opt(next, c.poll_timeout());
            }
        }
        next = min_opt(next, tx.timer_c);
        if let Some(f) = tx.failover.as_ref().filter(|f| !f.answered) {
            next = min_opt(next, f.deadline);
            next = min_opt(next, f.suspect_at);
        }
        if let Some(a) = tx.skip_alt.as_ref().filter(|a| !a.answered) {
            next = min_opt(next, Some(a.deadline));
        }
        if let Some(at) = next {
            let Core {
                wheel, timer_sleep, ..
            } = core;
            self.schedule(wheel, timer_sleep, &mut tx.scheduled, at, id, now);
        }
    }

    /// Files the transaction's next deadline on the wheel unless an earlier one is pending
    /// (a later one is found again when the earlier fires), waking the timer task if it now
    /// sleeps too long.
    fn schedule(
        &self,
        wheel: &mut TimerWheel,
        timer_sleep: &mut Option<Instant>,
        scheduled: &mut Option<Instant>,
        at: Instant,
        id: u64,
        now: Instant,
    ) {
        let at = wheel.round(at);
        if scheduled.is_none_or(|s| at < s || s <= now) {
            *scheduled = Some(at);
            wheel.insert(at, id);
            if timer_sleep.is_none_or(|s| at < s) {
                *timer_sleep = Some(at);
                self.timer_wake.notify_one();
            }
        }
    }

    /// Whether all that is left of the transaction is its linger: the final response is
    /// out (or the server side is past it), and no branch can still send anything upstream.
    /// An INVITE branch is never finished here: in Completed it re-sends its ACK for every
    /// retransmitted final response, in Accepted it forwards 2xx retransmissions.
    fn finished(tx: &ProxyTx) -> bool {
        let server_done = matches!(
            tx.server.state(),
            State::Completed | State::Confirmed | State::Accepted | State::Terminated
        );
        let branch_done = match tx.branch.as_ref() {
            None => true,
            Some(b) => {
                tx.method != Method::Invite
                    && b.cancel.is_none()
                    && matches!(b.tx.state(), State::Completed | State::Terminated)
            }
        };
        server_done
            && branch_done
            && tx.timer_c.is_none()
            && tx
                .failover
                .as_ref()
                .is_none_or(|f| f.answered || f.deadline.is_none())
            && tx.skip_alt.as_ref().is_none_or(|a| a.answered)
    }

    /// Moves a finished transaction into the linger table (see [`Lingering`]).
    fn start_linger(&self, core: &mut Core, id: u64, now: Instant, out: &mut Out) {
        let Some(tx) = core.txs.remove(&id) else {
            return;
        };
        // Only the fields the linger keeps are moved out of the box (a whole `ProxyTx` is
        // ~2.5 KB to copy).
        let ProxyTx {
            server,
            server_key,
            in_flow,
            branch,
            scheduled,
            _tx_slot,
            ..
        } = *tx;
        // The pending entry was the live transaction's (a retransmission timer, usually):
        // taken back, so the linger's own deadline is the next fire.
        let scheduled = match scheduled {
            Some(at) if core.wheel.cancel(at, id) => None,
            other => other,
        };
        let client = branch.map(|b| {
            let until = b.tx.poll_timeout().unwrap_or(now);
            (b.key, until)
        });
        // Boxed: the table then holds 16-byte entries, cheap to move when it grows and dense
        // in cache, and consecutive lingers sit side by side in the allocator's pages instead
        // of at random places in a table of tens of megabytes (fewer cache misses and page
        // faults per transaction).
        core.linger.insert(
            id,
            Box::new(Lingering {
                server,
                server_key,
                in_flow,
                client,
                scheduled,
                _tx_slot,
            }),
        );
        self.drive_linger(core, id, now, out);
    }

    /// `drive` for a lingering transaction: sends what its server side has to send, ends the
    /// branch's absorbing time, removes it when both are over.
    fn drive_linger(&self, core: &mut Core, id: u64, now: Instant, out: &mut Out) {
        let Core {
            linger,
            client_idx,
            server_idx,
            wheel,
            timer_sleep,
            txs,
            ..
        } = core;
        let Some(l) = linger.get_mut(&id) else {
            return;
        };
        while let Some(bytes) = l.server.poll_transmit() {
            out.push((Dest::Flow(l.in_flow), bytes));
        }
        while l.server.poll_event().is_some() {}
        if l.client.as_ref().is_some_and(|(_, until)| *until <= now) {
            if let Some((key, _)) = l.client.take() {
                client_idx.remove(&key);
            }
        }
        if l.server.state() == State::Terminated && l.client.is_none() {
            if let Some(l) = linger.remove(&id) {
                server_idx.remove(&l.server_key);
            }
            hot::transactions().set((txs.len() + linger.len()) as f64);
            return;
        }
        let next = min_opt(l.server.poll_timeout(), l.client.as_ref().map(|c| c.1));
        if let Some(at) = next {
            let retransmits = l.server.retransmitting()
                || (l.server.is_invite() && l.server.state() == State::Completed);
            let at = if retransmits || at < now + LINGER_COARSE_AHEAD {
                at
            } else {
                wheel.round_coarse(at, LINGER_TICKS)
            };
            self.schedule(wheel, timer_sleep, &mut l.scheduled, at, id, now);
        }
    }

    /// While draining, a new call (an INVITE outside a dialog) and an OPTIONS addressed to the
    /// SBC itself (a trunk's or phone's keep-alive) get `503` with `Retry-After`: callers and
    /// trunks that know another SBC move to it (RFC 3263), and OPTIONS-pinging trunks mark
    /// this one out of service. Everything else (registrations, requests in dialogs, calls
    /// from the PBX to phones, responses) still passes. True when it answered.
    fn refuse_while_draining(
        &self,
        msg: &Message,
        method: Method,
        inb: &Inbound,
        out: &mut Out,
    ) -> bool {
        if msg.to_tag().is_some() {
            return false;
        }
        let refuse = match method {
            Method::Invite => true,
            Method::Options => msg.uri().is_some_and(|u| {
                self.is_local(&u) && u.user.is_none() && u.param(b"sbcc").is_none()
            }),
            _ => false,
        };
        if refuse {
            let label = if method == Method::Invite {
                "INVITE"
            } else {
                "OPTIONS"
            };
            metrics::counter!("sbc_drain_refused_total", "method" => label).increment(1);
            self.shed(msg, method, inb, DRAIN_RETRY_AFTER, out);
        }
        refuse
    }

    /// A stateless `503` with `Retry-After: retry_after` for a request the SBC does not take
    /// (overload, draining): the same answer the per-source limits give.
    fn shed(&self, msg: &Message, method: Method, inb: &Inbound, retry_after: u32, out: &mut Out) {
        count_response(method, 503, "local");
        let busy = crate::ratelimit::busy(msg, inb.flow.remote, retry_after, &self.settings.name);
        out.push((Dest::Flow(inb.flow), busy));
    }

    /// The channel a new INVITE takes of the trunk it comes from or goes to (`None` for a
    /// call without a trunk); `Err` when that trunk is at its `max_calls`.
    fn trunk_call_slot(
        &self,
        inb: &Inbound,
        dest: &Dest,
    ) -> Result<Option<crate::trunk_calls::CallSlot>, ()> {
        let routes = self.routes.read().clone();
        let from = match routes.classify(inb.flow.remote, inb.flow.transport.is_reliable()) {
            Source::Trunk(t) => Some((t, "in")),
            _ => None,
        };
        let to_addr = match dest {
            Dest::Flow(f) => f.remote,
            Dest::Addr { remote, .. } => *remote,
        };
        let Some((t, direction)) = from.or_else(|| routes.trunk_at(to_addr).map(|t| (t, "out")))
        else {
            return Ok(None);
        };
        let Some(trunk) = routes.trunks.get(t) else {
            return Ok(None);
        };
        match self.trunk_calls.acquire(&trunk.name, trunk.max_calls) {
            Ok(slot) => Ok(Some(slot)),
            Err(calls) => {
                metrics::counter!("sbc_trunk_limit_refused_total", "trunk" => trunk.name.clone(), "direction" => direction)
                    .increment(1);
                tracing::debug!(trunk = %trunk.name, calls, direction, "trunk at its call limit: new call refused");
                Err(())
            }
        }
    }

    /// Every trunk of the running config: name, calls now, `max_calls`.
    pub fn trunks(&self) -> Vec<(String, usize, Option<u32>)> {
        let routes = self.routes.read().clone();
        routes
            .trunks
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    self.trunk_calls.current(&t.name),
                    t.max_calls,
                )
            })
            .collect()
    }

    /// Calls `trunk` has now, being set up or established (see [`crate::trunk_calls`]).
    pub fn trunk_calls(&self, trunk: &str) -> usize {
        self.trunk_calls.current(trunk)
    }

    /// Starts or stops refusing new calls (see [`crate::drain`]).
    pub fn set_draining(&self, on: bool) {
        self.draining
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Calls a drain waits for: established dialogs the media anchor knows, plus INVITEs
    /// (new or re-INVITEs) still waiting for their final response. Without media anchoring
    /// the SBC keeps no dialogs, so only the INVITEs in progress count.
    pub fn calls_in_progress(&self) -> usize {
        let dialogs = self.media.get().map_or(0, |m| m.dialogs());
        let core = self.core.lock();
        let setting_up = core
            .txs
            .values()
            .filter(|tx| tx.method == Method::Invite && !tx.final_sent)
            .count();
        dialogs + setting_up
    }

    /// An ACK for a 2xx the SBC sent as a re-INVITE's UAS (see `skip_hop`): stops that 2xx's
    /// retransmissions and is absorbed. False when it is not one.
    fn ack_own_2xx(&self, core: &mut Core, msg: &Message, now: Instant, out: &mut Out) -> bool {
        if core.own_2xx.is_empty() {
            return false;
        }
        let id = match core.own_2xx.remove(&own_2xx_key(msg)) {
            Some(o) if o.until > now => o.id,
            _ => return false,
        };
        let acked = match core.txs.get_mut(&id) {
            Some(tx) => tx.server.handle_own_2xx_ack(),
            None => core
                .linger
                .get_mut(&id)
                .is_some_and(|l| l.server.handle_own_2xx_ack()),
        };
        if acked {
            self.drive(core, id, now, out);
        }
        acked
    }

    /// Sends a locally generated final response upstream if none was sent yet.
    fn local_final(&self, tx: &mut ProxyTx, status: u16, reason: &str, now: Instant) {
        if tx.final_sent {
            return;
        }
        let tag = format!("sbc{:x}", tx.local_tag);
        let bytes = edit::response(
            &tx.request,
            status,
            reason,
            &ResponseOpts {
                to_tag: Some(tag.as_bytes()),
                source: Some((tx.in_flow.remote.ip(), tx.in_flow.remote.port())),
                server: Some(&self.settings.name),
                ..Default::default()
            },
        );
        if tx.server.send_response(status, Bytes::from(bytes), now) {
            tx.final_sent = true;
            tx.extra.take_call_slot();
            count_response(tx.method, status, "local");
        }
        if let (Some(m), Some((si, so))) = (self.media.get(), tx.media_sides) {
            m.abandon(&tx.request, si, so);
        }
    }

    fn start_cancel(&self, tx: &mut ProxyTx, now: Instant) {
        let Some(b) = tx.branch.as_mut() else { return };
        if b.cancel.is_some() || b.tx.state() != State::Proceeding {
            return;
        }
        let Ok(out) = Message::parse(b.out.clone()) else {
            return;
        };
        let cancel = build_hop_request(&out, "CANCEL", None);
        let reliable = dest_transport(&b.dest).is_reliable();
        let key = TxKey {
            branch: b.key.branch.clone(),
            method: MethodKey::Cancel,
        };
        b.cancel = Some((
            ClientTransaction::new(
                false,
                reliable,
                Bytes::from(cancel),
                now,
                self.settings.timers,
            ),
            key,
        ));
    }

    // ----- requests -----

    fn on_request(&self, msg: Message, inb: &Inbound, now: Instant, out: &mut Out) {
        let method = msg.method().unwrap_or(Method::Other);
        hot::request(method).increment(1);
        let Some(via) = msg.top_via() else { return };
        let key = server_key(&msg, &via);
        // Rate limits, blocked sources and scanners, before any lookup or routing.
        let limiter = self.limiter.get();
        if let Some(refusal) = limiter.and_then(|l| l.check(&msg, method, inb.flow.remote, now)) {
            if let crate::ratelimit::Refusal::Answer(busy) = refusal {
                out.push((Dest::Flow(inb.flow), busy));
            }
            return;
        }

        if method == Method::Ack {
            {
                let mut core = self.core.lock();
                if self.ack_own_2xx(&mut core, &msg, now, out) {
                    return;
                }
                let ikey = TxKey {
                    branch: key.branch.clone(),
                    method: MethodKey::Invite,
                };
                if let Some(&id) = core.server_idx.get(&ikey) {
                    let absorbed = match core.txs.get_mut(&id) {
                        Some(tx) => tx.server.handle_ack(now),
                        None => core
                            .linger
                            .get_mut(&id)
                            .is_some_and(|l| l.server.handle_ack(now)),
                    };
                    if absorbed {
                        self.drive(&mut core, id, now, out);
                        return;
                    }
                }
            }
            // ACK for a 2xx: end to end, stateless.
            let (dest, public_flow, pops) = match self.route(&msg, inb) {
                Target::Forward { dest, public_flow } => (dest, public_flow, None),
                Target::Skip(h) => (h.dest, h.public_flow, Some(h.pops)),
                // It completes a 2xx the SBC sent for the dead PBX (`answer_orphan`).
                Target::Orphan { .. } => return,
                _ => {
                    metrics::counter!("sbc_dropped_total", "reason" => "ack_unroutable")
                        .increment(1);
                    return;
                }
            };
            let body = self
                .media
                .get()
                .filter(|_| crate::media::has_sdp(&msg))
                .and_then(|m| {
                    let si = self.media_side(inb.flow.remote, inb.flow.transport.is_reliable());
                    let so = self.media_side_of_dest(&dest);
                    match media_request(m, &msg, si, so, pops.is_some()) {
                        MediaAction::Body(b) => Some(b),
                        _ => None,
                    }
                });
            if let Some(Forwarded { bytes, .. }) = self.forward(
                &msg,
                &inb.flow,
                &dest,
                public_flow,
                &via,
                body.as_deref(),
                pops,
            ) {
                out.push((dest, bytes));
            }
            return;
        }

        if method == Method::Cancel {
            let ikey = TxKey {
                branch: key.branch.clone(),
                method: MethodKey::Invite,
            };
            let mut core = self.core.lock();
            let Some(&id) = core.server_idx.get(&ikey) else {
                drop(core);
                self.reply(&msg, inb, 481, "Call/Transaction Does Not Exist", out);
                return;
            };
            self.reply(&msg, inb, 200, "OK", out);
            if let Some(tx) = core.txs.get_mut(&id) {
                if !tx.final_sent {
                    let provisional = tx.branch.as_ref().is_some_and(|b| b.tx.got_provisional());
                    if provisional {
                        self.start_cancel(tx, now);
                    } else if tx.branch.is_some() {
                        tx.cancel_pending = true;
                    } else {
                        self.local_final(tx, 487, "Request Terminated", now);
                    }
                }
            }
            self.drive(&mut core, id, now, out);
            return;
        }

        // Retransmission of a request we hold a transaction for?
        {
            let mut core = self.core.lock();
            if let Some(&id) = core.server_idx.get(&key) {
                if let Some(tx) = core.txs.get_mut(&id) {
                    tx.server.handle_request_retransmit(now);
                } else if let Some(l) = core.linger.get_mut(&id) {
                    l.server.handle_request_retransmit(now);
                }
                self.drive(&mut core, id, now, out);
                return;
            }
        }

        if self.draining.load(std::sync::atomic::Ordering::Relaxed)
            && self.refuse_while_draining(&msg, method, inb, out)
        {
            return;
        }

        // A new request. RFC 3261 16.3 checks first.
        if msg.uri_scheme() == Some(Scheme::Other) {
            return self.reply(&msg, inb, 416, "Unsupported URI Scheme", out);
        }
        if msg.max_forwards() == Some(0) {
            if method == Method::Options && self.is_local_uri(msg.uri_bytes()) {
                return self.reply(&msg, inb, 200, "OK", out);
            }
            return self.reply(&msg, inb, 483, "Too Many Hops", out);
        }
        if let Some(pr) = msg.header_value(HeaderName::ProxyRequire) {
            let unsupported = format!(
                "Unsupported: {}\r\n",
                String::from_utf8_lossy(sbc_sip::scan::trim(pr))
            );
            let bytes = edit::response(
                &msg,
                420,
                "Bad Extension",
                &ResponseOpts {
                    extra: unsupported.as_bytes(),
                    to_tag: Some(b"sbc420"),
                    source: Some((inb.flow.remote.ip(), inb.flow.remote.port())),
                    ..Default::default()
                },
            );
            count_response(method, 420, "local");
            out.push((Dest::Flow(inb.flow), Bytes::from(bytes)));
            return;
        }
        if self.is_loop(&msg) {
            return self.reply(&msg, inb, 482, "Loop Detected", out);
        }

        // Overload: an INVITE that waited past `overload_queue` in the socket queue is refused
        // before any routing, transaction or media work. Its sender has likely retransmitted
        // it already; taking it would only add the retransmissions to the backlog, and a 503
        // costs a fraction of a call.
        if method == Method::Invite
            && !self.settings.overload_queue.is_zero()
            && inb.queued > self.settings.overload_queue
            && msg.to_tag().is_none()
        {
            metrics::counter!("sbc_overload_rejected_total").increment(1);
            return self.shed(&msg, method, inb, 2, out);
        }

        // A new server transaction: counted against its source's cap.
        let tx_slot = match limiter.map(|l| l.begin_transaction(&msg, inb.flow.remote, now)) {
            Some(Err(busy)) => return out.push((Dest::Flow(inb.flow), busy)),
            Some(Ok(slot)) => slot,
            None => None,
        };
        let target = self.route(&msg, inb);
        let mut failover = None;
        let (dest, public_flow, pops) = match target {
            Target::Forward { dest, public_flow } => (dest, public_flow, None),
            Target::Skip(h) => {
                metrics::counter!("sbc_dead_hop_skips_total", "cause" => "down").increment(1);
                (h.dest, h.public_flow, Some(h.pops))
            }
            Target::Orphan { node, dest } => {
                tracing::debug!(node, "in-dialog request for a dead PBX answered by the SBC");
                if let Some((status, bytes)) = self.answer_orphan(&msg, &inb.flow, &dest) {
                    count_response(method, status, "local");
                    out.push((Dest::Flow(inb.flow), bytes));
                }
                return;
            }
            Target::Pool { pool, public_flow } => {
                let routes = self.routes.read().clone();
                if method == Method::Register {
                    if let Some(ok) = self.absorb_register(&msg, inb, &routes, pool, now) {
                        out.push((Dest::Flow(inb.flow), ok));
                        return;
                    }
                }
                let nodes: SmallVec<[(usize, Dest); 4]> = self
                    .candidates(&routes, pool)
                    .into_iter()
                    .filter_map(|n| {
                        let node = routes.nodes.get(n)?;
                        Some((
                            n,
                            peer_dest(
                                node.transport,
                                node.address,
                                node.tls_server_name.as_deref(),
                            ),
                        ))
                    })
                    .collect();
                let Some((_, first)) = nodes.first().cloned() else {
                    return self.reply(&msg, inb, 503, "Service Unavailable", out);
                };
                let (timeout, suspect_after) = routes
                    .pools
                    .get(pool)
                    .map_or((Duration::from_secs(1), None), |p| {
                        (p.branch_timeout, p.suspect_after)
                    });
                let timed = matches!(method, Method::Invite | Method::Register);
                failover = Some(Failover {
                    nodes,
                    pos: 0,
                    public_flow,
                    deadline: timed.then(|| branch_deadline(now, timeout)),
                    timeout,
                    answered: false,
                    suspect_at: suspect_after.filter(|_| timed).map(|d| now + d),
                    suspect_after,
                });
                (first, public_flow, None)
            }
            Target::Local(status, reason) => {
                if method == Method::Invite && status >= 300 {
                    // Through a server transaction so that the ACK is absorbed.
                    self.reject_invite(msg, inb, &key, status, reason, now, out);
                } else {
                    self.reply(&msg, inb, status, reason, out);
                }
                return;
            }
            Target::Drop => return,
        };
        // A new call with a trunk takes one of its channels, before any media work.
        let call_slot = if method == Method::Invite && msg.to_tag().is_none() {
            match self.trunk_call_slot(inb, &dest) {
                Ok(slot) => slot,
                Err(()) => {
                    let reason = "Service Unavailable (trunk call limit)";
                    return self.reject_invite(msg, inb, &key, 503, reason, now, out);
                }
            }
        } else {
            None
        };
        let mut media_offer = false;
        let mut media_sides = None;
        let mut media_body: Option<Bytes> = None;
        let media = self.media.get().filter(|_| {
            matches!(
                method,
                Method::Invite | Method::Update | Method::Prack | Method::Bye
            )
        });
        if let Some(m) = media {
            let sides = (
                self.media_side(inb.flow.remote, inb.flow.transport.is_reliable()),
                self.media_side_of_dest(&dest),
            );
            match media_request(m, &msg, sides.0, sides.1, pops.is_some()) {
                MediaAction::Pass => {}
                MediaAction::Body(b) => {
                    media_offer = matches!(method, Method::Invite | Method::Update);
                    media_body = Some(Bytes::from(b));
                }
                MediaAction::Refuse(status, err) => {
                    tracing::warn!(call_id = %String::from_utf8_lossy(msg.call_id()), error = %err, status, "media not anchored; request refused");
                    metrics::counter!("sbc_media_errors_total", "stage" => "offer").increment(1);
                    let reason = match status {
                        503 => "Service Unavailable (media ports)",
                        488 => "Not Acceptable Here",
                        _ => "Server Internal Error",
                    };
                    if method == Method::Invite {
                        self.reject_invite(msg, inb, &key, status, reason, now, out);
                    } else {
                        self.reply(&msg, inb, status, reason, out);
                    }
                    return;
                }
            }
            media_sides = Some(sides);
        }
        let Some(Forwarded {
            bytes,
            branch: out_branch,
            record_routes,
            hidden_vias,
        }) = self.forward(
            &msg,
            &inb.flow,
            &dest,
            public_flow,
            &via,
            media_body.as_deref(),
            pops,
        )
        else {
            return self.reply(&msg, inb, 500, "Server Internal Error", out);
        };
        // An in-dialog request toward a PBX that proxies this call: if the PBX turns out
        // dead, the request goes around it (see `skip_hop`).
        let skip_alt = if pops.is_none() && failover.is_none() && msg.to_tag().is_some() {
            self.skip_alternative(&msg, &dest, now)
        } else {
            None
        };

        let invite = method == Method::Invite;
        let in_reliable = inb.flow.transport.is_reliable();
        let out_reliable = dest_transport(&dest).is_reliable();
        let mut server = ServerTransaction::new(invite, in_reliable, now, self.settings.timers);
        if invite {
            let trying = edit::response(
                &msg,
                100,
                "Trying",
                &ResponseOpts {
                    source: Some((inb.flow.remote.ip(), inb.flow.remote.port())),
                    ..Default::default()
                },
            );
            server.send_response(100, Bytes::from(trying), now);
        }
        let client_key = TxKey {
            branch: out_branch,
            method: method_key(method),
        };
        let extra = match call_slot {
            Some(slot) => TxExtra::Call(slot),
            None if method == Method::Register => TxExtra::Register(inb.flow),
            None => TxExtra::None,
        };
        let mut core = self.core.lock();
        core.next_id += 1;
        let id = core.next_id;
        let tx = ProxyTx {
            server,
            server_key: key.clone(),
            in_flow: inb.flow,
            request: msg,
            method,
            branch: Some(Branch {
                tx: ClientTransaction::new(
                    invite,
                    out_reliable,
                    bytes.clone(),
                    now,
                    self.settings.timers,
                ),
                key: client_key.clone(),
                dest,
                out: bytes,
                cancel: None,
                record_routes,
            }),
            final_sent: false,
            cancel_pending: false,
            timer_c: None,
            scheduled: None,
            extra,
            hidden_vias,
            local_tag: id ^ 0x5bc0_0000,
            failover,
            media_offer,
            media_sides,
            media_body,
            _tx_slot: tx_slot,
            skip_alt,
            media_skip: pops.is_some(),
        };
        core.txs.insert(id, Box::new(tx));
        core.server_idx.insert(key, id);
        core.client_idx.insert(client_key, id);
        hot::transactions().set((core.txs.len() + core.linger.len()) as f64);
        hot::transaction(method).increment(1);
        self.drive(&mut core, id, now, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn reject_invite(
        &self,
        msg: Message,
        inb: &Inbound,
        key: &TxKey,
        status: u16,
        reason: &'static str,
        now: Instant,
        out: &mut Out,
    ) {
        let mut core = self.core.lock();
        core.next_id += 1;
        let id = core.next_id;
        let mut tx = ProxyTx {
            server: ServerTransaction::new(
                true,
                inb.flow.transport.is_reliable(),
                now,
                self.settings.timers,
            ),
            server_key: key.clone(),
            in_flow: inb.flow,
            request: msg,
            method: Method::Invite,
            branch: None,
            final_sent: false,
            cancel_pending: false,
            timer_c: None,
            scheduled: None,
            extra: TxExtra::None,
            hidden_vias: None,
            media_offer: false,
            media_sides: None,
            media_body: None,
            local_tag: id ^ 0x5bc0_0000,
            failover: None,
            _tx_slot: None,
            skip_alt: None,
            media_skip: false,
        };
        self.local_final(&mut tx, status, reason, now);
        core.txs.insert(id, Box::new(tx));
        core.server_idx.insert(key.clone(), id);
        self.drive(&mut core, id, now, out);
    }

    /// A stateless local response (no transaction needed: non-INVITE, or 2xx to OPTIONS).
    fn reply(&self, msg: &Message, inb: &Inbound, status: u16, reason: &str, out: &mut Out) {
        let method = msg.method().unwrap_or(Method::Other);
        if method == Method::Ack {
            return;
        }
        let bytes = edit::response(
            msg,
            status,
            reason,
            &ResponseOpts {
                to_tag: Some(b"sbc-local"),
                source: Some((inb.flow.remote.ip(), inb.flow.remote.port())),
                server: Some(&self.settings.name),
                ..Default::default()
            },
        );
        count_response(method, status, "local");
        out.push((Dest::Flow(inb.flow), Bytes::from(bytes)));
    }

    /// Decides where a request goes (RFC 3261 16.4-16.5 with the SBC's policy).
    fn route(&self, msg: &Message, inb: &Inbound) -> Target {
        self.route_around(msg, inb, None)
    }

    /// [`Proxy::route`], taking `assume_down` (a node an in-dialog request just timed out
    /// on) for dead like the nodes health calls Down: a route set that leads through a dead
    /// node and back to us skips it ([`Target::Skip`]).
    fn route_around(&self, msg: &Message, inb: &Inbound, assume_down: Option<usize>) -> Target {
        let mut skipped = None;
        match self.route_inner(msg, inb, assume_down, &mut skipped) {
            Target::Forward { dest, public_flow } => match skipped {
                Some((pops, node)) => Target::Skip(SkipHop {
                    dest,
                    public_flow,
                    pops,
                    node,
                }),
                None => {
                    let in_dialog = msg.to_tag().is_some() && msg.method() != Some(Method::Cancel);
                    let dead = in_dialog
                        .then(|| {
                            let remote = match &dest {
                                Dest::Flow(f) => f.remote,
                                Dest::Addr { remote, .. } => *remote,
                            };
                            let n = self.routes.read().node_by_addr(remote)?;
                            (assume_down == Some(n) || self.node_dead(n)).then_some(n)
                        })
                        .flatten();
                    match dead {
                        Some(node) => Target::Orphan { node, dest },
                        None => Target::Forward { dest, public_flow },
                    }
                }
            },
            t => t,
        }
    }

    /// Whether a Route URI names a PBX node that is dead for in-dialog requests: Down in
    /// health, timed out on recently, or `assume_down`.
    fn dead_hop(
        &self,
        routes: &RouteTable,
        uri: &Uri<'_>,
        assume_down: Option<usize>,
    ) -> Option<usize> {
        let addr = SocketAddr::new(uri.host_ip()?, uri.port_or_default());
        let n = routes.node_by_addr(addr)?;
        if assume_down == Some(n) {
            return Some(n);
        }
        if self.selector.read().as_ref().is_some_and(|s| s.is_down(n)) {
            return Some(n);
        }
        let mut dead = self.dead_hops.lock();
        match dead.get(&n) {
            Some(at) if at.elapsed() < DEAD_HOP_TTL => Some(n),
            Some(_) => {
                dead.remove(&n);
                None
            }
            None => None,
        }
    }

    fn route_inner(
        &self,
        msg: &Message,
        inb: &Inbound,
        assume_down: Option<usize>,
        skipped: &mut Option<(usize, usize)>,
    ) -> Target {
        let routes = self.routes.read().clone();
        let method = msg.method().unwrap_or(Method::Other);
        let mut source = routes.classify(inb.flow.remote, inb.flow.transport.is_reliable());
        if source == Source::Denied {
            metrics::counter!("sbc_rejected_total", "reason" => "source").increment(1);
            return Target::Local(403, "Forbidden");
        }
        // Pop our own Route entries (one or two), remembering a flow token. In a dialog
        // whose PBX proxies (it record-routed between two passes through us), a dead PBX's
        // entries are popped too when ours follow them: the request goes on as if the PBX
        // had sent it back to us.
        let mut token: Option<Flow> = None;
        let mut next_route: Option<NameAddr<'_>> = None;
        let values: SmallVec<[&[u8]; 8]> = msg.values(HeaderName::Route).map(|(_, v)| v).collect();
        let mut parsed: SmallVec<[NameAddr<'_>; 8]> = SmallVec::new();
        for v in &values {
            let Ok(na) = NameAddr::parse(v) else {
                return Target::Local(400, "Bad Request (Route)");
            };
            parsed.push(na);
        }
        let in_dialog_request = msg.to_tag().is_some() && method != Method::Cancel;
        let mut i = 0;
        while i < parsed.len() {
            let na = &parsed[i];
            if self.is_local(&na.uri) {
                if let Some(user) = na.uri.user {
                    if let Some(f) = self.tokens.decode(user) {
                        token = Some(f);
                    }
                }
                i += 1;
                continue;
            }
            if in_dialog_request {
                if let Some(n) = self.dead_hop(&routes, &na.uri, assume_down) {
                    let mut j = i + 1;
                    while j < parsed.len()
                        && !self.is_local(&parsed[j].uri)
                        && self.dead_hop(&routes, &parsed[j].uri, Some(n)) == Some(n)
                    {
                        j += 1;
                    }
                    if j < parsed.len() && self.is_local(&parsed[j].uri) {
                        // The not-open-relay rule still holds for the original sender.
                        if source == Source::Public && !self.registrations.has_flow(&inb.flow) {
                            metrics::counter!("sbc_rejected_total", "reason" => "unknown_source")
                                .increment(1);
                            return Target::Local(403, "Forbidden");
                        }
                        // The flow token of the first pass names the sender's side.
                        token = None;
                        source = Source::Node(n);
                        i = j;
                        *skipped = Some((0, n));
                        continue;
                    }
                }
            }
            next_route = Some(na.clone());
            break;
        }
        if let Some((pops, _)) = skipped.as_mut() {
            *pops = i;
        }
        let from_node = matches!(source, Source::Node(_));
        let public_flow = match source {
            Source::Public | Source::Trunk(_) => Some(inb.flow),
            _ => None,
        };

        if let Some(na) = next_route {
            // Loose routing to the next hop named in Route.
            return match self.resolve_uri(&routes, &na.uri, from_node, token) {
                Some(dest) => Target::Forward {
                    public_flow: public_flow.or(token),
                    dest,
                },
                None => Target::Local(404, "Not Found (route)"),
            };
        }
        if from_node {
            if let Some(flow) = token {
                if msg.to_tag().is_none()
                    && method != Method::Ack
                    && self.registrations.lapsed(&flow)
                {
                    // The phone stopped refreshing its registration: it is gone, and the PBX
                    // (which granted a longer lifetime) should hear so now, not after Timer B.
                    metrics::counter!("sbc_rejected_total", "reason" => "registration_lapsed")
                        .increment(1);
                    return Target::Local(480, "Temporarily Unavailable");
                }
                // PBX toward a phone or trunk over the flow named in Path / Record-Route.
                return Target::Forward {
                    dest: Dest::Flow(flow),
                    public_flow: Some(flow),
                };
            }
        }
        let Some(ruri) = msg.uri() else {
            return Target::Local(400, "Bad Request");
        };
        let to_local = self.is_local(&ruri);
        if to_local && ruri.user.is_none() && ruri.param(b"sbcc").is_none() {
            // Addressed to the SBC itself: answer keep-alive OPTIONS, refuse the rest.
            return match method {
                Method::Options => Target::Local(200, "OK"),
                _ => Target::Local(404, "Not Found"),
            };
        }
        let in_dialog = msg.to_tag().is_some();
        match source {
            Source::Node(_) => {
                if let Some(t) = routes.trunk_for_host(ruri.host_unbracketed(), ruri.port) {
                    let tr = &routes.trunks[t];
                    return Target::Forward {
                        dest: peer_dest(tr.transport, tr.address, tr.tls_server_name.as_deref()),
                        public_flow: None,
                    };
                }
                let real = self.unaliased_ruri(msg);
                let contact = real.as_deref().unwrap_or(msg.uri_bytes());
                if let Some(flow) = self.registrations.flow_for_contact(contact) {
                    return Target::Forward {
                        dest: Dest::Flow(flow),
                        public_flow: Some(flow),
                    };
                }
                if in_dialog {
                    if let Some(dest) = self.resolve_uri(&routes, &ruri, true, None) {
                        return Target::Forward {
                            dest,
                            public_flow: None,
                        };
                    }
                }
                Target::Local(404, "Not Found")
            }
            Source::Trunk(t) => {
                if in_dialog {
                    return match self.resolve_uri(&routes, &ruri, false, None) {
                        Some(dest) => Target::Forward { dest, public_flow },
                        None => Target::Local(404, "Not Found"),
                    };
                }
                self.to_pool(&routes, routes.trunks[t].pool, public_flow)
            }
            Source::Public => {
                if method == Method::Register {
                    if !routes.serves_domain(ruri.host_unbracketed()) {
                        metrics::counter!("sbc_rejected_total", "reason" => "domain").increment(1);
                        return Target::Local(403, "Forbidden (domain)");
                    }
                } else if !self.registrations.has_flow(&inb.flow) {
                    // Not an open relay: only phones we hold a registration for may send.
                    metrics::counter!("sbc_rejected_total", "reason" => "unknown_source")
                        .increment(1);
                    return Target::Local(403, "Forbidden");
                }
                if in_dialog {
                    return match self.resolve_uri(&routes, &ruri, false, None) {
                        Some(dest) => Target::Forward { dest, public_flow },
                        None => Target::Local(404, "Not Found"),
                    };
                }
                self.to_pool(&routes, routes.phone_pool, public_flow)
            }
            Source::Denied => Target::Drop,
        }
    }

    fn to_pool(&self, routes: &RouteTable, pool: usize, public_flow: Option<Flow>) -> Target {
        if routes.pools.get(pool).is_some_and(|p| !p.nodes.is_empty()) {
            Target::Pool { pool, public_flow }
        } else {
            Target::Local(503, "Service Unavailable")
        }
    }

    /// Resolves a URI to a destination we may send to: a configured node or trunk, or (for
    /// requests from a node) a flow we hold. No DNS on this path: hosts must be IP literals
    /// or a configured peer's name.
    fn resolve_uri(
        &self,
        routes: &RouteTable,
        uri: &Uri<'_>,
        from_node: bool,
        token: Option<Flow>,
    ) -> Option<Dest> {
        // An unknown transport parameter names nothing we can reach.
        uri.transport()?;
        let port = uri.port_or_default();
        let addr = match uri.host_ip() {
            Some(ip) => SocketAddr::new(ip, port),
            None => {
                let host = std::str::from_utf8(uri.host_unbracketed()).ok()?;
                if let Some(t) = routes.trunk_for_host(host.as_bytes(), uri.port) {
                    routes.trunks[t].address
                } else {
                    routes
                        .nodes
                        .iter()
                        .find(|n| n.tls_server_name.as_deref() == Some(host))?
                        .address
                }
            }
        };
        if let Some(n) = routes.node_by_addr(addr) {
            let node = &routes.nodes[n];
            return Some(peer_dest(
                node.transport,
                node.address,
                node.tls_server_name.as_deref(),
            ));
        }
        if let Some(t) = routes.trunk_by_addr(addr) {
            let tr = &routes.trunks[t];
            let t = cfg_transport(tr.transport);
            return Some(self.dest_for(t, addr, tr.tls_server_name.as_deref()));
        }
        if from_node {
            if let Some(flow) = token {
                return Some(Dest::Flow(flow));
            }
        }
        metrics::counter!("sbc_rejected_total", "reason" => "relay").increment(1);
        None
    }

    fn dest_for(&self, transport: Transport, addr: SocketAddr, server_name: Option<&str>) -> Dest {
        if transport == Transport::Udp {
            if let Some(l) = self.pick_listener(Transport::Udp, addr, true) {
                return Dest::Flow(Flow {
                    transport,
                    local: l.addr,
                    remote: addr,
                    conn: None,
                });
            }
        }
        Dest::Addr {
            transport,
            remote: addr,
            server_name: server_name.map(Arc::from),
        }
    }

    /// A listener of `transport` in the family of `remote`, preferring the side that faces it.
    fn pick_listener(
        &self,
        transport: Transport,
        remote: SocketAddr,
        internal: bool,
    ) -> Option<&LocalListener> {
        let locals = self.locals();
        let fam = |l: &&LocalListener| l.addr.is_ipv6() == remote.is_ipv6();
        let side_ok = |l: &&LocalListener| {
            if internal {
                l.side.faces_internal()
            } else {
                l.side.faces_public()
            }
        };
        locals
            .iter()
            .filter(|l| l.transport == transport)
            .filter(fam)
            .find(side_ok)
            .or_else(|| locals.iter().filter(|l| l.transport == transport).find(fam))
            .or_else(|| locals.iter().find(|l| l.transport == transport))
    }

    fn listener_for_flow(&self, flow: &Flow) -> Option<&LocalListener> {
        let locals = self.locals();
        locals
            .iter()
            .find(|l| l.transport == flow.transport && l.addr == flow.local)
            .or_else(|| {
                locals.iter().find(|l| {
                    l.transport == flow.transport && l.addr.is_ipv6() == flow.remote.is_ipv6()
                })
            })
            .or_else(|| locals.iter().find(|l| l.transport == flow.transport))
    }

    /// Whether a URI names this SBC (one of its listeners, by IP or advertised host).
    fn is_local_uri(&self, raw: &[u8]) -> bool {
        Uri::parse(raw).is_ok_and(|uri| self.is_local(&uri))
    }

    /// [`Proxy::is_local_uri`] for a URI the caller has parsed already.
    fn is_local(&self, uri: &Uri<'_>) -> bool {
        if !uri.is_sip() {
            return false;
        }
        let ip = uri.host_ip();
        self.locals().iter().any(|l| {
            let host_match = match ip {
                Some(ip) => ip == l.addr.ip() || l.host.as_bytes().eq_ignore_ascii_case(uri.host),
                None => l.host.as_bytes().eq_ignore_ascii_case(uri.host),
            };
            host_match
                && match uri.port {
                    Some(p) => p == l.port,
                    None => l.port == 5060 || l.port == 5061,
                }
        })
    }

    /// RFC 3261 16.3 step 4: a request carrying our Via with the same loop hash has looped.
    /// Most requests carry no Via of ours at all, so the hash is computed only for those that
    /// do (a spiral through the PBX, or a real loop).
    fn is_loop(&self, msg: &Message) -> bool {
        let mut hash: Option<[u8; 8]> = None;
        msg.values(HeaderName::Via).any(|(_, v)| {
            if OUR_BRANCH_MARK.find(v).is_none() {
                return false;
            }
            sbc_sip::via::Via::parse(v).is_ok_and(|via| {
                let Some(rest) = via.branch.and_then(|b| b.strip_prefix(OUR_BRANCH)) else {
                    return false;
                };
                if !self
                    .locals()
                    .iter()
                    .any(|l| l.host.as_bytes().eq_ignore_ascii_case(via.host))
                {
                    return false;
                }
                let want = hash.get_or_insert_with(|| {
                    let mut h = [0u8; 8];
                    let hex = format!("{:08x}", loop_hash(msg));
                    h.copy_from_slice(hex.as_bytes());
                    h
                });
                rest.len() > 8 && rest[..8] == want[..] && rest[8] == b'-'
            })
        })
    }

    /// Builds the forwarded request: our Via, received/rport, Max-Forwards, popped Routes,
    /// Record-Route for dialog-creating requests, Path (and Supported: path) for REGISTER.
    /// Returns it with the branch of our Via, the client transaction's key. `pops` (a
    /// request around a dead PBX) removes that many Route values instead of only ours.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        msg: &Message,
        in_flow: &Flow,
        dest: &Dest,
        public_flow: Option<Flow>,
        via: &sbc_sip::via::Via<'_>,
        body: Option<&[u8]>,
        pops: Option<usize>,
    ) -> Option<Forwarded> {
        let method = msg.method().unwrap_or(Method::Other);
        let (out_transport, remote) = match dest {
            Dest::Flow(f) => (f.transport, f.remote),
            Dest::Addr {
                transport, remote, ..
            } => (*transport, *remote),
        };
        let toward_internal = !matches!(dest, Dest::Flow(f) if Some(*f) == public_flow);
        let out_l = match dest {
            Dest::Flow(f) if f.transport == Transport::Udp => self
                .locals()
                .iter()
                .find(|l| l.transport == Transport::Udp && l.addr == f.local)
                .or_else(|| self.pick_listener(out_transport, remote, toward_internal)),
            Dest::Flow(f) => self.listener_for_flow(f),
            _ => self.pick_listener(out_transport, remote, toward_internal),
        }?
        .clone();
        let in_l = self.listener_for_flow(in_flow)?.clone();
        let mut e = Edits::new();
        // Our Via on top.
        let hash = loop_hash(msg);
        let n: u64 = rand::random();
        let mut branch: Vec<u8> = Vec::with_capacity(40);
        branch.extend_from_slice(OUR_BRANCH);
        push_hex(&mut branch, u64::from(hash), 8);
        branch.push(b'-');
        push_hex(&mut branch, n, 1);
        e.insert_with(edit::top_insert_point(msg, HeaderName::Via), |b| {
            b.extend_from_slice(b"Via: SIP/2.0/");
            b.extend_from_slice(out_l.transport.via_token().as_bytes());
            b.push(b' ');
            b.extend_from_slice(out_l.host.as_bytes());
            b.push(b':');
            push_dec(b, out_l.port.into());
            b.extend_from_slice(b";branch=");
            b.extend_from_slice(&branch);
            b.extend_from_slice(b";rport\r\n");
        });
        // A phone's request: its Vias stay with us (topology hiding), else they are stamped.
        let hide = self.hides_topology_of(in_flow, public_flow);
        let hidden_vias = if hide {
            let saved = crate::topology::hide_vias(
                msg,
                via,
                (in_flow.remote.ip(), in_flow.remote.port()),
                &mut e,
            );
            crate::topology::alias_contacts(
                msg,
                (&out_l.host, out_l.port, out_l.transport),
                &self.tokens,
                &mut e,
            );
            Some(saved)
        } else {
            edit::stamp_via(msg, via, in_flow.remote.ip(), in_flow.remote.port(), &mut e);
            None
        };
        // A Request-URI that is a phone's alias goes out as the phone's own URI.
        if let Some(real) = self.unaliased_ruri(msg) {
            let span = msg.span_of(msg.uri_bytes()).range();
            e.replace(span, &real);
        }
        // Max-Forwards.
        match (msg.header(HeaderName::MaxForwards), msg.max_forwards()) {
            (Some(h), Some(mf)) => {
                let mut v = [0u8; 10];
                let len = edit::write_decimal(&mut v, mf.saturating_sub(1).into());
                e.replace(h.value.range(), &v[..len]);
            }
            _ => e.insert(msg.headers_end(), b"Max-Forwards: 70\r\n"),
        }
        // Our Route entries.
        if let Some(p) = pops {
            // A line whose values all go is removed whole; otherwise value by value.
            let all: SmallVec<[(&sbc_sip::message::Header, &[u8]); 8]> =
                msg.values(HeaderName::Route).collect();
            let mut last_line = None;
            for (h, v) in all.iter().take(p) {
                let line = h.line.range();
                let whole = all
                    .iter()
                    .enumerate()
                    .filter(|(_, (h2, _))| h2.line.range() == line)
                    .all(|(k2, _)| k2 < p);
                if !whole {
                    e.delete(edit::remove_value_range(msg, h, v));
                } else if last_line != Some(line.start) {
                    last_line = Some(line.start);
                    e.delete(line);
                }
            }
        }
        for (h, v) in msg.values(HeaderName::Route) {
            if pops.is_some() {
                break;
            }
            let Ok(na) = NameAddr::parse(v) else { break };
            if !self.is_local(&na.uri) {
                break;
            }
            e.delete(edit::remove_value_range(msg, h, v));
        }
        let dialog_creating = matches!(
            method,
            Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
        ) && msg.to_tag().is_none();
        // The flow token (an HMAC) only goes into Record-Route and Path: in-dialog requests
        // and ACKs, most of the traffic, never pay for it.
        let user = match public_flow {
            Some(f) if dialog_creating || method == Method::Register => {
                let mut u = self.tokens.encode(&f);
                u.push('@');
                u
            }
            _ => String::new(),
        };
        let mut record_routes = 0;
        if dialog_creating {
            let at = edit::top_insert_point(msg, HeaderName::RecordRoute);
            if out_l.transport == in_l.transport && out_l.addr == in_l.addr {
                record_routes = 1;
                e.insert_fmt(
                    at,
                    format_args!(
                        "Record-Route: <sip:{user}{}:{};transport={};lr>\r\n",
                        out_l.host,
                        out_l.port,
                        out_l.transport.uri_param()
                    ),
                );
            } else {
                // Two entries when the transport or interface changes (RFC 3261 16.6 step 4,
                // the "double Record-Route" of RFC 5658).
                record_routes = 2;
                e.insert_fmt(
                    at,
                    format_args!(
                        "Record-Route: <sip:{user}{}:{};transport={};lr>, <sip:{user}{}:{};transport={};lr>\r\n",
                        out_l.host,
                        out_l.port,
                        out_l.transport.uri_param(),
                        in_l.host,
                        in_l.port,
                        in_l.transport.uri_param()
                    ),
                );
            }
        }
        if method == Method::Register {
            let at = edit::top_insert_point(msg, HeaderName::Path);
            e.insert_with(at, |b| {
                b.extend_from_slice(b"Path: <sip:");
                b.extend_from_slice(user.as_bytes());
                b.extend_from_slice(out_l.host.as_bytes());
                b.push(b':');
                push_dec(b, out_l.port.into());
                b.extend_from_slice(b";transport=");
                b.extend_from_slice(out_l.transport.uri_param().as_bytes());
                b.extend_from_slice(b";lr;ob>\r\n");
            });
            let has_path = msg.values(HeaderName::Supported).any(|(_, v)| {
                v.split(|&b| b == b',')
                    .any(|t| sbc_sip::scan::trim(t).eq_ignore_ascii_case(b"path"))
            });
            if !has_path {
                e.insert(msg.headers_end(), b"Supported: path\r\n");
            }
        }
        if let Some(b) = body {
            edit::replace_body(msg, b, &mut e);
        }
        Some(Forwarded {
            bytes: Bytes::from(e.apply(msg.as_bytes())),
            branch: branch.into_boxed_slice(),
            record_routes,
            hidden_vias,
        })
    }

    /// Whether a request arriving over `in_flow` comes from a phone whose topology the SBC
    /// hides (`phones.hide_topology`): from the public side, and not a trunk.
    fn hides_topology_of(&self, in_flow: &Flow, public_flow: Option<Flow>) -> bool {
        if public_flow != Some(*in_flow) {
            return false;
        }
        let routes = self.routes.read();
        routes.hide_topology
            && routes.classify(in_flow.remote, in_flow.transport.is_reliable()) == Source::Public
    }

    /// The phone's own URI when the Request-URI is one of our aliases.
    fn unaliased_ruri(&self, msg: &Message) -> Option<Vec<u8>> {
        // Cheap test first: almost no Request-URI is an alias.
        ALIAS_MARK.find(msg.uri_bytes())?;
        crate::topology::unalias(&msg.uri()?, &self.tokens)
    }

    // ----- responses -----

    fn on_response(&self, msg: Message, inb: &Inbound, now: Instant, out: &mut Out) {
        // A registrar's answer lists the aliases topology hiding gave the phone's contacts:
        // the phone (and the registration cache) must see its own URIs.
        let msg =
            if msg.cseq_method() == Method::Register && ALIAS_MARK.find(msg.as_bytes()).is_some() {
                let mut ue = Edits::new();
                crate::topology::unalias_contacts(&msg, &self.tokens, &mut ue);
                if ue.is_empty() {
                    msg
                } else {
                    match Message::parse_with(
                        Bytes::from(ue.apply(msg.as_bytes())),
                        &self.settings.limits,
                    ) {
                        Ok(m) => m,
                        Err(_) => msg,
                    }
                }
            } else {
                msg
            };
        let status = msg.status().unwrap_or(0);
        let Some(via) = msg.top_via() else { return };
        let Some(branch) = via.branch else {
            metrics::counter!("sbc_dropped_total", "reason" => "stray_response").increment(1);
            return;
        };
        let key = TxKey {
            branch: branch.into(),
            method: method_key(msg.cseq_method()),
        };
        if branch.starts_with(LOCAL_BRANCH) {
            // Provisional responses only stop retransmissions (done by the transaction's
            // timers); the final one ends the wait.
            if status >= 200 {
                if let Some(done) = self.local.lock().remove(branch) {
                    let _ = done.send(msg);
                }
            }
            return;
        }
        {
            let mut core = self.core.lock();
            let Some(&id) = core.client_idx.get(&key) else {
                drop(core);
                metrics::counter!("sbc_dropped_total", "reason" => "stray_response").increment(1);
                tracing::debug!(status, from = %inb.flow.remote, "response matches no transaction");
                return;
            };
            let Some(tx) = core.txs.get_mut(&id) else {
                return;
            };
            if let Some(a) = tx.skip_alt.as_mut().filter(|a| !a.answered) {
                // The PBX is alive after all.
                a.answered = true;
                self.dead_hops.lock().remove(&a.node);
            }
            let Some(b) = tx.branch.as_mut() else {
                return;
            };
            if key.method == MethodKey::Cancel {
                if let Some((c, _)) = b.cancel.as_mut() {
                    c.handle_response(status, now);
                }
                self.drive(&mut core, id, now, out);
                return;
            }
            let more_nodes = tx
                .failover
                .as_ref()
                .is_some_and(|f| !f.answered && f.pos + 1 < f.nodes.len());
            if status == 503 && more_nodes {
                // 503 before any provisional: the node refuses. Acknowledge it on its own
                // branch, then try the next node at once; the caller never sees the 503.
                if b.tx.handle_response(status, now) == ResponseAction::ForwardAndAck {
                    if let Ok(fwd) = Message::parse(b.out.clone()) {
                        b.tx.set_ack(Bytes::from(build_hop_request(&fwd, "ACK", Some(&msg))));
                    }
                }
                while let Some(bytes) = b.tx.poll_transmit() {
                    out.push((b.dest.clone(), bytes));
                }
                let Core {
                    txs, client_idx, ..
                } = &mut *core;
                if let Some(tx) = txs.get_mut(&id) {
                    if !self.next_node(tx, client_idx, id, NodeOutcome::Answered(503), now) {
                        self.local_final(tx, 503, "Service Unavailable", now);
                    }
                }
                self.drive(&mut core, id, now, out);
                return;
            }
            if let Some(f) = tx.failover.as_mut() {
                if !f.answered || status == 503 {
                    f.answered = true;
                    f.deadline = None;
                    let node = f.nodes[f.pos].0;
                    self.observe(node, NodeOutcome::Answered(status));
                }
            }
            let action = b.tx.handle_response(status, now);
            if action == ResponseAction::Absorb {
                self.drive(&mut core, id, now, out);
                return;
            }
            if action == ResponseAction::ForwardAndAck {
                if let Ok(fwd) = Message::parse(b.out.clone()) {
                    let ack = build_hop_request(&fwd, "ACK", Some(&msg));
                    b.tx.set_ack(Bytes::from(ack));
                }
            }
            if (100..200).contains(&status) {
                if tx.method == Method::Invite {
                    tx.timer_c = Some(now + self.settings.timer_c);
                }
                if tx.cancel_pending {
                    tx.cancel_pending = false;
                    self.start_cancel(tx, now);
                }
            } else {
                tx.timer_c = None;
            }
            if status != 100 {
                // Forward: drop our Via (and give a phone its own Vias back).
                let mut e = Edits::new();
                match &tx.hidden_vias {
                    Some(saved) => crate::topology::restore_vias(&msg, &via, saved, &mut e),
                    None => {
                        if let Some(h) = msg.header(HeaderName::Via) {
                            e.delete(edit::remove_value_range(&msg, h, via.raw));
                        }
                    }
                }
                // A phone's answer (to a call the PBX sent it): its Contact becomes an alias.
                if status > 100 && self.hides_topology_of(&inb.flow, Some(inb.flow)) {
                    if let Some(l) = self.listener_for_flow(&tx.in_flow) {
                        crate::topology::alias_contacts(
                            &msg,
                            (&l.host, l.port, l.transport),
                            &self.tokens,
                            &mut e,
                        );
                    }
                }
                if let (Some(m), Some((si, so))) = (self.media.get(), tx.media_sides) {
                    if let MediaAction::Body(b) = media_response(
                        m,
                        &tx.request,
                        tx.media_offer,
                        (si, so),
                        tx.media_skip,
                        &msg,
                    ) {
                        edit::replace_body(&msg, &b, &mut e);
                    }
                    if (200..300).contains(&status)
                        && tx.method == Method::Invite
                        && tx.request.to_tag().is_none()
                    {
                        let sent = tx
                            .branch
                            .as_ref()
                            .map(|b| (b.dest.clone(), usize::from(b.record_routes)));
                        if let Some(info) = sent.and_then(|(d, ours)| {
                            self.dialog_info(&tx.request, ours, &msg, tx.in_flow, &d)
                        }) {
                            m.record_dialog(&tx.request, si, so, info, tx.extra.take_call_slot());
                        }
                    }
                }
                if (200..300).contains(&status) {
                    if let Some(flow) = tx.extra.register_flow() {
                        self.record_registration(tx, flow, &msg, now, &mut e);
                    }
                }
                let bytes = Bytes::from(e.apply(msg.as_bytes()));
                if tx.server.send_response(status, bytes.clone(), now) {
                    count_response(tx.method, status, "forwarded");
                    if status >= 200 {
                        tx.final_sent = true;
                        // A failed call's channel is free now (a 2xx handed it on above).
                        tx.extra.take_call_slot();
                    }
                } else if (200..300).contains(&status) && tx.method == Method::Invite {
                    // A 2xx after our server transaction finished still goes upstream:
                    // 2xx are end to end (RFC 3261 16.7 step 10).
                    out.push((Dest::Flow(tx.in_flow), bytes));
                }
            }
            self.drive(&mut core, id, now, out);
        }
    }

    /// A 2xx to a phone's REGISTER: the binding goes into the cache, with the node that
    /// granted it and (for shadow registration) the Path it carried; with split expiry the
    /// 2xx is rewritten to give the phone its short lifetime.
    fn record_registration(
        &self,
        tx: &ProxyTx,
        flow: Flow,
        msg: &Message,
        now: Instant,
        e: &mut Edits,
    ) {
        let routes = self.routes.read().clone();
        let node = tx
            .failover
            .as_ref()
            .and_then(|f| f.nodes.get(f.pos))
            .and_then(|(n, _)| routes.nodes.get(*n));
        let shadow = node
            .and_then(|n| routes.pools.get(n.pool))
            .is_some_and(|p| p.shadow_registration);
        let path = if shadow {
            tx.branch
                .as_ref()
                .and_then(|b| Message::parse(b.out.clone()).ok())
                .map(|fwd| {
                    let paths: Vec<String> = fwd
                        .values(HeaderName::Path)
                        .map(|(_, v)| String::from_utf8_lossy(sbc_sip::scan::trim(v)).into_owned())
                        .collect();
                    paths.join(", ")
                })
        } else {
            None
        };
        self.registrations.record(
            flow,
            &tx.request,
            msg,
            node.map(|n| n.name.as_str()),
            path.as_deref(),
            &registration_policy(&routes),
            now,
            e,
        );
    }

    /// A phone's REGISTER that the cache can answer (split expiry): the 200 to send.
    fn absorb_register(
        &self,
        msg: &Message,
        inb: &Inbound,
        routes: &RouteTable,
        pool: usize,
        now: Instant,
    ) -> Option<Bytes> {
        let policy = registration_policy(routes);
        let active = self
            .active_node(routes, pool)
            .and_then(|n| routes.nodes.get(n))
            .map(|n| n.name.as_str());
        match self
            .registrations
            .absorb(&inb.flow, msg, active, &policy, now)
        {
            Ok(ok) => {
                hot::register_outcome(None).increment(1);
                count_response(Method::Register, 200, "local");
                Some(Bytes::from(ok))
            }
            Err(reason) => {
                hot::register_outcome(Some(reason)).increment(1);
                None
            }
        }
    }

    /// The pool's active node: where registrations belong (not the first candidate, which
    /// moves away from a merely Suspect node for a moment).
    pub(crate) fn active_node(&self, routes: &RouteTable, pool: usize) -> Option<usize> {
        match self.selector.read().as_ref() {
            Some(s) => s.active(pool),
            None => routes
                .pools
                .get(pool)
                .and_then(|p| p.nodes.first().copied()),
        }
    }

    /// Where to send a request to a node of the running route table.
    pub(crate) fn node_dest(&self, routes: &RouteTable, node: usize) -> Option<Dest> {
        let n = routes.nodes.get(node)?;
        Some(peer_dest(
            n.transport,
            n.address,
            n.tls_server_name.as_deref(),
        ))
    }

    /// A phone's Contact URI as a PBX may see it when it leaves through `l`: its alias on the
    /// SBC with topology hiding, else as it is (shadow registrations use it, so the standby
    /// stores what the active node stored).
    pub(crate) fn contact_for_pbx(&self, contact: &str, l: &LocalListener) -> String {
        if !self.routes.read().hide_topology {
            return contact.to_string();
        }
        let user = Uri::parse(contact.as_bytes()).ok().and_then(|u| u.user);
        crate::topology::alias_uri(
            contact.as_bytes(),
            user,
            (&l.host, l.port, l.transport),
            &self.tokens,
        )
    }

    /// The SBC's name (User-Agent of the requests it originates).
    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    /// The running route table.
    pub(crate) fn routes(&self) -> Arc<RouteTable> {
        self.routes.read().clone()
    }

    /// The ready nodes of a pool, in the order new transactions try them.
    pub(crate) fn ready_nodes(&self, pool: usize) -> SmallVec<[usize; 4]> {
        let routes = self.routes.read().clone();
        self.candidates(&routes, pool)
    }

    /// Closes a phone's TCP/TLS flow on purpose (the re-registration wave).
    pub(crate) fn close_flow(&self, flow: &Flow) -> bool {
        self.transports.get().is_some_and(|t| t.close_flow(flow))
    }

    /// Sends a request the SBC builds itself to `dest` through a local client transaction:
    /// `build` gets the listener it leaves from and the branch for its Via. The task yields
    /// the final response, if any came.
    pub(crate) fn originate(
        self: &Arc<Self>,
        dest: Dest,
        build: impl FnOnce(&LocalListener, &str) -> String,
    ) -> Option<tokio::task::JoinHandle<Option<Message>>> {
        let listener = match &dest {
            Dest::Flow(f) => self.listener_for_flow(f),
            Dest::Addr {
                transport, remote, ..
            } => self.pick_listener(*transport, *remote, true),
        }?;
        let n: u64 = rand::random();
        let branch = format!("{}{n:x}", String::from_utf8_lossy(LOCAL_BRANCH));
        let req = build(listener, &branch);
        Some(tokio::spawn(self.clone().run_local_msg(
            dest,
            Bytes::from(req),
            branch.into_bytes().into_boxed_slice(),
        )))
    }

    fn on_parse_error(&self, inb: &Inbound, err: sbc_sip::ParseError, out: &mut Out) {
        metrics::counter!("sbc_parse_errors_total", "kind" => err.label()).increment(1);
        tracing::debug!(from = %inb.flow.remote, %err, "unparseable message");
        if let Some(resp) = edit::response_to_unparsed(&inb.data, err.sip_status(), &err.reason()) {
            out.push((Dest::Flow(inb.flow), Bytes::from(resp)));
        }
    }
}

impl Handler for Proxy {
    fn on_message(&self, inb: Inbound) {
        let now = Instant::now();
        let mut out = Out::new();
        match Message::parse_with(inb.data.clone(), &self.settings.limits) {
            Err(e) => self.on_parse_error(&inb, e, &mut out),
            Ok(msg) if msg.is_request() => self.on_request(msg, &inb, now, &mut out),
            Ok(msg) => self.on_response(msg, &inb, now, &mut out),
        }
        self.flush(out);
    }

    fn on_flow_closed(&self, flow: &Flow) {
        self.registrations.flow_closed(flow);
    }

    fn on_send_error(&self, dest: &Dest, data: &Bytes, err: &SendError) {
        self.send_failed(dest, data, err);
    }
}

/// The relay's view of a request: one pass, or (`skip`: around a dead PBX) both passes of
/// a proxied call, `in_side` -> internal, then internal -> `out_side`.
fn media_request(
    m: &MediaAnchor,
    msg: &Message,
    in_side: MediaSide,
    out_side: MediaSide,
    skip: bool,
) -> MediaAction {
    if !skip {
        return m.on_request(msg, in_side, out_side);
    }
    match m.on_request(msg, in_side, MediaSide::Internal) {
        MediaAction::Body(b) => match m.on_request_body(msg, &b, MediaSide::Internal, out_side) {
            MediaAction::Pass => MediaAction::Body(b),
            other => other,
        },
        MediaAction::Pass => m.on_request(msg, MediaSide::Internal, out_side),
        refused => refused,
    }
}

/// The relay's view of a response to `request` (see [`media_request`]; the passes are
/// crossed in the reverse order).
fn media_response(
    m: &MediaAnchor,
    request: &Message,
    offered: bool,
    sides: (MediaSide, MediaSide),
    skip: bool,
    msg: &Message,
) -> MediaAction {
    let (si, so) = sides;
    if !skip {
        return m.on_response(request, offered, si, so, msg);
    }
    match m.on_response(request, offered, MediaSide::Internal, so, msg) {
        MediaAction::Body(b) => {
            match m.on_response_body(request, offered, si, MediaSide::Internal, msg, &b) {
                MediaAction::Pass => MediaAction::Body(b),
                other => other,
            }
        }
        _ => m.on_response(request, offered, si, MediaSide::Internal, msg),
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn method_key(m: Method) -> MethodKey {
    match m {
        Method::Invite | Method::Ack => MethodKey::Invite,
        Method::Cancel => MethodKey::Cancel,
        other => MethodKey::Other(other),
    }
}

/// RFC 3261 17.2.3 matching key; RFC 2543 requests (no magic cookie) get a key from the
/// fields that identify their transaction.
fn server_key(msg: &Message, via: &sbc_sip::via::Via<'_>) -> TxKey {
    let method = method_key(msg.method().unwrap_or(Method::Other));
    if via.has_rfc3261_branch() {
        let mut b = Vec::with_capacity(via.branch.map_or(0, |b| b.len()) + via.host.len() + 8);
        b.extend_from_slice(via.branch.unwrap_or_default());
        b.push(b'|');
        b.extend_from_slice(via.host);
        b.push(b':');
        push_dec(&mut b, u32::from(via.port.unwrap_or(0)));
        return TxKey {
            branch: b.into(),
            method,
        };
    }
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(b"2543|");
    b.extend_from_slice(msg.call_id());
    let _ = write!(AsFmt(&mut b), "|{}|", msg.cseq());
    b.extend_from_slice(msg.from_tag().unwrap_or_default());
    b.push(b'|');
    b.extend_from_slice(via.raw);
    TxKey {
        branch: b.into(),
        method,
    }
}

struct AsFmt<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for AsFmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `n` in decimal (the hot path's ports and Max-Forwards, without `fmt`).
fn push_dec(b: &mut Vec<u8>, n: u32) {
    let mut digits = [0u8; 10];
    let len = edit::write_decimal(&mut digits, n);
    b.extend_from_slice(&digits[..len]);
}

/// Appends `n` in lowercase hex, zero-padded to at least `width` digits (like `{:0width$x}`).
fn push_hex(b: &mut Vec<u8>, n: u64, width: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let len = ((64 - n.leading_zeros() as usize).div_ceil(4))
        .max(width)
        .max(1);
    for k in (0..len).rev() {
        let nib = if k < 16 { (n >> (k * 4)) & 0xf } else { 0 };
        b.push(HEX[nib as usize]);
    }
}

/// Finders built once: `memmem::find` builds its searcher on every call.
static OUR_BRANCH_MARK: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(OUR_BRANCH));
static ALIAS_MARK: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"sbcc="));

/// Hash of the fields RFC 3261 16.6 step 8 names for loop detection.
fn loop_hash(msg: &Message) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = ahash::RandomState::with_seeds(1, 2, 3, 4).build_hasher();
    h.write(msg.uri_bytes());
    h.write(msg.from_tag().unwrap_or_default());
    h.write(msg.to_tag().unwrap_or_default());
    h.write(msg.call_id());
    h.write_u32(msg.cseq());
    if let Some(pr) = msg.header_value(HeaderName::ProxyRequire) {
        h.write(pr);
    }
    // The Route set tells a spiral (the request comes back with fewer Routes, e.g. an
    // in-dialog BYE through SBC, PBX, SBC) from a loop.
    for (_, v) in msg.values(HeaderName::Route) {
        h.write(v);
    }
    h.finish() as u32
}

/// ACK (for a non-2xx) or CANCEL built from the request we forwarded (RFC 3261 17.1.1.3,
/// 9.1): same Request-URI, our Via only, same Route, From, Call-ID, CSeq number; To from the
/// response for ACK.
fn build_hop_request(fwd: &Message, method: &str, resp: Option<&Message>) -> Vec<u8> {
    let buf = fwd.as_bytes();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(fwd.uri_bytes());
    out.extend_from_slice(b" SIP/2.0\r\n");
    if let Some(v) = fwd.top_via() {
        out.extend_from_slice(b"Via: ");
        out.extend_from_slice(v.raw);
        out.extend_from_slice(b"\r\n");
    }
    for h in fwd.headers() {
        match h.name {
            HeaderName::Route | HeaderName::From | HeaderName::CallId => {
                out.extend_from_slice(&buf[h.line.range()]);
            }
            HeaderName::To if resp.is_none() => out.extend_from_slice(&buf[h.line.range()]),
            _ => {}
        }
    }
    if let Some(r) = resp {
        if let Some(h) = r.header(HeaderName::To) {
            out.extend_from_slice(&r.as_bytes()[h.line.range()]);
        }
    }
    let _ = write!(
        AsFmt(&mut out),
        "Max-Forwards: 70\r\nCSeq: {} {method}\r\nContent-Length: 0\r\n\r\n",
        fwd.cseq()
    );
    out
}

fn cfg_transport(t: sbc_config::Transport) -> Transport {
    match t {
        sbc_config::Transport::Udp => Transport::Udp,
        sbc_config::Transport::Tcp => Transport::Tcp,
        sbc_config::Transport::Tls => Transport::Tls,
    }
}

fn peer_dest(t: sbc_config::Transport, addr: SocketAddr, server_name: Option<&str>) -> Dest {
    Dest::Addr {
        transport: cfg_transport(t),
        remote: addr,
        server_name: server_name.map(Arc::from),
    }
}

fn dest_transport(d: &Dest) -> Transport {
    match d {
        Dest::Flow(f) => f.transport,
        Dest::Addr { transport, .. } => *transport,
    }
}

/// The registration settings of a route table.
fn registration_policy(routes: &RouteTable) -> crate::registrations::Policy {
    crate::registrations::Policy {
        phone_expires: routes.phone_expires,
        spread_percent: routes.phone_expires_spread_percent,
    }
}

fn count_response(method: Method, status: u16, origin: &'static str) {
    hot::response(method, status, origin == "local").increment(1);
}

const STATUS_LABELS: [&str; 23] = [
    "100", "180", "183", "200", "202", "401", "403", "404", "407", "408", "480", "481", "483",
    "486", "487", "500", "503", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx",
];

/// Index of a status's `code` label in [`STATUS_LABELS`]: the common codes by name, the rest
/// by class, so the label set stays small.
fn status_index(status: u16) -> usize {
    match status {
        100 => 0,
        180 => 1,
        183 => 2,
        200 => 3,
        202 => 4,
        401 => 5,
        403 => 6,
        404 => 7,
        407 => 8,
        408 => 9,
        480 => 10,
        481 => 11,
        483 => 12,
        486 => 13,
        487 => 14,
        500 => 15,
        503 => 16,
        s if s < 200 => 17,
        s if s < 300 => 18,
        s if s < 400 => 19,
        s if s < 500 => 20,
        s if s < 600 => 21,
        _ => 22,
    }
}

/// Handles of the counters every message touches, registered once. A `counter!` with labels
/// hashes its key and looks it up in the recorder's registry on every call: about 3,000
/// instructions per REGISTER transaction (7% of the SBC's work under callgrind). A handle is
/// an atomic add. Handles bind to the recorder installed when they are first used, which is
/// installed at start before any traffic.
mod hot {
    use super::{Method, STATUS_LABELS};
    use metrics::{Counter, Gauge};
    use std::sync::OnceLock;

    const METHODS: usize = 15;
    const CODES: usize = STATUS_LABELS.len();

    fn method_index(m: Method) -> usize {
        match m {
            Method::Invite => 0,
            Method::Ack => 1,
            Method::Bye => 2,
            Method::Cancel => 3,
            Method::Register => 4,
            Method::Options => 5,
            Method::Info => 6,
            Method::Update => 7,
            Method::Prack => 8,
            Method::Subscribe => 9,
            Method::Notify => 10,
            Method::Refer => 11,
            Method::Message => 12,
            Method::Publish => 13,
            Method::Other => 14,
        }
    }

    struct Hot {
        requests: [OnceLock<Counter>; METHODS],
        transactions_total: [OnceLock<Counter>; METHODS],
        transactions: OnceLock<Gauge>,
        /// [method][code][local]
        responses: [[[OnceLock<Counter>; 2]; CODES]; METHODS],
        /// REGISTERs answered from the cache (0) or forwarded, by reason (1..).
        register: [OnceLock<Counter>; 8],
    }

    fn hot() -> &'static Hot {
        static HOT: OnceLock<Hot> = OnceLock::new();
        HOT.get_or_init(|| Hot {
            requests: std::array::from_fn(|_| OnceLock::new()),
            transactions_total: std::array::from_fn(|_| OnceLock::new()),
            transactions: OnceLock::new(),
            responses: std::array::from_fn(|_| {
                std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new()))
            }),
            register: std::array::from_fn(|_| OnceLock::new()),
        })
    }

    /// `None`: answered from the registration cache; `Some(reason)`: forwarded.
    pub(super) fn register_outcome(
        forwarded: Option<crate::registrations::ForwardReason>,
    ) -> &'static Counter {
        use crate::registrations::ForwardReason as R;
        let i = match forwarded {
            None => 0,
            Some(R::Off) => 1,
            Some(R::New) => 2,
            Some(R::Changed) => 3,
            Some(R::NodeChanged) => 4,
            Some(R::Expiring) => 5,
            Some(R::Deregister) => 6,
            Some(R::Other) => 7,
        };
        hot().register[i].get_or_init(|| match forwarded {
            None => metrics::counter!("sbc_register_absorbed_total"),
            Some(r) => metrics::counter!("sbc_register_forwarded_total", "reason" => r.label()),
        })
    }

    pub(super) fn request(m: Method) -> &'static Counter {
        hot().requests[method_index(m)]
            .get_or_init(|| metrics::counter!("sbc_sip_requests_total", "method" => m.as_str()))
    }

    pub(super) fn transaction(m: Method) -> &'static Counter {
        hot().transactions_total[method_index(m)]
            .get_or_init(|| metrics::counter!("sbc_transactions_total", "method" => m.as_str()))
    }

    pub(super) fn transactions() -> &'static Gauge {
        hot()
            .transactions
            .get_or_init(|| metrics::gauge!("sbc_transactions"))
    }

    pub(super) fn response(m: Method, status: u16, local: bool) -> &'static Counter {
        let code = super::status_index(status);
        hot().responses[method_index(m)][code][usize::from(local)].get_or_init(|| {
            metrics::counter!(
                "sbc_sip_responses_total",
                "method" => m.as_str(),
                "code" => STATUS_LABELS[code],
                "origin" => if local { "local" } else { "forwarded" }
            )
        })
    }
}

fn outcome_label(o: NodeOutcome) -> &'static str {
    match o {
        NodeOutcome::Answered(503) => "503",
        NodeOutcome::Answered(_) => "answered",
        NodeOutcome::Timeout => "timeout",
        NodeOutcome::TransportError => "transport",
        NodeOutcome::Slow => "slow",
    }
}

/// When a branch gives up on its node. Timers fire on the wheel's tick after their deadline,
/// so the deadline is set one tick early: a caller whose first node is dead waits at most the
/// configured branch timeout, not that plus a tick.
fn branch_deadline(now: Instant, timeout: Duration) -> Instant {
    now + timeout.saturating_sub(TIMER_TICK)
}

#[cfg(test)]
mod number_tests {
    use super::{push_dec, push_hex};

    #[test]
    fn decimal_and_hex_match_fmt() {
        for n in [0u64, 1, 9, 10, 69, 70, 5060, 65535, u64::MAX] {
            if let Ok(small) = u32::try_from(n) {
                let mut b = Vec::new();
                push_dec(&mut b, small);
                assert_eq!(b, n.to_string().into_bytes());
            }
            for w in [1usize, 8] {
                let mut h = Vec::new();
                push_hex(&mut h, n, w);
                assert_eq!(h, format!("{n:0w$x}").into_bytes(), "{n} width {w}");
            }
        }
    }
}

#[cfg(test)]
mod id_map_tests {
    use super::{IdHasher, IdMap};
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn id_hash_keeps_neighbours_together_and_tags_apart() {
        let b = BuildHasherDefault::<IdHasher>::default();
        let tags: std::collections::HashSet<u64> = (1_000u64..2_000)
            .map(|id| {
                let h = b.hash_one(id);
                assert_eq!(h & ((1 << 57) - 1), id, "low bits: the id itself");
                h >> 57
            })
            .collect();
        assert!(tags.len() > 100, "only {} distinct tags", tags.len());
        // A table under a sliding window of ids, as the linger table is used.
        let mut m: IdMap<u64> = IdMap::default();
        for id in 0..200_000u64 {
            m.insert(id, id * 2);
            if id >= 50_000 {
                assert_eq!(m.remove(&(id - 50_000)), Some((id - 50_000) * 2));
            }
        }
        assert_eq!(m.len(), 50_000);
        assert!((150_000..200_000).all(|id| m.get(&id) == Some(&(id * 2))));
    }
}

#[cfg(test)]
mod tests {
    /// Live transactions are boxed, and tens of thousands are alive at a few thousand calls/s
    /// (an INVITE's stays for Timer M). mimalloc serves them from size bins: at 2,552 bytes a
    /// `ProxyTx` shares a bin with nothing bigger, while 2,560 and 2,576 both cost 10 MB more
    /// RSS and 7% more page faults per call at 2,000 calls/s with media (measured with
    /// `benchmarks/ab-proxy.sh`, benchmarks/README.md "A live transaction's size"). Past this
    /// size, find the bytes elsewhere.
    #[test]
    fn a_live_transaction_stays_in_its_allocator_bin() {
        let size = std::mem::size_of::<super::ProxyTx>();
        assert!(size <= 2552, "ProxyTx is {size} bytes");
    }
}
