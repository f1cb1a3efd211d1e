//! The resolved configuration the rest of the SBC runs on.
//!
//! Everything here has already been validated: addresses are parsed and
//! resolved, paths are absolute and exist, references between sections
//! point at things that exist. Code that consumes a [`Config`] never has to
//! re-check it or handle a "bad config" case at run time.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A fully validated SBC configuration, as loaded from one TOML file.
///
/// Built only by [`crate::load`] / [`crate::parse`], so holding one means
/// the file was accepted as a whole: the SBC either starts with all of it or
/// refuses to start and names the offending line.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Identity of this SBC instance (`[general]`).
    pub general: General,
    /// Sockets to accept SIP on (`[[listen]]`); never empty.
    pub listen: Vec<Listener>,
    /// Resource limits protecting the SBC from oversized or abusive peers (`[limits]`).
    pub limits: Limits,
    /// RFC 3261 transaction timers (`[timers]`).
    pub timers: Timers,
    /// Groups of PBX nodes calls are routed to (`[[pool]]`); never empty.
    pub pools: Vec<Pool>,
    /// SIP carriers the SBC accepts calls from and sends calls to (`[[trunk]]`).
    pub trunks: Vec<Trunk>,
    /// Which phones may register and call, and where they are routed (`[phones]`).
    pub phones: Phones,
    /// The local HTTP admin/metrics endpoint (`[admin]`).
    pub admin: Admin,
    /// Media anchoring: where the RTP relay binds and what it advertises (`[media]`).
    pub media: Media,
    /// Per-source request rate limits, blocking and scanner filtering (`[ratelimit]`).
    pub ratelimit: RateLimit,
    /// Absolute path of the file this was loaded from, so a reload (SIGHUP)
    /// re-reads the same file whatever the working directory is by then.
    pub source: PathBuf,
}

impl Config {
    /// Finds a pool by name, so routing can follow a trunk's or the phones'
    /// `pool` reference (which validation guarantees exists).
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// Identity of the SBC instance.
#[derive(Clone, PartialEq)]
pub struct General {
    /// Name shown in logs and in the `Server`/`User-Agent` headers, so an
    /// operator can tell which SBC of a cluster handled a call.
    /// Default `"sbc"`.
    pub name: String,
    /// Key for the HMAC that signs flow tokens in `Path`/`Record-Route`.
    /// Setting the same secret on all SBCs of a cluster (and across
    /// restarts) keeps registrations and dialogs working when a request
    /// comes back through another node or after a restart. `None` means a
    /// random key per process. At least 16 characters when set.
    pub secret: Option<String>,
    /// On SIGTERM, drain for up to this long before stopping: new calls get 503 while the
    /// calls in progress end (a planned restart of one SBC of a cluster drops no call).
    /// Zero (the default) stops at once, as a single SBC should: while it drains, nobody
    /// takes its new calls. Also the default length of an operator's `POST /drain` when
    /// set.
    pub drain: std::time::Duration,
}

impl Default for General {
    fn default() -> Self {
        General {
            name: "sbc".to_string(),
            secret: None,
            drain: std::time::Duration::ZERO,
        }
    }
}

/// Redacts the secret, so logging the configuration never leaks the key.
impl fmt::Debug for General {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("General")
            .field("name", &self.name)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("drain", &self.drain)
            .finish()
    }
}

/// SIP transport of a listener or a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// SIP over UDP (the default, what most phones and carriers speak).
    #[default]
    Udp,
    /// SIP over TCP.
    Tcp,
    /// SIP over TLS (over TCP).
    Tls,
}

impl Transport {
    /// The port used when an address leaves it out: 5060 for UDP/TCP,
    /// 5061 for TLS (RFC 3261 19.1.2), so configs can write just a host.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Udp | Transport::Tcp => 5060,
            Transport::Tls => 5061,
        }
    }

    /// The spelling used in the config file (`"udp"`, `"tcp"`, `"tls"`),
    /// so logs and messages use the same words the operator wrote.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Whether this transport runs over a TCP stream; two stream listeners
    /// (TCP and TLS) cannot share one address and port.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kind of peer a listener faces, so internal PBX traffic and
