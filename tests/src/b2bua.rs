//! [`B2bua`]: a scripted PBX that bridges calls as a back-to-back user agent, the way most
//! PBXs do: every call is two dialogs, the b-leg with its own Call-ID, tags and CSeq. It
//! does not record-route; each leg's remote target is the B2BUA itself.
//!
//! Media: by default the SDP is passed through unchanged ("direct media"), so the two legs'
//! media meet in the SBC's relay and the call can outlive the PBX. With
//! [`B2buaConfig::anchor_media`] the SDP sent on each leg names the PBX's own address instead
//! (a PBX that anchors media itself); nothing listens there, so such a call's media dies with
//! the PBX.
//!
//! Behaviour (UDP only, every request sent to the SBC):
//! - REGISTER: 200 with the binding stored (Contact, Path); no authentication;
//! - OPTIONS out of dialog (probes): 200;
//! - INVITE: 100, then a b-leg INVITE to `sip:NUMBER@trunk_host` for a number starting with
//!   the trunk prefix, or to a registered user's Contact (Route: its Path); provisional and
//!   final responses come back on the a-leg (a 2xx copies the a-leg INVITE's Record-Route);
//!   the b-leg 2xx is ACKed at once;
//! - any in-dialog request (re-INVITE, UPDATE, BYE, INFO...) is sent on the other leg in that
//!   leg's own terms and its final response comes back; a 2xx to a re-INVITE is ACKed;
//! - ACKs from the legs are absorbed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::anyhow;
use parking_lot::Mutex;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::{HeaderName, Message, Method};
use tokio::task::JoinHandle;

use crate::sip_io::Endpoint;
use crate::ua::{lossy, rand_hex, reason};

/// B2BUA configuration.
#[derive(Clone, Debug)]
pub struct B2buaConfig {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// The SIP domain (From of b-legs).
    pub domain: String,
    /// Numbers starting with this go to the trunk.
    pub trunk_prefix: String,
    /// Request-URI host toward the trunk (the SBC knows the trunk by it).
    pub trunk_host: String,
    /// The SBC: where every request goes.
    pub sbc: SocketAddr,
    /// Name the PBX's own address in SDP instead of passing it through.
    pub anchor_media: bool,
}

impl B2buaConfig {
    pub fn new(listen: SocketAddr, domain: &str, sbc: SocketAddr) -> B2buaConfig {
        B2buaConfig {
            listen,
            domain: domain.to_string(),
            trunk_prefix: String::new(),
            trunk_host: String::new(),
            sbc,
            anchor_media: false,
        }
    }

    pub fn trunk(mut self, prefix: &str, host: &str) -> B2buaConfig {
        self.trunk_prefix = prefix.to_string();
        self.trunk_host = host.to_string();
        self
    }

    pub fn anchor_media(mut self, on: bool) -> B2buaConfig {
        self.anchor_media = on;
        self
    }
}

/// One dialog from the B2BUA's side.
#[derive(Clone, Debug)]
struct Leg {
    call_id: String,
    /// Our From/To value (with our tag) in requests we send.
    local: String,
    /// The peer's From/To value (with its tag) in requests we send.
    remote: String,
    remote_target: String,
    /// Route values, in order.
    routes: Vec<String>,
    cseq: u32,
}

/// A request we sent on one leg, waiting for its response to pass back.
struct Pending {
    /// The request on the other leg and where it came from.
    origin: Message,
    origin_src: SocketAddr,
    /// The pair it belongs to.
    pair: u64,
    /// Which leg the request went out on (0 = a-leg, 1 = b-leg).
    out_leg: usize,
    /// Our request, for the ACK of a 2xx.
    sent: String,
    /// Local tag to put in the a-leg response to an initial INVITE.
    a_tag: Option<String>,
}

#[derive(Default)]
struct State {
    bindings: HashMap<String, (String, Vec<String>)>,
    /// pair id -> [a-leg, b-leg] (b-leg dialog is filled at its 2xx).
    pairs: HashMap<u64, [Option<Leg>; 2]>,
    /// Call-ID -> (pair, leg index).
    by_call: HashMap<String, (u64, usize)>,
    /// Our branch -> pending request.
    pending: HashMap<String, Pending>,
    /// Responses sent per request branch (retransmissions get them again).
    answered: HashMap<String, Vec<u8>>,
    next_pair: u64,
    /// Calls bridged so far.
    bridged: u64,
}

struct Inner {
    cfg: B2buaConfig,
    addr: SocketAddr,
    ep: Endpoint,
    state: Mutex<State>,
}

