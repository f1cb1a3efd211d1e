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
}

impl Default for General {
    fn default() -> Self {
        General {
            name: "sbc".to_string(),
            secret: None,
        }
    }
}

/// Redacts the secret, so logging the configuration never leaks the key.
impl fmt::Debug for General {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("General")
            .field("name", &self.name)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
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
    /// (2..=256, default 32).
    pub max_via: usize,
    /// A TCP/TLS connection without traffic for this long is closed
    /// (10 s..=86400 s, default 300 s).
    pub idle_timeout: Duration,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 65535,
            max_headers: 128,
            max_via: 70,
            idle_timeout: Duration::from_secs(300),
            tcp_connect_timeout: Duration::from_millis(2000),
            tls_handshake_timeout: Duration::from_millis(5000),
            max_connections: 10000,
            max_connections_per_source: 256,
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

/// A group of interchangeable PBX nodes; calls routed to the pool are
/// spread over (and fail over between) its healthy nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Unique name that trunks and phones refer to.
    pub name: String,
    /// Members of the pool; never empty.
    pub nodes: Vec<Node>,
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
}

impl Default for Phones {
    fn default() -> Self {
        Phones {
            domains: Vec::new(),
            pool: String::new(),
            // Ipv4Net/Ipv6Net default to 0.0.0.0/0 and ::/0.
            sources: vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
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