/// untrusted public traffic can be kept on separate sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Side {
    /// Phones and trunks (the untrusted side).
    Public,
    /// PBX nodes (the trusted side).
    Internal,
    /// Both public and internal peers (the default; fine for small setups).
    #[default]
    Both,
}

impl Side {
    /// Whether phones and trunks may use this listener.
    pub fn faces_public(self) -> bool {
        matches!(self, Side::Public | Side::Both)
    }

    /// Whether PBX nodes may use this listener.
    pub fn faces_internal(self) -> bool {
        matches!(self, Side::Internal | Side::Both)
    }

    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Public => "public",
            Side::Internal => "internal",
            Side::Both => "both",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host (and port) the SBC writes into `Via`, `Record-Route` and `Path`
/// for a listener, so peers can reach it back even when it binds a wildcard
/// address or sits behind NAT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Advertise {
    /// A hostname, an IPv4 address or a bracketed IPv6 reference
    /// (`[2001:db8::1]`), i.e. the SIP `host` production, ready to be
    /// written into a header as is.
    pub host: String,
    /// Port to write; `None` writes no port, so the peer uses the
    /// transport's default (or DNS SRV for a hostname).
    pub port: Option<u16>,
}

impl fmt::Display for Advertise {
    /// Formats as `host[:port]`, the form used in SIP headers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{}", self.host, port),
            None => f.write_str(&self.host),
        }
    }
}

/// One socket the SBC accepts SIP on.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Transport spoken on this socket.
    pub transport: Transport,
    /// Address to bind; port 0 lets the OS pick one (used by tests).
    pub addr: SocketAddr,
    /// What to tell peers to reach this listener by; always set when `addr`
    /// is a wildcard (`0.0.0.0` / `::`), since a wildcard cannot be written
    /// into a header.
    pub advertise: Option<Advertise>,
    /// Which peers this listener faces.
    pub side: Side,
    /// PEM certificate chain presented to TLS clients; `Some` exactly when
    /// `transport` is TLS, and the file existed at load time.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`; `Some` exactly when `transport` is TLS,
    /// and the file existed at load time.
    pub key: Option<PathBuf>,
}

impl Listener {
    /// The host and port to write into headers for this listener: the
    /// configured `advertise`, else the bound address, so callers never
    /// have to special-case a missing `advertise`.
    pub fn advertised(&self) -> Advertise {
        match &self.advertise {
            Some(a) => a.clone(),
            None => Advertise {
                host: host_text(self.addr.ip()),
                port: Some(self.addr.port()),
            },
        }
    }
}

fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Resource limits that keep a misbehaving or hostile peer from exhausting
/// memory, file descriptors or parser time.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest SIP message accepted, in bytes (1024..=1048576, default 65535).
    pub max_message_size: usize,
    /// Most header fields in one message (8..=1024, default 128).
    pub max_headers: usize,
    /// Most `Via` entries in one message, bounding loops and amplification
    /// (2..=256, default 70: RFC 4475 "longreq" carries 34 and must pass).
    pub max_via: usize,
    /// A TCP/TLS connection without traffic for this long is closed
    /// (10 s..=86400 s, default 300 s).
    pub idle_timeout: Duration,
    /// A TCP/TLS peer that has started a message must finish it within this
    /// time, or the connection is closed (1000 ms..=60000 ms, default 5000 ms).
    /// Stops slow senders ("slowloris"): a byte every few seconds would keep
    /// a connection and its buffer forever under the idle timeout alone.
    pub message_timeout: Duration,
    /// Give up connecting to a TCP/TLS peer after this long
    /// (100 ms..=60000 ms, default 2000 ms).
    pub tcp_connect_timeout: Duration,
    /// Drop a TLS connection whose handshake has not finished after this
    /// long (100 ms..=60000 ms, default 5000 ms).
    pub tls_handshake_timeout: Duration,
    /// Most simultaneous TCP/TLS connections (1..=1000000, default 10000).
    pub max_connections: usize,
    /// Most simultaneous TCP/TLS connections from one source IP
    /// (1..=max_connections, default 256).
    pub max_connections_per_source: usize,
    /// Most server transactions in flight from one source IP
    /// (1..=1000000, default 1000); a new request past it is answered 503
    /// with Retry-After. Bounds the memory one source can pin in the
    /// transaction table (each entry lives until its timers end, up to
    /// 32 s after the final response on UDP). Sources that `[ratelimit]`
    /// exempts (trunks and PBX nodes by default) are not counted.
    pub max_transactions_per_source: usize,
    /// A new INVITE that waited longer than this in the SBC's socket queue (UDP,
    /// TCP or TLS) before the SBC could read it is answered 503 with Retry-After at once,
    /// without routing or media (0..=60000 ms, default 100 ms; 0 turns it off).
    /// Overload protection: past its capacity the SBC sheds the cheapest way,
    /// and its queue stays short enough that no sender's T1 (500 ms) runs out
    /// on a message waiting in it; a queue that lets retransmissions start
    /// swamps the SBC with them (benchmarks/README.md, "Overload").
    pub overload_queue: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 65535,
            max_headers: 128,
            max_via: 70,
            idle_timeout: Duration::from_secs(300),
            message_timeout: Duration::from_millis(5000),
            tcp_connect_timeout: Duration::from_millis(2000),
            tls_handshake_timeout: Duration::from_millis(5000),
            max_connections: 10000,
            max_connections_per_source: 256,
            max_transactions_per_source: 1000,
            overload_queue: Duration::from_millis(100),
        }
    }
}

/// A token bucket: a sustained rate and how far a source may run ahead of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second allowed on average (1..=100000).
    pub per_second: u32,
    /// Requests allowed at once after a quiet spell (1..=100000); a phone
    /// that boots registers, subscribes and probes in a burst.
    pub burst: u32,
}

/// User-Agent substrings of well-known SIP scanners, matched
/// case-insensitively; the default of `[ratelimit] scanner_agents`.
///
/// These tools probe every reachable SIP port for open relays and weak
/// passwords; answering them only confirms that a SIP server is there.
pub const DEFAULT_SCANNER_AGENTS: [&str; 12] = [
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "sundayddr",
    "iwar",
    "sip-scan",
    "sipscan",
    "sipsak",
    "smap",
    "pplsip",
    "siparmyknife",
];

/// Per-source rate limiting of the requests attackers repeat (REGISTER for
/// password guessing, INVITE for toll fraud, OPTIONS for scanning), so one
/// source cannot crowd out the others or flood the PBX behind the SBC.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Whether rate limits and scanner filtering apply at all (default true).
    pub enabled: bool,
    /// REGISTER per source (default 20/s, burst 100: an office of phones
    /// behind one NAT address re-registers in waves).
    pub register: Rate,
    /// INVITE per source (default 10/s, burst 50).
    pub invite: Rate,
    /// OPTIONS per source (default 20/s, burst 100).
    pub options: Rate,
    /// Requests refused with 503 after which a source that keeps going is
    /// blocked (1..=100000, default 10): a client that honours Retry-After
    /// never gets there, a flooder does at once.
    pub block_after: u32,
    /// How long a blocked source's requests are dropped without an answer
    /// (1 s..=86400 s, default 300 s).
    pub block_time: Duration,
    /// Most sources tracked at once (1024..=10000000, default 65536); the
    /// least recently seen are forgotten first, so memory stays bounded
    /// whatever the number of addresses an attacker sends from. IPv6
    /// sources are tracked per /64, the block a single host usually holds.
    pub max_sources: usize,
    /// Trunk sources are not limited (default true): a carrier's traffic is
    /// the business, and its addresses are configured.
    pub exempt_trunks: bool,
    /// PBX nodes are not limited (default true): they send on behalf of
    /// every phone.
    pub exempt_nodes: bool,
    /// Requests whose User-Agent contains one of [`RateLimit::scanner_agents`]
    /// are dropped without an answer (default true).
    pub drop_scanners: bool,
    /// Lower-cased User-Agent substrings that mark a scanner (default
    /// [`DEFAULT_SCANNER_AGENTS`]); never empty strings.
    pub scanner_agents: Vec<String>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            enabled: true,
            register: Rate {
                per_second: 20,
                burst: 100,
            },
            invite: Rate {
                per_second: 10,
                burst: 50,
            },
            options: Rate {
                per_second: 20,
                burst: 100,
            },
            block_after: 10,
            block_time: Duration::from_secs(300),
            max_sources: 65536,
            exempt_trunks: true,
            exempt_nodes: true,
            drop_scanners: true,
            scanner_agents: DEFAULT_SCANNER_AGENTS
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
        }
    }
}

