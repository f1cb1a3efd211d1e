//! TCP and TLS: the connection table, the accept loops and one task per connection.
//!
//! Each connection is one task that runs its reader, its writer, its idle timer and its close
//! signal under a single `select!`; whichever ends first ends the connection, and dropping the
//! other futures drops the socket. The table entry is removed by a drop guard owned by that
//! task, so a connection is cleaned up exactly once however it ends (including a panic in the
//! handler or the runtime shutting down).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;
use rustls::pki_types::ServerName;
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::Transport;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::stats::{self, CloseReason};
use super::{ConnId, Dest, Flow, Inbound, Inner, SendError};

/// Messages a connection's write queue holds before `send` reports `QueueFull` and closes it:
/// a peer that far behind is not reading, and holding more only delays the failure.
pub(super) const WRITE_QUEUE_LEN: usize = 1024;

/// Size of one socket read.
const READ_CHUNK: usize = 16 * 1024;

/// A message waiting in a connection's write queue. The destination travels with it so a
/// delivery failure can be reported to the handler exactly as the caller addressed it; `None`
/// marks our own keep-alive answers, whose loss is nobody's business.
pub(super) struct Outgoing {
    data: Bytes,
    dest: Option<Dest>,
}

/// Shared between the table entry and the connection task: lets `send` and `shutdown` ask the
/// task to close without holding its socket.
pub(super) struct ConnCtl {
    close: Notify,
    /// 0 while open, else the `CloseReason` asked for.
    requested: AtomicU8,
}

impl ConnCtl {
    fn new() -> Self {
        ConnCtl {
            close: Notify::new(),
            requested: AtomicU8::new(0),
        }
    }

    pub(super) fn request_close(&self, reason: CloseReason) {
        // First request wins; the permit stored by notify_one reaches the task even if it is
        // not waiting yet.
        if self
            .requested
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.close.notify_one();
        }
    }

    fn is_closing(&self) -> bool {
        self.requested.load(Ordering::Acquire) != 0
    }

    fn reason(&self) -> CloseReason {
        CloseReason::from_u8(self.requested.load(Ordering::Acquire)).unwrap_or(CloseReason::Error)
    }
}

struct ConnEntry {
    /// Fixed when the entry is created (see `Flow` docs on outbound `local`).
    flow: Flow,
    tx: mpsc::Sender<Outgoing>,
    ctl: Arc<ConnCtl>,
    inbound: bool,
    /// SNI of an outbound TLS connection; an outbound TLS connection is only reused for the
    /// name it was verified against.
    server_name: Option<Arc<str>>,
    /// The handler knows this flow (it was returned by `send`, or the connection is
    /// established), so it gets `on_flow_closed`. An inbound TLS connection is not announced
    /// until its handshake completes.
    announced: bool,
    /// Present in `by_remote`, i.e. reusable by `Dest::Addr`.
    indexed: bool,
}

/// All open (and opening) stream connections.
#[derive(Default)]
pub(super) struct ConnTable {
    conns: AHashMap<ConnId, ConnEntry>,
    /// Reuse index: every connection (inbound or outbound) to a remote transport address,
    /// oldest first.
    by_remote: AHashMap<(Transport, SocketAddr), SmallVec<[ConnId; 2]>>,
    /// Inbound connections per source IP, for `max_connections_per_source`.
    per_source: AHashMap<IpAddr, usize>,
    pub(super) shut_down: bool,
}

impl ConnTable {
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Asks one connection to close; false when it is not (or no longer) open.
    pub(super) fn close_one(&self, id: ConnId, reason: CloseReason) -> bool {
        match self.conns.get(&id) {
            Some(entry) => {
                entry.ctl.request_close(reason);
                true
            }
            None => false,
        }
    }

    pub(super) fn close_all(&mut self, reason: CloseReason) {
        for entry in self.conns.values() {
            entry.ctl.request_close(reason);
        }
    }

    fn index(&mut self, id: ConnId, key: (Transport, SocketAddr)) {
        self.by_remote.entry(key).or_default().push(id);
    }

