//! [`Ua`]: the user-agent core shared by the test phone ([`crate::phone::Phone`]) and the
//! test carrier ([`crate::trunk::Trunk`]).
//!
//! It is a UAC and a UAS "correct enough that a strict proxy accepts it" (RFC 3261 8, 12,
//! 13, 15, 17), and no more:
//! - every request goes to one fixed next hop (`PhoneConfig::sbc`), as with an outbound
//!   proxy: initial requests carry no Route, in-dialog requests carry the route set;
//! - client transactions retransmit on UDP with Timer A/E (T1 = 500 ms) until a response
//!   arrives, so lost-packet tests work; they give up after `PhoneConfig::timeout` without
//!   any response (not 64*T1: tests must fail fast);
//! - non-2xx finals are ACKed hop-by-hop (same branch), 2xx finals end-to-end (new branch,
//!   route set), and a retransmitted 2xx is re-ACKed by the endpoint's auto-reply hook;
//! - as UAS, retransmitted requests are re-answered with the last response by that hook, and
//!   final responses are retransmitted on UDP until the ACK arrives (Timer G), like a real
//!   phone, so a proxy that loses an ACK is noticed.
//!
//! Everything a test may want to look at is returned ([`Call::responses`], the request
//! received, the ACK) and the raw [`Endpoint`] is reachable for scripting odd cases.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::{HeaderName, Message, Method, Transport};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::digest::{Challenge, Credentials};
use crate::sip_io::{summary, Endpoint};

/// RFC 3261 T1: RTT estimate, first retransmission interval.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2: cap of the non-INVITE and 2xx retransmission interval.
pub const T2: Duration = Duration::from_secs(4);

const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, MESSAGE";

/// Configuration of a phone (also used for the trunk's UA).
#[derive(Clone, Debug)]
pub struct PhoneConfig {
    pub user: String,
    pub domain: String,
    /// Digest password; empty means challenges are not answered.
    pub password: String,
    pub transport: Transport,
    /// The next hop for every request (the SBC, or a PBX in tests without SBC).
    pub sbc: SocketAddr,
    /// CA certificate(s), PEM, trusted for TLS.
    pub tls_ca: Option<Vec<u8>>,
    /// The name the SBC's TLS certificate must match.
    pub tls_server_name: String,
    /// Local address to bind (UDP) or connect from (TCP/TLS); 127.0.0.1 by default.
    pub local_ip: IpAddr,
    /// UDP port to bind; 0 picks one. Ignored for TCP/TLS (ephemeral).
    pub local_port: u16,
    /// NAT simulation: the Contact (and Via sent-by) name this port instead of the real one;
    /// the phone must still be reachable through the SBC's flow.
    pub contact_port_override: Option<u16>,
    /// How long to wait for any response (retransmitting meanwhile on UDP), for an expected
    /// request, or for an ACK.
    pub timeout: Duration,
    /// How long an INVITE waits for its final response once a provisional arrived (the
    /// callee is a scripted test task that may take a moment to answer).
    pub call_timeout: Duration,
    /// [`Ua::wait_invite`] sends 180 Ringing after 100 Trying.
    pub auto_ring: bool,
    /// Answer out-of-dialog OPTIONS with 200 automatically (SBC keep-alive/health probes).
    pub answer_options: bool,
    pub user_agent: String,
}

impl Default for PhoneConfig {
    /// User `phone`, domain `example.test`, no password, SBC at 127.0.0.1:5060; otherwise as
    /// [`PhoneConfig::new`]. For `PhoneConfig { user: .., ..Default::default() }`.
    fn default() -> PhoneConfig {
        PhoneConfig::new(
            "phone",
            "example.test",
            "",
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5060),
        )
    }
}

impl PhoneConfig {
    /// UDP from 127.0.0.1, 2 s timeout, 5 s call timeout, auto-ring, OPTIONS answered.
    pub fn new(user: &str, domain: &str, password: &str, sbc: SocketAddr) -> PhoneConfig {
        PhoneConfig {
            user: user.to_string(),
            domain: domain.to_string(),
            password: password.to_string(),
            transport: Transport::Udp,
            sbc,
            tls_ca: None,
            tls_server_name: "localhost".to_string(),
            local_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            local_port: 0,
            contact_port_override: None,
            timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            auto_ring: true,
            answer_options: true,
            user_agent: format!("sbc-tests-ua/{user}"),
        }
    }
}

/// A dialog (or an attempted one) from this UA's point of view.
#[derive(Clone, Debug)]
pub struct Call {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: Option<String>,
    /// The URI in our From (UAC) / To (UAS).
    pub local_uri: String,
    /// The URI in the peer's From/To (the INVITE's target for a UAC).
    pub remote_uri: String,
    /// Route set, header values (`<sip:...;lr>`), in the order to put in Route headers.
    pub route_set: Vec<String>,
    /// The peer's Contact URI.
    pub remote_target: String,
    /// The last local CSeq number used in this dialog.
    pub cseq: u32,
    /// UAC: every response received for the INVITE(s), challenges included, in order.
    /// UAS: the final response sent.
    pub responses: Vec<Message>,
    /// Final status of the (last) INVITE; 0 while none has been received.
    pub final_status: u16,
    /// UAC: the last INVITE sent (needed for CANCEL and the non-2xx ACK). UAS: the INVITE.
    pub invite: Option<Message>,
    /// UAS: the ACK that completed the INVITE.
    pub ack: Option<Message>,
    pub is_uac: bool,
    /// Version of our SDP (o= line), bumped by re-INVITEs.
    pub sdp_version: u32,
}

impl Call {
    /// The media address the peer's last SDP names (c= and m=audio), if any.
    pub fn remote_media(&self) -> Option<SocketAddr> {
        let sdp_msg = if self.is_uac {
            self.responses
                .iter()
                .rev()
                .find(|r| r.status().is_some_and(|s| (200..300).contains(&s)))
        } else {
            self.invite.as_ref()
        }?;
        sdp_media_addr(sdp_msg.body())
    }
}

