//! SIP transports: UDP sockets and TCP/TLS connections, behind one non-blocking interface.
//!
//! # Shape
//!
//! [`Transports::start`] binds every [`ListenerSpec`] and spawns one task per UDP socket
//! (receive loop) and per stream listener (accept loop), plus one task per TCP/TLS connection
//! (reader, writer, idle timer). Everything received is delivered to a [`Handler`] as an
//! [`Inbound`]: the message bytes plus the [`Flow`] they arrived on. Everything sent goes
//! through [`Transports::send`] to a [`Dest`]: either exactly a flow (a reply over the
//! connection or socket a request came in on), or a transport address (a new request).
//! Streams are framed by [`sbc_sip::framing::StreamFramer`]; a UDP datagram is one message.
//!
//! # Why the handler is synchronous
//!
//! The proxy core is a synchronous state machine (parse, route, edit, forward, arm timers),
//! so it is called straight from the receiving task and sends by pushing onto queues: a UDP
//! send is a `try_send_to`, a stream send is a `try_send` onto the connection's bounded write
//! queue, a new connection is registered at once and connected in a spawned task. Nothing in
//! the message path awaits, so there is no per-message task or channel hop, and back-pressure
//! shows up as an error ([`SendError::QueueFull`]) instead of a stalled proxy. Failures that
//! can only be known later (connect refused or timed out, TLS handshake failure, a write that
//! fails on reset) come back through [`Handler::on_send_error`] for every message they
//! affect, so the proxy can fail a client transaction at once instead of waiting for Timer B/F.
//!
//! # Connection reuse
//!
//! Every stream connection, inbound or outbound, is indexed by (transport, remote address).
//! [`Dest::Addr`] first looks there (RFC 3261 18, RFC 5626): a request to a UA that connected
//! to us from that address goes back over its own connection (which is often the only way
//! through its NAT), and requests to a trunk share one connection. Only when no open
//! connection exists is one opened; it enters the index at once, so requests sent while it is
//! still connecting queue behind the first one instead of opening more. An outbound TLS
//! connection is reused only for the server name it was verified against (or when no name is
//! asked for); an inbound TLS connection, whose peer we never authenticated, is reused like an
//! inbound TCP one, which is what RFC 3261 18 connection reuse does for a UA's registration. [`Dest::Flow`]
//! never falls back: if that connection is gone the send fails with [`SendError::FlowGone`]
//! (a response must go back the way the request came, RFC 3261 18.2.2).
//!
//! Identity of a stream flow is its [`ConnId`]; the [`Flow`] value of a connection never
//! changes over its life, so it can be used as a map key and is equal in `send`'s return, in
//! every [`Inbound`] on that connection, and in [`Handler::on_flow_closed`].

mod sockets;
mod stamp;
mod stats;
mod stream;
mod tls;
mod udp;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use sbc_sip::Transport;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;

pub use tls::{
    client_tls, load_certified_key, load_reloadable_server_tls, load_server_tls, ServerCert,
    TlsError,
};

use stats::CloseReason;
use stream::ConnTable;
use udp::UdpEntry;

/// Identifies one TCP/TLS connection for its whole life; never reused within a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Where a message came from or went over: enough to send a reply over the same flow (the
/// same UDP socket to the same remote, or the same connection).
///
/// For an outbound connection `local` is the unspecified address of the remote's family with
/// port 0: the Flow is handed out by [`Transports::send`] before the connect has happened,
/// and it is kept unchanged afterwards so that the value stays equal for the connection's
/// whole life. The actual local address is logged when the connection is established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection, for TCP/TLS; `None` for UDP.
    pub conn: Option<ConnId>,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} <-> {}", self.transport, self.local, self.remote)?;
        if let Some(ConnId(id)) = self.conn {
            write!(f, " #{id}")?;
        }
        Ok(())
    }
}