    fn remove(&mut self, id: ConnId) -> Option<ConnEntry> {
        let entry = self.conns.remove(&id)?;
        let key = (entry.flow.transport, entry.flow.remote);
        if entry.indexed {
            if let Some(ids) = self.by_remote.get_mut(&key) {
                ids.retain(|c| *c != id);
                if ids.is_empty() {
                    self.by_remote.remove(&key);
                }
            }
        }
        if entry.inbound {
            let ip = entry.flow.remote.ip();
            if let Some(n) = self.per_source.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&ip);
                }
            }
        }
        Some(entry)
    }

    /// A connection `Dest::Addr` may reuse: newest first, skipping ones already closing.
    fn reusable(
        &self,
        transport: Transport,
        remote: SocketAddr,
        server_name: Option<&str>,
    ) -> Option<&ConnEntry> {
        let ids = self.by_remote.get(&(transport, remote))?;
        ids.iter().rev().find_map(|id| {
            let entry = self.conns.get(id)?;
            if entry.ctl.is_closing() {
                return None;
            }
            if transport == Transport::Tls && !entry.inbound {
                if let Some(want) = server_name {
                    if entry.server_name.as_deref() != Some(want) {
                        return None;
                    }
                }
            }
            Some(entry)
        })
    }
}

fn push(entry: &ConnEntry, dest: &Dest, data: Bytes) -> Result<Flow, SendError> {
    let out = Outgoing {
        data,
        dest: Some(dest.clone()),
    };
    match entry.tx.try_send(out) {
        Ok(()) => Ok(entry.flow),
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(flow = %entry.flow, "write queue full; closing connection");
            entry.ctl.request_close(CloseReason::Error);
            Err(SendError::QueueFull)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::FlowGone),
    }
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Owned by a connection's task; removes the connection from the table when dropped and
/// tells the handler about everything that will now never be sent.
struct ConnGuard {
    inner: Arc<Inner>,
    id: ConnId,
    transport: Transport,
    rx: mpsc::Receiver<Outgoing>,
    reason: CloseReason,
    /// Reported for messages still queued at close; `FlowGone` unless a connect failed.
    queued_error: Option<SendError>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let entry = self.inner.table.lock().remove(self.id);
        // No sender can enqueue once the entry is gone (senders only exist in the table and
        // in this task), so after this everything left in the queue is final.
        self.rx.close();
        stats::closed(self.transport, self.reason);
        stats::gauge_dec(self.transport);
        let err = self.queued_error.take().unwrap_or(SendError::FlowGone);
        while let Ok(out) = self.rx.try_recv() {
            if let Some(dest) = &out.dest {
                self.inner.handler.on_send_error(dest, &out.data, &err);
            }
        }
        if let Some(entry) = entry {
            tracing::debug!(flow = %entry.flow, reason = self.reason.as_str(), "connection closed");
            if entry.announced {
                self.inner.handler.on_flow_closed(&entry.flow);
            }
        }
    }
}

/// What an accepted connection's task needs.
struct Admitted {
    guard: ConnGuard,
    ctl: Arc<ConnCtl>,
    tx: mpsc::Sender<Outgoing>,
    flow: Flow,
}

/// Last activity on a connection, readable by its idle timer.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

