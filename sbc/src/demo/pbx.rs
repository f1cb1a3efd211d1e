//! The built-in PBX: a registrar with digest authentication and a stateless proxy.
//!
//! The demo runs two of them, primary and standby, as the two nodes of one pool. Each keeps
//! its own registrations in memory, like two PBXs without a shared database: after a failover
//! the phones register again with the standby (as real phones do at their next refresh), and
//! a restarted primary starts empty.
//!
//! It stands in for the real PBX behind the SBC, and does only what the SBC relies on a PBX
//! doing:
//! - answer the SBC's OPTIONS probes, which is how the SBC knows it is alive;
//! - keep each binding's Path (RFC 3327), and reach a registered phone by sending the INVITE
//!   back to the SBC with `Route: <path>`, because the phone's Contact is only reachable over
//!   the flow the SBC holds;
//! - send a call for a `+` number to the carrier's domain, again through the SBC, which maps
//!   the domain to the trunk;
//! - Record-Route itself and follow Route for in-dialog requests, so that ACK and BYE cross
//!   SBC, PBX and SBC again as they would with a real PBX that stays in the dialog.
//!
//! Being stateless keeps it short: it forwards every request to the SBC (its only neighbour:
//! every Path and Record-Route it sees names the SBC) and every response to the address in
//! the Via below its own.

use super::digest::{Answer, Params};
use super::wire::{lossy, response_dest, token, via_addr, Peer};
use anyhow::Context;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits, ResponseOpts};
use sbc_sip::message::{HeaderName, Message, Method};
use sbc_sip::via::Via;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// What one PBX node handled, read by the script to tell which node served a step (the SBC
/// picks the node; the script checks its choice against what the PBXs actually saw).
#[derive(Default)]
pub struct Counters {
    /// REGISTERs accepted (200).
    pub registered: AtomicU32,
    /// Dialog-creating INVITEs proxied.
    pub invites: AtomicU32,
}

impl Counters {
    pub fn registered(&self) -> u32 {
        self.registered.load(Ordering::Relaxed)
    }

    pub fn invites(&self) -> u32 {
        self.invites.load(Ordering::Relaxed)
    }
}

/// What the registrar keeps for one user.
struct Binding {
    contact: String,
    /// The Path of the REGISTER, as one Route value list.
    path: Option<String>,
}

pub struct Pbx {
    peer: Peer,
    realm: &'static str,
    carrier_domain: &'static str,
    /// user -> password.
    users: HashMap<&'static str, &'static str>,
    bindings: HashMap<String, Binding>,
    /// Nonces handed out, so an answer to a nonce we never issued is refused.
    nonces: HashSet<String>,
    counters: Arc<Counters>,
}

impl Pbx {
    pub fn new(
        peer: Peer,
        realm: &'static str,
        carrier_domain: &'static str,
        users: &[(&'static str, &'static str)],
        counters: Arc<Counters>,
    ) -> Pbx {
        Pbx {
            peer,
            realm,
            carrier_domain,
            users: users.iter().copied().collect(),
            bindings: HashMap::new(),
            nonces: HashSet::new(),
            counters,
        }
    }

    /// Serves until aborted. A message it cannot handle is narrated and dropped, never fatal:
    /// the script's own waits time out and say which step broke.
    pub async fn run(mut self) {
        while let Some((msg, src)) = self.peer.recv().await {
            let r = if msg.is_request() {
                self.on_request(&msg, src).await
            } else {
                self.on_response(&msg).await
            };
            if let Err(e) = r {
                self.peer
                    .tl
                    .note(&format!("{}: dropped a message: {e:#}", self.peer.name));
            }
        }
    }

    fn is_me(&self, uri: &sbc_sip::uri::Uri<'_>) -> bool {
        uri.host_ip() == Some(self.peer.addr.ip()) && uri.port == Some(self.peer.addr.port())
    }

    fn is_my_via(&self, via: &Via<'_>) -> bool {
        sbc_sip::uri::parse_ip(via.host) == Some(self.peer.addr.ip())
            && via.port == Some(self.peer.addr.port())
    }

