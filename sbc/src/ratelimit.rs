//! Per-source admission control: rate limits, blocking, scanner filtering and a cap on the
//! transactions one source keeps in flight.
//!
//! An SBC on the internet is found by SIP scanners within minutes; they send REGISTERs to
//! guess passwords, INVITEs to find an open route to the PSTN, and OPTIONS to map servers, at
//! thousands of requests per second. Without limits one such source crowds out every phone,
//! floods the PBX behind the SBC and fills the transaction table. So every request from a
//! source that is neither a trunk nor a PBX node (both exempt by default, as their addresses
//! are configured and their traffic is the business) passes [`Limiter::check`] before any
//! routing:
//!
//! - a `User-Agent` of a known scanner is dropped without an answer (answering only confirms
//!   that a SIP server is there);
//! - REGISTER, INVITE and OPTIONS each take a token from the source's bucket for that method;
//!   without one the source gets `503 Service Unavailable` with `Retry-After`, which a real
//!   client honours;
//! - a source that goes on past `block_after` refusals is blocked: everything it sends is
//!   dropped without an answer for `block_time`, so a flood costs the SBC a hash lookup per
//!   packet and the attacker gets nothing back to measure.
//!
//! A new server transaction takes a [`TxSlot`] from [`Limiter::begin_transaction`], which
//! answers 503 once the source has `max_transactions_per_source` in flight; the slot gives the
//! count back when the transaction is dropped.
//!
//! # Why hand-rolled and not `governor`
//! governor's keyed limiter holds one quota per limiter, so three methods would take three
//! maps (three lookups per request, three copies of every source), and the violation count
//! and block state would need a fourth; its store grows until `retain_recent` is called and
//! has no size bound. Here one sharded map holds everything known about a source in one
//! entry: one hash lookup under one short, uncontended lock per request, no allocation for a
//! source already known, and a hard cap on entries (the least recently seen are evicted).
//!
//! # Memory
//! At most `max_sources` entries (about 150 bytes each with the map's overhead, so 10 MB at
//! the default 65536). IPv6 sources are keyed by their /64, the block one host or one
//! customer usually holds, so an attacker cannot create a fresh entry per packet by cycling
//! through the addresses of its own prefix. Entries that carry no information (a full bucket,
//! no block, no transaction in flight) are swept away in the background of normal traffic.

use bytes::Bytes;
use ipnet::IpNet;
use memchr::memmem::Finder;
use parking_lot::{Mutex, RwLock};
use sbc_config::{Config, RateLimit};
use sbc_routing::RouteTable;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::message::{HeaderName, Message, Method};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shards of the source table. Requests from different sources rarely meet on one lock, and
/// a sweep or an eviction pass holds only a sixteenth of the table.
const SHARDS: usize = 16;
/// A refusal older than this is forgotten: a client that slowed down after a 503 starts with
/// a clean slate instead of being blocked days later for one more burst.
const FORGET_VIOLATIONS: Duration = Duration::from_secs(30);
/// How often one shard is swept (expired blocks, idle entries); the whole table once every
/// `SHARDS` times this.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Retry-After for a source at its transaction cap: transactions end within seconds.
const TX_RETRY_AFTER: u32 = 2;
/// Longest prefix of a User-Agent searched for scanner names; scanners' are short, and an
/// attacker padding its own header only hides itself from this check, never slows it down.
const MAX_AGENT: usize = 256;

/// The methods with a rate limit, in the order of [`Entry::buckets`].
const LIMITED: [Method; 3] = [Method::Register, Method::Invite, Method::Options];

/// What to do with a request the limiter refuses.
#[derive(Debug)]
pub enum Refusal {
    /// Send this `503` (with `Retry-After`) back on the request's flow.
    Answer(Bytes),
    /// Send nothing: a scanner, or a blocked source.
    Drop,
}

/// One server transaction counted against its source; dropping it gives the count back.
#[derive(Debug)]
pub struct TxSlot(Arc<AtomicU32>);