async fn idle_timer(activity: &Activity, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

impl Inner {
    fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Admits an accepted connection against the limits and puts it in the table. A TLS
    /// connection is held out of the reuse index (and unannounced) until its handshake ends.
    fn admit_inbound(
        self: &Arc<Self>,
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Admitted, CloseReason> {
        let established = transport == Transport::Tcp;
        let id = self.next_conn_id();
        let flow = Flow {
            transport,
            local,
            remote,
            conn: Some(id),
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_LEN);
        let ctl = Arc::new(ConnCtl::new());
        {
            let mut table = self.table.lock();
            if table.shut_down {
                return Err(CloseReason::Shutdown);
            }
            if table.conns.len() >= self.cfg.max_connections {
                return Err(CloseReason::Limit);
            }
            let from_source = table.per_source.get(&remote.ip()).copied().unwrap_or(0);
            if from_source >= self.cfg.max_connections_per_source {
                return Err(CloseReason::Limit);
            }
            *table.per_source.entry(remote.ip()).or_insert(0) += 1;
            table.conns.insert(
                id,
                ConnEntry {
                    flow,
                    tx: tx.clone(),
                    ctl: ctl.clone(),
                    inbound: true,
                    server_name: None,
                    announced: established,
                    indexed: established,
                },
            );
            if established {
                table.index(id, (transport, remote));
            }
        }
        stats::gauge_inc(transport);
        let guard = ConnGuard {
            inner: self.clone(),
            id,
            transport,
            rx,
            reason: CloseReason::Error,
            queued_error: None,
        };
        Ok(Admitted {
            guard,
            ctl,
            tx,
            flow,
        })
    }

    /// Marks an inbound TLS connection established: announced and reusable. False if it was
    /// closed meanwhile (shutdown).
    fn establish_inbound(&self, id: ConnId) -> bool {
        let mut table = self.table.lock();
        let Some(entry) = table.conns.get_mut(&id) else {
            return false;
        };
        entry.announced = true;
        entry.indexed = true;
        let key = (entry.flow.transport, entry.flow.remote);
        table.index(id, key);
        true
    }

    /// `Dest::Flow` over a stream: the connection must still be in the table.
    pub(super) fn send_on_conn(
        &self,
        id: ConnId,
        transport: Transport,
        dest: &Dest,
        data: Bytes,
    ) -> Result<Flow, SendError> {
        let table = self.table.lock();
        match table.conns.get(&id) {
            Some(entry)
                if entry.flow.transport == transport
                    && entry.announced
                    && !entry.ctl.is_closing() =>
            {
                push(entry, dest, data)
            }
            _ => Err(SendError::FlowGone),
        }
    }

    /// `Dest::Addr` over a stream: reuse a connection to `remote`, or open one. The new
    /// connection is in the table (and the reuse index) before this returns, so messages sent
    /// while it is still connecting queue behind the first instead of opening more.
    pub(super) fn send_stream_addr(
        self: &Arc<Self>,
        transport: Transport,
        remote: SocketAddr,
        server_name: Option<&Arc<str>>,
        dest: &Dest,
        data: Bytes,
    ) -> Result<Flow, SendError> {
        {
            let table = self.table.lock();
            if let Some(entry) = table.reusable(transport, remote, server_name.map(|s| &**s)) {
                return push(entry, dest, data);
            }
        }
        // Parsed outside the lock; the table is checked again below.
        let sni = match transport {
            Transport::Tls => Some(match server_name {
                Some(name) => ServerName::try_from(name.to_string())
                    .map_err(|_| SendError::BadServerName(name.clone()))?,
                None => ServerName::IpAddress(remote.ip().into()),
            }),
            _ => None,
        };
        let id = self.next_conn_id();
        let flow = Flow {
            transport,
            local: unspecified_like(remote),
            remote,
            conn: Some(id),
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_LEN);
        let ctl = Arc::new(ConnCtl::new());
        {
            let mut table = self.table.lock();
            if let Some(entry) = table.reusable(transport, remote, server_name.map(|s| &**s)) {
                return push(entry, dest, data);
            }
            if table.shut_down {
                return Err(SendError::Shutdown);
            }
            if table.conns.len() >= self.cfg.max_connections {
                return Err(SendError::ConnectionLimit);
            }
            tx.try_send(Outgoing {
                data,
                dest: Some(dest.clone()),
            })
            .map_err(|_| SendError::QueueFull)?;
            table.conns.insert(
                id,
                ConnEntry {
                    flow,
                    tx: tx.clone(),
                    ctl: ctl.clone(),
                    inbound: false,
                    server_name: server_name.cloned(),
                    announced: true,
                    indexed: true,
                },
            );
            table.index(id, (transport, remote));
        }
        stats::opened(transport);
        stats::gauge_inc(transport);
        let guard = ConnGuard {
            inner: self.clone(),
            id,
            transport,
            rx,
            reason: CloseReason::Error,
            queued_error: None,
        };
        self.rt
            .spawn(run_outbound(self.clone(), guard, ctl, tx, flow, sni));
        Ok(flow)
    }
}

pub(super) async fn accept_loop(
    inner: Arc<Inner>,
    transport: Transport,
    listener: TcpListener,
    listen_addr: SocketAddr,
    acceptor: Option<TlsAcceptor>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(r) => r,
            Err(err) => {
                // Typically EMFILE/ENFILE: pause rather than spin until descriptors free up.
                tracing::warn!(%listen_addr, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats::opened(transport);
        let local = tcp.local_addr().unwrap_or(listen_addr);
        match inner.admit_inbound(transport, local, remote) {
            Err(reason) => {
                tracing::debug!(%remote, %local, reason = reason.as_str(), "connection refused");
                stats::closed(transport, reason);
                drop(tcp);
            }
            Ok(admitted) => {
                tracing::debug!(flow = %admitted.flow, "connection accepted");
                tokio::spawn(run_inbound(inner.clone(), admitted, tcp, acceptor.clone()));
            }
        }
    }
}

async fn run_inbound(
    inner: Arc<Inner>,
    admitted: Admitted,
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
) {
    let Admitted {
        mut guard,
        ctl,
        tx,
        flow,
    } = admitted;
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%flow, error = %err, "set_nodelay failed");
    }
    let Some(acceptor) = acceptor else {
        serve(&inner, &mut guard, &ctl, tx, flow, tcp).await;
        return;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(inner.cfg.tls_handshake_timeout, acceptor.accept(tcp)) => r,
        () = ctl.close.notified() => {
            guard.reason = ctl.reason();
            return;
        }
    };
    match handshake {
        Ok(Ok(tls)) => {
            if inner.establish_inbound(guard.id) {
                serve(&inner, &mut guard, &ctl, tx, flow, tls).await;
            } else {
                guard.reason = CloseReason::Shutdown;
            }
        }
        Ok(Err(err)) => {
            tracing::debug!(%flow, error = %err, "TLS handshake failed");
            guard.reason = CloseReason::Error;
        }
        Err(_) => {
            tracing::debug!(%flow, "TLS handshake timed out");
            guard.reason = CloseReason::Error;
        }
    }
}

enum Connected {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(
    inner: &Inner,
    remote: SocketAddr,
    sni: Option<ServerName<'static>>,
) -> Result<Connected, SendError> {
    let tcp =
        match tokio::time::timeout(inner.cfg.connect_timeout, TcpStream::connect(remote)).await {
            Err(_) => return Err(SendError::ConnectTimeout),
            Ok(Err(err)) => return Err(SendError::Io(err)),
            Ok(Ok(tcp)) => tcp,
        };
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%remote, error = %err, "set_nodelay failed");
    }
    let Some(name) = sni else {
        return Ok(Connected::Tcp(tcp));
    };
    let connector = TlsConnector::from(inner.cfg.tls_client.clone());
    match tokio::time::timeout(
        inner.cfg.tls_handshake_timeout,
        connector.connect(name, tcp),
    )
    .await
    {
        Err(_) => Err(SendError::TlsHandshakeTimeout),
        Ok(Err(err)) => Err(SendError::TlsHandshake(err)),
        Ok(Ok(tls)) => Ok(Connected::Tls(Box::new(tls))),
    }
}

