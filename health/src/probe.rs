//! Probing one node: SIP OPTIONS over its own transport and/or HTTP(S) GET.
//!
//! A [`Prober`] is built once per node and called once per interval by the
//! monitor (and once more by a witness check). Each call is bounded by the
//! pool's probe timeout and touches nothing shared but the node's cached
//! TCP/TLS connection, so a slow or dead node never holds anything else up.
//!
//! OPTIONS rules, after kamailio's dispatcher:
//! - a fresh branch, Call-ID and From tag per probe; the Via names the
//!   prober's real local address and asks for `rport`, so a PBX behind NAT
//!   or with a strict Via check answers to the right place;
//! - UDP: a fresh socket per probe, connected to the node so that an ICMP
//!   port unreachable (the PBX process is gone) fails the probe at once
//!   instead of after the timeout; one retransmission halfway through the
//!   timeout, so a single lost datagram does not count as a failure;
//! - TCP/TLS (SNI = `tls_server_name`, certificate checked against the
//!   webpki roots plus the node's `tls_ca`): the connection is kept between
//!   probes like real traffic's, and replaced after any error; a cached
//!   connection that turns out dead is retried once on a fresh one;
//! - the node is alive on a final response whose code counts
//!   ([`sbc_config::Probe::is_alive_code`]); provisional responses are
//!   waited past; a locally generated timeout never counts as an answer.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use sbc_config::{HttpUrl, Transport};
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::message::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::error::ProbeError;
use crate::http;
use crate::tls::{self, Tls};

/// Largest SIP response accepted from a node (what a UDP datagram can hold).
const MAX_RESPONSE: usize = 65_535;

/// Which probe produced a result: the `kind` label of probe metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// SIP OPTIONS.
    Options,
    /// HTTP(S) GET.
    Http,
}

impl ProbeKind {
    /// Fixed label text.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Options => "options",
            ProbeKind::Http => "http",
        }
    }
}

/// One probe's result: the round-trip time when the node proved alive.
pub type ProbeResult = Result<Duration, ProbeError>;

/// The verdict of one probe round of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// True when every configured probe proved the node alive: a PBX whose
    /// web application is gone is not healthy even if SIP still answers.
    pub alive: bool,
    /// The OPTIONS result, when that probe is configured.
    pub options: Option<ProbeResult>,
    /// The HTTP result, when that probe is configured.
    pub http: Option<ProbeResult>,
}

impl ProbeReport {
    /// Each configured probe's result, with its kind.
    pub fn results(&self) -> impl Iterator<Item = (ProbeKind, &ProbeResult)> {
        [
            (ProbeKind::Options, self.options.as_ref()),
            (ProbeKind::Http, self.http.as_ref()),
        ]
        .into_iter()
        .filter_map(|(kind, r)| r.map(|r| (kind, r)))
    }

    /// The first failure, for the log line of a transition.
    pub fn first_error(&self) -> Option<(ProbeKind, &ProbeError)> {
        self.results()
            .find_map(|(kind, r)| r.as_ref().err().map(|e| (kind, e)))
    }
}

/// A TCP or TLS stream toward the node.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A cached stream connection with its framing state.
struct StreamConn {
    io: Box<dyn Io>,
    framer: StreamFramer,
    local: SocketAddr,
}

/// Probes one node (see the module docs).
pub struct Prober {
    pool: String,
    node: String,
    address: SocketAddr,
    transport: Transport,
    /// Host for the Request-URI and To: the TLS name when there is one
    /// (so a PBX with name-based domains recognises itself), else the IP.
    uri_host: String,
    server_name: Option<ServerName<'static>>,
    options: bool,
    http: Option<HttpUrl>,
    /// For the SIP TLS probe and the node's HTTPS probe: webpki roots plus
    /// the node's `tls_ca`.
    tls: Tls,
    probe: sbc_config::Probe,
    /// The TCP/TLS connection kept between probes. Taken out for the length
    /// of a probe (never held across an await), so a concurrent probe of the
    /// same node (a witness check) simply opens its own.
    conn: Mutex<Option<StreamConn>>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("pool", &self.pool)
            .field("node", &self.node)
            .field("address", &self.address)
            .field("transport", &self.transport)
            .field("options", &self.options)
            .field("http", &self.http.as_ref().map(|u| &u.authority))
            .finish()
    }
}

