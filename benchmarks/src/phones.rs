//! Many registered phones, each on its own flow, over UDP and TLS (`sbc-phones`, used by
//! benchmarks/scale).
//!
//! `sbc-loadgen --scenario register` sends REGISTERs for many users from a handful of
//! sockets: right for REGISTER throughput, wrong for the memory a deployment of N phones
//! costs, because a real phone has a flow of its own (its own UDP source address and port,
//! or its own TLS connection) and the SBC keeps state per flow. Here every phone is one
//! socket (UDP) or one connection (TLS, rustls with the benchmark's own CA) and one user
//! (`PREFIX<i>`), registers, and refreshes every `expires / 2` seconds (the first refreshes
//! spread evenly over that interval, as phones that booted at different times do) until the
//! run ends; then every phone unregisters (`Expires: 0`) so the registrar and the SBC drop
//! the binding, and the report is written.
//!
//! The phones start at `rate` per second; when each has had its first answer (or given up)
//! `--ready-file` is written, so a script can measure the SBC with all phones registered.
//!
//! One tokio task per phone on a current-thread runtime (one core's worth of work at most),
//! bounded by `--duration` plus the unregistration's own limit; loopback addresses only.
//! A process holds at most `MAX_PHONES` sockets: the fd limit of the machine (20,000 here)
//! is per process, so 20,000 phones take two or three processes.