async fn run_outbound(
    inner: Arc<Inner>,
    mut guard: ConnGuard,
    ctl: Arc<ConnCtl>,
    tx: mpsc::Sender<Outgoing>,
    flow: Flow,
    sni: Option<ServerName<'static>>,
) {
    let connected = tokio::select! {
        r = connect(&inner, flow.remote, sni) => r,
        () = ctl.close.notified() => {
            guard.reason = ctl.reason();
            return;
        }
    };
    match connected {
        Ok(Connected::Tcp(tcp)) => {
            log_connected(&flow, tcp.local_addr());
            serve(&inner, &mut guard, &ctl, tx, flow, tcp).await;
        }
        Ok(Connected::Tls(tls)) => {
            log_connected(&flow, tls.get_ref().0.local_addr());
            serve(&inner, &mut guard, &ctl, tx, flow, tls).await;
        }
        Err(err) => {
            tracing::info!(%flow, error = %err, "outbound connection failed");
            guard.reason = CloseReason::Error;
            guard.queued_error = Some(err);
        }
    }
}

fn log_connected(flow: &Flow, local: std::io::Result<SocketAddr>) {
    match local {
        Ok(local) => tracing::debug!(%flow, %local, "outbound connection established"),
        Err(_) => tracing::debug!(%flow, "outbound connection established"),
    }
}

