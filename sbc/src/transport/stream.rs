//! TCP and TLS: the connection table, the accept loops and one task per connection.
//!
//! Each connection is one task that runs its reader, its writer, its idle timer and its close
//! signal under a single `select!`; whichever ends first ends the connection, and dropping the
//! other futures drops the socket. The table entry is removed by a drop guard owned by that
//! task, so a connection is cleaned up exactly once however it ends (including a panic in the
//! handler or the runtime shutting down).

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::Transport;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::stamp::{self, StampedTcp};
use super::stats::{self, CloseReason};
use super::{ConnId, Dest, Flow, Inbound, Inner, SendError};

/// Messages a connection's write queue holds before `send` reports `QueueFull` and closes it:
/// a peer that far behind is not reading, and holding more only delays the failure.
pub(super) const WRITE_QUEUE_LEN: usize = 1024;

/// Size of one socket read.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The read buffer, one per runtime thread instead of one per connection: a read borrows
    /// it only for one poll and moves what arrived into the connection's framer before the
    /// poll returns, so an idle connection holds no read buffer at all. (A 16 KiB buffer per
    /// connection was most of a TLS phone's memory; see `read_some`.)
    static READ_SCRATCH: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// A message waiting in a connection's write queue. The destination travels with it so a
/// delivery failure can be reported to the handler exactly as the caller addressed it; `None`
/// marks our own keep-alive answers, whose loss is nobody's business.
pub(super) struct Outgoing {
    data: Bytes,
    dest: Option<Dest>,
}

/// Why a message could not be queued.
enum QueueError {
    /// `WRITE_QUEUE_LEN` messages are waiting already.
    Full,
    /// The connection has ended; nothing more will be sent on it.
    Closed,
}

/// A connection's write queue: bounded, one consumer (the connection's task), and holding no
/// memory while empty. (A tokio mpsc channel preallocates 32 slots per connection, ~4 KiB
/// with a `Dest` in each, plus ~0.5 KiB of channel state; an idle SIP connection with a
/// message a minute needs none of it.)
struct WriteQueue {
    state: Mutex<QueueState>,
    /// A message was queued or the queue closed.
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Outgoing>,
    closed: bool,
}

impl WriteQueue {
    fn new() -> Self {
        WriteQueue {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
        }
    }

    fn push(&self, out: Outgoing) -> Result<(), QueueError> {
        {
            let mut st = self.state.lock();
            if st.closed {
                return Err(QueueError::Closed);
            }
            if st.items.len() >= WRITE_QUEUE_LEN {
                return Err(QueueError::Full);
            }
            st.items.push_back(out);
        }
        // Stores a permit when the task is not waiting yet, so the wake-up cannot be lost.
        self.ready.notify_one();
        Ok(())
    }

    /// The next message without waiting; frees the queue's buffer once it is empty.
    fn try_pop(&self) -> Option<Outgoing> {
        let mut st = self.state.lock();
        let out = st.items.pop_front();
        if st.items.is_empty() && st.items.capacity() > 0 {
            st.items = VecDeque::new();
        }
        out
    }

    /// The next message; `None` once the queue is closed and drained.
    async fn pop(&self) -> Option<Outgoing> {
        loop {
            let notified = self.ready.notified();
            if let Some(out) = self.try_pop() {
                return Some(out);
            }
            if self.state.lock().closed {
                return None;
            }
            notified.await;
        }
    }

    fn is_empty(&self) -> bool {
        self.state.lock().items.is_empty()
    }

    /// Refuses every later `push`; what is queued stays for `try_pop`.
    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_one();
    }
}

/// Shared between the table entry and the connection task: lets `send` and `shutdown` ask the
/// task to close without holding its socket.
pub(super) struct ConnCtl {
    close: Notify,
    /// 0 while open, else the `CloseReason` asked for.
    requested: AtomicU8,
    queue: WriteQueue,
}