impl Prober {
    /// The prober of `node` of `pool` with the pool's probe settings.
    ///
    /// Never fails: a problem found here (an unreadable `tls_ca`, a TLS name
    /// that is not a valid server name) is logged once and fails every probe
    /// that needs it, so the node shows up Down with the reason instead of
    /// the SBC refusing to start.
    pub fn new(pool: &str, node: &sbc_config::Node, probe: &sbc_config::Probe) -> Prober {
        let tls = Tls::new(node.tls_ca.as_deref());
        if let Some(e) = tls.error() {
            tracing::error!(pool, node = %node.name, error = e, "TLS setup for the node's probes failed; its TLS probes will fail");
        }
        let server_name = match node.transport {
            Transport::Tls => match &node.tls_server_name {
                Some(name) => match ServerName::try_from(name.clone()) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::error!(pool, node = %node.name, error = %e, "bad tls_server_name; the node's OPTIONS probes will fail");
                        None
                    }
                },
                None => Some(ServerName::IpAddress(node.address.ip().into())),
            },
            _ => None,
        };
        let http = node.http_url.as_deref().and_then(|u| match HttpUrl::parse(u) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::error!(pool, node = %node.name, error = %e, "bad http_url; HTTP probe disabled");
                None
            }
        });
        let uri_host = match (&node.transport, &node.tls_server_name) {
            (Transport::Tls, Some(name)) => name.clone(),
            _ => host_text(node.address.ip()),
        };
        Prober {
            pool: pool.to_string(),
            node: node.name.clone(),
            address: node.address,
            transport: node.transport,
            uri_host,
            server_name,
            options: node.options,
            http,
            tls,
            probe: probe.clone(),
            conn: Mutex::new(None),
        }
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Runs every configured probe of the node concurrently, each bounded
    /// by the probe timeout.
    pub async fn probe(&self) -> ProbeReport {
        let options = async {
            if self.options {
                Some(self.options().await)
            } else {
                None
            }
        };
        let http = async {
            match self.http {
                Some(_) => self.http().await,
                None => None,
            }
        };
        let (options, http) = tokio::join!(options, http);
        let configured = options.is_some() || http.is_some();
        let alive = configured && passed(options.as_ref()) && passed(http.as_ref());
        ProbeReport {
            alive,
            options,
            http,
        }
    }

    /// One SIP OPTIONS probe over the node's transport.
    pub async fn options(&self) -> ProbeResult {
        let run = async {
            match self.transport {
                Transport::Udp => self.options_udp().await,
                Transport::Tcp | Transport::Tls => self.options_stream().await,
            }
        };
        tokio::time::timeout(self.probe.timeout, run)
            .await
            .unwrap_or(Err(ProbeError::Timeout))
    }

    /// One HTTP(S) GET of the node's `http_url`; `None` when it has none.
    pub async fn http(&self) -> Option<ProbeResult> {
        let url = self.http.as_ref()?;
        let start = Instant::now();
        let run = http::send(url, "GET", &[], Bytes::new(), self.tls.get());
        Some(match tokio::time::timeout(self.probe.timeout, run).await {
            Err(_) => Err(ProbeError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(code)) if (200..300).contains(&code) => Ok(start.elapsed()),
            Ok(Ok(code)) => Err(ProbeError::Status(code)),
        })
    }

    async fn options_udp(&self) -> ProbeResult {
        let bind = match self.address {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = UdpSocket::bind(bind).await.map_err(ProbeError::transport)?;
        socket
            .connect(self.address)
            .await
            .map_err(ProbeError::transport)?;
        let local = socket.local_addr().map_err(ProbeError::transport)?;
        let ids = Ids::new();
        let request = self.request(local, &ids);
        let start = Instant::now();
        socket.send(&request).await.map_err(ProbeError::transport)?;
        let retransmit = tokio::time::sleep(self.probe.timeout / 2);
        tokio::pin!(retransmit);
        let mut retransmitted = false;
        // Room for the largest datagram, not zeroed: recv_buf writes into the spare capacity,
        // so a probe touches only the pages its answer fills (a zeroed 64 KiB per probe was
        // most of the health checker's CPU).
        let mut buf = Vec::with_capacity(MAX_RESPONSE);
        loop {
            buf.clear();
            tokio::select! {
                received = socket.recv_buf(&mut buf) => {
                    let n = received.map_err(ProbeError::transport)?;
                    let datagram = buf.get(..n).unwrap_or_default();
                    if let Some(result) = self.answer(Bytes::copy_from_slice(datagram), &ids, start) {
                        return result;
                    }
                }
                () = &mut retransmit, if !retransmitted => {
                    retransmitted = true;
                    socket.send(&request).await.map_err(ProbeError::transport)?;
                }
            }
        }
    }

    async fn options_stream(&self) -> ProbeResult {
        let start = Instant::now();
        let cached = self.conn.lock().take();
        if let Some(conn) = cached {
            match self.exchange(conn, start).await {
                // A cached connection the node has closed meanwhile (restart,
                // idle timeout): not a verdict on the node, try a fresh one.
                (Err(ProbeError::Transport(_)), _) => {}
                (result, conn) => {
                    self.keep(conn);
                    return result;
                }
            }
        }
        let conn = self.connect().await?;
        let (result, conn) = self.exchange(conn, start).await;
        self.keep(conn);
        result
    }

    /// Puts a healthy connection back for the next probe, unless a
    /// concurrent probe already did.
    fn keep(&self, conn: Option<StreamConn>) {
        if let Some(conn) = conn {
            let mut slot = self.conn.lock();
            if slot.is_none() {
                *slot = Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<StreamConn, ProbeError> {
        let tcp = TcpStream::connect(self.address)
            .await
            .map_err(ProbeError::transport)?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(ProbeError::transport)?;
        let io: Box<dyn Io> = match self.transport {
            Transport::Tls => {
                let name = self
                    .server_name
                    .clone()
                    .ok_or_else(|| ProbeError::Tls("no usable TLS server name".into()))?;
                let config = Arc::clone(self.tls.get()?);
                let stream = TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(tls::handshake_error)?;
                Box::new(stream)
            }
            _ => Box::new(tcp),
        };
        Ok(StreamConn {
            io,
            framer: StreamFramer::new(MAX_RESPONSE),
            local,
        })
    }

    /// Sends one OPTIONS on `conn` and reads until its final response.
    /// Returns the connection when it is still usable.
    async fn exchange(
        &self,
        mut conn: StreamConn,
        start: Instant,
    ) -> (ProbeResult, Option<StreamConn>) {
        let ids = Ids::new();
        let request = self.request(conn.local, &ids);
        if let Err(e) = conn.io.write_all(&request).await {
            return (Err(ProbeError::transport(e)), None);
        }
        if let Err(e) = conn.io.flush().await {
            return (Err(ProbeError::transport(e)), None);
        }
        let mut buf = [0u8; 4096];
        loop {
            loop {
                match conn.framer.next_frame() {
                    Ok(Some(Frame::Message(message))) => {
                        if let Some(result) = self.answer(message, &ids, start) {
                            return (result, Some(conn));
                        }
                    }
                    Ok(Some(Frame::Ping)) => {
                        if let Err(e) = conn.io.write_all(b"\r\n").await {
                            return (Err(ProbeError::transport(e)), None);
                        }
                    }
                    Ok(Some(Frame::Pong)) => {}
                    Ok(None) => break,
                    Err(e) => return (Err(ProbeError::Protocol(e.to_string())), None),
                }
            }
            match conn.io.read(&mut buf).await {
                Ok(0) => {
                    return (
                        Err(ProbeError::Transport(
                            "connection closed by the node".into(),
                        )),
                        None,
                    )
                }
                Ok(n) => conn.framer.push(buf.get(..n).unwrap_or_default()),
                Err(e) => return (Err(ProbeError::transport(e)), None),
            }
        }
    }

    /// The verdict on a received message, or `None` if it is not the final
    /// response to this probe (another transaction's, a provisional one,
    /// unparseable noise).
    fn answer(&self, bytes: Bytes, ids: &Ids, start: Instant) -> Option<ProbeResult> {
        let message = Message::parse(bytes).ok()?;
        let code = message.status()?;
        let via = message.top_via()?;
        if via.branch? != ids.branch.as_bytes() || message.call_id() != ids.call_id.as_bytes() {
            return None;
        }
        if code < 200 {
            return None;
        }
        Some(if self.probe.is_alive_code(code) {
            Ok(start.elapsed())
        } else {
            Err(ProbeError::Status(code))
        })
    }

    /// The OPTIONS request, with a Via naming `local`.
    fn request(&self, local: SocketAddr, ids: &Ids) -> Vec<u8> {
        let transport = match self.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        };
        let param = match self.transport {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
            Transport::Tls => ";transport=tls",
        };
        let target = format!("sip:{}:{}", self.uri_host, self.address.port());
        let local_host = host_text(local.ip());
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "OPTIONS {target}{param} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local_host}:{port};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:sbc-health@{local_host}>;tag={tag}\r\n\
             To: <{target}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 OPTIONS\r\n\
             Accept: application/sdp\r\n\
             User-Agent: {agent}\r\n\
             Content-Length: 0\r\n\r\n",
            port = local.port(),
            branch = ids.branch,
            tag = ids.tag,
            call_id = ids.call_id,
            agent = http::USER_AGENT,
        );
        out.into_bytes()
    }
}

/// The identifiers of one probe transaction.
struct Ids {
    branch: String,
    tag: String,
    call_id: String,
}

impl Ids {
    fn new() -> Ids {
        Ids {
            // RFC 3261 magic cookie, so the PBX treats it as a proper
            // RFC 3261 transaction.
            branch: format!("z9hG4bK-hc-{:016x}", rand::random::<u64>()),
            tag: format!("{:08x}", rand::random::<u32>()),
            call_id: format!(
                "hc-{:016x}{:08x}",
                rand::random::<u64>(),
                rand::random::<u32>()
            ),
        }
    }
}

/// An IP as written in a SIP header: IPv6 in brackets.
fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A probe that is not configured does not veto; a configured one must pass.
fn passed(result: Option<&ProbeResult>) -> bool {
    !matches!(result, Some(Err(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(transport: &str, extra: &str) -> (sbc_config::Node, sbc_config::Probe) {
        let text = format!(
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n\
             [[pool]]\nname = \"p\"\n[[pool.node]]\nname = \"n\"\naddress = \"127.0.0.1:5070\"\n\
             transport = \"{transport}\"\n{extra}"
        );
        let cfg = sbc_config::parse(&text, std::path::Path::new("sbc.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let pool = &cfg.pools[0];
        (pool.nodes[0].clone(), pool.probe.clone())
    }

    #[test]
    fn options_request_is_well_formed() {
        let (n, p) = node("tcp", "");
        let prober = Prober::new("p", &n, &p);
        let ids = Ids::new();
        let local: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let raw = prober.request(local, &ids);
        let m = Message::parse(Bytes::from(raw)).expect("parses");
        assert!(m.is_request());
        assert_eq!(m.method_bytes(), b"OPTIONS");
        assert_eq!(m.uri_bytes(), b"sip:127.0.0.1:5070;transport=tcp");
        let via = m.top_via().expect("via");
        assert_eq!(via.transport_raw, b"TCP");
        assert_eq!(via.host, b"127.0.0.1");
        assert_eq!(via.port, Some(40000));
        assert_eq!(via.rport, Some(None));
        assert!(via.has_rfc3261_branch());
        assert_eq!(via.branch, Some(ids.branch.as_bytes()));
        assert_eq!(m.call_id(), ids.call_id.as_bytes());
        assert_eq!(m.cseq(), 1);
        // A fresh branch every time.
        assert_ne!(Ids::new().branch, ids.branch);
    }

    #[test]
    fn tls_uri_uses_the_server_name_and_v6_is_bracketed() {
        let (n, p) = node("tls", "tls_server_name = \"pbx.example.com\"\n");
        let prober = Prober::new("p", &n, &p);
        let local: SocketAddr = "[::1]:40000".parse().expect("addr");
        let raw = prober.request(local, &Ids::new());
        let m = Message::parse(Bytes::from(raw)).expect("parses");
        assert_eq!(m.uri_bytes(), b"sip:pbx.example.com:5070;transport=tls");
        assert_eq!(m.top_via().map(|v| v.host), Some(&b"[::1]"[..]));
    }

    fn response(code: u16, ids: &Ids) -> Bytes {
        Bytes::from(format!(
            "SIP/2.0 {code} Whatever\r\nVia: SIP/2.0/UDP 127.0.0.1:40000;branch={};rport=40000\r\n\
             From: <sip:sbc-health@127.0.0.1>;tag={}\r\nTo: <sip:127.0.0.1:5070>;tag=x\r\n\
             Call-ID: {}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            ids.branch, ids.tag, ids.call_id
        ))
    }

    #[test]
    fn answers_are_judged_by_code_and_matched_by_branch() {
        let (n, p) = node("udp", "");
        let prober = Prober::new("p", &n, &p);
        let ids = Ids::new();
        let start = Instant::now();
        assert!(matches!(
            prober.answer(response(200, &ids), &ids, start),
            Some(Ok(_))
        ));
        assert!(matches!(
            prober.answer(response(404, &ids), &ids, start),
            Some(Ok(_))
        ));
        assert_eq!(
            prober.answer(response(503, &ids), &ids, start),
            Some(Err(ProbeError::Status(503)))
        );
        assert_eq!(prober.answer(response(100, &ids), &ids, start), None);
        let other = Ids::new();
        assert_eq!(prober.answer(response(200, &other), &ids, start), None);
        assert_eq!(
            prober.answer(Bytes::from_static(b"garbage"), &ids, start),
            None
        );

        let (n, mut p) = node("udp", "");
        p.alive_codes = vec![200];
        let strict = Prober::new("p", &n, &p);
        assert_eq!(
            strict.answer(response(404, &ids), &ids, start),
            Some(Err(ProbeError::Status(404)))
        );
    }

    #[test]
    fn report_is_alive_only_when_every_probe_is() {
        let ok: ProbeResult = Ok(Duration::from_millis(1));
        let bad: ProbeResult = Err(ProbeError::Timeout);
        let r = ProbeReport {
            alive: false,
            options: Some(ok.clone()),
            http: Some(bad.clone()),
        };
        assert_eq!(
            r.first_error(),
            Some((ProbeKind::Http, &ProbeError::Timeout))
        );
        assert_eq!(r.results().count(), 2);
        assert!(passed(Some(&ok)) && passed(None) && !passed(Some(&bad)));
    }
}
