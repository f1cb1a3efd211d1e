//! [`Endpoint`]: one SIP socket of a test peer (UDP socket, TCP/TLS client connection, or
//! TCP/TLS listener with its accepted connections), with a receive backlog.
//!
//! Tests script peers step by step ("expect an INVITE, answer 180, expect a CANCEL..."), and
//! several steps may wait on one socket at once (a phone waiting for the 200 to its BYE while
//! also expecting the callee's re-INVITE). So a background task reads and parses everything
//! into a queue, and [`Endpoint::recv_match`] takes the first message a predicate accepts,
//! leaving the others queued for later calls: nothing a test did not ask for is lost or
//! consumed by the wrong waiter.
//!
//! Two hooks run in the reader task before a message is queued, because they must act on
//! messages no test step is waiting for:
//! - [`Endpoint::drop_incoming`] discards chosen messages (simulated packet loss);
//! - [`Endpoint::set_auto_reply`] answers a message without queueing it (the UA uses it to
//!   re-answer retransmitted requests and re-ACK retransmitted 2xx, as RFC 3261 asks).
//!
//! Unparseable input is counted ([`Endpoint::garbage_count`]) and logged, never fatal: a test
//! peer must survive whatever the SBC sends so that the test can report it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use parking_lot::Mutex;
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::{Message, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Short alias kept for tests that prefer the brief's name.
pub type Tp = Transport;

/// How long a TCP/TLS connect (and TLS handshake) may take on loopback before we give up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message accepted on a stream; far above anything the tests send.
const MAX_STREAM_MESSAGE: usize = 256 * 1024;

/// Answers a received message instead of queueing it: return the bytes to send back to the
/// message's source, or `None` to queue the message as usual.
pub type AutoReply = Arc<dyn Fn(&Message, SocketAddr) -> Option<Vec<u8>> + Send + Sync>;

type Ack = oneshot::Sender<std::io::Result<()>>;
/// Bytes to write on one stream connection, with a channel for the write result.
type Outbox = mpsc::UnboundedSender<(Vec<u8>, Option<Ack>)>;

struct DropRule {
    remaining: usize,
    pred: Box<dyn Fn(&Message) -> bool + Send + Sync>,
}

enum Io {
    /// `None` once closed, so the socket is released as soon as the reader task is gone.
    Udp(Mutex<Option<Arc<UdpSocket>>>),
    /// A client connection to one remote; `None` once closed.
    Client {
        remote: SocketAddr,
        out: Mutex<Option<Outbox>>,
    },
    /// A listener: accepted (and, for TCP, outgoing) connections by peer address.
    Server {
        tls: bool,
        conns: Mutex<HashMap<SocketAddr, Outbox>>,
    },
}

struct Shared {
    transport: Transport,
    local: SocketAddr,
    io: Io,
    queue: Mutex<VecDeque<(Message, SocketAddr)>>,
    notify: Notify,
    garbage: AtomicU64,
    dropped: AtomicU64,
    closed: AtomicBool,
    drop_rules: Mutex<Vec<DropRule>>,
    auto_reply: Mutex<Option<AutoReply>>,
    received_log: Mutex<Vec<(Message, SocketAddr)>>,
    sent_log: Mutex<Vec<(Bytes, SocketAddr)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Aborts the background tasks when the last [`Endpoint`] clone goes away, which closes the
/// socket (tasks own the socket halves; without this they would keep each other alive).
struct Handle {
    s: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        abort_all(&self.s);
    }
}

/// One SIP socket with a receive backlog. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct Endpoint {
    h: Arc<Handle>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({} {})", self.h.s.transport, self.h.s.local)
    }
}