impl ConnCtl {
    fn new() -> Self {
        ConnCtl {
            close: Notify::new(),
            requested: AtomicU8::new(0),
            queue: WriteQueue::new(),
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
    /// The connection's write queue lives here too.
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
    match entry.ctl.queue.push(out) {
        Ok(()) => Ok(entry.flow),
        Err(QueueError::Full) => {
            tracing::warn!(flow = %entry.flow, "write queue full; closing connection");
            entry.ctl.request_close(CloseReason::Error);
            Err(SendError::QueueFull)
        }
        Err(QueueError::Closed) => Err(SendError::FlowGone),
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
    ctl: Arc<ConnCtl>,
    reason: CloseReason,
    /// Reported for messages still queued at close; `FlowGone` unless a connect failed.
    queued_error: Option<SendError>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let entry = self.inner.table.lock().remove(self.id);
        // No sender can enqueue once the entry is gone (senders only exist in the table and
        // in this task), so after this everything left in the queue is final.
        self.ctl.queue.close();
        stats::closed(self.transport, self.reason);
        stats::gauge_dec(self.transport);
        let err = self.queued_error.take().unwrap_or(SendError::FlowGone);
        while let Some(out) = self.ctl.queue.try_pop() {
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
            ctl: ctl.clone(),
            reason: CloseReason::Error,
            queued_error: None,
        };
        Ok(Admitted { guard, ctl, flow })
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
            ctl.queue
                .push(Outgoing {
                    data,
                    dest: Some(dest.clone()),
                })
                .map_err(|_| SendError::QueueFull)?;
            table.conns.insert(
                id,
                ConnEntry {
                    flow,
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
            ctl: ctl.clone(),
            reason: CloseReason::Error,
            queued_error: None,
        };
        self.rt
            .spawn(run_outbound(self.clone(), guard, ctl, flow, sni));
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
        flow,
    } = admitted;
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(%flow, error = %err, "set_nodelay failed");
    }
    let tcp = StampedTcp::new(tcp);
    let Some(acceptor) = acceptor else {
        serve(&inner, &mut guard, &ctl, flow, tcp).await;
        return;
    };
    // The handshake future and the established stream are boxed: the task's future is
    // allocated at its largest state for the connection's whole life, and an inline rustls
    // connection (~1.2 KiB, in the handshake future, in `handshake` below and in `serve`'s
    // argument, none of which share space) made it ~4.4 KiB.
    let accept = Box::pin(acceptor.accept(tcp));
    let handshake = tokio::select! {
        r = tokio::time::timeout(inner.cfg.tls_handshake_timeout, accept) => {
            r.map(|r| r.map(Box::new))
        }
        () = ctl.close.notified() => {
            guard.reason = ctl.reason();
            return;
        }
    };
    match handshake {
        Ok(Ok(tls)) => {
            if inner.establish_inbound(guard.id) {
                serve(&inner, &mut guard, &ctl, flow, tls).await;
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
    Tcp(StampedTcp),
    Tls(Box<tokio_rustls::client::TlsStream<StampedTcp>>),
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
    let tcp = StampedTcp::new(tcp);
    let Some(name) = sni else {
        return Ok(Connected::Tcp(tcp));
    };
    let connector = TlsConnector::from(inner.cfg.tls_client.clone());
    match tokio::time::timeout(
        inner.cfg.tls_handshake_timeout,
        Box::pin(connector.connect(name, tcp)),
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
            serve(&inner, &mut guard, &ctl, flow, tcp).await;
        }
        Ok(Connected::Tls(tls)) => {
            log_connected(&flow, tls.get_ref().0.local_addr());
            serve(&inner, &mut guard, &ctl, flow, tls).await;
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
async fn serve<S>(inner: &Inner, guard: &mut ConnGuard, ctl: &ConnCtl, flow: Flow, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let activity = Activity::new();
    let reason = tokio::select! {
        r = read_loop(inner, flow, rd, &activity, &ctl.queue) => r,
        r = write_loop(inner, wr, &ctl.queue, &activity) => r,
        () = idle_timer(&activity, inner.cfg.idle_timeout) => CloseReason::Idle,
        () = ctl.close.notified() => ctl.reason(),
    };
    guard.reason = reason;
}

/// One read from `rd` into the thread's scratch buffer, appended to `framer` (made when the
/// first bytes of a message arrive) before the poll returns. Resolves to the number of bytes
/// read, 0 at end of stream, and the kernel's arrival stamp of the newest of them when the
/// read reached a [`StampedTcp`] socket.
///
/// Correct for any `AsyncRead` because a read that returns `Pending` has put nothing in the
/// buffer, so the scratch buffer holds nothing of this connection between polls.
fn read_some<'a, R>(
    rd: &'a mut R,
    framer: &'a mut Option<StreamFramer>,
    max_message_size: usize,
) -> impl Future<Output = io::Result<(usize, Option<i128>)>> + 'a
where
    R: AsyncRead + Unpin,
{
    std::future::poll_fn(move |cx| {
        // Taken out of the cell (not borrowed) so that even a reentrant poll cannot fail:
        // it would find the cell empty and use a buffer of its own.
        let mut scratch = READ_SCRATCH
            .with(Cell::take)
            .unwrap_or_else(|| vec![0u8; READ_CHUNK].into_boxed_slice());
        let mut rb = ReadBuf::new(&mut scratch);
        stamp::clear_stream_stamp();
        let r = match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let data = rb.filled();
                if !data.is_empty() {
                    framer
                        .get_or_insert_with(|| StreamFramer::new(max_message_size))
                        .push(data);
                }
                Poll::Ready(Ok((data.len(), stamp::take_stream_stamp())))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        };
        READ_SCRATCH.with(|cell| cell.set(Some(scratch)));
        r
    })
}

async fn read_loop<R>(
    inner: &Inner,
    flow: Flow,
    mut rd: R,
    activity: &Activity,
    queue: &WriteQueue,
) -> CloseReason
where
    R: AsyncRead + Unpin,
{
    // Only while a message is being received: between messages a connection keeps no
    // buffer (the framer's is at least 4 KiB).
    let mut framer: Option<StreamFramer> = None;
    let max = inner.cfg.max_message_size;
    // When the bytes still buffered (a message not yet complete) began to arrive: the rest
    // must come within message_timeout.
    let mut partial_since: Option<tokio::time::Instant> = None;
    // The arrival stamp of the newest data read: a TLS read that returns plaintext decrypted
    // from an earlier read has none of its own.
    let mut arrived: Option<i128> = None;
    loop {
        let read = read_some(&mut rd, &mut framer, max);
        let r = match partial_since {
            Some(t) => match tokio::time::timeout_at(t + inner.cfg.message_timeout, read).await {
                Ok(r) => r,
                Err(_) => {
                    let buffered = framer.as_ref().map_or(0, StreamFramer::buffered);
                    tracing::debug!(%flow, buffered, "message not finished in time; closing (slow sender)");
                    return CloseReason::Slow;
                }
            },
            None => read.await,
        };
        match r {
            Ok((0, _)) => return CloseReason::Eof,
            Ok((_, stamp)) => arrived = stamp.or(arrived),
            Err(err) => {
                tracing::debug!(%flow, error = %err, "read failed");
                return CloseReason::Error;
            }
        }
        let received_at = Instant::now();
        // How long the newest data waited in the kernel: the overload signal.
        let queued = stamp::waited(arrived, stamp::realtime_ns());
        activity.touch();
        let Some(fr) = framer.as_mut() else {
            continue;
        };
        let mut framed = false;
        loop {
            let frame = fr.next_frame();
            framed |= matches!(frame, Ok(Some(_)));
            match frame {
                Ok(Some(Frame::Message(data))) => super::deliver(
                    &*inner.handler,
                    Inbound {
                        flow,
                        data,
                        received_at,
                        queued,
                    },
                ),
                Ok(Some(Frame::Ping)) => {
                    let pong = Outgoing {
                        data: Bytes::from_static(b"\r\n"),
                        dest: None,
                    };
                    if queue.push(pong).is_err() {
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
        let buffered = fr.buffered();
        if buffered == 0 {
            // Between messages: nothing of the framer is needed until the next byte.
            framer = None;
        }
        partial_since = match (buffered, partial_since) {
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
    queue: &WriteQueue,
    activity: &Activity,
) -> CloseReason
where
    W: AsyncWrite + Unpin,
{
    while let Some(out) = queue.pop().await {
        let mut result = wr.write_all(&out.data).await;
        // Flush only once the queue is drained, so a burst goes out in as few TLS records and
        // segments as possible.
        if result.is_ok() && queue.is_empty() {
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
    // Only after the queue was closed, which the guard does when the task ends.
    CloseReason::Error
}