/// RFC 3261 transaction timers; tuning them trades failover speed against
/// tolerance of slow or lossy links.
#[derive(Debug, Clone, PartialEq)]
pub struct Timers {
    /// Round-trip estimate, base of retransmission timers (1 ms..=10000 ms,
    /// default 500 ms).
    pub t1: Duration,
    /// Cap on non-INVITE request and INVITE response retransmit intervals
    /// (t1..=60000 ms, default 4000 ms).
    pub t2: Duration,
    /// How long a message may stay in the network (0..=60000 ms, default
    /// 5000 ms).
    pub t4: Duration,
    /// Proxy INVITE transaction timeout (timer C): an unanswered INVITE is
    /// cancelled after this long (10 s..=86400 s, default 180 s).
    pub timer_c: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_millis(4000),
            t4: Duration::from_millis(5000),
            timer_c: Duration::from_secs(180),
        }
    }
}

/// A group of PBX nodes in priority order: the first is the primary, the
/// others stand by. New calls and registrations go to the pool's active
/// node; the health monitor moves that role when the active node fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Unique name that trunks and phones refer to.
    pub name: String,
    /// Members of the pool in priority order (primary first); never empty.
    pub nodes: Vec<Node>,
    /// Whether traffic returns to the primary by itself once it is healthy
    /// again, or only when an operator says so (`failback`, default manual).
    pub failback: Failback,
    /// With [`Failback::Auto`], how long the primary must have stayed Up
    /// without a single failed check before traffic moves back to it
    /// (`failback_hold_secs`, 1..=86400 s, default 300 s). Guards against a
    /// flapping primary pulling traffic back and forth.
    pub failback_hold: Duration,
    /// A new INVITE or REGISTER that has had no response from a node within
    /// this time is retried on the next candidate node (`branch_timeout_ms`,
    /// 50..=32000 ms, default 1000 ms). A healthy PBX answers 100 Trying in
    /// milliseconds, so this is far below Timer B and callers barely notice
    /// a dead node while probes are still counting.
    pub branch_timeout: Duration,
    /// A new INVITE or REGISTER that has had no response at all (not even
    /// 100 Trying, which RFC 3261 wants within 200 ms) from a node for this
    /// long makes the node Suspect, so the calls behind it go to the next
    /// ready node first, while this one still waits out its branch timeout
    /// (`suspect_after_ms`, 0 = off, below `branch_timeout_ms`, default
    /// 250 ms). It counts no failure: only probes and real failures bring a
    /// node Down.
    pub suspect_after: Option<Duration>,
    /// After each successful registration on the active node, register the
    /// same contact (with its Path) on the other nodes too, so calls to the
    /// phone work on a standby the moment it becomes active
    /// (`shadow_registration`, default false). Only for standbys that trust
    /// the SBC by source address: the SBC holds no phone credentials.
    pub shadow_registration: bool,
    /// How the pool's nodes are probed (`[pool.probe]`).
    pub probe: Probe,
    /// HTTP requests fired on failover and failback (`[[pool.webhook]]`),
    /// e.g. to repoint DNS or wake a passive standby.
    pub webhooks: Vec<Webhook>,
}