/// One received SIP message (not yet parsed).
#[derive(Clone, Debug)]
pub struct Inbound {
    pub flow: Flow,
    pub data: Bytes,
    /// When the read that completed it returned, for latency accounting.
    pub received_at: Instant,
    /// How long it waited in the kernel's socket queue before that read, from the kernel's
    /// arrival stamp (UDP: of its datagram; TCP/TLS: of the newest segment that read took;
    /// zero where unknown): the SBC's overload signal.
    pub queued: Duration,
}

/// Where [`Transports::send`] delivers a message.
#[derive(Clone, Debug)]
pub enum Dest {
    /// Exactly this flow. For TCP/TLS the connection must still be open, else
    /// [`SendError::FlowGone`]; for UDP the datagram goes from the socket bound at
    /// `flow.local` to `flow.remote`.
    Flow(Flow),
    /// A transport address: reuse any open connection to `remote` of that transport (inbound
    /// or outbound), else open one. For TLS the certificate is verified against
    /// `server_name`, or against the IP address when it is `None`, and that name is the SNI.
    /// For UDP the datagram goes from the first UDP listener of the remote's address family
    /// that can plausibly reach it.
    Addr {
        transport: Transport,
        remote: SocketAddr,
        server_name: Option<Arc<str>>,
    },
}

/// A socket to listen on. `tls` is required for, and only allowed with, `Transport::Tls`.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Limits and timers of all transports.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Largest message accepted (headers + body): bigger datagrams are dropped, a stream
    /// announcing one is closed.
    pub max_message_size: usize,
    /// A connection with no byte received and no message sent for this long is closed.
    pub idle_timeout: Duration,
    /// A peer that has started a message must finish it within this time (slow senders).
    pub message_timeout: Duration,
    /// Outbound TCP connect limit.
    pub connect_timeout: Duration,
    /// TLS handshake limit, inbound and outbound.
    pub tls_handshake_timeout: Duration,
    /// All TCP/TLS connections, inbound and outbound.
    pub max_connections: usize,
    /// Inbound TCP/TLS connections from one source IP.
    pub max_connections_per_source: usize,
    /// Used for every outbound TLS connection.
    pub tls_client: Arc<rustls::ClientConfig>,
}

impl TransportConfig {
    /// Defaults that suit a production SBC: 64 KiB messages, connections idle for 10 minutes
    /// closed (longer than the usual 2-5 minute CRLF keep-alive period), 5 s connect and
    /// handshake timeouts, 100 000 connections, 64 per source IP.
    pub fn with_defaults(tls_client: Arc<rustls::ClientConfig>) -> Self {
        TransportConfig {
            max_message_size: 65535,
            idle_timeout: Duration::from_secs(600),
            message_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(5),
            max_connections: 100_000,
            max_connections_per_source: 64,
            tls_client,
        }
    }
}

/// Hands a message to the handler and survives a panic in it. A bug that one message
/// triggers must cost that message only: on UDP the receiving thread is the only one reading
/// its socket, so losing it would silence the SBC for everyone on that address (the fuzzers
/// found such a bug once, in SDP rewriting). Locks are parking_lot's, which unlock on unwind
/// and do not poison, so the next message finds the state usable.
pub(crate) fn deliver(handler: &dyn Handler, msg: Inbound) {
    let flow = msg.flow;
    let run = std::panic::AssertUnwindSafe(|| handler.on_message(msg));
    if std::panic::catch_unwind(run).is_err() {
        metrics::counter!("sbc_handler_panics_total").increment(1);
        tracing::error!(%flow, "message handler panicked; the message is dropped, the SBC goes on");
    }
}

