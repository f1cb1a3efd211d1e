//! [`Pbx`]: a scripted PBX behind the SBC: registrar (RFC 3261 10, Path RFC 3327, digest
//! auth) and stateless record-routing proxy (RFC 3261 16.11) on UDP and TCP.
//!
//! Why stateless: the SBC in front is the stateful element under test; a stateless PBX
//! forwards retransmissions, CANCELs and ACKs exactly as it receives them, so whatever
//! reaches a phone is what the SBC sent, and there is no PBX-side timer to confuse a
//! lost-packet test. Branches of forwarded requests are derived from the incoming branch, so
//! a CANCEL and a non-2xx ACK take the same branch as their INVITE (RFC 3261 16.11).
//!
//! Routing decisions:
//! - the PBX's own Route is popped; any remaining Route is followed (in-dialog requests);
//! - in-dialog requests without a remaining Route follow the Request-URI;
//! - an initial request to a registered user goes to the binding: Request-URI = Contact,
//!   Route = the stored Path, sent to the first Path URI's address (the SBC), or straight to
//!   the Contact when the binding has no Path (a phone registered directly);
//! - a user starting with `trunk_prefix` goes to `sip:NUMBER@trunk_host`, sent to `sbc`;
//! - a known user without a binding gets 480, anything else 404.
//!
//! A next-hop URI whose host is not an IP literal is sent to `sbc` (every peer sits behind
//! the SBC). Responses go back to where the request came from (remembered per branch).
//! Every received message is logged ([`Pbx::received`]) for assertions such as "no phone
//! address ever reached the PBX".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use parking_lot::Mutex;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits, ResponseOpts};
use sbc_sip::uri::Uri;
use sbc_sip::via::Via;
use sbc_sip::{HeaderName, Message, Method, Transport};
use tokio::task::JoinHandle;

use crate::digest::{md5_hex, Challenge, Credentials};
use crate::sip_io::{summary, Endpoint};
use crate::ua::{hostport, lossy, rand_hex, reason};

/// PBX configuration.
#[derive(Clone, Debug)]
pub struct PbxConfig {
    /// UDP listen address (port 0 picks one). TCP listens on the same address and port
    /// when that port is free for TCP too (otherwise the PBX is UDP-only, with a warning).
    pub listen: SocketAddr,
    /// The SIP domain (digest realm; "us" in Request-URIs).
    pub domain: String,
    /// (user, password) pairs.
    pub users: Vec<(String, String)>,
    /// Numbers starting with this go to the trunk; empty disables trunk routing.
    pub trunk_prefix: String,
    /// Request-URI host used toward the trunk (the SBC knows the trunk by it).
    pub trunk_host: String,
    /// Where everything not addressed by IP goes (the SBC).
    pub sbc: SocketAddr,
    /// Challenge REGISTER (401) and INVITEs from our own domain (407).
    pub auth: bool,
}

impl Default for PbxConfig {
    /// 127.0.0.1:0, domain `example.test`, SBC at 127.0.0.1:5060, auth on, no users.
    fn default() -> PbxConfig {
        let lo = std::net::Ipv4Addr::LOCALHOST.into();
        PbxConfig::new(
            SocketAddr::new(lo, 0),
            "example.test",
            SocketAddr::new(lo, 5060),
        )
    }
}

impl PbxConfig {
    /// No users, no trunk, auth on.
    pub fn new(listen: SocketAddr, domain: &str, sbc: SocketAddr) -> PbxConfig {
        PbxConfig {
            listen,
            domain: domain.to_string(),
            users: Vec::new(),
            trunk_prefix: String::new(),
            trunk_host: String::new(),
            sbc,
            auth: true,
        }
    }

    pub fn user(mut self, user: &str, password: &str) -> PbxConfig {
        self.users.push((user.to_string(), password.to_string()));
        self
    }