/// Runs an established connection until it ends; records why in the guard.
async fn serve<S>(
    inner: &Inner,
    guard: &mut ConnGuard,
    ctl: &ConnCtl,
    tx: mpsc::Sender<Outgoing>,
    flow: Flow,
    stream: S,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let activity = Activity::new();
    let reason = tokio::select! {
        r = read_loop(inner, flow, rd, &activity, &tx) => r,
        r = write_loop(inner, wr, &mut guard.rx, &activity) => r,
        () = idle_timer(&activity, inner.cfg.idle_timeout) => CloseReason::Idle,
        () = ctl.close.notified() => ctl.reason(),
    };
    guard.reason = reason;
}

async fn read_loop<R>(
    inner: &Inner,
    flow: Flow,
    mut rd: R,
    activity: &Activity,
    tx: &mpsc::Sender<Outgoing>,
) -> CloseReason
where
    R: AsyncRead + Unpin,
{
    let mut framer = StreamFramer::new(inner.cfg.max_message_size);
    let mut buf = vec![0u8; READ_CHUNK];
    // When the bytes still buffered (a message not yet complete) began to arrive: the rest
    // must come within message_timeout.
    let mut partial_since: Option<tokio::time::Instant> = None;
    loop {
        let read = rd.read(&mut buf);
        let r = match partial_since {
            Some(t) => match tokio::time::timeout_at(t + inner.cfg.message_timeout, read).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%flow, buffered = framer.buffered(), "message not finished in time; closing (slow sender)");
                    return CloseReason::Slow;
                }
            },
            None => read.await,
        };
        let n = match r {
            Ok(0) => return CloseReason::Eof,
            Ok(n) => n,
            Err(err) => {
                tracing::debug!(%flow, error = %err, "read failed");
                return CloseReason::Error;
            }
        };
        let received_at = Instant::now();
        activity.touch();
        framer.push(&buf[..n]);
        let mut framed = false;
        loop {
            let frame = framer.next_frame();
            framed |= matches!(frame, Ok(Some(_)));
            match frame {
                Ok(Some(Frame::Message(data))) => super::deliver(
                    &*inner.handler,
                    Inbound {
                        flow,
                        data,
                        received_at,
                    },
                ),
                Ok(Some(Frame::Ping)) => {
                    let pong = Outgoing {
                        data: Bytes::from_static(b"\r\n"),
                        dest: None,
                    };
                    if tx.try_send(pong).is_err() {
                        tracing::warn!(%flow, "write queue full; closing connection");
                        return CloseReason::Error;
                    }
                }
                Ok(Some(Frame::Pong)) => {}
                Ok(None) => break,
                Err(err) => {
                    stats::framing_error(flow.transport);
                    tracing::info!(%flow, error = %err, "framing error; closing connection");
                    return CloseReason::Framing;
                }
            }
        }
        partial_since = match (framer.buffered(), partial_since) {
            (0, _) => None,
            // A message completed in this read: what remains started now.
            (_, _) if framed => Some(tokio::time::Instant::now()),
            (_, Some(t)) => Some(t),
            (_, None) => Some(tokio::time::Instant::now()),
        };
    }
}

async fn write_loop<W>(
    inner: &Inner,
    mut wr: W,
    rx: &mut mpsc::Receiver<Outgoing>,
    activity: &Activity,
) -> CloseReason
where
    W: AsyncWrite + Unpin,
{
    while let Some(out) = rx.recv().await {
        let mut result = wr.write_all(&out.data).await;
        // Flush only once the queue is drained, so a burst goes out in as few TLS records and
        // segments as possible.
        if result.is_ok() && rx.is_empty() {
            result = wr.flush().await;
        }
        if let Err(err) = result {
            tracing::debug!(error = %err, "write failed");
            if let Some(dest) = &out.dest {
                inner
                    .handler
                    .on_send_error(dest, &out.data, &SendError::Io(err));
            }
            return CloseReason::Error;
        }
        activity.touch();
    }
    // Unreachable while the table holds a sender; treat as an error close if it happens.
    CloseReason::Error
}