impl Drop for TxSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settings and exemptions, replaced as a whole (config reload, new route table).
struct Policy {
    enabled: bool,
    /// Per second and burst, per method of [`LIMITED`].
    rates: [(f32, f32); 3],
    block_after: u32,
    block_time: Duration,
    per_shard: usize,
    drop_scanners: bool,
    scanners: Vec<Finder<'static>>,
    exempt_trunks: bool,
    exempt_nodes: bool,
    /// Sources never limited: trunk networks and node addresses, as the flags select.
    exempt: Vec<IpNet>,
    max_tx: u32,
    server: String,
}

impl Policy {
    fn new(rl: &RateLimit, max_tx: usize, server: &str) -> Policy {
        let rate = |r: sbc_config::Rate| (r.per_second as f32, r.burst as f32);
        Policy {
            enabled: rl.enabled,
            rates: [rate(rl.register), rate(rl.invite), rate(rl.options)],
            block_after: rl.block_after,
            block_time: rl.block_time,
            per_shard: rl.max_sources.div_ceil(SHARDS).max(1),
            drop_scanners: rl.drop_scanners,
            scanners: rl
                .scanner_agents
                .iter()
                .map(|a| Finder::new(a.as_bytes()).into_owned())
                .collect(),
            exempt_trunks: rl.exempt_trunks,
            exempt_nodes: rl.exempt_nodes,
            exempt: Vec::new(),
            max_tx: u32::try_from(max_tx).unwrap_or(u32::MAX),
            server: server.to_string(),
        }
    }

    fn set_exempt(&mut self, routes: &RouteTable) {
        self.exempt.clear();
        if self.exempt_nodes {
            self.exempt.extend(
                routes
                    .nodes
                    .iter()
                    .map(|n| IpNet::from(canonical(n.address.ip()))),
            );
        }
        if self.exempt_trunks {
            self.exempt
                .extend(routes.trunks.iter().flat_map(|t| t.sources.iter().copied()));
        }
    }

    fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    fn is_scanner(&self, msg: &Message) -> bool {
        if !self.drop_scanners || self.scanners.is_empty() {
            return false;
        }
        let Some(agent) = msg.header_value(HeaderName::UserAgent) else {
            return false;
        };
        let mut lower = [0u8; MAX_AGENT];
        let n = agent.len().min(MAX_AGENT);
        for (l, a) in lower.iter_mut().zip(&agent[..n]) {
            *l = a.to_ascii_lowercase();
        }
        let agent = &lower[..n];
        self.scanners.iter().any(|f| f.find(agent).is_some())
    }
}

/// A token bucket, in tokens and milliseconds since the limiter's epoch.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f32,
    at: u64,
}

impl Bucket {
    fn refill(&mut self, now: u64, (rate, burst): (f32, f32)) {
        let elapsed = now.saturating_sub(self.at) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }
}

/// Everything known about one source.
struct Entry {
    buckets: [Bucket; 3],
    violations: u32,
    last_violation: u64,
    /// 0: not blocked.
    blocked_until: u64,
    last_seen: u64,
    in_flight: Arc<AtomicU32>,
}