impl Endpoint {
    /// A UDP socket bound to `local` (port 0 picks one).
    pub async fn udp(local: SocketAddr) -> anyhow::Result<Endpoint> {
        let sock = Arc::new(
            UdpSocket::bind(local)
                .await
                .with_context(|| format!("bind UDP {local}"))?,
        );
        let local = sock.local_addr()?;
        let ep = Endpoint::new(
            Transport::Udp,
            local,
            Io::Udp(Mutex::new(Some(sock.clone()))),
        );
        let s = ep.h.s.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, src)) => deliver(&s, Bytes::copy_from_slice(&buf[..n]), src).await,
                    Err(e) => {
                        // ICMP port unreachable surfaces as an error on some platforms;
                        // the socket itself is still fine.
                        tracing::debug!("udp {} recv error: {e}", s.local);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
        ep.h.s.tasks.lock().push(task);
        Ok(ep)
    }

    /// A TCP connection to `remote` from an ephemeral port on the matching loopback.
    pub async fn tcp(remote: SocketAddr) -> anyhow::Result<Endpoint> {
        Self::tcp_from(None, remote).await
    }

    /// A TCP connection to `remote` from `local_ip` (e.g. 127.0.0.5, so the SBC sees that
    /// source address).
    pub async fn tcp_from(
        local_ip: Option<IpAddr>,
        remote: SocketAddr,
    ) -> anyhow::Result<Endpoint> {
        let stream = connect_tcp(local_ip, remote).await?;
        let local = stream.local_addr()?;
        let ep = Endpoint::new(
            Transport::Tcp,
            local,
            Io::Client {
                remote,
                out: Mutex::new(None),
            },
        );
        let out = spawn_stream(&ep.h.s, stream, remote);
        if let Io::Client { out: o, .. } = &ep.h.s.io {
            *o.lock() = Some(out);
        }
        Ok(ep)
    }

    /// A TLS connection to `remote`, verifying the server certificate for `server_name`
    /// against the CA certificate(s) in `ca_pem`.
    pub async fn tls(
        remote: SocketAddr,
        server_name: &str,
        ca_pem: &[u8],
    ) -> anyhow::Result<Endpoint> {
        let cfg = client_config(ca_pem, None)?;
        Self::tls_with_config(None, remote, server_name, cfg).await
    }

    /// Like [`Endpoint::tls`], from a chosen local address and with a prepared rustls config
    /// (client certificates, see [`client_config`]).
    pub async fn tls_with_config(
        local_ip: Option<IpAddr>,
        remote: SocketAddr,
        server_name: &str,
        cfg: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Endpoint> {
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow!("bad TLS server name {server_name:?}: {e}"))?;
        let tcp = connect_tcp(local_ip, remote).await?;
        let local = tcp.local_addr()?;
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, TlsConnector::from(cfg).connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {remote} timed out"))?
            .with_context(|| format!("TLS handshake with {remote}"))?;
        let ep = Endpoint::new(
            Transport::Tls,
            local,
            Io::Client {
                remote,
                out: Mutex::new(None),
            },
        );
        let out = spawn_stream(&ep.h.s, tls, remote);
        if let Io::Client { out: o, .. } = &ep.h.s.io {
            *o.lock() = Some(out);
        }
        Ok(ep)
    }

    /// A TCP listener on `local`. Replies go back on the connection a peer opened; sending
    /// to an address with no connection opens one (RFC 3261 18.2.2 / 18.1.1).
    pub async fn tcp_listen(local: SocketAddr) -> anyhow::Result<Endpoint> {
        let listener = TcpListener::bind(local)
            .await
            .with_context(|| format!("bind TCP {local}"))?;
        let local = listener.local_addr()?;
        let ep = Endpoint::new(
            Transport::Tcp,
            local,
            Io::Server {
                tls: false,
                conns: Mutex::new(HashMap::new()),
            },
        );
        let s = ep.h.s.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let out = spawn_stream(&s, stream, peer);
                if let Io::Server { conns, .. } = &s.io {
                    conns.lock().insert(peer, out);
                }
            }
        });
        ep.h.s.tasks.lock().push(task);
        Ok(ep)
    }

    /// A TLS listener on `local` with the given certificate chain and key (PEM). It cannot
    /// open outgoing connections: a TLS server reaching a client needs the client's flow.
    pub async fn tls_listen(
        local: SocketAddr,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> anyhow::Result<Endpoint> {
        let certs = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .context("parse certificate PEM")?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .context("parse key PEM")?
            .ok_or_else(|| anyhow!("no private key in PEM"))?;
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind(local)
            .await
            .with_context(|| format!("bind TLS {local}"))?;
        let local = listener.local_addr()?;
        let ep = Endpoint::new(
            Transport::Tls,
            local,
            Io::Server {
                tls: true,
                conns: Mutex::new(HashMap::new()),
            },
        );
        let s = ep.h.s.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let s2 = s.clone();
                // Handshake off the accept loop so one stuck client cannot block others.
                let t = tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let out = spawn_stream(&s2, tls, peer);
                            if let Io::Server { conns, .. } = &s2.io {
                                conns.lock().insert(peer, out);
                            }
                        }
                        Ok(Err(e)) => tracing::info!("TLS accept from {peer} failed: {e}"),
                        Err(_) => tracing::info!("TLS accept from {peer} timed out"),
                    }
                });
                s.tasks.lock().push(t);
            }
        });
        ep.h.s.tasks.lock().push(task);
        Ok(ep)
    }

    fn new(transport: Transport, local: SocketAddr, io: Io) -> Endpoint {
        Endpoint {
            h: Arc::new(Handle {
                s: Arc::new(Shared {
                    transport,
                    local,
                    io,
                    queue: Mutex::new(VecDeque::new()),
                    notify: Notify::new(),
                    garbage: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    closed: AtomicBool::new(false),
                    drop_rules: Mutex::new(Vec::new()),
                    auto_reply: Mutex::new(None),
                    received_log: Mutex::new(Vec::new()),
                    sent_log: Mutex::new(Vec::new()),
                    tasks: Mutex::new(Vec::new()),
                }),
            }),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.h.s.local
    }

    pub fn transport(&self) -> Transport {
        self.h.s.transport
    }

    /// The connected remote of a client connection.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        match &self.h.s.io {
            Io::Client { remote, .. } => Some(*remote),
            _ => None,
        }
    }

    /// Sends one message. `to` is ignored on a client connection; on a listener it selects
    /// the connection (one is opened for TCP if none exists).
    pub async fn send(&self, to: SocketAddr, msg: &[u8]) -> anyhow::Result<()> {
        send(&self.h.s, to, msg).await
    }

    /// Sends raw bytes on a stream without any framing concern (half messages, garbage,
    /// keep-alives); the same as [`Endpoint::send`], named for intent.
    pub async fn send_raw(&self, to: SocketAddr, bytes: &[u8]) -> anyhow::Result<()> {
        send(&self.h.s, to, bytes).await
    }

    /// The next message of any kind, with its source; Err on timeout or closed connection.
    pub async fn recv(&self, timeout: Duration) -> anyhow::Result<(Message, SocketAddr)> {
        self.recv_match(timeout, |_| true).await
    }

    /// The first queued or arriving message that `pred` accepts; the others stay queued for
    /// later calls. Err on timeout (the error lists the backlog) or when the connection is
    /// closed with nothing matching queued.
    pub async fn recv_match(
        &self,
        timeout: Duration,
        pred: impl Fn(&Message) -> bool,
    ) -> anyhow::Result<(Message, SocketAddr)> {
        match self.recv_until(Instant::now() + timeout, &pred).await? {
            Some(m) => Ok(m),
            None => bail!(
                "timed out after {timeout:?} on {} {} waiting for a message; backlog: [{}]",
                self.h.s.transport,
                self.h.s.local,
                self.backlog_summary()
            ),
        }
    }

    /// Like [`Endpoint::recv_match`] but `Ok(None)` on timeout (Err only when closed), for
    /// callers that retransmit on timeout.
    pub async fn recv_until<F: Fn(&Message) -> bool + ?Sized>(
        &self,
        deadline: Instant,
        pred: &F,
    ) -> anyhow::Result<Option<(Message, SocketAddr)>> {
        let s = &self.h.s;
        loop {
            let notified = s.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = s.queue.lock();
                if let Some(i) = q.iter().position(|(m, _)| pred(m)) {
                    return Ok(q.remove(i));
                }
            }
            if s.closed.load(Ordering::SeqCst) {
                bail!(
                    "{} {} is closed; backlog: [{}]",
                    s.transport,
                    s.local,
                    self.backlog_summary()
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Waits without a deadline (server loops); `None` once the endpoint is closed.
    pub async fn next(&self) -> Option<(Message, SocketAddr)> {
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            match self.recv_until(far, &|_: &Message| true).await {
                Ok(Some(m)) => return Some(m),
                Ok(None) => continue,
                Err(_) => return None,
            }
        }
    }

    /// A copy of the queued (not yet received) messages.
    pub fn backlog(&self) -> Vec<(Message, SocketAddr)> {
        self.h.s.queue.lock().iter().cloned().collect()
    }

    /// Empties the backlog, returning what was in it.
    pub fn clear_backlog(&self) -> Vec<(Message, SocketAddr)> {
        self.h.s.queue.lock().drain(..).collect()
    }

    fn backlog_summary(&self) -> String {
        self.h
            .s
            .queue
            .lock()
            .iter()
            .map(|(m, src)| format!("{} from {src}", summary(m)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Drops the TCP/TLS connection(s) at once (no TLS close_notify: this simulates a lost
    /// connection); for UDP, stops receiving. Later sends fail, receives drain the backlog.
    pub fn close(&self) {
        let s = &self.h.s;
        mark_closed(s);
        abort_all(s);
        s.notify.notify_waiters();
    }

    /// [`Endpoint::close`], then waits until the background tasks are gone, so the port is
    /// free again when this returns (a test can restart a peer on the same address).
    pub async fn close_wait(&self) {
        let s = &self.h.s;
        mark_closed(s);
        let tasks: Vec<JoinHandle<()>> = s.tasks.lock().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        s.notify.notify_waiters();
    }

    /// True once closed locally or (client connections) by the peer.
    pub fn is_closed(&self) -> bool {
        self.h.s.closed.load(Ordering::SeqCst)
    }

    /// Peers with an open connection (listeners only).
    pub fn connected_peers(&self) -> Vec<SocketAddr> {
        match &self.h.s.io {
            Io::Server { conns, .. } => conns.lock().keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// Received byte runs that were not a parseable SIP message (and were not keep-alives),
    /// plus stream framing errors.
    pub fn garbage_count(&self) -> u64 {
        self.h.s.garbage.load(Ordering::SeqCst)
    }

    /// Messages discarded by [`Endpoint::drop_incoming`] rules.
    pub fn dropped_count(&self) -> u64 {
        self.h.s.dropped.load(Ordering::SeqCst)
    }

    /// Simulated packet loss: silently discards the next `count` received messages that
    /// `pred` accepts (they do not appear in the backlog or in [`Endpoint::received_log`]).
    pub fn drop_incoming(
        &self,
        count: usize,
        pred: impl Fn(&Message) -> bool + Send + Sync + 'static,
    ) {
        self.h.s.drop_rules.lock().push(DropRule {
            remaining: count,
            pred: Box::new(pred),
        });
    }

    /// Installs (or removes) the auto-reply hook; it replaces any previous one (a phone
    /// installs its own at creation: replacing it turns off its retransmission handling).
    pub fn set_auto_reply(&self, f: Option<AutoReply>) {
        *self.h.s.auto_reply.lock() = f;
    }

    /// Every message received (auto-answered ones included, dropped ones excluded), in order.
    pub fn received_log(&self) -> Vec<(Message, SocketAddr)> {
        self.h.s.received_log.lock().clone()
    }

    /// Every byte run sent, with its destination, in order.
    pub fn sent_log(&self) -> Vec<(Bytes, SocketAddr)> {
        self.h.s.sent_log.lock().clone()
    }
}

/// A one-line description of a message for logs and error texts.
pub fn summary(m: &Message) -> String {
    let first = match m.status() {
        Some(st) => format!(
            "{st} {} ({} {})",
            String::from_utf8_lossy(m.reason_bytes()),
            m.cseq(),
            String::from_utf8_lossy(m.cseq_method_bytes())
        ),
        None => format!(
            "{} {} (CSeq {})",
            String::from_utf8_lossy(m.method_bytes()),
            String::from_utf8_lossy(m.uri_bytes()),
            m.cseq()
        ),
    };
    format!("{first} Call-ID {}", String::from_utf8_lossy(m.call_id()))
}

/// A rustls client config trusting the CA certificate(s) in `ca_pem`, with an optional client
/// certificate chain and key (both PEM) for mutual TLS.
pub fn client_config(
    ca_pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.context("parse CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("no CA certificate in PEM");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let cfg = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let certs = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut &key_pem[..])?
                .ok_or_else(|| anyhow!("no private key in PEM"))?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    Ok(Arc::new(cfg))
}

fn mark_closed(s: &Shared) {
    s.closed.store(true, Ordering::SeqCst);
    match &s.io {
        Io::Client { out, .. } => {
            out.lock().take();
        }
        Io::Server { conns, .. } => conns.lock().clear(),
        Io::Udp(sock) => {
            sock.lock().take();
        }
    }
}

fn abort_all(s: &Shared) {
    for t in s.tasks.lock().drain(..) {
        t.abort();
    }
}

async fn connect_tcp(local_ip: Option<IpAddr>, remote: SocketAddr) -> anyhow::Result<TcpStream> {
    let sock = if remote.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local_ip {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip} for TCP"))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(remote))
        .await
        .map_err(|_| anyhow!("TCP connect to {remote} timed out"))?
        .with_context(|| format!("TCP connect to {remote}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Starts the reader and writer tasks of one stream connection; returns its outbox.
fn spawn_stream<S>(s: &Arc<Shared>, stream: S, peer: SocketAddr) -> Outbox
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Option<Ack>)>();
    let writer = tokio::spawn(async move {
        while let Some((bytes, ack)) = rx.recv().await {
            let r = async {
                wr.write_all(&bytes).await?;
                wr.flush().await
            }
            .await;
            let failed = r.is_err();
            if let Some(ack) = ack {
                let _ = ack.send(r);
            }
            if failed {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let s2 = s.clone();
    let pong_tx = tx.clone();
    let reader = tokio::spawn(async move {
        let mut framer = StreamFramer::new(MAX_STREAM_MESSAGE);
        let mut buf = vec![0u8; 16384];
        'conn: loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            framer.push(&buf[..n]);
            loop {
                match framer.next_frame() {
                    Ok(Some(Frame::Message(b))) => deliver(&s2, b, peer).await,
                    Ok(Some(Frame::Ping)) => {
                        // RFC 5626 4.4.1: answer a CRLFCRLF ping with a CRLF pong.
                        let _ = pong_tx.send((b"\r\n".to_vec(), None));
                    }
                    Ok(Some(Frame::Pong)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        s2.garbage.fetch_add(1, Ordering::SeqCst);
                        tracing::warn!(
                            "{} {}: framing error from {peer}: {e}",
                            s2.transport,
                            s2.local
                        );
                        break 'conn;
                    }
                }
            }
        }
        drop(pong_tx);
        stream_ended(&s2, peer);
    });
    let mut tasks = s.tasks.lock();
    tasks.push(writer);
    tasks.push(reader);
    tx
}

fn stream_ended(s: &Shared, peer: SocketAddr) {
    tracing::debug!("{} {}: connection with {peer} ended", s.transport, s.local);
    match &s.io {
        Io::Client { out, .. } => {
            out.lock().take();
            s.closed.store(true, Ordering::SeqCst);
            s.notify.notify_waiters();
        }
        Io::Server { conns, .. } => {
            conns.lock().remove(&peer);
        }
        Io::Udp(_) => {}
    }
}

async fn deliver(s: &Arc<Shared>, bytes: Bytes, src: SocketAddr) {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        // UDP keep-alive (RFC 5626 4.4.2 style CRLF) - not SIP, not garbage.
        return;
    }
    let m = match Message::parse(bytes.clone()) {
        Ok(m) => m,
        Err(e) => {
            s.garbage.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                "{} {}: unparseable message from {src} ({e}): {:?}",
                s.transport,
                s.local,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            );
            return;
        }
    };
    {
        let mut rules = s.drop_rules.lock();
        let mut hit = false;
        for r in rules.iter_mut() {
            if r.remaining > 0 && (r.pred)(&m) {
                r.remaining -= 1;
                hit = true;
                break;
            }
        }
        rules.retain(|r| r.remaining > 0);
        if hit {
            s.dropped.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(
                "{} {}: dropped {} from {src}",
                s.transport,
                s.local,
                summary(&m)
            );
            return;
        }
    }
    tracing::trace!(
        "{} {}: received {} from {src}",
        s.transport,
        s.local,
        summary(&m)
    );
    s.received_log.lock().push((m.clone(), src));
    let hook = s.auto_reply.lock().clone();
    if let Some(reply) = hook.and_then(|f| f(&m, src)) {
        if let Err(e) = send(s, src, &reply).await {
            tracing::info!(
                "{} {}: auto-reply to {src} failed: {e}",
                s.transport,
                s.local
            );
        }
        return;
    }
    s.queue.lock().push_back((m, src));
    s.notify.notify_waiters();
}

async fn send(s: &Arc<Shared>, to: SocketAddr, msg: &[u8]) -> anyhow::Result<()> {
    let dest = match &s.io {
        Io::Udp(sock) => {
            let sock = sock
                .lock()
                .clone()
                .ok_or_else(|| anyhow!("UDP {} is closed", s.local))?;
            sock.send_to(msg, to)
                .await
                .with_context(|| format!("UDP send {} -> {to}", s.local))?;
            to
        }
        Io::Client { remote, out } => {
            let tx = out.lock().clone().ok_or_else(|| {
                anyhow!(
                    "{} connection {} -> {remote} is closed",
                    s.transport,
                    s.local
                )
            })?;
            write_stream(&tx, msg)
                .await
                .with_context(|| format!("{} send {} -> {remote}", s.transport, s.local))?;
            *remote
        }
        Io::Server { tls, conns } => {
            let existing = conns.lock().get(&to).cloned();
            let tx = match existing {
                Some(tx) => tx,
                None if *tls => bail!("no TLS connection from {to} to send on"),
                None => {
                    if s.closed.load(Ordering::SeqCst) {
                        bail!("TCP listener {} is closed", s.local);
                    }
                    let stream = connect_tcp(Some(s.local.ip()), to).await?;
                    let tx = spawn_stream(s, stream, to);
                    conns.lock().insert(to, tx.clone());
                    tx
                }
            };
            write_stream(&tx, msg)
                .await
                .with_context(|| format!("{} send {} -> {to}", s.transport, s.local))?;
            to
        }
    };
    s.sent_log.lock().push((Bytes::copy_from_slice(msg), dest));
    Ok(())
}

async fn write_stream(tx: &Outbox, msg: &[u8]) -> anyhow::Result<()> {
    let (ack, done) = oneshot::channel();
    tx.send((msg.to_vec(), Some(ack)))
        .map_err(|_| anyhow!("connection closed"))?;
    done.await
        .map_err(|_| anyhow!("connection closed"))?
        .map_err(anyhow::Error::from)
}