/// When traffic moves back to a recovered primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Failback {
    /// Only on an operator's command (the default): a primary that flaps
    /// can never cause repeated switches, and the operator decides when the
    /// recovered node is trustworthy.
    #[default]
    Manual,
    /// By itself, once the primary has been Up for [`Pool::failback_hold`].
    Auto,
}

impl Failback {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Failback::Manual => "manual",
            Failback::Auto => "auto",
        }
    }
}

impl fmt::Display for Failback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Probe settings of a pool (`[pool.probe]`), shared by its nodes so that
/// interchangeable nodes are judged by the same rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Time between the starts of two probes of one node
    /// (`interval_ms`, 100..=600000 ms, default 1000 ms).
    pub interval: Duration,
    /// A probe without an answer after this long has failed (`timeout_ms`,
    /// 10 ms..interval, default 800 ms or 4/5 of a shorter interval). Kept
    /// below the interval so that one probe per node is ever in flight.
    pub timeout: Duration,
    /// Consecutive failures that take a node Down (`failures`, 1..=100,
    /// default 2); the first failure already makes it Suspect.
    pub failures: u32,
    /// Consecutive successes that bring a Down node back Up (`successes`,
    /// 1..=100, default 2).
    pub successes: u32,
    /// SIP response codes to OPTIONS that count as alive (`alive_codes`,
    /// each 200..=699). Empty (the default) means any final response the
    /// node itself sent except 503: many PBXs answer OPTIONS with 404 or
    /// 405, which still proves they run, while 503 is the node saying it
    /// cannot serve.
    pub alive_codes: Vec<u16>,
    /// Failures of a node that has never answered are not counted until
    /// this long after start (`start_grace_secs`, 0..=3600 s, default 30 s),
    /// so a PBX that boots slower than the SBC is not declared Down.
    pub start_grace: Duration,
    /// Always-on HTTP(S) URLs (`witnesses`, default none). Before failing
    /// over, the SBC must reach one of these or another node of the pool;
    /// if it reaches nothing, the fault is on its own side and it stays.
    pub witnesses: Vec<String>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(800),
            failures: 2,
            successes: 2,
            alive_codes: Vec::new(),
            start_grace: Duration::from_secs(30),
            witnesses: Vec::new(),
        }
    }
}

impl Probe {
    /// Whether an OPTIONS response with `code` proves the node alive under
    /// these settings (see [`Probe::alive_codes`]); provisional responses
    /// never do, as they may come from a proxy in between.
    pub fn is_alive_code(&self, code: u16) -> bool {
        if self.alive_codes.is_empty() {
            (200..=699).contains(&code) && code != 503
        } else {
            self.alive_codes.contains(&code)
        }
    }
}

/// What a webhook fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookEvent {
    /// The pool's active node moved away from a failed (or manually
    /// failed-over, or maintained) node.
    Failover,
    /// The pool's active node moved back to a node of higher priority.
    Failback,
}

impl WebhookEvent {
    /// The spelling used in the config file and in the `{event}` placeholder.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Failover => "failover",
            WebhookEvent::Failback => "failback",
        }
    }
}

impl fmt::Display for WebhookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Placeholders a webhook body may contain, as `{name}`.
///
/// `pool` is the pool's name, `from`/`to` the node names, `reason` why the
/// active node moved, `time` the moment in RFC 3339 (UTC), `event`
/// `failover` or `failback`.
pub const TEMPLATE_PLACEHOLDERS: [&str; 6] = ["pool", "from", "to", "reason", "time", "event"];