/// A running B2BUA; stops when dropped.
pub struct B2bua {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl B2bua {
    pub async fn start(cfg: B2buaConfig) -> anyhow::Result<B2bua> {
        let ep = Endpoint::udp(cfg.listen).await?;
        let addr = ep.local_addr();
        let inner = Arc::new(Inner {
            cfg,
            addr,
            ep,
            state: Mutex::new(State::default()),
        });
        let i = inner.clone();
        let task = tokio::spawn(async move {
            while let Some((m, src)) = i.ep.next().await {
                if let Err(e) = i.handle(m, src).await {
                    tracing::warn!("b2bua: {e:#}");
                }
            }
        });
        Ok(B2bua {
            inner,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Calls bridged (b-leg answered) so far.
    pub fn bridged(&self) -> u64 {
        self.inner.state.lock().bridged
    }

    /// Dies: stops serving and closes its socket (waited for).
    pub async fn stop(&self) {
        let task = self.task.lock().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
        self.inner.ep.close_wait().await;
    }
}

impl Drop for B2bua {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
        self.inner.ep.close();
    }
}

fn header(m: &Message, name: HeaderName) -> String {
    m.header_value(name).map(lossy).unwrap_or_default()
}

fn contact_of(m: &Message) -> Option<String> {
    let v = m.header_value(HeaderName::Contact)?;
    NameAddr::parse(v).ok().map(|na| lossy(na.uri_raw))
}

impl Inner {
    fn contact(&self) -> String {
        format!("<sip:pbx@{}>", self.addr)
    }

    /// The SDP to send on: passed through, or naming the PBX's own address.
    fn sdp(&self, body: &[u8]) -> Vec<u8> {
        if !self.cfg.anchor_media || body.is_empty() {
            return body.to_vec();
        }
        let ip = self.addr.ip();
        let mut out = String::new();
        for line in String::from_utf8_lossy(body).split_inclusive("\r\n") {
            if line.starts_with("c=IN IP4 ") {
                let _ = write!(out, "c=IN IP4 {ip}\r\n");
            } else if let Some(rest) = line.strip_prefix("m=audio ") {
                let tail = rest
                    .split_once(' ')
                    .map(|(_, t)| t)
                    .unwrap_or("RTP/AVP 0\r\n");
                let _ = write!(out, "m=audio 40000 {tail}");
            } else {
                out.push_str(line);
            }
        }
        out.into_bytes()
    }

    async fn send(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ep.send(self.cfg.sbc, bytes).await
    }

    async fn respond(
        &self,
        req: &Message,
        src: SocketAddr,
        status: u16,
        to_tag: Option<&str>,
        extra: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        let bytes = edit::response(
            req,
            status,
            reason(status),
            &ResponseOpts {
                to_tag: to_tag.map(str::as_bytes),
                extra: extra.as_bytes(),
                body: body
                    .filter(|b| !b.is_empty())
                    .map(|b| ("application/sdp", b)),
                server: Some("sbc-tests-b2bua"),
                ..Default::default()
            },
        );
        if status >= 200 {
            if let Some(b) = req.top_via().and_then(|v| v.branch) {
                self.state.lock().answered.insert(
                    format!("{}/{}", lossy(b), lossy(req.method_bytes())),
                    bytes.clone(),
                );
            }
        }
        self.ep.send(src, &bytes).await
    }

    /// Builds a request on `leg` (CSeq already chosen).
    fn request(&self, leg: &Leg, method: &str, cseq: u32, body: &[u8]) -> (String, String) {
        let branch = format!("z9hG4bK-b2b-{}", rand_hex(8));
        let mut r = format!(
            "{method} {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch};rport\r\nMax-Forwards: 70\r\n",
            leg.remote_target, self.addr
        );
        for route in &leg.routes {
            let _ = write!(r, "Route: {route}\r\n");
        }
        let _ = write!(
            r,
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\nContact: {}\r\n",
            leg.local,
            leg.remote,
            leg.call_id,
            self.contact()
        );
        if !body.is_empty() {
            r.push_str("Content-Type: application/sdp\r\n");
        }
        let _ = write!(
            r,
            "Content-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        );
        (r, branch)
    }

    async fn handle(&self, m: Message, src: SocketAddr) -> anyhow::Result<()> {
        if m.is_request() {
            self.on_request(m, src).await
        } else {
            self.on_response(m).await
        }
    }

    async fn on_request(&self, m: Message, src: SocketAddr) -> anyhow::Result<()> {
        let method = m.method().unwrap_or(Method::Other);
        if method == Method::Ack {
            return Ok(());
        }
        // A retransmission gets the same answer.
        if let Some(b) = m.top_via().and_then(|v| v.branch) {
            let key = format!("{}/{}", lossy(b), lossy(m.method_bytes()));
            let again = self.state.lock().answered.get(&key).cloned();
            if let Some(bytes) = again {
                return self.ep.send(src, &bytes).await;
            }
        }
        match method {
            Method::Register => self.on_register(&m, src).await,
            Method::Options if m.to_tag().is_none() => {
                self.respond(&m, src, 200, Some("b2b"), "", None).await
            }
            Method::Invite if m.to_tag().is_none() => self.on_invite(m, src).await,
            _ => self.on_in_dialog(m, src).await,
        }
    }

    async fn on_register(&self, m: &Message, src: SocketAddr) -> anyhow::Result<()> {
        let to = m.to().ok_or_else(|| anyhow!("REGISTER without To"))?;
        let user = to.uri.user.map(lossy).unwrap_or_default();
        let contact = contact_of(m).ok_or_else(|| anyhow!("REGISTER without Contact"))?;
        let path: Vec<String> = m.values(HeaderName::Path).map(|(_, v)| lossy(v)).collect();
        let mut extra = format!("Contact: <{contact}>;expires=300\r\n");
        for p in &path {
            let _ = write!(extra, "Path: {p}\r\n");
        }
        self.state.lock().bindings.insert(user, (contact, path));
        self.respond(m, src, 200, Some("b2breg"), &extra, None)
            .await
    }

    async fn on_invite(&self, m: Message, src: SocketAddr) -> anyhow::Result<()> {
        self.respond(&m, src, 100, None, "", None).await?;
        let from = m.from().ok_or_else(|| anyhow!("INVITE without From"))?;
        let ruri = m.uri().ok_or_else(|| anyhow!("bad Request-URI"))?;
        let user = ruri.user.map(lossy).unwrap_or_default();
        let caller = from.uri.user.map(lossy).unwrap_or_default();
        let (target, routes) =
            if !self.cfg.trunk_prefix.is_empty() && user.starts_with(&self.cfg.trunk_prefix) {
                (format!("sip:{user}@{}", self.cfg.trunk_host), Vec::new())
            } else {
                let b = self.state.lock().bindings.get(&user).cloned();
                match b {
                    Some((c, p)) => (c, p),
                    None => return self.respond(&m, src, 404, Some("b2b404"), "", None).await,
                }
            };
        let a_tag = rand_hex(6);
        let a_leg = Leg {
            call_id: lossy(m.call_id()),
            local: format!("{};tag={a_tag}", header(&m, HeaderName::To)),
            remote: header(&m, HeaderName::From),
            remote_target: contact_of(&m).ok_or_else(|| anyhow!("INVITE without Contact"))?,
            routes: m
                .values(HeaderName::RecordRoute)
                .map(|(_, v)| lossy(v))
                .collect(),
            cseq: 0,
        };
        let b_leg = Leg {
            call_id: format!("b2b-{}", rand_hex(10)),
            local: format!("<sip:{caller}@{}>;tag={}", self.cfg.domain, rand_hex(6)),
            remote: format!("<{target}>"),
            remote_target: target,
            routes,
            cseq: 1,
        };
        let (req, branch) = self.request(&b_leg, "INVITE", 1, &self.sdp(m.body()));
        {
            let mut st = self.state.lock();
            st.next_pair += 1;
            let pair = st.next_pair;
            st.by_call.insert(a_leg.call_id.clone(), (pair, 0));
            st.by_call.insert(b_leg.call_id.clone(), (pair, 1));
            st.pairs.insert(pair, [Some(a_leg), Some(b_leg)]);
            st.pending.insert(
                branch,
                Pending {
                    origin: m,
                    origin_src: src,
                    pair,
                    out_leg: 1,
                    sent: req.clone(),
                    a_tag: Some(a_tag),
                },
            );
        }
        self.send(req.as_bytes()).await
    }

    async fn on_in_dialog(&self, m: Message, src: SocketAddr) -> anyhow::Result<()> {
        let call_id = lossy(m.call_id());
        let found = {
            let mut st = self.state.lock();
            st.by_call.get(&call_id).copied().and_then(|(pair, leg)| {
                let other = 1 - leg;
                let l = st.pairs.get_mut(&pair)?[other].as_mut()?;
                l.cseq += 1;
                Some((pair, other, l.clone()))
            })
        };
        let Some((pair, other, leg)) = found else {
            return self.respond(&m, src, 481, Some("b2b481"), "", None).await;
        };
        let method = lossy(m.method_bytes());
        let (req, branch) = self.request(&leg, &method, leg.cseq, &self.sdp(m.body()));
        self.state.lock().pending.insert(
            branch,
            Pending {
                origin: m,
                origin_src: src,
                pair,
                out_leg: other,
                sent: req.clone(),
                a_tag: None,
            },
        );
        self.send(req.as_bytes()).await
    }

    async fn on_response(&self, m: Message) -> anyhow::Result<()> {
        let status = m.status().unwrap_or(0);
        let Some(branch) = m.top_via().and_then(|v| v.branch).map(lossy) else {
            return Ok(());
        };
        let is_invite = m.cseq_method() == Method::Invite;
        if status < 200 {
            if status > 100 && is_invite {
                let p = {
                    let st = self.state.lock();
                    st.pending
                        .get(&branch)
                        .map(|p| (p.origin.clone(), p.origin_src, p.a_tag.clone()))
                };
                if let Some((origin, src, tag)) = p {
                    let extra = format!("Contact: {}\r\n", self.contact());
                    self.respond(
                        &origin,
                        src,
                        status,
                        tag.as_deref(),
                        &extra,
                        Some(&self.sdp(m.body())),
                    )
                    .await?;
                }
            }
            return Ok(());
        }
        let Some(p) = self.state.lock().pending.remove(&branch) else {
            return Ok(());
        };
        // The ACK of an INVITE's final response on the leg it came from.
        if is_invite {
            let ok = (200..300).contains(&status);
            if ok {
                // The b-leg dialog is complete now: its peer tag, target and route set.
                let mut st = self.state.lock();
                if let Some(Some(l)) = st.pairs.get_mut(&p.pair).map(|legs| &mut legs[p.out_leg]) {
                    if p.a_tag.is_some() {
                        l.remote = header(&m, HeaderName::To);
                        if let Some(c) = contact_of(&m) {
                            l.remote_target = c;
                        }
                        let mut rr: Vec<String> = m
                            .values(HeaderName::RecordRoute)
                            .map(|(_, v)| lossy(v))
                            .collect();
                        rr.reverse();
                        l.routes = rr;
                    }
                }
                if p.a_tag.is_some() {
                    st.bridged += 1;
                }
            }
            let legs = self.state.lock().pairs.get(&p.pair).cloned();
            if let Some(Some(leg)) = legs.map(|l| l[p.out_leg].clone()) {
                let cseq = m.cseq();
                let ack = if ok {
                    self.request(&leg, "ACK", cseq, b"").0
                } else {
                    // Hop-by-hop ACK: same branch as the INVITE.
                    let via = p
                        .sent
                        .lines()
                        .find(|l| l.starts_with("Via:"))
                        .unwrap_or_default()
                        .to_string();
                    let mut a = self.request(&leg, "ACK", cseq, b"").0;
                    if let Some(v) = a
                        .lines()
                        .find(|l| l.starts_with("Via:"))
                        .map(str::to_string)
                    {
                        a = a.replace(&v, &via);
                    }
                    a.replace(
                        &format!("To: {}", leg.remote),
                        &format!("To: {}", header(&m, HeaderName::To)),
                    )
                };
                self.send(ack.as_bytes()).await?;
            }
        }
        let mut extra = String::new();
        if (200..300).contains(&status) && p.origin.method() == Some(Method::Invite) {
            let _ = write!(extra, "Contact: {}\r\n", self.contact());
            if p.a_tag.is_some() {
                for (_, v) in p.origin.values(HeaderName::RecordRoute) {
                    let _ = write!(extra, "Record-Route: {}\r\n", lossy(v));
                }
            }
        }
        let body = self.sdp(m.body());
        self.respond(
            &p.origin,
            p.origin_src,
            status,
            p.a_tag.as_deref(),
            &extra,
            Some(&body),
        )
        .await?;
        // A failed initial INVITE or a BYE ends the pair.
        let ends = (p.a_tag.is_some() && status >= 300) || p.origin.method() == Some(Method::Bye);
        if ends {
            let mut st = self.state.lock();
            if let Some(legs) = st.pairs.remove(&p.pair) {
                for l in legs.into_iter().flatten() {
                    st.by_call.remove(&l.call_id);
                }
            }
        }
        Ok(())
    }
}