    pub fn trunk(mut self, prefix: &str, host: &str) -> PbxConfig {
        self.trunk_prefix = prefix.to_string();
        self.trunk_host = host.to_string();
        self
    }
}

/// One registered contact.
#[derive(Clone, Debug)]
pub struct Registration {
    /// `sip:user@host` from the To header.
    pub aor: String,
    /// The Contact URI.
    pub contact: String,
    /// Path header values (`<sip:...;lr>`), in order (RFC 3327).
    pub path: Vec<String>,
    pub expires: u32,
    /// Source of the REGISTER.
    pub received_from: SocketAddr,
    pub transport: Transport,
    pub call_id: String,
    pub registered_at: Instant,
}

impl Registration {
    fn user(&self) -> &str {
        self.aor
            .strip_prefix("sip:")
            .or_else(|| self.aor.strip_prefix("sips:"))
            .unwrap_or(&self.aor)
            .split('@')
            .next()
            .unwrap_or("")
    }

    fn active(&self, now: Instant) -> bool {
        now < self.registered_at + Duration::from_secs(self.expires as u64)
    }
}

/// Counters.
#[derive(Clone, Debug, Default)]
pub struct PbxStats {
    /// Requests received, by method text.
    pub requests: BTreeMap<String, u64>,
    /// Responses received, by status.
    pub responses: BTreeMap<u16, u64>,
    /// Responses the PBX generated itself, by status.
    pub local_responses: BTreeMap<u16, u64>,
    pub forwarded_requests: u64,
    pub forwarded_responses: u64,
    /// Messages dropped (Silent mode, responses not for us, unroutable).
    pub dropped: u64,
}

impl PbxStats {
    pub fn requests_of(&self, method: &str) -> u64 {
        self.requests.get(method).copied().unwrap_or(0)
    }
    pub fn local_of(&self, status: u16) -> u64 {
        self.local_responses.get(&status).copied().unwrap_or(0)
    }
}

/// Behaviour switch for failover tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PbxMode {
    Normal,
    /// Answer every request (but ACK) with 503.
    Respond503,
    /// Drop everything.
    Silent,
}

#[derive(Default)]
struct PbxState {
    regs: Vec<Registration>,
    nonces: HashSet<String>,
    stats: PbxStats,
    log: Vec<(Message, SocketAddr, Transport)>,
    /// (Call-ID, CSeq) of INVITEs we answered with a final response ourselves: their ACK
    /// ends here.
    local_finals: HashSet<(String, u32)>,
    /// Our branch -> where the request came from (responses go back there).
    branches: HashMap<String, (Transport, SocketAddr)>,
}

struct Inner {
    cfg: PbxConfig,
    addr: SocketAddr,
    udp: Endpoint,
    tcp: Option<Endpoint>,
    state: Mutex<PbxState>,
    mode: Mutex<PbxMode>,
    salt: String,
}

