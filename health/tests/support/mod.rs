//! Loopback peers for the health tests: SIP OPTIONS responders (UDP, TCP,
//! TLS) that can be made to answer any code, go silent (a frozen PBX) or
//! close their socket (an exited PBX); an HTTP server recording requests;
//! a test PKI; a metrics recorder; configuration builders.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sbc_sip::framing::{Frame, StreamFramer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

// ---------------------------------------------------------------- SIP peer

/// What a SIP peer does with an OPTIONS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer with this code.
    Answer(u16),
    /// Receive and say nothing (a frozen process: the socket still exists).
    Silent,
    /// Answer with this code after this many milliseconds (UDP only): a slow but live node.
    Slow(u16, u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Udp,
    Tcp,
    Tls,
}

/// A PBX stand-in that answers OPTIONS.
pub struct SipPeer {
    pub addr: SocketAddr,
    kind: Kind,
    state: Arc<PeerState>,
    acceptor: Option<TlsAcceptor>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct PeerState {
    mode: Mutex<Option<Mode>>,
    requests: AtomicUsize,
    connections: AtomicUsize,
    /// (source address, request text) of the last request.
    last: Mutex<Option<(SocketAddr, String)>>,
}

impl SipPeer {
    pub async fn udp() -> SipPeer {
        SipPeer::start(Kind::Udp, None, "127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn tcp() -> SipPeer {
        SipPeer::start(Kind::Tcp, None, "127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn tls(pki: &Pki) -> SipPeer {
        SipPeer::start(
            Kind::Tls,
            Some(pki.acceptor()),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
    }

    async fn start(kind: Kind, acceptor: Option<TlsAcceptor>, addr: SocketAddr) -> SipPeer {
        let state = Arc::new(PeerState::default());
        *state.mode.lock() = Some(Mode::Answer(200));
        let (addr, task) = spawn(kind, acceptor.clone(), addr, Arc::clone(&state)).await;
        SipPeer {
            addr,
            kind,
            state,
            acceptor,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.state.mode.lock() = Some(mode);
    }

    /// Closes the socket (and every connection): an exited PBX.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }

    /// Opens the same port again.
    pub async fn restart(&self) {
        self.stop();
        // Give the aborted task a moment to drop its socket.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, task) = spawn(
            self.kind,
            self.acceptor.clone(),
            self.addr,
            Arc::clone(&self.state),
        )
        .await;
        *self.task.lock() = Some(task);
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn last_request(&self) -> Option<(SocketAddr, String)> {
        self.state.last.lock().clone()
    }
}

impl Drop for SipPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn spawn(
    kind: Kind,
    acceptor: Option<TlsAcceptor>,
    addr: SocketAddr,
    state: Arc<PeerState>,
) -> (SocketAddr, JoinHandle<()>) {
    match kind {
        Kind::Udp => {
            let socket = UdpSocket::bind(addr).await.expect("bind udp");
            let addr = socket.local_addr().expect("local addr");
            (addr, tokio::spawn(udp_loop(socket, state)))
        }
        Kind::Tcp | Kind::Tls => {
            let listener = TcpListener::bind(addr).await.expect("bind tcp");
            let addr = listener.local_addr().expect("local addr");
            (addr, tokio::spawn(tcp_loop(listener, acceptor, state)))
        }
    }
}

async fn udp_loop(socket: UdpSocket, state: Arc<PeerState>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, src)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if let Some(reply) = handle(&state, src, &text) {
            let delay = match *state.mode.lock() {
                Some(Mode::Slow(_, ms)) => ms,
                _ => 0,
            };
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let _ = socket.send_to(reply.as_bytes(), src).await;
        }
    }
}

async fn tcp_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<PeerState>) {
    // Connections live in this set: aborting the loop closes them all.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, src)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let state = Arc::clone(&state);
        let acceptor = acceptor.clone();
        conns.spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve_stream(tls, src, state).await;
                    }
                }
                None => serve_stream(stream, src, state).await,
            }
        });
    }
}