/// The proxy side of the transports. Called from transport tasks; no method may block.
pub trait Handler: Send + Sync + 'static {
    /// A message arrived. Called on the receiving task, so the next read on that socket or
    /// connection waits until this returns.
    fn on_message(&self, msg: Inbound);

    /// A TCP/TLS connection the handler knows about ended (called once per connection).
    /// Known means: an inbound connection that was accepted (and whose TLS handshake
    /// completed), or an outbound one whose Flow `send` returned, even if it never connected.
    fn on_flow_closed(&self, _flow: &Flow) {}

    /// A message `send` accepted could not be delivered (connect refused or timed out, TLS
    /// handshake failure, write error, or the connection closed with it still queued), so the
    /// proxy can fail the branch at once. `dest` is what the message was sent to.
    fn on_send_error(&self, _dest: &Dest, _data: &Bytes, _err: &SendError) {}
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection of a `Dest::Flow` is closed (or the UDP socket is not ours).
    #[error("flow no longer exists")]
    FlowGone,
    /// No listener socket of that transport and address family to send from.
    #[error("no {0} socket for that address family")]
    NoListener(Transport),
    /// The connection's write queue is full; the connection is being closed.
    #[error("connection write queue full")]
    QueueFull,
    /// Opening another connection would exceed `max_connections`.
    #[error("connection limit reached")]
    ConnectionLimit,
    /// The TLS server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    BadServerName(Arc<str>),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake timed out")]
    TlsHandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
    /// [`Transports::shutdown`] was called.
    #[error("transports are shut down")]
    Shutdown,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// State shared by the public handle and every task.
struct Inner {
    cfg: TransportConfig,
    handler: Arc<dyn Handler>,
    /// Lets the synchronous `send` spawn connects and blocked UDP sends from any thread.
    rt: Handle,
    /// Emptied at shutdown so the sockets close once their tasks end.
    udp: RwLock<Vec<Arc<UdpEntry>>>,
    table: Mutex<ConnTable>,
    next_conn: AtomicU64,
    shut_down: AtomicBool,
}