/// A running PBX; stops when dropped.
pub struct Pbx {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Where a request goes.
enum Target {
    /// Request-URI, extra Route values, destination.
    Forward {
        ruri: Option<String>,
        routes: Vec<String>,
        dest: (Transport, SocketAddr),
    },
    Reject(u16),
}

impl Pbx {
    pub async fn start(cfg: PbxConfig) -> anyhow::Result<Pbx> {
        let udp = Endpoint::udp(cfg.listen).await?;
        let addr = udp.local_addr();
        let tcp = match Endpoint::tcp_listen(addr).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("pbx {addr}: no TCP listener: {e:#}");
                None
            }
        };
        let inner = Arc::new(Inner {
            cfg,
            addr,
            udp,
            tcp,
            state: Mutex::new(PbxState::default()),
            mode: Mutex::new(PbxMode::Normal),
            salt: rand_hex(6),
        });
        let mut tasks = Vec::new();
        let eps: Vec<Endpoint> = std::iter::once(inner.udp.clone())
            .chain(inner.tcp.clone())
            .collect();
        for ep in eps {
            let inner = inner.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((m, src)) = ep.next().await {
                    if let Err(e) = inner.handle(ep.transport(), m, src).await {
                        tracing::warn!("pbx: {e:#}");
                    }
                }
            }));
        }
        Ok(Pbx {
            inner,
            tasks: Mutex::new(tasks),
        })
    }

    /// The UDP address (TCP listens on the same one).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The UDP endpoint, for scripting (drop rules, raw sends).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.udp
    }

    pub fn tcp_endpoint(&self) -> Option<&Endpoint> {
        self.inner.tcp.as_ref()
    }

    /// Active bindings.
    pub fn registrations(&self) -> Vec<Registration> {
        let now = Instant::now();
        self.inner
            .state
            .lock()
            .regs
            .iter()
            .filter(|r| r.active(now))
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> PbxStats {
        self.inner.state.lock().stats.clone()
    }

    pub fn set_mode(&self, mode: PbxMode) {
        *self.inner.mode.lock() = mode;
    }

    /// Every message received, in order.
    pub fn received(&self) -> Vec<Message> {
        self.inner
            .state
            .lock()
            .log
            .iter()
            .map(|(m, _, _)| m.clone())
            .collect()
    }

    /// Every message received with its source and transport.
    pub fn received_with_source(&self) -> Vec<(Message, SocketAddr, Transport)> {
        self.inner.state.lock().log.clone()
    }

    /// Stops serving and closes the sockets (released asynchronously; see [`Pbx::stop`]).
    pub fn shutdown(&self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
        self.inner.udp.close();
        if let Some(t) = &self.inner.tcp {
            t.close();
        }
    }

    /// Stops serving and waits until the sockets are released, so a new PBX can start on
    /// the same address right away (failover tests).
    pub async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.inner.udp.close_wait().await;
        if let Some(t) = &self.inner.tcp {
            t.close_wait().await;
        }
    }
}