async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    src: SocketAddr,
    state: Arc<PeerState>,
) {
    let mut framer = StreamFramer::new(65535);
    let mut buf = [0u8; 4096];
    loop {
        while let Ok(Some(frame)) = framer.next_frame() {
            if let Frame::Message(m) = frame {
                let text = String::from_utf8_lossy(&m).to_string();
                if let Some(reply) = handle(&state, src, &text) {
                    if io.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => framer.push(&buf[..n]),
        }
    }
}

/// Records the request and builds the reply per the current mode.
fn handle(state: &PeerState, src: SocketAddr, request: &str) -> Option<String> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    *state.last.lock() = Some((src, request.to_string()));
    let mode = (*state.mode.lock())?;
    match mode {
        Mode::Silent => None,
        Mode::Answer(code) | Mode::Slow(code, _) => Some(reply(request, code)),
    }
}

/// A response to `request` copying Via, From, To (tagged), Call-ID, CSeq.
pub fn reply(request: &str, code: u16) -> String {
    let mut out = format!("SIP/2.0 {code} Test\r\n");
    for line in request.split("\r\n").skip(1) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("via:")
            || lower.starts_with("from:")
            || lower.starts_with("call-id:")
            || lower.starts_with("cseq:")
        {
            out.push_str(line);
            out.push_str("\r\n");
        } else if lower.starts_with("to:") {
            out.push_str(line);
            out.push_str(";tag=peer\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

// ---------------------------------------------------------------- HTTP peer

/// One request the HTTP peer received.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 server: answers every request with `status` (or not at
/// all when silent) and records it.
pub struct HttpPeer {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    silent: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
    task: JoinHandle<()>,
}

impl HttpPeer {
    pub async fn start(status: u16) -> HttpPeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = listener.local_addr().expect("local addr");
        let status = Arc::new(AtomicU16::new(status));
        let silent = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(http_loop(
            listener,
            Arc::clone(&status),
            Arc::clone(&silent),
            Arc::clone(&requests),
        ));
        HttpPeer {
            addr,
            status,
            silent,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<HttpRequest> {
        self.requests.lock().clone()
    }

    /// Waits until at least `n` requests arrived to `path`.
    pub async fn wait_for(&self, path: &str, n: usize, within: Duration) -> Vec<HttpRequest> {
        let deadline = Instant::now() + within;
        loop {
            let got: Vec<HttpRequest> = self
                .requests()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for HttpPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn http_loop(
    listener: TcpListener,
    status: Arc<AtomicU16>,
    silent: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let status = Arc::clone(&status);
        let silent = Arc::clone(&silent);
        let requests = Arc::clone(&requests);
        conns.spawn(async move {
            let Some(request) = read_request(&mut stream).await else {
                return;
            };
            requests.lock().push(request);
            if silent.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            let code = status.load(Ordering::SeqCst);
            let reply =
                format!("HTTP/1.1 {code} Test\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let method = start.next()?.to_string();
    let path = start.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(HttpRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

// ---------------------------------------------------------------- TLS

/// A test CA and a server certificate for `pbx.test` and 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sbc-health test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["pbx.test".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "pbx.test");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("cert pem");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key pem");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        TlsAcceptor::from(Arc::new(config))
    }
}

// ---------------------------------------------------------------- config

/// A scratch directory (for tls_ca files), removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sbc-health-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Dir(path)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses a configuration: a UDP listener plus `pools` (TOML text of
/// `[[pool]]` tables), as if read from `dir/sbc.toml`.
pub fn config(dir: &Path, pools: &str) -> sbc_config::Config {
    let text = format!("[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n\n{pools}");
    sbc_config::parse(&text, &dir.join("sbc.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

// ---------------------------------------------------------------- metrics

/// The process-wide debugging recorder (installed once per test binary).
pub fn metrics() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("install the debugging recorder");
        snapshotter
    })
}

/// The value of counter `name` with all of `labels`, summed over the rest.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name && has_labels(key.key(), labels))
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// The value of gauge `name` with exactly `labels`.
pub fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics()
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == name && has_labels(key.key(), labels))
        .and_then(|(.., value)| match value {
            DebugValue::Gauge(v) => Some(v.into_inner()),
            _ => None,
        })
}

/// How many histogram samples `name` with `labels` got since the last look.
pub fn histogram_samples(name: &str, labels: &[(&str, &str)]) -> usize {
    metrics()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name && has_labels(key.key(), labels))
        .map(|(.., value)| match value {
            DebugValue::Histogram(v) => v.len(),
            _ => 0,
        })
        .sum()
}

fn has_labels(key: &metrics::Key, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(n, v)| key.labels().any(|l| l.key() == *n && l.value() == *v))
}

/// Polls `f` every 5 ms until it is true or `within` passed; returns
/// whether it became true.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