/// An HTTP request the SBC sends when a pool fails over or back
/// (`[[pool.webhook]]`); how operators repoint DNS or wake a standby.
#[derive(Clone, PartialEq)]
pub struct Webhook {
    /// Events that fire it (`on`, default both); never empty, no repeats.
    pub on: Vec<WebhookEvent>,
    /// Upper-case HTTP method (`method`: GET, POST, PUT, PATCH or DELETE;
    /// default POST).
    pub method: String,
    /// `http://` or `https://` URL (`url`, required); see [`HttpUrl`].
    pub url: String,
    /// Extra request headers (`headers`), sorted by name. Values are kept
    /// out of `Debug` output because they usually carry credentials.
    pub headers: Vec<(String, String)>,
    /// Request body template (`body`); `{pool}`, `{from}`, `{to}`,
    /// `{reason}`, `{time}`, `{event}` are filled in (see
    /// [`fill_template`]). Default: a JSON object with all of them.
    pub body: String,
    /// Give up one attempt after this long (`timeout_ms`, 100..=60000 ms,
    /// default 2000 ms).
    pub timeout: Duration,
    /// Further attempts after a failed one, with growing pauses between
    /// (`retries`, 0..=10, default 2).
    pub retries: u32,
}

impl Webhook {
    /// The body used when `body` is not set: every placeholder as JSON.
    pub const DEFAULT_BODY: &'static str = r#"{"event":"{event}","pool":"{pool}","from":"{from}","to":"{to}","reason":"{reason}","time":"{time}"}"#;

    /// Whether this webhook fires on `event`.
    pub fn fires_on(&self, event: WebhookEvent) -> bool {
        self.on.contains(&event)
    }
}

/// Redacts header values (they usually hold a bearer token or password),
/// so logging the configuration never leaks them.
impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, _)| (name.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("Webhook")
            .field("on", &self.on)
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body", &self.body)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// Fills the `{name}` placeholders of a webhook template with `value(name)`.
///
/// A placeholder is `{` + a lower-case identifier + `}`; any other brace is
/// literal, so JSON bodies need no escaping. Placeholders `value` does not
/// know are left as written (validation has already refused unknown ones
/// in the configuration). Values are inserted as given: the caller escapes
/// them for the body's format.
pub fn fill_template<'v>(template: &str, mut value: impl FnMut(&str) -> Option<&'v str>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some((before, name, after)) = next_placeholder(rest) {
        out.push_str(before);
        match value(name) {
            Some(v) => out.push_str(v),
            None => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Splits `text` at its first placeholder: (text before, name, text after).
pub(crate) fn next_placeholder(text: &str) -> Option<(&str, &str, &str)> {
    let mut from = 0;
    while let Some(open) = text[from..].find('{').map(|i| i + from) {
        let tail = &text[open + 1..];
        let len = tail
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        let starts_ok = tail
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        if starts_ok && tail.as_bytes().get(len) == Some(&b'}') {
            return Some((&text[..open], &tail[..len], &tail[len + 1..]));
        }
        from = open + 1;
    }
    None
}

/// A validated `http://` or `https://` URL, split into what an HTTP client
/// needs; probes, witnesses and webhooks use it so that what validation
/// accepted is exactly what the client sends to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpUrl {
    /// `https` (TLS) or plain `http`.
    pub tls: bool,
    /// Host as written in the URL and in the `Host` header: a name, an IPv4
    /// address or a bracketed IPv6 address.
    pub host: String,
    /// Port: as written, else 80 or 443.
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, starting with `/` (`/` when the URL has none).
    pub path: String,
}

impl HttpUrl {
    /// Parses and checks a URL: scheme http/https, a hostname, IPv4 or
    /// bracketed IPv6 host, an optional port 1..=65535, an optional path of
    /// printable ASCII. Credentials (`user@`) and fragments are refused:
    /// credentials belong in headers, and a fragment is never sent.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        crate::net::parse_http_url(url)
    }

    /// The host to look up or connect to: without IPv6 brackets.
    pub fn connect_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// The host as an IP address, when it is one (no DNS needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.connect_host().parse().ok()
    }
}