/// The running transports. Dropping the last handle shuts them down; note that a handler
/// holding an `Arc<Transports>` keeps them alive, so call [`Transports::shutdown`] explicitly.
pub struct Transports {
    inner: Arc<Inner>,
    local_addrs: Vec<(Transport, SocketAddr)>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Transports {
    /// Binds every listener (IPv6 sockets with IPV6_V6ONLY), then spawns the receive and
    /// accept tasks on the current runtime. Fails without starting anything if any bind
    /// fails, or if a TLS listener has no server config (or a non-TLS one has one).
    pub async fn start(
        listeners: Vec<ListenerSpec>,
        cfg: TransportConfig,
        handler: Arc<dyn Handler>,
    ) -> io::Result<Arc<Transports>> {
        let mut udp = Vec::new();
        let mut streams = Vec::new();
        let mut local_addrs = Vec::new();
        for spec in listeners {
            match (spec.transport, spec.tls) {
                (Transport::Udp, None) => {
                    let socket = sockets::bind_udp(spec.addr)?;
                    let local = socket.local_addr()?;
                    local_addrs.push((Transport::Udp, local));
                    udp.push(Arc::new(UdpEntry { socket, local }));
                }
                (Transport::Tcp, None) => {
                    let listener = sockets::bind_tcp(spec.addr)?;
                    let local = listener.local_addr()?;
                    local_addrs.push((Transport::Tcp, local));
                    streams.push((Transport::Tcp, listener, local, None));
                }
                (Transport::Tls, Some(server)) => {
                    let listener = sockets::bind_tcp(spec.addr)?;
                    let local = listener.local_addr()?;
                    local_addrs.push((Transport::Tls, local));
                    streams.push((
                        Transport::Tls,
                        listener,
                        local,
                        Some(TlsAcceptor::from(server)),
                    ));
                }
                (transport, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{transport} listener {}: TLS config must be given exactly for TLS",
                            spec.addr
                        ),
                    ))
                }
            }
        }
        let inner = Arc::new(Inner {
            cfg,
            handler,
            rt: Handle::current(),
            udp: RwLock::new(udp.clone()),
            table: Mutex::new(ConnTable::default()),
            next_conn: AtomicU64::new(1),
            shut_down: AtomicBool::new(false),
        });
        let mut tasks = Vec::new();
        for entry in udp {
            tracing::info!(local = %entry.local, "listening on UDP");
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("sip-udp {}", entry.local))
                .spawn(move || udp::recv_thread(inner, entry))?;
        }
        for (transport, listener, local, acceptor) in streams {
            tracing::info!(%local, "listening on {transport}");
            let task = tokio::spawn(stream::accept_loop(
                inner.clone(),
                transport,
                listener,
                local,
                acceptor,
            ));
            tasks.push(task.abort_handle());
        }
        Ok(Arc::new(Transports {
            inner,
            local_addrs,
            tasks: Mutex::new(tasks),
        }))
    }

    /// Sends one whole message without blocking and returns the flow it went over.
    ///
    /// UDP goes out at once (or, if the socket buffer is full, from a spawned task). Streams
    /// enqueue on the connection's bounded write queue; a full queue fails with `QueueFull`
    /// and closes that connection. A new outbound connection gets its [`ConnId`] here and is
    /// connected in a spawned task; its returned Flow has an unspecified `local` (see
    /// [`Flow`]). `Ok` means accepted for delivery: later failures go to
    /// [`Handler::on_send_error`].
    pub fn send(&self, dest: &Dest, data: Bytes) -> Result<Flow, SendError> {
        let inner = &self.inner;
        if inner.shut_down.load(Ordering::Acquire) {
            return Err(SendError::Shutdown);
        }
        match dest {
            Dest::Flow(flow) => match (flow.transport, flow.conn) {
                (Transport::Udp, _) => {
                    let entry = inner.udp_at(flow.local).ok_or(SendError::FlowGone)?;
                    inner.send_udp(entry, flow.remote, dest, data)
                }
                (transport, Some(id)) => inner.send_on_conn(id, transport, dest, data),
                (_, None) => Err(SendError::FlowGone),
            },
            Dest::Addr {
                transport: Transport::Udp,
                remote,
                ..
            } => {
                let entry = inner
                    .udp_for(*remote)
                    .ok_or(SendError::NoListener(Transport::Udp))?;
                inner.send_udp(entry, *remote, dest, data)
            }
            Dest::Addr {
                transport,
                remote,
                server_name,
            } => inner.send_stream_addr(*transport, *remote, server_name.as_ref(), dest, data),
        }
    }

    /// The bound addresses, with port 0 resolved to the actual port.
    pub fn local_addrs(&self) -> Vec<(Transport, SocketAddr)> {
        self.local_addrs.clone()
    }

    /// Closes a TCP/TLS flow on purpose: after a failover a phone whose flow drops
    /// registers again at once (RFC 5626 4.4), which moves it to the new active node far
    /// sooner than its refresh timer would. Returns whether the connection was open; the
    /// close itself (and `on_flow_closed`) follows from the connection's task.
    pub fn close_flow(&self, flow: &Flow) -> bool {
        let Some(id) = flow.conn else { return false };
        self.inner
            .table
            .lock()
            .close_one(id, CloseReason::Reregister)
    }

    /// Open and opening TCP/TLS connections.
    pub fn connection_count(&self) -> usize {
        self.inner.table.lock().len()
    }

    /// Stops accepting and receiving, closes every connection (each still gets
    /// `on_flow_closed`, and queued messages `on_send_error`), and makes `send` fail with
    /// `Shutdown`. Returns at once; connection tasks finish shortly after.
    pub fn shutdown(&self) {
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut table = self.inner.table.lock();
            table.shut_down = true;
            table.close_all(CloseReason::Shutdown);
        }
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        self.inner.udp.write().clear();
        tracing::info!("transports shut down");
    }
}

impl Drop for Transports {
    fn drop(&mut self) {
        self.shutdown();
    }
}