    async fn reply(
        &self,
        req: &Message,
        src: SocketAddr,
        status: u16,
        reason: &str,
        extra: &str,
    ) -> anyhow::Result<()> {
        let tag = token();
        let bytes = edit::response(
            req,
            status,
            reason,
            &ResponseOpts {
                to_tag: Some(tag.as_bytes()),
                extra: extra.as_bytes(),
                server: Some("sbc-demo-pbx"),
                ..Default::default()
            },
        );
        self.peer.send(response_dest(req, src)?, bytes, "").await
    }

    async fn on_request(&mut self, msg: &Message, src: SocketAddr) -> anyhow::Result<()> {
        match msg.method() {
            Some(Method::Register) => self.register(msg, src).await,
            _ => self.proxy(msg, src).await,
        }
    }

    /// Registrar (RFC 3261 10.3): challenge, check the digest, store Contact and Path.
    async fn register(&mut self, msg: &Message, src: SocketAddr) -> anyhow::Result<()> {
        let to = msg.to().context("REGISTER without To")?;
        let user = lossy(to.uri.user.unwrap_or_default());
        let Some(password) = self.users.get(user.as_str()).copied() else {
            return self.reply(msg, src, 404, "Not Found", "").await;
        };
        let authorized = msg
            .header_value(HeaderName::Authorization)
            .and_then(Params::parse)
            .is_some_and(|p| self.check(&p, &user, password));
        if !authorized {
            let nonce = token();
            self.nonces.insert(nonce.clone());
            let challenge = format!(
                "WWW-Authenticate: Digest realm=\"{}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\"\r\n",
                self.realm
            );
            return self.reply(msg, src, 401, "Unauthorized", &challenge).await;
        }
        let (_, cv) = msg
            .values(HeaderName::Contact)
            .next()
            .context("REGISTER without Contact")?;
        let contact = NameAddr::parse(cv)
            .map_err(|e| anyhow::anyhow!("bad Contact: {e:?}"))?
            .uri_raw;
        let path: Vec<String> = msg
            .values(HeaderName::Path)
            .map(|(_, v)| lossy(v))
            .collect();
        let expires = msg
            .header_value(HeaderName::Expires)
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u32>().ok())
            .unwrap_or(3600)
            .min(300);
        let mut extra = format!("Contact: <{}>;expires={expires}\r\n", lossy(contact));
        if !path.is_empty() {
            // RFC 3327 5.3: the registrar echoes the Path it stored.
            extra.push_str(&format!("Path: {}\r\n", path.join(", ")));
        }
        self.bindings.insert(
            user,
            Binding {
                contact: lossy(contact),
                path: (!path.is_empty()).then(|| path.join(", ")),
            },
        );
        self.counters.registered.fetch_add(1, Ordering::Relaxed);
        self.reply(msg, src, 200, "OK", &extra).await
    }

    fn check(&self, p: &Params, user: &str, password: &str) -> bool {
        let (Some(nonce), Some(uri), Some(resp)) =
            (p.get("nonce"), p.get("uri"), p.get("response"))
        else {
            return false;
        };
        if p.get("username") != Some(user)
            || p.get("realm") != Some(self.realm)
            || !self.nonces.contains(nonce)
        {
            return false;
        }
        let expected = Answer {
            user,
            realm: self.realm,
            password,
            method: "REGISTER",
            uri,
            nonce,
            nc: p.get("nc").unwrap_or(""),
            cnonce: p.get("cnonce").unwrap_or(""),
        }
        .response();
        expected.eq_ignore_ascii_case(resp)
    }

    /// Stateless proxying (RFC 3261 16.11): route, add our Via (branch derived from the
    /// incoming one, so a retransmission would get the same branch), stamp received/rport,
    /// Record-Route new dialogs, forward to the SBC.
    async fn proxy(&mut self, msg: &Message, src: SocketAddr) -> anyhow::Result<()> {
        let method = msg.method().unwrap_or(Method::Other);
        let via = msg.top_via().context("request without Via")?;
        let mut e = Edits::new();

        // Pop our own Route entry (in-dialog requests carry one: we Record-Routed).
        let mut more_routes = false;
        for (h, v) in msg.values(HeaderName::Route) {
            let na = NameAddr::parse(v).map_err(|e| anyhow::anyhow!("bad Route: {e:?}"))?;
            if self.is_me(&na.uri) {
                e.delete(edit::remove_value_range(msg, h, v));
                continue;
            }
            more_routes = true;
            break;
        }

        let mut note = String::new();
        if !more_routes {
            // No Route left to follow: route by Request-URI, as the PBX's dial plan would.
            if method == Method::Ack {
                // An ACK we cannot route (it would answer a failure we sent) ends here.
                return Ok(());
            }
            if method == Method::Options {
                // Addressed to us (the SBC's health probe): alive.
                return self
                    .reply(
                        msg,
                        src,
                        200,
                        "OK",
                        "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER\r\n",
                    )
                    .await;
            }
            if msg.to_tag().is_some() {
                return self
                    .reply(msg, src, 481, "Call/Transaction Does Not Exist", "")
                    .await;
            }
            let ruri = msg.uri().context("request without a Request-URI")?;
            let user = lossy(ruri.user.unwrap_or_default());
            let uri_span = msg.uri_span().context("request without a Request-URI")?;
            if let Some(b) = self.bindings.get(&user) {
                e.replace(uri_span.range(), b.contact.as_bytes());
                if let Some(path) = &b.path {
                    e.insert_fmt(
                        edit::top_insert_point(msg, HeaderName::Route),
                        format_args!("Route: {path}\r\n"),
                    );
                    note = format!("{user}'s Contact, Route = {user}'s Path");
                } else {
                    note = format!("{user}'s Contact");
                }
            } else if user.starts_with('+') {
                let target = format!("sip:{user}@{}", self.carrier_domain);
                e.replace(uri_span.range(), target.as_bytes());
                note = format!("a + number: to {}", self.carrier_domain);
            } else {
                return self.reply(msg, src, 404, "Not Found", "").await;
            }
        }

        match msg.max_forwards() {
            Some(0) => return self.reply(msg, src, 483, "Too Many Hops", "").await,
            Some(mf) => {
                let h = msg
                    .header(HeaderName::MaxForwards)
                    .context("Max-Forwards vanished")?;
                e.replace(h.value.range(), (mf - 1).to_string().as_bytes());
            }
            None => e.insert(msg.headers_end(), b"Max-Forwards: 70\r\n"),
        }
        edit::stamp_via(msg, &via, src.ip(), src.port(), &mut e);
        let branch = format!(
            "z9hG4bK-pbx-{}",
            &hex::encode(<md5::Md5 as md5::Digest>::digest(via.raw))[..16]
        );
        e.insert_fmt(
            edit::top_insert_point(msg, HeaderName::Via),
            format_args!("Via: SIP/2.0/UDP {};branch={branch}\r\n", self.peer.addr),
        );
        if method == Method::Invite && msg.to_tag().is_none() {
            self.counters.invites.fetch_add(1, Ordering::Relaxed);
            e.insert_fmt(
                edit::top_insert_point(msg, HeaderName::RecordRoute),
                format_args!("Record-Route: <sip:{};lr>\r\n", self.peer.addr),
            );
        }
        let out = e.apply(msg.as_bytes());
        self.peer.send(self.peer.sbc, out, &note).await
    }

    /// Response relaying (RFC 3261 16.11 / 16.7): drop our Via, send to the next one. A 100
    /// Trying is hop by hop (it only stops the SBC's retransmissions to us) and goes no
    /// further.
    async fn on_response(&self, msg: &Message) -> anyhow::Result<()> {
        let via = msg.top_via().context("response without Via")?;
        if !self.is_my_via(&via) {
            anyhow::bail!("response whose top Via is not ours");
        }
        if msg.status() == Some(100) {
            return Ok(());
        }
        let (_, next) = msg
            .values(HeaderName::Via)
            .nth(1)
            .context("response with no Via below ours")?;
        let next = Via::parse(next).map_err(|e| anyhow::anyhow!("bad Via: {e:?}"))?;
        let to = via_addr(&next).context("next Via names no IP address")?;
        let h = msg.header(HeaderName::Via).context("Via vanished")?;
        let mut e = Edits::new();
        e.delete(edit::remove_value_range(msg, h, via.raw));
        self.peer.send(to, e.apply(msg.as_bytes()), "").await
    }
}