/// An INVITE received and not answered yet.
#[derive(Clone, Debug)]
pub struct IncomingCall {
    pub invite: Message,
    /// Where it came from (responses go back there).
    pub from: SocketAddr,
    /// The To tag used in our responses.
    pub local_tag: String,
}

/// Knobs for [`Ua::invite_with`].
#[derive(Clone, Debug, Default)]
pub struct InviteOpts {
    /// Return after the first provisional above 100 (`final_status` stays 0).
    pub stop_at_ringing: bool,
    /// Extra header lines, each ending in CRLF.
    pub extra_headers: String,
    /// Replaces the default SDP offer; `Some(vec![])` sends no body.
    pub sdp: Option<Vec<u8>>,
    /// Content-Type of that body (default `application/sdp`): a multipart body with the SDP
    /// in one part, as SIP-I trunks send.
    pub content_type: Option<String>,
}

/// Per-UA memory used by the auto-reply hook.
#[derive(Default)]
struct UaState {
    /// Server transactions answered: (top Via branch, method) -> last response sent.
    answered: HashMap<(String, String), Vec<u8>>,
    /// 2xx responses ACKed: (Call-ID, CSeq) -> the ACK, re-sent on a retransmitted 2xx.
    acks: HashMap<(String, u32), Vec<u8>>,
}

/// The user-agent core. See the module doc.
pub struct Ua {
    cfg: PhoneConfig,
    ep: Endpoint,
    media: Arc<UdpSocket>,
    reg_call_id: String,
    reg_tag: String,
    reg_cseq: AtomicU32,
    state: Arc<Mutex<UaState>>,
}

/// A request to build: everything but Via, Max-Forwards and Content-Length.
struct ReqSpec<'a> {
    method: &'a str,
    ruri: &'a str,
    from: &'a str,
    to: &'a str,
    call_id: &'a str,
    cseq: u32,
    routes: &'a [String],
    contact: bool,
    extra: &'a str,
    body: Option<(&'a str, &'a [u8])>,
}

/// The outcome of a client transaction.
struct TxOutcome {
    responses: Vec<Message>,
    final_response: Option<Message>,
}

impl Ua {
    /// Opens the socket (UDP bind, or TCP/TLS connect to `cfg.sbc`) and an RTP socket.
    pub async fn new(cfg: PhoneConfig) -> anyhow::Result<Ua> {
        let ep = match cfg.transport {
            Transport::Udp => Endpoint::udp(SocketAddr::new(cfg.local_ip, cfg.local_port)).await?,
            Transport::Tcp => Endpoint::tcp_from(Some(cfg.local_ip), cfg.sbc).await?,
            Transport::Tls => {
                let ca = cfg
                    .tls_ca
                    .as_deref()
                    .ok_or_else(|| anyhow!("TLS phone needs tls_ca"))?;
                let tls = crate::sip_io::client_config(ca, None)?;
                Endpoint::tls_with_config(Some(cfg.local_ip), cfg.sbc, &cfg.tls_server_name, tls)
                    .await?
            }
        };
        let media = Arc::new(UdpSocket::bind(SocketAddr::new(cfg.local_ip, 0)).await?);
        let ua = Ua {
            reg_call_id: format!("reg-{}@{}", rand_hex(12), host_str(cfg.local_ip)),
            reg_tag: rand_hex(8),
            reg_cseq: AtomicU32::new(0),
            state: Arc::new(Mutex::new(UaState::default())),
            cfg,
            ep,
            media,
        };
        ua.install_hook();
        Ok(ua)
    }

    /// Re-answers retransmitted requests, re-ACKs retransmitted 2xx, answers OPTIONS.
    fn install_hook(&self) {
        let state = self.state.clone();
        let answer_options = self.cfg.answer_options;
        let hook = move |m: &Message, _src: SocketAddr| -> Option<Vec<u8>> {
            let st = state.lock();
            match m.method() {
                Some(Method::Ack) => None,
                Some(_) => {
                    let branch = m.top_via()?.branch.map(lossy)?;
                    let key = (branch, lossy(m.method_bytes()));
                    if let Some(resp) = st.answered.get(&key) {
                        return Some(resp.clone());
                    }
                    if answer_options && m.method() == Some(Method::Options) && m.to_tag().is_none()
                    {
                        let tag = rand_hex(8);
                        let extra = format!("Allow: {ALLOW}\r\nAccept: application/sdp\r\n");
                        return Some(edit::response(
                            m,
                            200,
                            "OK",
                            &ResponseOpts {
                                to_tag: Some(tag.as_bytes()),
                                extra: extra.as_bytes(),
                                ..Default::default()
                            },
                        ));
                    }
                    None
                }
                None => {
                    let st_code = m.status()?;
                    if (200..300).contains(&st_code) && m.cseq_method() == Method::Invite {
                        let key = (lossy(m.call_id()), m.cseq());
                        return st.acks.get(&key).cloned();
                    }
                    None
                }
            }
        };
        self.ep.set_auto_reply(Some(Arc::new(hook)));
    }

    pub fn config(&self) -> &PhoneConfig {
        &self.cfg
    }