impl Entry {
    fn new(now: u64, policy: &Policy) -> Entry {
        let full = |i: usize| Bucket {
            tokens: policy.rates[i].1,
            at: now,
        };
        Entry {
            buckets: [full(0), full(1), full(2)],
            violations: 0,
            last_violation: 0,
            blocked_until: 0,
            last_seen: now,
            in_flight: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Nothing here that a fresh entry would not say: forgetting it loses nothing.
    fn is_idle(&self, now: u64, policy: &Policy) -> bool {
        self.blocked_until == 0
            && self.in_flight.load(Ordering::Relaxed) == 0
            && (self.violations == 0
                || now.saturating_sub(self.last_violation) > millis(FORGET_VIOLATIONS))
            && self
                .buckets
                .iter()
                .zip(&policy.rates)
                .all(|(b, &(rate, burst))| {
                    b.tokens + now.saturating_sub(b.at) as f32 / 1000.0 * rate >= burst
                })
    }

    /// Until when eviction should keep this entry: a blocked source counts as seen until its
    /// block ends, so a flood of new sources does not lift the blocks of old ones first.
    fn keep_until(&self) -> u64 {
        self.last_seen.max(self.blocked_until)
    }
}

#[derive(Default)]
struct Shard {
    map: ahash::AHashMap<u128, Entry>,
}

/// Per-source rate limits and transaction caps; see the module documentation.
pub struct Limiter {
    /// Read on every request, written on reload: a read-mostly lock whose read side is one
    /// atomic add, never held across anything that blocks.
    policy: RwLock<Policy>,
    /// parking_lot mutexes: held for one hash lookup and a few arithmetic operations (or one
    /// sweep of a shard), never across an await.
    shards: Box<[Mutex<Shard>]>,
    epoch: Instant,
    /// Blocked sources right now, for the `sbc_blocked_sources` gauge.
    blocked: AtomicI64,
    /// Milliseconds since the epoch of the next sweep.
    next_sweep: AtomicU64,
    sweep_cursor: AtomicUsize,
}

impl Limiter {
    /// A limiter for `cfg`'s `[ratelimit]` and `limits.max_transactions_per_source`, exempting
    /// the nodes and trunks of `routes` as the config says.
    pub fn new(cfg: &Config, routes: &RouteTable) -> Limiter {
        let mut policy = Policy::new(
            &cfg.ratelimit,
            cfg.limits.max_transactions_per_source,
            &cfg.general.name,
        );
        policy.set_exempt(routes);
        metrics::describe_counter!(
            "sbc_ratelimited_total",
            "Requests refused by per-source limits, by method and action (503, block, drop, scanner, transactions)"
        );
        metrics::describe_gauge!(
            "sbc_blocked_sources",
            "Sources currently blocked for exceeding their rate limits"
        );
        metrics::gauge!("sbc_blocked_sources").set(0.0);
        Limiter {
            policy: RwLock::new(policy),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            epoch: Instant::now(),
            blocked: AtomicI64::new(0),
            next_sweep: AtomicU64::new(millis(SWEEP_EVERY)),
            sweep_cursor: AtomicUsize::new(0),
        }
    }

    /// Applies new settings (a reload); what is known about each source is kept.
    pub fn reconfigure(&self, cfg: &Config, routes: &RouteTable) {
        let mut policy = Policy::new(
            &cfg.ratelimit,
            cfg.limits.max_transactions_per_source,
            &cfg.general.name,
        );
        policy.set_exempt(routes);
        *self.policy.write() = policy;
    }

    /// Re-derives the exempt sources from a new route table (trunks or nodes changed).
    pub fn set_routes(&self, routes: &RouteTable) {
        self.policy.write().set_exempt(routes);
    }

    /// Decides on a request before it is routed: `None` lets it through.
    pub fn check(
        &self,
        msg: &Message,
        method: Method,
        remote: SocketAddr,
        now: Instant,
    ) -> Option<Refusal> {
        let policy = self.policy.read();
        let ip = canonical(remote.ip());
        if !policy.enabled || policy.is_exempt(ip) {
            return None;
        }
        let now = self.ms(now);
        self.maybe_sweep(now, &policy);
        let label = method_label(method);
        if policy.is_scanner(msg) {
            count(label, "scanner");
            tracing::debug!(source = %ip, "scanner User-Agent; dropped");
            return Some(Refusal::Drop);
        }
        let key = key(ip);
        let limited = LIMITED.iter().position(|&m| m == method);
        let mut shard = self.shards[shard_of(key)].lock();
        let entry = match limited {
            Some(_) => self.entry(&mut shard, key, now, &policy),
            // Other methods only meet a block; they never create an entry.
            None => shard.map.get_mut(&key)?,
        };
        entry.last_seen = now;
        if entry.blocked_until != 0 {
            if now < entry.blocked_until {
                count(label, "drop");
                return Some(Refusal::Drop);
            }
            self.unblock(entry);
        }
        let i = limited?;
        let bucket = &mut entry.buckets[i];
        bucket.refill(now, policy.rates[i]);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return None;
        }
        let (rate, _) = policy.rates[i];
        let wait = ((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u32;
        if entry.violations > 0
            && now.saturating_sub(entry.last_violation) > millis(FORGET_VIOLATIONS)
        {
            entry.violations = 0;
        }
        entry.violations = entry.violations.saturating_add(1);
        entry.last_violation = now;
        if entry.violations > policy.block_after {
            entry.blocked_until = now.saturating_add(millis(policy.block_time).max(1));
            let n = self.blocked.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!("sbc_blocked_sources").set(n as f64);
            count(label, "block");
            tracing::info!(source = %ip, method = method.as_str(), block_secs = policy.block_time.as_secs(), "source over its rate limit; blocked");
            return Some(Refusal::Drop);
        }
        drop(shard);
        count(label, "503");
        Some(Refusal::Answer(busy(msg, remote, wait, &policy.server)))
    }

    /// Counts a new server transaction against its source: `Ok(None)` for sources that are
    /// not counted, `Err` with the 503 to send when the source is at its cap.
    pub fn begin_transaction(
        &self,
        msg: &Message,
        remote: SocketAddr,
        now: Instant,
    ) -> Result<Option<TxSlot>, Bytes> {
        let policy = self.policy.read();
        let ip = canonical(remote.ip());
        if policy.is_exempt(ip) {
            return Ok(None);
        }
        let now = self.ms(now);
        self.maybe_sweep(now, &policy);
        let key = key(ip);
        let mut shard = self.shards[shard_of(key)].lock();
        let entry = self.entry(&mut shard, key, now, &policy);
        entry.last_seen = now;
        let in_flight = &entry.in_flight;
        if in_flight.load(Ordering::Relaxed) >= policy.max_tx {
            drop(shard);
            count(
                method_label(msg.method().unwrap_or(Method::Other)),
                "transactions",
            );
            return Err(busy(msg, remote, TX_RETRY_AFTER, &policy.server));
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Some(TxSlot(in_flight.clone())))
    }

    /// Sources tracked right now (for tests and the memory bound).
    pub fn tracked_sources(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    /// Sources blocked right now.
    pub fn blocked_sources(&self) -> usize {
        usize::try_from(self.blocked.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn ms(&self, now: Instant) -> u64 {
        millis(now.saturating_duration_since(self.epoch))
    }

    /// The entry of `key`, created if new; a full shard first forgets its idle entries,
    /// then, if still full, the quarter seen least recently.
    fn entry<'s>(
        &self,
        shard: &'s mut Shard,
        key: u128,
        now: u64,
        policy: &Policy,
    ) -> &'s mut Entry {
        if !shard.map.contains_key(&key) && shard.map.len() >= policy.per_shard {
            self.sweep_shard(shard, now, policy);
            if shard.map.len() >= policy.per_shard {
                // Exactly a quarter, however many entries share a timestamp: one pass here
                // makes room for the next quarter's worth of new sources.
                let mut ages: Vec<(u64, u128)> = shard
                    .map
                    .iter()
                    .map(|(k, e)| (e.keep_until(), *k))
                    .collect();
                let cut = (ages.len() / 4).max(1);
                ages.select_nth_unstable(cut - 1);
                let mut removed_blocked = 0;
                for (_, k) in &ages[..cut] {
                    // A block not yet lifted (even if expired) is still counted.
                    if shard.map.remove(k).is_some_and(|e| e.blocked_until != 0) {
                        removed_blocked += 1;
                    }
                }
                if removed_blocked > 0 {
                    self.add_blocked(-removed_blocked);
                }
                tracing::debug!(
                    remaining = shard.map.len(),
                    "rate limit table full; forgot the least recently seen sources"
                );
            }
        }
        shard
            .map
            .entry(key)
            .or_insert_with(|| Entry::new(now, policy))
    }

    fn unblock(&self, entry: &mut Entry) {
        entry.blocked_until = 0;
        entry.violations = 0;
        self.add_blocked(-1);
    }

    fn add_blocked(&self, delta: i64) {
        let n = self.blocked.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!("sbc_blocked_sources").set(n.max(0) as f64);
    }

    /// Every `SWEEP_EVERY`, one caller sweeps the next shard (if nobody holds it).
    fn maybe_sweep(&self, now: u64, policy: &Policy) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    now + millis(SWEEP_EVERY),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let i = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
        if let Some(mut shard) = self.shards[i].try_lock() {
            self.sweep_shard(&mut shard, now, policy);
        }
    }

    /// Lifts expired blocks and forgets entries that carry nothing.
    fn sweep_shard(&self, shard: &mut Shard, now: u64, policy: &Policy) {
        let mut lifted = 0;
        shard.map.retain(|_, e| {
            if e.blocked_until != 0 && now >= e.blocked_until {
                e.blocked_until = 0;
                e.violations = 0;
                lifted += 1;
            }
            !e.is_idle(now, policy)
        });
        if lifted > 0 {
            self.add_blocked(-lifted);
        }
    }
}

/// The 503 a refused request gets: a real client waits `retry_after` seconds and tries again
/// (RFC 3261 21.5.4), so it is never pushed into the block. Also the proxy's answer to an
/// INVITE it sheds under overload.
pub(crate) fn busy(msg: &Message, remote: SocketAddr, retry_after: u32, server: &str) -> Bytes {
    let extra = format!("Retry-After: {retry_after}\r\n");
    Bytes::from(edit::response(
        msg,
        503,
        "Service Unavailable",
        &ResponseOpts {
            to_tag: Some(b"sbc-local"),
            source: Some((remote.ip(), remote.port())),
            server: Some(server),
            extra: extra.as_bytes(),
            ..Default::default()
        },
    ))
}

fn count(method: &'static str, action: &'static str) {
    metrics::counter!("sbc_ratelimited_total", "method" => method, "action" => action).increment(1);
}

fn method_label(m: Method) -> &'static str {
    match m {
        Method::Register => "REGISTER",
        Method::Invite => "INVITE",
        Method::Options => "OPTIONS",
        _ => "other",
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so one host is one source whatever the socket family.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The table key: an IPv4 address, or the /64 of an IPv6 one (see the module documentation).
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) | (1 << 127),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

fn shard_of(key: u128) -> usize {
    let folded = (key as u64) ^ ((key >> 64) as u64);
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n\
             [[pool]]\nname = \"pbx\"\n[[pool.node]]\nname = \"a\"\naddress = \"10.0.0.2:5060\"\n\
             [[trunk]]\nname = \"carrier\"\nsources = [\"192.0.2.0/24\"]\naddress = \"192.0.2.1:5060\"\n\
             {extra}"
        );
        sbc_config::parse(&text, std::path::Path::new("/nonexistent/sbc.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn limiter(extra: &str) -> Limiter {
        let cfg = config(extra);
        Limiter::new(&cfg, &RouteTable::new(&cfg))
    }

    fn request(method: &str, agent: &str) -> Message {
        let text = format!(
            "{method} sip:bob@example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 198.51.100.9:5062;branch=z9hG4bK1;rport\r\n\
             From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n\
             Call-ID: c1\r\nCSeq: 1 {method}\r\nUser-Agent: {agent}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).expect("test request parses")
    }

    fn src(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 5062)
    }

    /// What `check` says, as 'p'ass, 'a'nswer (with the Retry-After value) or 'd'rop.
    fn verdict(l: &Limiter, m: &Message, from: SocketAddr, at: Instant) -> (char, u32) {
        let method = m.method().unwrap_or(Method::Other);
        match l.check(m, method, from, at) {
            None => ('p', 0),
            Some(Refusal::Drop) => ('d', 0),
            Some(Refusal::Answer(bytes)) => {
                let resp = Message::parse(bytes).expect("503 parses");
                assert_eq!(resp.status(), Some(503));
                let retry = resp
                    .header_value(HeaderName::RetryAfter)
                    .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
                    .expect("Retry-After");
                ('a', retry)
            }
        }
    }

    #[test]
    fn burst_then_503_then_block_then_release() {
        let l = limiter("[ratelimit]\nregister_rate = 2\nregister_burst = 3\nblock_after = 2\nblock_secs = 10\n");
        let reg = request("REGISTER", "Yealink SIP-T46S");
        let a = src("198.51.100.9");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(verdict(&l, &reg, a, t0).0, 'p');
        }
        // Over the burst: 503, asking to wait until a token is back (1/2 s, rounded up).
        assert_eq!(verdict(&l, &reg, a, t0), ('a', 1));
        assert_eq!(verdict(&l, &reg, a, t0), ('a', 1));
        // The third refusal exceeds block_after = 2: blocked, silently.
        assert_eq!(verdict(&l, &reg, a, t0).0, 'd');
        assert_eq!(l.blocked_sources(), 1);
        // Blocked means everything, other methods included, even with tokens back.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(verdict(&l, &reg, a, later).0, 'd');
        assert_eq!(verdict(&l, &request("BYE", "x"), a, later).0, 'd');
        // Another source is not affected.
        assert_eq!(verdict(&l, &reg, src("198.51.100.10"), later).0, 'p');
        // After the block time, a fresh start.
        let after = t0 + Duration::from_secs(11);
        assert_eq!(verdict(&l, &reg, a, after).0, 'p');
        assert_eq!(l.blocked_sources(), 0);
    }

    #[test]
    fn tokens_come_back_at_the_configured_rate() {
        let l = limiter("[ratelimit]\ninvite_rate = 10\ninvite_burst = 1\nblock_after = 1000\n");
        let inv = request("INVITE", "phone");
        let a = src("198.51.100.9");
        let t0 = Instant::now();
        assert_eq!(verdict(&l, &inv, a, t0).0, 'p');
        assert_eq!(verdict(&l, &inv, a, t0).0, 'a');
        assert_eq!(verdict(&l, &inv, a, t0 + Duration::from_millis(50)).0, 'a');
        assert_eq!(verdict(&l, &inv, a, t0 + Duration::from_millis(110)).0, 'p');
        // 10 per second sustained passes indefinitely.
        for k in 1..=50u64 {
            let at = t0 + Duration::from_millis(110 + k * 100);
            assert_eq!(verdict(&l, &inv, a, at).0, 'p', "request {k}");
        }
        // Methods have separate buckets; unlimited methods create no entry.
        assert_eq!(verdict(&l, &request("OPTIONS", "p"), a, t0).0, 'p');
        assert_eq!(
            verdict(&l, &request("MESSAGE", "p"), src("198.51.100.77"), t0).0,
            'p'
        );
        assert_eq!(l.tracked_sources(), 1);
    }

    #[test]
    fn scanners_are_dropped_whatever_their_rate() {
        let l = limiter("");
        let a = src("198.51.100.9");
        let now = Instant::now();
        for agent in [
            "friendly-scanner",
            "SIPVicious 0.3.4",
            "sipcli/v1.8",
            "VaxSIPUserAgent/3.1",
            "sundayddr",
            "iWar",
        ] {
            assert_eq!(
                verdict(&l, &request("OPTIONS", agent), a, now).0,
                'd',
                "{agent}"
            );
        }
        assert_eq!(
            verdict(&l, &request("OPTIONS", "Linphone/5.2"), a, now).0,
            'p'
        );
        // Nothing is remembered about a scanner that was dropped at once.
        assert_eq!(l.tracked_sources(), 1);

        let off = limiter("[ratelimit]\ndrop_scanners = false\n");
        assert_eq!(
            verdict(&off, &request("OPTIONS", "friendly-scanner"), a, now).0,
            'p'
        );
    }

    #[test]
    fn trunks_and_nodes_are_exempt_unless_configured_otherwise() {
        let strict = "[ratelimit]\nregister_rate = 1\nregister_burst = 1\n";
        let l = limiter(strict);
        let reg = request("REGISTER", "friendly-scanner");
        let now = Instant::now();
        for from in ["192.0.2.77", "10.0.0.2", "::ffff:192.0.2.5"] {
            for _ in 0..20 {
                assert_eq!(verdict(&l, &reg, src(from), now).0, 'p', "{from}");
            }
        }
        let l = limiter(&format!("{strict}exempt_trunks = false\n"));
        assert_eq!(verdict(&l, &reg, src("192.0.2.77"), now).0, 'd');
        assert_eq!(verdict(&l, &reg, src("10.0.0.2"), now).0, 'p');
        let l = limiter("[ratelimit]\nenabled = false\n");
        assert_eq!(verdict(&l, &reg, src("198.51.100.1"), now).0, 'p');
    }

    #[test]
    fn the_table_stays_within_max_sources() {
        let l = limiter("[ratelimit]\nmax_sources = 1024\nregister_burst = 1\nregister_rate = 1\n");
        let reg = request("REGISTER", "phone");
        let now = Instant::now();
        for i in 0..20_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            // Spend the token so that no entry is idle and eviction has to choose.
            verdict(&l, &reg, SocketAddr::new(ip.into(), 5060), now);
        }
        let n = l.tracked_sources();
        assert!(n <= 1024 + SHARDS, "{n} sources tracked");
        // Each shard forgets a quarter at a time, so at least three quarters stay.
        assert!(n >= 1024 * 3 / 4, "eviction forgot too much: {n}");
    }

    /// Entries whose block is not lifted yet, counted the slow way.
    fn really_blocked(l: &Limiter) -> usize {
        l.shards
            .iter()
            .map(|s| {
                s.lock()
                    .map
                    .values()
                    .filter(|e| e.blocked_until != 0)
                    .count()
            })
            .sum()
    }

    #[test]
    fn evicting_blocked_sources_keeps_the_gauge_true() {
        let l = limiter(
            "[ratelimit]\nmax_sources = 1024\nregister_burst = 1\nregister_rate = 1\nblock_after = 1\nblock_secs = 1\n",
        );
        let reg = request("REGISTER", "phone");
        let t0 = Instant::now();
        let at = |i: u32| SocketAddr::new(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), 5060);
        for i in 0..5_000u32 {
            // A pass, a 503, then blocked.
            let seen: String = (0..3).map(|_| verdict(&l, &reg, at(i), t0).0).collect();
            assert_eq!(seen, "pad");
        }
        assert!(l.blocked_sources() > 0);
        assert_eq!(l.blocked_sources(), really_blocked(&l));
        // Their blocks expire; a wave of new sources evicts them before any sweep lifts them.
        let t1 = t0 + Duration::from_secs(2);
        for i in 5_000..10_000u32 {
            assert_eq!(verdict(&l, &reg, at(i), t1).0, 'p');
        }
        assert_eq!(l.blocked_sources(), really_blocked(&l));
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let l = limiter("[ratelimit]\nregister_rate = 1\nregister_burst = 2\nblock_after = 100\n");
        let reg = request("REGISTER", "phone");
        let now = Instant::now();
        assert_eq!(verdict(&l, &reg, src("2001:db8:1:2::1"), now).0, 'p');
        assert_eq!(verdict(&l, &reg, src("2001:db8:1:2:ffff::9"), now).0, 'p');
        assert_eq!(verdict(&l, &reg, src("2001:db8:1:2::77"), now).0, 'a');
        assert_eq!(verdict(&l, &reg, src("2001:db8:1:3::1"), now).0, 'p');
    }

    #[test]
    fn transactions_in_flight_are_capped_per_source() {
        let l = limiter("[limits]\nmax_transactions_per_source = 3\n");
        let reg = request("REGISTER", "phone");
        let a = src("198.51.100.9");
        let now = Instant::now();
        let mut slots: Vec<TxSlot> = (0..3)
            .map(|_| {
                l.begin_transaction(&reg, a, now)
                    .expect("under the cap")
                    .expect("counted")
            })
            .collect();
        let refused = l.begin_transaction(&reg, a, now).expect_err("at the cap");
        let resp = Message::parse(refused).expect("503 parses");
        assert_eq!(resp.status(), Some(503));
        assert!(resp.header_value(HeaderName::RetryAfter).is_some());
        // Another source has its own count; a trunk is not counted.
        assert!(matches!(
            l.begin_transaction(&reg, src("198.51.100.10"), now),
            Ok(Some(_))
        ));
        assert!(matches!(
            l.begin_transaction(&reg, src("192.0.2.9"), now),
            Ok(None)
        ));
        // A finished transaction frees its slot.
        slots.pop();
        assert!(l.begin_transaction(&reg, a, now).is_ok());
    }
}