/// One PBX node the SBC forwards calls and registrations to.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Name unique across all pools, used in logs, metrics and health state.
    pub name: String,
    /// Where to send SIP, resolved once at load time.
    pub address: SocketAddr,
    /// The address as written in the file (e.g. `pbx-a.example.com:5060`),
    /// for logs and for re-resolving on reload.
    pub address_text: String,
    /// Transport used toward this node.
    pub transport: Transport,
    /// Name to send in TLS SNI and to verify the certificate against.
    /// For TLS peers it defaults to the address's hostname; `None` for an
    /// IP address (the certificate is then checked against the IP) and
    /// always `None` for UDP/TCP peers.
    pub tls_server_name: Option<String>,
    /// PEM file of trusted root certificates for this peer; `None` uses the
    /// system/webpki roots.
    pub tls_ca: Option<PathBuf>,
    /// Whether the node is probed with SIP OPTIONS over its own transport
    /// (`options`, default true). At least one of this and `http_url` is
    /// set, so every node has some probe.
    pub options: bool,
    /// HTTP(S) URL on the PBX's web server probed with GET; a 2xx answer
    /// counts as alive (`http_url`, default none). Validated by
    /// [`HttpUrl::parse`]. With both probes, a node is alive only when both
    /// answer: a PBX whose application server is gone is not healthy even
    /// if its SIP stack still replies.
    pub http_url: Option<String>,
}

/// A SIP carrier: where its calls come from and where calls to it go.
#[derive(Debug, Clone, PartialEq)]
pub struct Trunk {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Source networks that identify inbound traffic as this trunk's; an
    /// IP address is stored as a /32 or /128 network. Never empty.
    pub sources: Vec<IpNet>,
    /// Where calls toward this trunk are sent, resolved once at load time.
    pub address: SocketAddr,
    /// The address as written in the file.
    pub address_text: String,
    /// Transport used toward this trunk.
    pub transport: Transport,
    /// As [`Node::tls_server_name`].
    pub tls_server_name: Option<String>,
    /// As [`Node::tls_ca`].
    pub tls_ca: Option<PathBuf>,
    /// Request-URI hosts (lower-cased) that send a call from the PBX to this
    /// trunk; empty means the trunk is never chosen by domain.
    pub domains: Vec<String>,
    /// Name of the pool that inbound calls from this trunk are routed to;
    /// guaranteed to exist in [`Config::pools`].
    pub pool: String,
    /// Calls with this trunk at once, both directions, being set up or established (its
    /// channels); past it a new call gets 503. `None`: no limit.
    pub max_calls: Option<u32>,
}

/// Admission and routing of phones (SIP user agents on the public side).
#[derive(Debug, Clone, PartialEq)]
pub struct Phones {
    /// Domains (lower-cased) phones may register and call in; empty means
    /// any domain.
    pub domains: Vec<String>,
    /// Pool that REGISTERs and calls from phones are routed to; guaranteed
    /// to exist in [`Config::pools`]. `Default` leaves it empty because the
    /// documented default ("the first pool") depends on the file;
    /// [`crate::parse`] always fills it in.
    pub pool: String,
    /// Source networks phones may connect from (default: any IPv4 or IPv6).
    pub sources: Vec<IpNet>,
    /// Split expiry: the registration lifetime handed to phones, whatever
    /// the PBX granted (`expires_secs`, 0 = off, else 10..=86400, default
    /// 120 s). Phones then refresh often (keeping NAT bindings open and
    /// moving to a new active node within this time after a failover), while
    /// the SBC answers those refreshes itself and forwards one to the PBX
    /// only when the PBX's binding nears its end or something changed.
    pub expires: Option<Duration>,
    /// Random spread of [`Phones::expires`], in percent either way
    /// (`expires_spread_percent`, 0..=50, default 10), so phones that
    /// registered together do not refresh together.
    pub expires_spread_percent: u32,
    /// After a failover, TCP/TLS phones registered on the old node have
    /// their flow closed so they re-register at once (RFC 5626): this many
    /// flows per second at most, so the standby is not stormed
    /// (`reregister_rate`, 0 = off, default 50).
    pub reregister_rate: u32,
    /// Topology hiding (`hide_topology`, default true): requests from phones leave with the
    /// SBC's Via only, and phones' Contacts become sealed aliases on the SBC, so no PBX or
    /// carrier sees a phone's address in SIP (the media relay already hides it in SDP).
    pub hide_topology: bool,
}