    /// Raw access for scripting odd cases (drop a response, send twice...).
    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// `sip:user@domain`.
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.cfg.user, self.cfg.domain)
    }

    /// The port our Contact and Via name (the override when simulating NAT).
    pub fn contact_port(&self) -> u16 {
        self.cfg
            .contact_port_override
            .unwrap_or(self.ep.local_addr().port())
    }

    /// `sip:user@ip:port;transport=x`.
    pub fn contact_uri(&self) -> String {
        format!(
            "sip:{}@{}:{};transport={}",
            self.cfg.user,
            host_str(self.cfg.local_ip),
            self.contact_port(),
            self.ep.transport().uri_param()
        )
    }

    /// The local RTP socket our SDP offers/answers name.
    pub fn media_socket(&self) -> &Arc<UdpSocket> {
        &self.media
    }

    pub fn media_addr(&self) -> SocketAddr {
        self.media
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.cfg.local_ip, 0))
    }

    /// A minimal audio SDP naming our RTP socket.
    pub fn sdp(&self, version: u32) -> Vec<u8> {
        let ip = self.cfg.local_ip;
        let fam = if ip.is_ipv4() { "IP4" } else { "IP6" };
        format!(
            "v=0\r\no={user} 4242 {version} IN {fam} {ip}\r\ns=sbc-tests\r\nc=IN {fam} {ip}\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n",
            user = self.cfg.user,
            port = self.media_addr().port(),
        )
        .into_bytes()
    }

    // ---------------------------------------------------------------------------------
    // Building and sending requests
    // ---------------------------------------------------------------------------------

    fn build_request(&self, r: &ReqSpec<'_>, branch: &str) -> Vec<u8> {
        let mut s = String::with_capacity(800);
        let _ = write!(
            s,
            "{} {} SIP/2.0\r\nVia: SIP/2.0/{} {}:{};branch={branch};rport\r\nMax-Forwards: 70\r\n",
            r.method,
            r.ruri,
            self.ep.transport().via_token(),
            host_str(self.cfg.local_ip),
            self.contact_port()
        );
        for route in r.routes {
            let _ = write!(s, "Route: {route}\r\n");
        }
        let _ = write!(
            s,
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
            r.from, r.to, r.call_id, r.cseq, r.method
        );
        if r.contact {
            let _ = write!(s, "Contact: <{}>\r\n", self.contact_uri());
        }
        let _ = write!(s, "User-Agent: {}\r\n", self.cfg.user_agent);
        s.push_str(r.extra);
        let mut out = s.into_bytes();
        match r.body {
            Some((ct, body)) if !body.is_empty() => {
                out.extend_from_slice(
                    format!(
                        "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(body);
            }
            _ => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
        }
        out
    }

    /// Sends to the next hop (the SBC).
    async fn send(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ep.send(self.cfg.sbc, bytes).await
    }

    /// Runs a client transaction: sends `bytes`, retransmits on UDP (Timer A for INVITE,
    /// Timer E otherwise), collects responses whose top Via carries `branch` and whose CSeq
    /// method is `method`, until a final response (or, with `stop_at_ringing`, the first
    /// provisional above 100). `sent` says the request was already sent and answered with a
    /// provisional (continuing an INVITE transaction): no (re)transmission then.
    async fn run_client_tx(
        &self,
        bytes: &[u8],
        branch: &str,
        method: Method,
        stop_at_ringing: bool,
        sent: bool,
    ) -> anyhow::Result<TxOutcome> {
        let reliable = self.ep.transport().is_reliable();
        if !sent {
            self.send(bytes).await?;
        }
        let start = Instant::now();
        let mut got_provisional = sent;
        let mut deadline = start
            + if sent {
                self.cfg.call_timeout
            } else {
                self.cfg.timeout
            };
        let mut interval = T1;
        let mut next_rtx = start + T1;
        let mut responses = Vec::new();
        let pred = |m: &Message| {
            m.status().is_some()
                && m.cseq_method() == method
                && m.top_via()
                    .and_then(|v| v.branch)
                    .is_some_and(|b| b == branch.as_bytes())
        };
        loop {
            // Timer A stops at the first provisional; Timer E goes on (at T2).
            let invite_proceeding = got_provisional && method == Method::Invite;
            let retransmitting = !reliable && !invite_proceeding;
            let wake = if retransmitting {
                next_rtx.min(deadline)
            } else {
                deadline
            };
            match self.ep.recv_until(wake, &pred).await? {
                Some((m, _)) => {
                    let status = m.status().unwrap_or(0);
                    responses.push(m.clone());
                    if status >= 200 {
                        return Ok(TxOutcome {
                            responses,
                            final_response: Some(m),
                        });
                    }
                    if !got_provisional {
                        got_provisional = true;
                        if method != Method::Invite {
                            // Timer E continues at T2 after a provisional (RFC 3261 17.1.2.2).
                            interval = T2;
                            next_rtx = Instant::now() + T2;
                        }
                    }
                    deadline = Instant::now()
                        + if method == Method::Invite {
                            self.cfg.call_timeout
                        } else {
                            self.cfg.timeout
                        };
                    if stop_at_ringing && status > 100 {
                        return Ok(TxOutcome {
                            responses,
                            final_response: None,
                        });
                    }
                }
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        bail!(
                            "no final response to {} (branch {branch}) within {:?}; got {:?}; backlog: {:?}",
                            method.as_str(),
                            now - start,
                            responses.iter().map(summary).collect::<Vec<_>>(),
                            self.ep.backlog().iter().map(|(m, _)| summary(m)).collect::<Vec<_>>()
                        );
                    }
                    if retransmitting && now >= next_rtx {
                        tracing::debug!(
                            "{}: retransmitting {} {branch}",
                            self.cfg.user,
                            method.as_str()
                        );
                        self.send(bytes).await?;
                        interval = if method == Method::Invite {
                            interval * 2
                        } else {
                            (interval * 2).min(T2)
                        };
                        next_rtx = now + interval;
                    }
                }
            }
        }
    }

    /// Credentials header line answering a 401/407 `resp` for a request `method ruri`.
    fn auth_line(&self, resp: &Message, method: &str, ruri: &str) -> anyhow::Result<String> {
        let (chal_h, cred_h) = match resp.status() {
            Some(401) => (HeaderName::WwwAuthenticate, "Authorization"),
            Some(407) => (HeaderName::ProxyAuthenticate, "Proxy-Authorization"),
            other => bail!("not a challenge: {other:?}"),
        };
        let v = resp
            .header_value(chal_h)
            .ok_or_else(|| anyhow!("{} without challenge header", summary(resp)))?;
        let ch = Challenge::parse(&lossy(v))?;
        let c = Credentials::answer(&ch, &self.cfg.user, &self.cfg.password, method, ruri);
        Ok(format!("{cred_h}: {}\r\n", c.to_header()))
    }

    /// An out-of-dialog non-INVITE request with digest retry; returns all responses and the
    /// final one. `cseq` yields the next CSeq number for each attempt.
    #[allow(clippy::too_many_arguments)]
    async fn ood_request(
        &self,
        method: &str,
        ruri: &str,
        from: &str,
        to: &str,
        call_id: &str,
        cseq: &dyn Fn() -> u32,
        contact: bool,
        extra: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<(Message, Vec<Message>)> {
        let m = Method::from_bytes(method.as_bytes());
        let mut auth = String::new();
        let mut all = Vec::new();
        for attempt in 0..3 {
            let branch = new_branch();
            let extra_all = format!("{auth}{extra}");
            let bytes = self.build_request(
                &ReqSpec {
                    method,
                    ruri,
                    from,
                    to,
                    call_id,
                    cseq: cseq(),
                    routes: &[],
                    contact,
                    extra: &extra_all,
                    body,
                },
                &branch,
            );
            let out = self.run_client_tx(&bytes, &branch, m, false, false).await?;
            all.extend(out.responses);
            let fin = out
                .final_response
                .ok_or_else(|| anyhow!("{method}: no final response"))?;
            let st = fin.status().unwrap_or(0);
            if (st == 401 || st == 407) && !self.cfg.password.is_empty() && attempt < 2 {
                // A second challenge only makes sense when the first nonce went stale.
                if attempt == 1 && !is_stale(&fin) {
                    return Ok((fin, all));
                }
                auth = self.auth_line(&fin, method, ruri)?;
                continue;
            }
            return Ok((fin, all));
        }
        bail!("{method}: too many challenges")
    }

    // ---------------------------------------------------------------------------------
    // Registration
    // ---------------------------------------------------------------------------------

    /// REGISTER (one Call-ID per UA, CSeq increasing, RFC 3261 10.2); answers a 401/407
    /// digest challenge; returns the final response.
    pub async fn register(&self, expires: u32) -> anyhow::Result<Message> {
        self.register_with(expires, "").await
    }

    /// [`Ua::register`] with extra header lines (each ending in CRLF).
    pub async fn register_with(&self, expires: u32, extra: &str) -> anyhow::Result<Message> {
        let aor = self.aor();
        let ruri = format!("sip:{}", self.cfg.domain);
        let from = format!("<{aor}>;tag={}", self.reg_tag);
        let to = format!("<{aor}>");
        let extra = format!("Expires: {expires}\r\nSupported: path\r\n{extra}");
        let next = || self.reg_cseq.fetch_add(1, Ordering::SeqCst) + 1;
        let (fin, _) = self
            .ood_request(
                "REGISTER",
                &ruri,
                &from,
                &to,
                &self.reg_call_id,
                &next,
                true,
                &extra,
                None,
            )
            .await?;
        Ok(fin)
    }

    /// REGISTER with Expires 0.
    pub async fn unregister(&self) -> anyhow::Result<Message> {
        self.register(0).await
    }

    /// An out-of-dialog request (OPTIONS, MESSAGE...) to `target`; answers challenges;
    /// returns the final response.
    pub async fn request(
        &self,
        method: &str,
        target: &str,
        extra: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Message> {
        let call_id = format!("{}@{}", rand_hex(16), host_str(self.cfg.local_ip));
        let from = format!("<{}>;tag={}", self.aor(), rand_hex(8));
        let to = format!("<{target}>");
        let cseq = AtomicU32::new(0);
        let next = || cseq.fetch_add(1, Ordering::SeqCst) + 1;
        let (fin, _) = self
            .ood_request(
                method, target, &from, &to, &call_id, &next, false, extra, body,
            )
            .await?;
        Ok(fin)
    }

    // ---------------------------------------------------------------------------------
    // UAC: calls
    // ---------------------------------------------------------------------------------

    /// INVITE `target` with an SDP offer; answers a 401/407; on a final response sends the
    /// ACK (2xx: to the dialog, route set from Record-Route reversed, RFC 3261 12.1.2).
    pub async fn invite(&self, target: &str) -> anyhow::Result<Call> {
        self.invite_with(target, InviteOpts::default()).await
    }

    /// Like [`Ua::invite`] but returns after the first provisional above 100 (for CANCEL
    /// tests); finish with [`Ua::wait_final`] or [`Ua::cancel`].
    pub async fn invite_until_ringing(&self, target: &str) -> anyhow::Result<Call> {
        self.invite_with(
            target,
            InviteOpts {
                stop_at_ringing: true,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn invite_with(&self, target: &str, opts: InviteOpts) -> anyhow::Result<Call> {
        let mut call = Call {
            call_id: format!("{}@{}", rand_hex(16), host_str(self.cfg.local_ip)),
            local_tag: rand_hex(8),
            remote_tag: None,
            local_uri: self.aor(),
            remote_uri: target.to_string(),
            route_set: Vec::new(),
            remote_target: target.to_string(),
            cseq: 1,
            responses: Vec::new(),
            final_status: 0,
            invite: None,
            ack: None,
            is_uac: true,
            sdp_version: 1,
        };
        let sdp = opts
            .sdp
            .clone()
            .unwrap_or_else(|| self.sdp(call.sdp_version));
        let from = format!("<{}>;tag={}", call.local_uri, call.local_tag);
        let to = format!("<{target}>");
        let mut auth = String::new();
        for attempt in 0..3 {
            let branch = new_branch();
            let extra = format!("{auth}Allow: {ALLOW}\r\n{}", opts.extra_headers);
            let bytes = self.build_request(
                &ReqSpec {
                    method: "INVITE",
                    ruri: target,
                    from: &from,
                    to: &to,
                    call_id: &call.call_id,
                    cseq: call.cseq,
                    routes: &[],
                    contact: true,
                    extra: &extra,
                    body: Some((
                        opts.content_type.as_deref().unwrap_or("application/sdp"),
                        &sdp,
                    )),
                },
                &branch,
            );
            call.invite = Some(parse_own(&bytes)?);
            let out = self
                .run_client_tx(&bytes, &branch, Method::Invite, opts.stop_at_ringing, false)
                .await?;
            call.responses.extend(out.responses);
            let Some(fin) = out.final_response else {
                return Ok(call);
            };
            let st = fin.status().unwrap_or(0);
            if (st == 401 || st == 407) && !self.cfg.password.is_empty() && attempt < 2 {
                self.ack_non2xx(&call, &fin).await?;
                if attempt == 1 && !is_stale(&fin) {
                    call.final_status = st;
                    return Ok(call);
                }
                auth = self.auth_line(&fin, "INVITE", target)?;
                call.cseq += 1;
                continue;
            }
            self.complete_invite(&mut call, &fin).await?;
            return Ok(call);
        }
        bail!("INVITE: too many challenges")
    }

    /// After [`Ua::invite_until_ringing`]: waits for the INVITE's final response (up to
    /// `call_timeout`), ACKs it, and returns it.
    pub async fn wait_final(&self, call: &mut Call) -> anyhow::Result<Message> {
        let invite = call
            .invite
            .clone()
            .ok_or_else(|| anyhow!("call has no INVITE"))?;
        let branch = branch_of(&invite)?;
        let out = self
            .run_client_tx(invite.as_bytes(), &branch, Method::Invite, false, true)
            .await?;
        call.responses.extend(out.responses);
        let fin = out
            .final_response
            .ok_or_else(|| anyhow!("no final response"))?;
        self.complete_invite(call, &fin).await?;
        Ok(fin)
    }

    /// Handles an INVITE's final response: ACK hop-by-hop for non-2xx; for 2xx, establish
    /// the dialog (or refresh the target for a re-INVITE) and ACK end-to-end.
    async fn complete_invite(&self, call: &mut Call, fin: &Message) -> anyhow::Result<()> {
        let st = fin.status().unwrap_or(0);
        call.final_status = st;
        if st >= 300 {
            return self.ack_non2xx(call, fin).await;
        }
        if call.remote_tag.is_none() {
            call.remote_tag = fin.to_tag().map(lossy);
            let mut rr: Vec<String> = fin
                .values(HeaderName::RecordRoute)
                .map(|(_, v)| lossy(v))
                .collect();
            rr.reverse();
            call.route_set = rr;
        }
        if let Some(c) = contact_uri_of(fin) {
            call.remote_target = c;
        } else if call.invite.as_ref().and_then(|i| i.to_tag()).is_none() {
            bail!("2xx without Contact: {}", summary(fin));
        }
        self.ack_2xx(call).await
    }

    /// ACK for a non-2xx final: same branch, Request-URI and Route as the INVITE, To from the
    /// response (RFC 3261 17.1.1.3).
    async fn ack_non2xx(&self, call: &Call, fin: &Message) -> anyhow::Result<()> {
        let invite = call
            .invite
            .as_ref()
            .ok_or_else(|| anyhow!("call has no INVITE"))?;
        let bytes = ack_for_non2xx(invite, fin)?;
        self.send(&bytes).await
    }

    /// ACK for a 2xx: a new transaction in the dialog, CSeq number of the INVITE.
    async fn ack_2xx(&self, call: &Call) -> anyhow::Result<()> {
        let invite_cseq = call.invite.as_ref().map_or(call.cseq, |i| i.cseq());
        let (bytes, _) = self.dialog_request(call, "ACK", invite_cseq, "", None)?;
        self.state
            .lock()
            .acks
            .insert((call.call_id.clone(), invite_cseq), bytes.clone());
        self.send(&bytes).await
    }

    /// Builds an in-dialog request (RFC 3261 12.2.1.1), handling a strict-routing first hop.
    fn dialog_request(
        &self,
        call: &Call,
        method: &str,
        cseq: u32,
        extra: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<(Vec<u8>, String)> {
        let loose = call
            .route_set
            .first()
            .map(|r| {
                NameAddr::parse(r.as_bytes())
                    .map(|na| na.uri.param(b"lr").is_some())
                    .unwrap_or(true)
            })
            .unwrap_or(true);
        let (ruri, routes) = if loose {
            (call.remote_target.clone(), call.route_set.clone())
        } else {
            let first = NameAddr::parse(call.route_set[0].as_bytes())
                .map_err(|e| anyhow!("bad route {:?}: {e:?}", call.route_set[0]))?;
            let mut rest = call.route_set[1..].to_vec();
            rest.push(format!("<{}>", call.remote_target));
            (lossy(first.uri_raw), rest)
        };
        let from = format!("<{}>;tag={}", call.local_uri, call.local_tag);
        let to = match &call.remote_tag {
            Some(t) => format!("<{}>;tag={t}", call.remote_uri),
            None => format!("<{}>", call.remote_uri),
        };
        let branch = new_branch();
        let bytes = self.build_request(
            &ReqSpec {
                method,
                ruri: &ruri,
                from: &from,
                to: &to,
                call_id: &call.call_id,
                cseq,
                routes: &routes,
                contact: matches!(method, "INVITE" | "UPDATE"),
                extra,
                body,
            },
            &branch,
        );
        Ok((bytes, branch))
    }

    /// CANCEL a ringing call: checks the 200 to the CANCEL, then returns the INVITE's final
    /// response (normally 487, ACKed; a 2xx that crossed the CANCEL is ACKed and returned).
    pub async fn cancel(&self, call: &Call) -> anyhow::Result<Message> {
        let invite = call
            .invite
            .as_ref()
            .ok_or_else(|| anyhow!("call has no INVITE"))?;
        let branch = branch_of(invite)?;
        let bytes = cancel_for(invite)?;
        let out = self
            .run_client_tx(&bytes, &branch, Method::Cancel, false, false)
            .await?;
        let c = out
            .final_response
            .ok_or_else(|| anyhow!("no response to CANCEL"))?;
        if c.status() != Some(200) {
            bail!("CANCEL answered with {}", summary(&c));
        }
        let mut call = call.clone();
        let out = self
            .run_client_tx(invite.as_bytes(), &branch, Method::Invite, false, true)
            .await?;
        let fin = out
            .final_response
            .ok_or_else(|| anyhow!("no final response to the cancelled INVITE"))?;
        self.complete_invite(&mut call, &fin).await?;
        Ok(fin)
    }

    /// BYE in the dialog; returns the final response.
    pub async fn bye(&self, call: &Call) -> anyhow::Result<Message> {
        let (bytes, branch) = self.dialog_request(call, "BYE", call.cseq + 1, "", None)?;
        let out = self
            .run_client_tx(&bytes, &branch, Method::Bye, false, false)
            .await?;
        out.final_response
            .ok_or_else(|| anyhow!("no final response to BYE"))
    }

    /// Any non-INVITE request in the dialog (INFO, UPDATE, MESSAGE, ...); bumps the CSeq.
    pub async fn request_in_dialog(
        &self,
        call: &mut Call,
        method: &str,
        extra: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Message> {
        call.cseq += 1;
        let (bytes, branch) = self.dialog_request(call, method, call.cseq, extra, body)?;
        let m = Method::from_bytes(method.as_bytes());
        let out = self.run_client_tx(&bytes, &branch, m, false, false).await?;
        out.final_response
            .ok_or_else(|| anyhow!("no final response to {method}"))
    }

    /// re-INVITE with a new SDP version; ACKs the final response and returns it.
    pub async fn reinvite(&self, call: &mut Call) -> anyhow::Result<Message> {
        call.cseq += 1;
        call.sdp_version += 1;
        let sdp = self.sdp(call.sdp_version);
        let extra = format!("Allow: {ALLOW}\r\n");
        let (bytes, branch) = self.dialog_request(
            call,
            "INVITE",
            call.cseq,
            &extra,
            Some(("application/sdp", &sdp)),
        )?;
        let previous_invite = call.invite.replace(parse_own(&bytes)?);
        let out = self
            .run_client_tx(&bytes, &branch, Method::Invite, false, false)
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                call.invite = previous_invite;
                return Err(e);
            }
        };
        call.responses.extend(out.responses);
        let fin = out
            .final_response
            .ok_or_else(|| anyhow!("no final response to re-INVITE"))?;
        let st = fin.status().unwrap_or(0);
        if (200..300).contains(&st) {
            if let Some(c) = contact_uri_of(&fin) {
                call.remote_target = c;
            }
            call.final_status = st;
            self.ack_2xx(call).await?;
        } else {
            // A failed re-INVITE leaves the dialog as it was (RFC 3261 14.1).
            let status = call.final_status;
            self.ack_non2xx(call, &fin).await?;
            call.final_status = status;
        }
        Ok(fin)
    }

    // ---------------------------------------------------------------------------------
    // UAS
    // ---------------------------------------------------------------------------------

    /// Waits for a new INVITE (not a retransmission, not a re-INVITE), sends 100 Trying and,
    /// with `auto_ring`, 180 Ringing; returns it.
    pub async fn wait_invite(&self, timeout: Duration) -> anyhow::Result<IncomingCall> {
        let state = self.state.clone();
        let (inv, src) = self
            .ep
            .recv_match(timeout, |m| {
                m.method() == Some(Method::Invite)
                    && m.to_tag().is_none()
                    && !m.top_via().and_then(|v| v.branch).is_some_and(|b| {
                        state
                            .lock()
                            .answered
                            .contains_key(&(lossy(b), "INVITE".into()))
                    })
            })
            .await
            .with_context(|| format!("{} waiting for INVITE", self.cfg.user))?;
        let inc = IncomingCall {
            invite: inv,
            from: src,
            local_tag: rand_hex(8),
        };
        self.respond_invite(&inc, 100, None).await?;
        if self.cfg.auto_ring {
            self.respond_invite(&inc, 180, None).await?;
        }
        Ok(inc)
    }

    /// Sends a provisional response (183 carries our SDP) to an incoming INVITE.
    pub async fn send_provisional(&self, inc: &IncomingCall, status: u16) -> anyhow::Result<()> {
        let sdp = (status == 183).then(|| self.sdp(1));
        self.respond_invite(inc, status, sdp.as_deref())
            .await
            .map(|_| ())
    }

    /// Builds, remembers (for retransmitted INVITEs) and sends a response to an INVITE.
    async fn respond_invite(
        &self,
        inc: &IncomingCall,
        status: u16,
        sdp: Option<&[u8]>,
    ) -> anyhow::Result<Vec<u8>> {
        let inv = &inc.invite;
        let mut extra = String::new();
        if status > 100 && status < 300 {
            for (_, v) in inv.values(HeaderName::RecordRoute) {
                let _ = write!(extra, "Record-Route: {}\r\n", lossy(v));
            }
            let _ = write!(extra, "Contact: <{}>\r\n", self.contact_uri());
        }
        if (200..300).contains(&status) {
            let _ = write!(extra, "Allow: {ALLOW}\r\n");
        }
        let bytes = edit::response(
            inv,
            status,
            reason(status),
            &ResponseOpts {
                to_tag: Some(inc.local_tag.as_bytes()),
                extra: extra.as_bytes(),
                body: sdp.map(|b| ("application/sdp", b)),
                server: Some(&self.cfg.user_agent),
                ..Default::default()
            },
        );
        let branch = branch_of(inv)?;
        self.state
            .lock()
            .answered
            .insert((branch, "INVITE".to_string()), bytes.clone());
        self.ep.send(inc.from, &bytes).await?;
        Ok(bytes)
    }

    /// Sends a final response to an incoming INVITE: 2xx with SDP, Contact and the
    /// Record-Route copied (then waits for the ACK, retransmitting the 2xx on UDP); an error
    /// status (then waits for the hop-by-hop ACK, retransmitting on UDP). Returns the call.
    pub async fn answer(&self, inc: &IncomingCall, status: u16) -> anyhow::Result<Call> {
        if status < 200 {
            bail!("answer() needs a final status; use send_provisional for {status}");
        }
        let inv = &inc.invite;
        let success = (200..300).contains(&status);
        let sdp = success.then(|| self.sdp(1));
        let bytes = self.respond_invite(inc, status, sdp.as_deref()).await?;
        let branch = branch_of(inv)?;
        let call_id = lossy(inv.call_id());
        let cseq = inv.cseq();
        let ack_pred = |m: &Message| {
            m.method() == Some(Method::Ack)
                && m.call_id() == call_id.as_bytes()
                && m.cseq() == cseq
                && (success
                    || m.top_via()
                        .and_then(|v| v.branch)
                        .is_some_and(|b| b == branch.as_bytes()))
        };
        let (ack, _) = self
            .retransmit_until(&bytes, inc.from, &ack_pred, "ACK")
            .await?;
        let from = inv.from().ok_or_else(|| anyhow!("INVITE without From"))?;
        let to = inv.to().ok_or_else(|| anyhow!("INVITE without To"))?;
        Ok(Call {
            call_id,
            local_tag: inc.local_tag.clone(),
            remote_tag: from.tag().map(lossy),
            local_uri: lossy(to.uri_raw),
            remote_uri: lossy(from.uri_raw),
            route_set: inv
                .values(HeaderName::RecordRoute)
                .map(|(_, v)| lossy(v))
                .collect(),
            remote_target: contact_uri_of(inv).unwrap_or_else(|| lossy(from.uri_raw)),
            cseq: 0,
            responses: vec![parse_own(&bytes)?],
            final_status: status,
            invite: Some(inv.clone()),
            ack: Some(ack),
            is_uac: false,
            sdp_version: 1,
        })
    }

    /// Waits for the CANCEL of an incoming INVITE; answers it 200 and the INVITE 487 (and
    /// waits for that ACK). Returns the CANCEL.
    pub async fn wait_cancel(
        &self,
        inc: &IncomingCall,
        timeout: Duration,
    ) -> anyhow::Result<Message> {
        let branch = branch_of(&inc.invite)?;
        let (cancel, src) = self
            .ep
            .recv_match(timeout, |m| {
                m.method() == Some(Method::Cancel)
                    && m.top_via()
                        .and_then(|v| v.branch)
                        .is_some_and(|b| b == branch.as_bytes())
            })
            .await
            .with_context(|| format!("{} waiting for CANCEL", self.cfg.user))?;
        let ok = edit::response(
            &cancel,
            200,
            "OK",
            &ResponseOpts {
                to_tag: Some(inc.local_tag.as_bytes()),
                ..Default::default()
            },
        );
        self.state
            .lock()
            .answered
            .insert((branch, "CANCEL".to_string()), ok.clone());
        self.ep.send(src, &ok).await?;
        self.answer(inc, 487).await?;
        Ok(cancel)
    }

    /// Waits for a request of `method` (in-dialog for INVITE: a re-INVITE) and answers 200
    /// (a re-INVITE with our SDP, then waits for its ACK). An ACK is just returned.
    pub async fn wait_request_and_answer(
        &self,
        method: Method,
        timeout: Duration,
    ) -> anyhow::Result<Message> {
        let (req, src) = self.wait_request(method, timeout).await?;
        if method == Method::Ack {
            return Ok(req);
        }
        self.respond(&req, src, 200).await?;
        Ok(req)
    }

    /// Waits for a request of `method` without answering it (INVITE: in-dialog only;
    /// retransmissions of answered requests are never returned).
    pub async fn wait_request(
        &self,
        method: Method,
        timeout: Duration,
    ) -> anyhow::Result<(Message, SocketAddr)> {
        let state = self.state.clone();
        self.ep
            .recv_match(timeout, |m| {
                m.method() == Some(method)
                    && (method != Method::Invite || m.to_tag().is_some())
                    && (method == Method::Ack
                        || !m.top_via().and_then(|v| v.branch).is_some_and(|b| {
                            state
                                .lock()
                                .answered
                                .contains_key(&(lossy(b), lossy(m.method_bytes())))
                        }))
            })
            .await
            .with_context(|| format!("{} waiting for {}", self.cfg.user, method.as_str()))
    }

    /// Answers a request with `status` (a 2xx to an INVITE carries our SDP and Contact and
    /// waits for the ACK).
    pub async fn respond(&self, req: &Message, src: SocketAddr, status: u16) -> anyhow::Result<()> {
        let is_invite = req.method() == Some(Method::Invite);
        let mut extra = String::new();
        if is_invite && (200..300).contains(&status) {
            let _ = write!(
                extra,
                "Contact: <{}>\r\nAllow: {ALLOW}\r\n",
                self.contact_uri()
            );
        }
        let sdp = (is_invite && (200..300).contains(&status)).then(|| self.sdp(2));
        let tag = rand_hex(8);
        let bytes = edit::response(
            req,
            status,
            reason(status),
            &ResponseOpts {
                to_tag: Some(tag.as_bytes()),
                extra: extra.as_bytes(),
                body: sdp.as_deref().map(|b| ("application/sdp", b)),
                server: Some(&self.cfg.user_agent),
                ..Default::default()
            },
        );
        let branch = branch_of(req)?;
        self.state
            .lock()
            .answered
            .insert((branch.clone(), lossy(req.method_bytes())), bytes.clone());
        if is_invite && status >= 200 {
            let call_id = lossy(req.call_id());
            let cseq = req.cseq();
            let success = status < 300;
            let pred = |m: &Message| {
                m.method() == Some(Method::Ack)
                    && m.call_id() == call_id.as_bytes()
                    && m.cseq() == cseq
                    && (success
                        || m.top_via()
                            .and_then(|v| v.branch)
                            .is_some_and(|b| b == branch.as_bytes()))
            };
            self.retransmit_until(&bytes, src, &pred, "ACK").await?;
        } else {
            self.ep.send(src, &bytes).await?;
        }
        Ok(())
    }

    /// Sends `bytes` to `to` and waits for a message matching `pred`, retransmitting on UDP
    /// with T1 doubling up to T2 (Timer G), for up to `timeout`.
    async fn retransmit_until(
        &self,
        bytes: &[u8],
        to: SocketAddr,
        pred: &dyn Fn(&Message) -> bool,
        what: &str,
    ) -> anyhow::Result<(Message, SocketAddr)> {
        self.ep.send(to, bytes).await?;
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let mut interval = T1;
        loop {
            let wake = if self.ep.transport().is_reliable() {
                deadline
            } else {
                (Instant::now() + interval).min(deadline)
            };
            if let Some(m) = self.ep.recv_until(wake, pred).await? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no {what} within {:?}; backlog: {:?}",
                    self.cfg.user,
                    self.cfg.timeout,
                    self.ep
                        .backlog()
                        .iter()
                        .map(|(m, _)| summary(m))
                        .collect::<Vec<_>>()
                );
            }
            self.ep.send(to, bytes).await?;
            interval = (interval * 2).min(T2);
        }
    }
}

// -------------------------------------------------------------------------------------
// Helpers shared with the PBX
// -------------------------------------------------------------------------------------

/// Lossy UTF-8 of a header slice.
/// `caller` calls `target` (with `opts`) and `callee` answers 200: the caller's dialog, the
/// INVITE as the callee got it, and the callee's dialog. Panics on any failure (for tests).
pub async fn call_and_answer(
    caller: &Ua,
    target: &str,
    opts: InviteOpts,
    callee: &Ua,
) -> (Call, IncomingCall, Call) {
    let (call, answered) = tokio::join!(caller.invite_with(target, opts), async {
        let inc = callee
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("the callee gets the INVITE");
        let c = callee.answer(&inc, 200).await.expect("answer");
        (inc, c)
    });
    let (inc, answered) = answered;
    (call.expect("call"), inc, answered)
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn rand_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// A fresh RFC 3261 branch.
pub fn new_branch() -> String {
    format!("z9hG4bK{}", rand_hex(10))
}

/// An IP as it appears in a URI host or Via sent-by (IPv6 bracketed).
pub fn host_str(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `ip:port` for URIs (IPv6 bracketed).
pub fn hostport(addr: SocketAddr) -> String {
    format!("{}:{}", host_str(addr.ip()), addr.port())
}

/// The top Via branch of a message.
pub fn branch_of(m: &Message) -> anyhow::Result<String> {
    m.top_via()
        .and_then(|v| v.branch.map(lossy))
        .ok_or_else(|| anyhow!("no branch in top Via of {}", summary(m)))
}

/// The URI of the first Contact of a message.
pub fn contact_uri_of(m: &Message) -> Option<String> {
    let (_, v) = m.values(HeaderName::Contact).next()?;
    NameAddr::parse(v).ok().map(|na| lossy(na.uri_raw))
}

/// Parses a message we built ourselves (an error here is a bug in the builder).
pub fn parse_own(bytes: &[u8]) -> anyhow::Result<Message> {
    Message::parse(Bytes::copy_from_slice(bytes)).map_err(|e| {
        anyhow!(
            "built an unparseable message ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    })
}

fn is_stale(resp: &Message) -> bool {
    let v = resp
        .header_value(HeaderName::WwwAuthenticate)
        .or_else(|| resp.header_value(HeaderName::ProxyAuthenticate));
    v.and_then(|v| Challenge::parse(&lossy(v)).ok())
        .is_some_and(|c| c.stale)
}

/// Copies the header lines of `names` from `m`, in order.
fn copy_lines(m: &Message, names: &[HeaderName], out: &mut Vec<u8>) {
    for h in m.headers() {
        if names.contains(&h.name) {
            let line = m.slice(h.line);
            out.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// The top Via line of `m` only (our requests carry one; be safe with several).
fn top_via_line(m: &Message) -> anyhow::Result<String> {
    let via = m.top_via().ok_or_else(|| anyhow!("no Via"))?;
    Ok(format!("Via: {}\r\n", lossy(via.raw)))
}

/// RFC 3261 17.1.1.3: ACK for a non-2xx final response.
pub fn ack_for_non2xx(invite: &Message, fin: &Message) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"ACK ");
    out.extend_from_slice(invite.uri_bytes());
    out.extend_from_slice(b" SIP/2.0\r\n");
    out.extend_from_slice(top_via_line(invite)?.as_bytes());
    out.extend_from_slice(b"Max-Forwards: 70\r\n");
    copy_lines(
        invite,
        &[HeaderName::Route, HeaderName::From, HeaderName::CallId],
        &mut out,
    );
    let to = fin
        .header(HeaderName::To)
        .ok_or_else(|| anyhow!("response without To"))?;
    out.extend_from_slice(b"To: ");
    out.extend_from_slice(fin.slice(to.value));
    out.extend_from_slice(
        format!(
            "\r\nCSeq: {} ACK\r\nContent-Length: 0\r\n\r\n",
            invite.cseq()
        )
        .as_bytes(),
    );
    Ok(out)
}

/// RFC 3261 9.1: CANCEL for a pending INVITE.
pub fn cancel_for(invite: &Message) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"CANCEL ");
    out.extend_from_slice(invite.uri_bytes());
    out.extend_from_slice(b" SIP/2.0\r\n");
    out.extend_from_slice(top_via_line(invite)?.as_bytes());
    out.extend_from_slice(b"Max-Forwards: 70\r\n");
    copy_lines(
        invite,
        &[
            HeaderName::Route,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
        ],
        &mut out,
    );
    out.extend_from_slice(
        format!(
            "CSeq: {} CANCEL\r\nContent-Length: 0\r\n\r\n",
            invite.cseq()
        )
        .as_bytes(),
    );
    Ok(out)
}

/// A reason phrase for the statuses the peers send.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        603 => "Decline",
        _ => "Unknown",
    }
}

/// The audio destination an SDP names: the first m=audio port, at the media-level c=
/// address if there is one, else the session-level one.
pub fn sdp_media_addr(sdp: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(sdp).ok()?;
    let mut session_ip: Option<IpAddr> = None;
    let mut media_ip: Option<IpAddr> = None;
    let mut port: Option<u16> = None;
    let mut in_audio = false;
    for line in text.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            if port.is_some() {
                break;
            }
            in_audio = m.starts_with("audio ");
            if in_audio {
                port = m.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            }
        } else if let Some(c) = line.strip_prefix("c=") {
            let ip = c
                .split_whitespace()
                .nth(2)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok());
            if in_audio {
                media_ip = ip;
            } else if port.is_none() {
                session_ip = ip;
            }
        }
    }
    Some(SocketAddr::new(media_ip.or(session_ip)?, port?))
}