use crate::net;
use crate::report::Latencies;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use parking_lot::Mutex;
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::Message;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Most phones in one process (one fd each, and the machine's limit is 20,000).
pub const MAX_PHONES: usize = 18_000;
const T1: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct PhonesOpts {
    pub target_udp: SocketAddr,
    pub target_tls: Option<SocketAddr>,
    /// PEM of the CA that issued the SBC's TLS certificate.
    pub ca_pem: Option<Vec<u8>>,
    pub udp: usize,
    pub tls: usize,
    /// Address the phones bind (each its own ephemeral port).
    pub local_ip: IpAddr,
    /// Users are `PREFIX<i>`, UDP phones first, then TLS.
    pub user_prefix: String,
    pub domain: String,
    pub expires: u32,
    /// New phones per second at the start.
    pub rate: u32,
    pub duration: Duration,
    pub timeout: Duration,
    pub ready_file: Option<PathBuf>,
    /// TLS phones reconnect (after 0-2 s) and register again when their connection closes.
    pub reconnect: bool,
}

/// What the phones saw.
#[derive(Debug, Default, Serialize)]
pub struct PhonesReport {
    pub udp: usize,
    pub tls: usize,
    /// Phones whose first REGISTER got a 2xx.
    pub registered: u64,
    /// Phones whose first REGISTER did not.
    pub first_failed: u64,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    pub unregistered: u64,
    pub timeouts: u64,
    pub connect_errors: u64,
    /// TLS connections reopened after the SBC (or the network) closed one (`--reconnect`).
    pub reconnects: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub retransmissions: u64,
    /// Seconds from the start until every phone had its first answer.
    pub ready_seconds: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub elapsed_s: f64,
}

struct Shared {
    registered: AtomicU64,
    first_failed: AtomicU64,
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
    unregistered: AtomicU64,
    timeouts: AtomicU64,
    connect_errors: AtomicU64,
    reconnects: AtomicU64,
    retransmissions: AtomicU64,
    first_done: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    lat: Mutex<Latencies>,
    stop: AtomicBool,
    /// Wakes the phones sleeping until their next refresh when the run is stopped early.
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn status(&self, s: u16) {
        *self.statuses.lock().entry(s).or_default() += 1;
    }
    fn latency(&self, d: Duration) {
        self.lat.lock().record_us(d.as_micros() as u64);
    }
}

/// One phone's identity and message template.
struct Phone {
    idx: usize,
    user: String,
    domain: String,
    /// `UDP` or `TLS`.
    transport: &'static str,
    local: SocketAddr,
    run: u32,
    cseq: u32,
}

impl Phone {
    fn register(&mut self, expires: u32) -> (String, String) {
        self.cseq += 1;
        let branch = format!("z9hG4bKph{:x}x{}x{}", self.run, self.idx, self.cseq);
        let hp = net::hostport(self.local);
        let tparam = if self.transport == "TLS" {
            ";transport=tls"
        } else {
            ""
        };
        let msg = format!(
            "REGISTER sip:{d} SIP/2.0\r\nVia: SIP/2.0/{t} {hp};branch={branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:{u}@{d}>;tag=p{i}\r\nTo: <sip:{u}@{d}>\r\n\
             Call-ID: ph-{r:x}-{i}\r\nCSeq: {c} REGISTER\r\nContact: <sip:{u}@{hp}{tparam}>\r\n\
             Expires: {expires}\r\nUser-Agent: sbc-phones\r\nContent-Length: 0\r\n\r\n",
            d = self.domain,
            t = self.transport,
            u = self.user,
            i = self.idx,
            r = self.run,
            c = self.cseq,
        );
        (msg, branch)
    }
}

/// The final response to our REGISTER with this branch, if `data` is one.
fn final_status(data: Bytes, branch: &str) -> Option<u16> {
    let msg = Message::parse(data).ok()?;
    let status = msg.status()?;
    let via = msg.top_via()?;
    if via.branch? != branch.as_bytes() || status < 200 {
        return None;
    }
    Some(status)
}

enum Outcome {
    Ok,
    Status(u16),
    Timeout,
}

trait Wire {
    /// Sends `msg` and waits for the final response carrying `branch`.
    async fn transact(
        &mut self,
        msg: &str,
        branch: &str,
        sh: &Shared,
        timeout: Duration,
    ) -> anyhow::Result<Outcome>;

    /// Between transactions: returns when the connection closes or fails (never for UDP),
    /// answering keep-alive pings meanwhile.
    async fn idle(&mut self) -> anyhow::Result<()>;
}

struct UdpWire {
    sock: UdpSocket,
    target: SocketAddr,
    buf: Vec<u8>,
}

impl Wire for UdpWire {
    async fn transact(
        &mut self,
        msg: &str,
        branch: &str,
        sh: &Shared,
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = T1;
        self.sock.send_to(msg.as_bytes(), self.target).await?;
        let mut next_rtx = tokio::time::Instant::now() + interval;
        loop {
            let wake = next_rtx.min(deadline);
            match tokio::time::timeout_at(wake, self.sock.recv_from(&mut self.buf)).await {
                Ok(Ok((n, _))) => {
                    let data = Bytes::copy_from_slice(&self.buf[..n]);
                    match final_status(data, branch) {
                        Some(s) if (200..300).contains(&s) => return Ok(Outcome::Ok),
                        Some(s) => return Ok(Outcome::Status(s)),
                        None => continue,
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Ok(Outcome::Timeout);
                    }
                    self.sock.send_to(msg.as_bytes(), self.target).await?;
                    sh.retransmissions.fetch_add(1, Ordering::Relaxed);
                    interval = (interval * 2).min(Duration::from_secs(4));
                    next_rtx = now + interval;
                }
            }
        }
    }

    async fn idle(&mut self) -> anyhow::Result<()> {
        std::future::pending().await
    }
}

struct StreamWire<S> {
    io: S,
    framer: StreamFramer,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for StreamWire<S> {
    async fn transact(
        &mut self,
        msg: &str,
        branch: &str,
        _sh: &Shared,
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.io.write_all(msg.as_bytes()).await?;
        self.io.flush().await?;
        loop {
            while let Some(frame) = self
                .framer
                .next_frame()
                .map_err(|e| anyhow!("framing: {e:?}"))?
            {
                match frame {
                    Frame::Message(m) => match final_status(m, branch) {
                        Some(s) if (200..300).contains(&s) => return Ok(Outcome::Ok),
                        Some(s) => return Ok(Outcome::Status(s)),
                        None => {}
                    },
                    Frame::Ping => {
                        self.io.write_all(b"\r\n").await?;
                    }
                    Frame::Pong => {}
                }
            }
            match tokio::time::timeout_at(deadline, self.io.read(&mut self.buf)).await {
                Ok(Ok(0)) => bail!("connection closed by the SBC"),
                Ok(Ok(n)) => self.framer.push(&self.buf[..n]),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Ok(Outcome::Timeout),
            }
        }
    }

    async fn idle(&mut self) -> anyhow::Result<()> {
        loop {
            match self.io.read(&mut self.buf).await? {
                0 => bail!("connection closed by the SBC"),
                n => self.framer.push(&self.buf[..n]),
            }
            // Stray messages between transactions are dropped; pings are answered.
            while let Some(frame) = self
                .framer
                .next_frame()
                .map_err(|e| anyhow!("framing: {e:?}"))?
            {
                if let Frame::Ping = frame {
                    self.io.write_all(b"\r\n").await?;
                }
            }
        }
    }
}

/// Where a phone is in its life, kept across reconnections.
struct Life {
    first: bool,
    registered: bool,
    next: tokio::time::Instant,
}

impl Life {
    /// Not registered yet; the first REGISTER goes out at once.
    fn new() -> Life {
        Life {
            first: true,
            registered: false,
            next: tokio::time::Instant::now(),
        }
    }
}

/// Registers, refreshes until stopped, unregisters. Returns early (true) when a TLS
/// connection broke, for the caller to reconnect.
async fn phone_life<W: Wire>(
    wire: &mut W,
    phone: &mut Phone,
    o: &PhonesOpts,
    sh: &Shared,
    first_refresh: Duration,
    end: tokio::time::Instant,
    life: &mut Life,
) -> bool {
    let mut stop_rx = sh.stop_tx.subscribe();
    while !sh.stop.load(Ordering::Relaxed) && life.next < end {
        let closed = tokio::select! {
            _ = tokio::time::sleep_until(life.next) => false,
            _ = stop_rx.changed() => false,
            r = wire.idle() => r.is_err(),
        };
        if closed {
            sh.connect_errors.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let first = life.first;
        let (msg, branch) = phone.register(o.expires);
        let t0 = Instant::now();
        let outcome = wire.transact(&msg, &branch, sh, o.timeout).await;
        let broken = outcome.is_err();
        let ok = match outcome {
            Ok(Outcome::Ok) => {
                sh.latency(t0.elapsed());
                true
            }
            Ok(Outcome::Status(s)) => {
                sh.status(s);
                false
            }
            Ok(Outcome::Timeout) => {
                sh.timeouts.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => {
                sh.connect_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        let counter = match (first, ok) {
            (true, true) => &sh.registered,
            (true, false) => &sh.first_failed,
            (false, true) => &sh.refreshes_ok,
            (false, false) => &sh.refreshes_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if first {
            sh.first_done.fetch_add(1, Ordering::Relaxed);
        }
        life.registered |= ok;
        let wait = if first {
            first_refresh
        } else {
            Duration::from_secs(u64::from(o.expires / 2).max(1))
        };
        life.first = false;
        life.next = tokio::time::Instant::now() + wait;
        if broken && phone.transport == "TLS" {
            // Without --reconnect the phone stops here, so the failure shows; with it the
            // caller reconnects and the phone registers again at once.
            life.next = tokio::time::Instant::now();
            return true;
        }
    }
    if life.registered {
        let (msg, branch) = phone.register(0);
        if let Ok(Outcome::Ok) = wire
            .transact(&msg, &branch, sh, Duration::from_secs(5))
            .await
        {
            sh.unregistered.fetch_add(1, Ordering::Relaxed);
        }
    }
    false
}

/// PEM of a fresh CA and of a server certificate for `ip` it issued (cert, key), for the
/// SBC's TLS listener in a benchmark: no key material is checked in.
pub fn make_pki(ip: IpAddr) -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sbc-benchmarks CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![ip.to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, ip.to_string());
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

fn tls_config(ca_pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.context("parsing the CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("no CA certificate in the PEM");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Runs the phones to the end and reports.
pub fn run(o: PhonesOpts) -> anyhow::Result<PhonesReport> {
    net::ensure_loopback(o.target_udp, "--target")?;
    net::ensure_loopback(SocketAddr::new(o.local_ip, 0), "--local-ip")?;
    if let Some(t) = o.target_tls {
        net::ensure_loopback(t, "--target-tls")?;
    }
    if o.udp + o.tls == 0 || o.udp + o.tls > MAX_PHONES {
        bail!("1..={MAX_PHONES} phones per process");
    }
    if o.tls > 0 && (o.target_tls.is_none() || o.ca_pem.is_none()) {
        bail!("TLS phones need --target-tls and --ca");
    }
    if o.rate == 0 || o.expires < 10 || o.duration > Duration::from_secs(4 * 3600) {
        bail!("--rate >= 1, --expires >= 10, --duration <= 4 h");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(o))
}

async fn run_async(o: PhonesOpts) -> anyhow::Result<PhonesReport> {
    let o = Arc::new(o);
    let sh = Arc::new(Shared {
        registered: AtomicU64::new(0),
        first_failed: AtomicU64::new(0),
        refreshes_ok: AtomicU64::new(0),
        refreshes_failed: AtomicU64::new(0),
        unregistered: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        connect_errors: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        retransmissions: AtomicU64::new(0),
        first_done: AtomicU64::new(0),
        statuses: Mutex::new(BTreeMap::new()),
        lat: Mutex::new(Latencies::with_capacity(o.udp + o.tls)),
        stop: AtomicBool::new(false),
        stop_tx: tokio::sync::watch::Sender::new(false),
    });
    let tls_cfg = match &o.ca_pem {
        Some(p) if o.tls > 0 => Some(tls_config(p)?),
        _ => None,
    };
    let run = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() << 4);
    let start = Instant::now();
    let end = tokio::time::Instant::now() + o.duration;
    let total = o.udp + o.tls;
    let refresh = Duration::from_secs(u64::from(o.expires / 2).max(1));
    {
        let sh = sh.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            sh.stop.store(true, Ordering::Relaxed);
            sh.stop_tx.send_replace(true);
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = tokio::time::Instant::now();
    for i in 0..total {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / f64::from(o.rate))).await;
        // Spread the refreshes evenly over one refresh interval.
        let first_refresh = refresh.mul_f64((i as f64 + 0.5) / total as f64);
        let tls = i >= o.udp;
        let mut phone = Phone {
            idx: i,
            user: format!("{}{i}", o.user_prefix),
            domain: o.domain.clone(),
            transport: if tls { "TLS" } else { "UDP" },
            local: SocketAddr::new(o.local_ip, 0),
            run,
            cseq: 0,
        };
        let (o2, sh2) = (o.clone(), sh.clone());
        if !tls {
            let sock = UdpSocket::bind(SocketAddr::new(o.local_ip, 0))
                .await
                .context("binding a phone's UDP socket (fd limit?)")?;
            phone.local = sock.local_addr()?;
            let mut wire = UdpWire {
                sock,
                target: o.target_udp,
                buf: vec![0u8; 8192],
            };
            tasks.spawn(async move {
                let mut life = Life::new();
                phone_life(
                    &mut wire,
                    &mut phone,
                    &o2,
                    &sh2,
                    first_refresh,
                    end,
                    &mut life,
                )
                .await;
            });
        } else {
            let (Some(target), Some(cfg)) = (o.target_tls, tls_cfg.clone()) else {
                bail!("TLS phones need --target-tls and --ca");
            };
            tasks.spawn(async move {
                let mut life = Life::new();
                loop {
                    let connect = async {
                        let s = match target {
                            SocketAddr::V4(_) => TcpSocket::new_v4()?,
                            SocketAddr::V6(_) => TcpSocket::new_v6()?,
                        };
                        s.bind(SocketAddr::new(o2.local_ip, 0))?;
                        let tcp = s.connect(target).await?;
                        let local = tcp.local_addr()?;
                        let name = rustls::pki_types::ServerName::from(target.ip());
                        let io = tokio_rustls::TlsConnector::from(cfg.clone())
                            .connect(name, tcp)
                            .await?;
                        anyhow::Ok((io, local))
                    };
                    match tokio::time::timeout(o2.timeout, connect).await {
                        Ok(Ok((io, local))) => {
                            phone.local = local;
                            let mut wire = StreamWire {
                                io,
                                framer: StreamFramer::new(65535),
                                buf: vec![0u8; 8192],
                            };
                            let broken = phone_life(
                                &mut wire,
                                &mut phone,
                                &o2,
                                &sh2,
                                first_refresh,
                                end,
                                &mut life,
                            )
                            .await;
                            if !broken {
                                break;
                            }
                        }
                        _ if !life.first => {
                            sh2.connect_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            sh2.connect_errors.fetch_add(1, Ordering::Relaxed);
                            sh2.first_failed.fetch_add(1, Ordering::Relaxed);
                            sh2.first_done.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    let now = tokio::time::Instant::now();
                    if !o2.reconnect || sh2.stop.load(Ordering::Relaxed) || now >= end {
                        break;
                    }
                    // Spread the reconnections (RFC 5626 4.5 backs off; 0-2 s is enough here).
                    let pause = Duration::from_millis(rand::random::<u64>() % 2000);
                    tokio::time::sleep(pause).await;
                    sh2.reconnects.fetch_add(1, Ordering::Relaxed);
                    life.next = tokio::time::Instant::now();
                }
            });
        }
    }
    // Ready: every phone has had its first answer (bounded by the run's end).
    let mut ready_seconds = None;
    while tokio::time::Instant::now() < end && !sh.stop.load(Ordering::Relaxed) {
        if sh.first_done.load(Ordering::Relaxed) as usize >= total {
            ready_seconds = Some(start.elapsed().as_secs_f64());
            if let Some(p) = &o.ready_file {
                std::fs::write(
                    p,
                    format!(
                        "{{\"registered\": {}, \"first_failed\": {}, \"ready_seconds\": {:.3}}}\n",
                        sh.registered.load(Ordering::Relaxed),
                        sh.first_failed.load(Ordering::Relaxed),
                        start.elapsed().as_secs_f64()
                    ),
                )?;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every task ends by `end` (+ one transaction and the unregistration); the backstop
    // covers a stuck connection.
    let backstop = end + o.timeout + Duration::from_secs(10);
    while tokio::time::timeout_at(backstop, tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    tasks.abort_all();
    let mut lat = std::mem::take(&mut *sh.lat.lock());
    let statuses = sh.statuses.lock().clone();
    Ok(PhonesReport {
        udp: o.udp,
        tls: o.tls,
        registered: sh.registered.load(Ordering::Relaxed),
        first_failed: sh.first_failed.load(Ordering::Relaxed),
        refreshes_ok: sh.refreshes_ok.load(Ordering::Relaxed),
        refreshes_failed: sh.refreshes_failed.load(Ordering::Relaxed),
        unregistered: sh.unregistered.load(Ordering::Relaxed),
        timeouts: sh.timeouts.load(Ordering::Relaxed),
        connect_errors: sh.connect_errors.load(Ordering::Relaxed),
        reconnects: sh.reconnects.load(Ordering::Relaxed),
        statuses,
        retransmissions: sh.retransmissions.load(Ordering::Relaxed),
        ready_seconds,
        latency_p50_ms: lat.percentile_ms(50.0),
        latency_p99_ms: lat.percentile_ms(99.0),
        latency_max_ms: lat.max_ms(),
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_carries_transport_and_expires() {
        let mut p = Phone {
            idx: 7,
            user: "p7".into(),
            domain: "bench.test".into(),
            transport: "TLS",
            local: "127.0.0.5:4000".parse().expect("addr"),
            run: 1,
            cseq: 0,
        };
        let (m, branch) = p.register(120);
        let msg = Message::parse(Bytes::from(m.clone())).expect("our REGISTER parses");
        assert_eq!(msg.cseq(), 1);
        assert!(m.contains("Contact: <sip:p7@127.0.0.5:4000;transport=tls>"));
        assert!(m.contains("Expires: 120"));
        let resp = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS 127.0.0.5:4000;branch={branch}\r\nFrom: <sip:p7@d>;tag=p7\r\n\
             To: <sip:p7@d>;tag=x\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
        );
        assert_eq!(final_status(Bytes::from(resp.clone()), &branch), Some(200));
        assert_eq!(final_status(Bytes::from(resp), "z9hG4bKother"), None);
        let (_, b2) = p.register(0);
        assert_ne!(branch, b2, "every REGISTER is a new transaction");
    }

    #[test]
    fn pki_makes_a_usable_client_config() {
        let (ca, cert, key) = make_pki("127.0.0.31".parse().expect("ip")).expect("pki");
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        tls_config(ca.as_bytes()).expect("client config from the CA");
        assert!(tls_config(b"not a pem").is_err());
    }
}