impl Drop for Pbx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn endpoint(&self, t: Transport) -> anyhow::Result<&Endpoint> {
        match t {
            Transport::Udp => Ok(&self.udp),
            Transport::Tcp => self
                .tcp
                .as_ref()
                .ok_or_else(|| anyhow!("PBX has no TCP listener")),
            Transport::Tls => bail!("PBX does not speak TLS"),
        }
    }

    async fn handle(&self, t: Transport, m: Message, src: SocketAddr) -> anyhow::Result<()> {
        {
            let mut st = self.state.lock();
            st.log.push((m.clone(), src, t));
            match m.status() {
                Some(s) => *st.stats.responses.entry(s).or_default() += 1,
                None => {
                    *st.stats
                        .requests
                        .entry(lossy(m.method_bytes()))
                        .or_default() += 1
                }
            }
        }
        let mode = *self.mode.lock();
        if mode == PbxMode::Silent {
            self.state.lock().stats.dropped += 1;
            return Ok(());
        }
        if m.is_request() {
            if mode == PbxMode::Respond503 {
                if m.method() != Some(Method::Ack) {
                    self.respond(t, &m, src, 503, "").await?;
                }
                return Ok(());
            }
            self.handle_request(t, m, src).await
        } else {
            self.handle_response(m).await
        }
    }

    /// True when a URI names this PBX (its address, or its domain without a port).
    fn is_me(&self, uri: &Uri<'_>) -> bool {
        if let Some(ip) = uri.host_ip() {
            return ip == self.addr.ip() && uri.port.unwrap_or(5060) == self.addr.port();
        }
        uri.host.eq_ignore_ascii_case(self.cfg.domain.as_bytes())
            && uri.port.is_none_or(|p| p == self.addr.port())
    }

    async fn handle_request(
        &self,
        t: Transport,
        m: Message,
        src: SocketAddr,
    ) -> anyhow::Result<()> {
        let method = m.method().unwrap_or(Method::Other);
        if m.max_forwards() == Some(0) && method != Method::Ack {
            return self.respond(t, &m, src, 483, "").await;
        }
        let mut edits = Edits::new();
        let mut routes: Vec<String> = m.values(HeaderName::Route).map(|(_, v)| lossy(v)).collect();
        if let Some((h, v)) = m.values(HeaderName::Route).next() {
            let mine = NameAddr::parse(v).is_ok_and(|na| self.is_me(&na.uri));
            if mine {
                edits.delete(edit::remove_value_range(&m, h, v));
                routes.remove(0);
            }
        }
        let ruri_is_me = m.uri().is_some_and(|u| self.is_me(&u));
        let has_to_tag = m.to_tag().is_some();

        if let Some(first) = routes.first() {
            let dest = self.dest_of_uri_value(first)?;
            return self
                .forward(t, &m, src, edits, None, &[], false, dest)
                .await;
        }
        if has_to_tag {
            let key = (lossy(m.call_id()), m.cseq());
            if method == Method::Ack {
                if self.state.lock().local_finals.contains(&key) {
                    return Ok(());
                }
                if ruri_is_me {
                    // ACK for a relayed non-2xx: goes where its INVITE went.
                    return self.route_initial(t, &m, src, edits, false).await;
                }
                let dest = self.dest_of_uri(&lossy(m.uri_bytes()))?;
                return self
                    .forward(t, &m, src, edits, None, &[], false, dest)
                    .await;
            }
            if ruri_is_me {
                return self.respond(t, &m, src, 481, "").await;
            }
            let dest = self.dest_of_uri(&lossy(m.uri_bytes()))?;
            return self
                .forward(t, &m, src, edits, None, &[], false, dest)
                .await;
        }
        match method {
            Method::Register => self.register(t, &m, src).await,
            Method::Options if ruri_is_me => {
                let extra = "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER\r\nAccept: application/sdp\r\n";
                self.respond(t, &m, src, 200, extra).await
            }
            Method::Ack => {
                let key = (lossy(m.call_id()), m.cseq());
                if self.state.lock().local_finals.contains(&key) {
                    return Ok(());
                }
                self.route_initial(t, &m, src, edits, false).await
            }
            Method::Invite => {
                if self.cfg.auth && self.sent_from_our_domain(&m) && !self.authorized(&m, true) {
                    return self.challenge(t, &m, src, true).await;
                }
                self.route_initial(t, &m, src, edits, true).await
            }
            _ => self.route_initial(t, &m, src, edits, false).await,
        }
    }

    fn sent_from_our_domain(&self, m: &Message) -> bool {
        m.from()
            .is_some_and(|f| f.uri.host.eq_ignore_ascii_case(self.cfg.domain.as_bytes()))
    }

    /// Routes an initial request (or its CANCEL / non-2xx ACK) by the Request-URI user.
    async fn route_initial(
        &self,
        t: Transport,
        m: &Message,
        src: SocketAddr,
        edits: Edits,
        record_route: bool,
    ) -> anyhow::Result<()> {
        match self.lookup(m)? {
            Target::Forward { ruri, routes, dest } => {
                self.forward(
                    t,
                    m,
                    src,
                    edits,
                    ruri.as_deref(),
                    &routes,
                    record_route,
                    dest,
                )
                .await
            }
            Target::Reject(status) => {
                if m.method() == Some(Method::Ack) {
                    self.state.lock().stats.dropped += 1;
                    return Ok(());
                }
                let status = if m.method() == Some(Method::Cancel) {
                    481
                } else {
                    status
                };
                self.respond(t, m, src, status, "").await
            }
        }
    }

    fn lookup(&self, m: &Message) -> anyhow::Result<Target> {
        let uri = m.uri().ok_or_else(|| anyhow!("request without URI"))?;
        let user = uri.user.map(lossy).unwrap_or_default();
        if user.is_empty() {
            return Ok(Target::Reject(404));
        }
        let now = Instant::now();
        let binding = self
            .state
            .lock()
            .regs
            .iter()
            .rev()
            .find(|r| r.active(now) && r.user() == user)
            .cloned();
        if let Some(reg) = binding {
            let dest = match reg.path.first() {
                Some(p) => self.dest_of_uri_value(p)?,
                None => self.dest_of_uri(&reg.contact)?,
            };
            return Ok(Target::Forward {
                ruri: Some(reg.contact.clone()),
                routes: reg.path.clone(),
                dest,
            });
        }
        if !self.cfg.trunk_prefix.is_empty() && user.starts_with(&self.cfg.trunk_prefix) {
            return Ok(Target::Forward {
                ruri: Some(format!("sip:{user}@{}", self.cfg.trunk_host)),
                routes: Vec::new(),
                dest: (Transport::Udp, self.cfg.sbc),
            });
        }
        if self.cfg.users.iter().any(|(u, _)| *u == user) {
            return Ok(Target::Reject(480));
        }
        Ok(Target::Reject(404))
    }

    /// Destination of a name-addr value (Route, Path).
    fn dest_of_uri_value(&self, v: &str) -> anyhow::Result<(Transport, SocketAddr)> {
        let na =
            NameAddr::parse(v.as_bytes()).map_err(|e| anyhow!("bad URI value {v:?}: {e:?}"))?;
        self.dest_from(&na.uri)
    }

    fn dest_of_uri(&self, u: &str) -> anyhow::Result<(Transport, SocketAddr)> {
        let uri = Uri::parse(u.as_bytes()).map_err(|e| anyhow!("bad URI {u:?}: {e:?}"))?;
        self.dest_from(&uri)
    }

    /// An IP-literal URI is sent to its address; anything else to the SBC.
    fn dest_from(&self, uri: &Uri<'_>) -> anyhow::Result<(Transport, SocketAddr)> {
        let transport = uri.transport().unwrap_or(Transport::Udp);
        Ok(match uri.host_ip() {
            Some(ip) => (transport, SocketAddr::new(ip, uri.port_or_default())),
            None => (transport, self.cfg.sbc),
        })
    }

    /// RFC 3261 16.6 + 16.11: Request-URI, Max-Forwards, Route, Record-Route, Via; sends.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        in_t: Transport,
        m: &Message,
        src: SocketAddr,
        mut edits: Edits,
        ruri: Option<&str>,
        routes: &[String],
        record_route: bool,
        dest: (Transport, SocketAddr),
    ) -> anyhow::Result<()> {
        let (out_t, to) = dest;
        let ep = self.endpoint(out_t)?;
        if let (Some(r), Some(span)) = (ruri, m.uri_span()) {
            edits.replace(span.range(), r.as_bytes());
        }
        match (m.header(HeaderName::MaxForwards), m.max_forwards()) {
            (Some(h), Some(mf)) => {
                edits.replace(h.value.range(), mf.saturating_sub(1).to_string().as_bytes())
            }
            _ => edits.insert(m.headers_end(), b"Max-Forwards: 69\r\n"),
        }
        let top = m.top_via().ok_or_else(|| anyhow!("request without Via"))?;
        edit::stamp_via(m, &top, src.ip(), src.port(), &mut edits);
        let in_branch = top.branch.map(lossy).unwrap_or_default();
        let branch = format!(
            "z9hG4bKpbx{}",
            &md5_hex(&format!("{}{in_branch}", self.salt))[..16]
        );
        let via = format!(
            "Via: SIP/2.0/{} {};branch={branch}\r\n",
            out_t.via_token(),
            hostport(self.addr)
        );
        edits.insert(edit::top_insert_point(m, HeaderName::Via), via.as_bytes());
        if !routes.is_empty() {
            let at = edit::top_insert_point(m, HeaderName::Route);
            for r in routes {
                edits.insert(at, format!("Route: {r}\r\n").as_bytes());
            }
        }
        if record_route {
            let tp = if in_t == Transport::Udp {
                String::new()
            } else {
                format!(";transport={}", in_t.uri_param())
            };
            edits.insert(
                edit::top_insert_point(m, HeaderName::RecordRoute),
                format!("Record-Route: <sip:{};lr{tp}>\r\n", hostport(self.addr)).as_bytes(),
            );
        }
        let out = edits.apply(m.as_bytes());
        {
            let mut st = self.state.lock();
            st.branches.insert(branch, (in_t, src));
            st.stats.forwarded_requests += 1;
        }
        tracing::debug!("pbx: forwarding {} to {out_t} {to}", summary(m));
        ep.send(to, &out).await
    }

    async fn handle_response(&self, m: Message) -> anyhow::Result<()> {
        let via = m.top_via().ok_or_else(|| anyhow!("response without Via"))?;
        let branch = via.branch.map(lossy).unwrap_or_default();
        let known = self.state.lock().branches.get(&branch).copied();
        let dest = match known {
            Some(d) => d,
            None if branch.starts_with("z9hG4bKpbx") => {
                // Not remembered (should not happen): fall back to the next Via.
                let next = m
                    .values(HeaderName::Via)
                    .nth(1)
                    .ok_or_else(|| anyhow!("response with our Via only"))?;
                let v = Via::parse(next.1).map_err(|e| anyhow!("bad Via: {e:?}"))?;
                via_dest(&v)?
            }
            None => {
                self.state.lock().stats.dropped += 1;
                bail!("response not for us: {}", summary(&m));
            }
        };
        let h = m
            .header(HeaderName::Via)
            .ok_or_else(|| anyhow!("response without Via"))?;
        let mut edits = Edits::new();
        edits.delete(edit::remove_value_range(&m, h, via.raw));
        let out = edits.apply(m.as_bytes());
        self.state.lock().stats.forwarded_responses += 1;
        self.endpoint(dest.0)?.send(dest.1, &out).await
    }

    /// A locally generated response; remembered for ACK absorption when final to INVITE.
    async fn respond(
        &self,
        t: Transport,
        m: &Message,
        src: SocketAddr,
        status: u16,
        extra: &str,
    ) -> anyhow::Result<()> {
        // Derived from the transaction so a retransmitted request gets the same To tag.
        let tag = md5_hex(&format!(
            "{}{}{}{}",
            self.salt,
            lossy(m.call_id()),
            m.cseq(),
            m.top_via()
                .and_then(|v| v.branch)
                .map(lossy)
                .unwrap_or_default()
        ))[..12]
            .to_string();
        let bytes = edit::response(
            m,
            status,
            reason(status),
            &ResponseOpts {
                to_tag: Some(tag.as_bytes()),
                source: Some((src.ip(), src.port())),
                extra: extra.as_bytes(),
                server: Some("sbc-tests-pbx"),
                ..Default::default()
            },
        );
        {
            let mut st = self.state.lock();
            *st.stats.local_responses.entry(status).or_default() += 1;
            if m.method() == Some(Method::Invite) && status >= 200 {
                st.local_finals.insert((lossy(m.call_id()), m.cseq()));
            }
        }
        self.endpoint(t)?.send(src, &bytes).await
    }

    fn password_of(&self, user: &str) -> Option<&str> {
        self.cfg
            .users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.as_str())
    }

    /// Checks (Proxy-)Authorization against our users and nonces.
    fn authorized(&self, m: &Message, proxy: bool) -> bool {
        let h = if proxy {
            HeaderName::ProxyAuthorization
        } else {
            HeaderName::Authorization
        };
        m.headers_named(h).any(|hdr| {
            let Ok(c) = Credentials::parse(&lossy(m.slice(hdr.value))) else {
                return false;
            };
            let Some(pw) = self.password_of(&c.username) else {
                return false;
            };
            c.realm == self.cfg.domain
                && self.state.lock().nonces.contains(&c.nonce)
                && c.verify(pw, &lossy(m.method_bytes()))
        })
    }

    async fn challenge(
        &self,
        t: Transport,
        m: &Message,
        src: SocketAddr,
        proxy: bool,
    ) -> anyhow::Result<()> {
        let nonce = rand_hex(16);
        self.state.lock().nonces.insert(nonce.clone());
        let ch = Challenge {
            realm: self.cfg.domain.clone(),
            nonce,
            qop: Some("auth".to_string()),
            algorithm: Some("MD5".to_string()),
            ..Default::default()
        };
        let (status, name) = if proxy {
            (407, "Proxy-Authenticate")
        } else {
            (401, "WWW-Authenticate")
        };
        let extra = format!("{name}: {}\r\n", ch.to_header());
        self.respond(t, m, src, status, &extra).await
    }

    /// Registrar (RFC 3261 10.3) with Path (RFC 3327).
    async fn register(&self, t: Transport, m: &Message, src: SocketAddr) -> anyhow::Result<()> {
        if self.cfg.auth && !self.authorized(m, false) {
            return self.challenge(t, m, src, false).await;
        }
        let to = m.to().ok_or_else(|| anyhow!("REGISTER without To"))?;
        let user = to.uri.user.map(lossy).unwrap_or_default();
        let aor = format!("sip:{user}@{}", lossy(to.uri.host));
        let default_expires = m
            .header_value(HeaderName::Expires)
            .and_then(|v| lossy(v).trim().parse::<u32>().ok())
            .unwrap_or(3600);
        let path: Vec<String> = m.values(HeaderName::Path).map(|(_, v)| lossy(v)).collect();
        let call_id = lossy(m.call_id());
        let now = Instant::now();
        {
            let mut st = self.state.lock();
            for (_, v) in m.values(HeaderName::Contact) {
                if v == b"*" {
                    st.regs.retain(|r| r.aor != aor);
                    continue;
                }
                let Ok(na) = NameAddr::parse(v) else {
                    continue;
                };
                let expires = na
                    .param(b"expires")
                    .flatten()
                    .and_then(|e| lossy(e).parse::<u32>().ok())
                    .unwrap_or(default_expires);
                let contact = lossy(na.uri_raw);
                st.regs.retain(|r| !(r.aor == aor && r.contact == contact));
                if expires > 0 {
                    st.regs.push(Registration {
                        aor: aor.clone(),
                        contact,
                        path: path.clone(),
                        expires,
                        received_from: src,
                        transport: t,
                        call_id: call_id.clone(),
                        registered_at: now,
                    });
                }
            }
        }
        let mut extra = String::new();
        for r in self
            .state
            .lock()
            .regs
            .iter()
            .filter(|r| r.aor == aor && r.active(now))
        {
            let left = r
                .expires
                .saturating_sub(now.duration_since(r.registered_at).as_secs() as u32);
            extra.push_str(&format!("Contact: <{}>;expires={left}\r\n", r.contact));
        }
        if !path.is_empty() {
            extra.push_str(&format!("Path: {}\r\n", path.join(", ")));
        }
        self.respond(t, m, src, 200, &extra).await
    }
}

/// Where a Via says responses go: received/rport over sent-by (RFC 3261 18.2.2, RFC 3581).
fn via_dest(v: &Via<'_>) -> anyhow::Result<(Transport, SocketAddr)> {
    let host = v.received.unwrap_or(v.host);
    let ip: IpAddr = sbc_sip::uri::parse_ip(sbc_sip::uri::unbracket(host))
        .ok_or_else(|| anyhow!("Via host is not an IP: {}", lossy(host)))?;
    let port = v.rport.flatten().or(v.port).unwrap_or(5060);
    Ok((
        v.transport.unwrap_or(Transport::Udp),
        SocketAddr::new(ip, port),
    ))
}