impl Default for Phones {
    fn default() -> Self {
        Phones {
            domains: Vec::new(),
            pool: String::new(),
            // Ipv4Net/Ipv6Net default to 0.0.0.0/0 and ::/0.
            sources: vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
            expires: Some(Duration::from_secs(120)),
            expires_spread_percent: 10,
            reregister_rate: 50,
            hide_topology: true,
        }
    }
}

/// The local HTTP endpoint for health, metrics and admin commands.
#[derive(Clone, PartialEq)]
pub struct Admin {
    /// Address to serve on (default `127.0.0.1:9090`).
    pub listen: SocketAddr,
    /// Bearer token required by admin requests; always set when `listen`
    /// is not a loopback address, so the endpoint is never open to the
    /// network without authentication.
    pub token: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090),
            token: None,
        }
    }
}

/// Redacts the token, so logging the configuration never leaks it.
impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Media anchoring: the RTP/RTCP relay every call's media goes through.
///
/// Two sides, because an SBC usually sits between networks: the public
/// side (phones, trunks) and the internal side (PBX nodes). Each side binds
/// its relay ports on its own address and writes its own address into the
/// SDP it sends that way, so a PBX never sees a phone's address and a phone
/// never sees an internal one.
#[derive(Debug, Clone, PartialEq)]
pub struct Media {
    /// `false` passes SDP through untouched (signalling-only SBC).
    /// Default `true`.
    pub enabled: bool,
    /// Toward phones and trunks.
    pub public: MediaSide,
    /// Toward PBX nodes.
    pub internal: MediaSide,
    /// First port of the relay's range (even; RTP takes even ports, RTCP
    /// the odd one above). Default 30000.
    pub port_min: u16,
    /// Last port of the range. Default 39999.
    pub port_max: u16,
    /// Silence after which a call's media is declared dead, its ports
    /// released and the call torn down. Default 60 s.
    pub timeout: Duration,
    /// The same for a call on hold (`a=inactive`/`sendonly`, or `c=0.0.0.0`),
    /// where silence is normal. Default 3600 s.
    pub hold_timeout: Duration,
    /// After a call's PBX node died: how long a call whose media the PBX
    /// anchored itself (so its media died with the PBX) may stay silent on
    /// the PBX side before the SBC hangs it up. Default 5 s.
    pub unsaveable_timeout: Duration,
    /// How long the latched source must stay quiet before another source
    /// may take its place (a phone whose NAT binding changed), so a stray
    /// sender cannot hijack a running stream. Default 2000 ms.
    pub relatch_quiet: Duration,
    /// Forwarding threads; 0 means one per core. Default 0.
    pub workers: usize,
    /// How the forwarding threads talk to the kernel.
    pub io: MediaIo,
}

/// The relay's I/O interface. Both forward the same packets through the same kernel
/// UDP path; they differ in system calls per packet, which is most of the relay's own CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MediaIo {
    /// epoll + recvmmsg/sendmmsg: works on every kernel and under any seccomp profile.
    Epoll,
    /// io_uring (Linux 6.0+): multishot receives and batched sends, ~0.05 system calls per
    /// packet instead of ~2. Falls back to epoll, with a warning, where the kernel refuses
    /// a ring (too old, io_uring disabled, a container's seccomp filter).
    #[default]
    Uring,
}

/// One side of the relay.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaSide {
    /// Address the relay ports of this side bind on.
    pub address: IpAddr,
    /// Address written into SDP sent this way (`c=`), for a relay behind
    /// 1:1 NAT; defaults to `address`.
    pub advertise: IpAddr,
}
