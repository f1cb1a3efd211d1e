//! The registration cache: every binding a phone made through the SBC.
//!
//! The SBC must know which public sources are phones it serves (everyone else gets 403: no
//! open relay), where a request for a phone's Contact goes when a PBX routes by Contact
//! instead of by Path, and, to keep phones reachable across a failover, where each phone is
//! registered. All of it comes from the REGISTER transactions it proxied: a binding is made
//! when the registrar answers 2xx, and removed on de-registration, expiry, or when the TCP/TLS
//! connection it came over closes (RFC 5626).
//!
//! **Split expiry.** A binding has two lifetimes: the one the PBX granted and a short one the
//! SBC hands the phone (`phones.expires_secs`, 120 s by default, spread by a random
//! +-`expires_spread_percent`). Phones therefore refresh often, which keeps NAT bindings open
//! and brings every phone to a new active node within that time after a failover, while the
//! SBC answers those refreshes from the cache ([`Registrations::absorb`]) and forwards one to
//! the PBX only when the PBX's binding nears its end, when the contact, flow or Call-ID
//! changed, or when the node holding the binding is no longer the pool's active node.
//! De-registrations always go through. The model is OpenSIPS's mid_registrar in throttling
//! mode.
//!
//! Bindings outlive the phone's lifetime until the PBX's ends ("lapsed"): a phone that stopped
//! refreshing is no longer served, but the SBC still knows its flow is dead and answers a
//! PBX's call toward it with 480 at once instead of letting it time out.

use crate::transport::Flow;
use ahash::AHashMap;
use parking_lot::RwLock;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits, ResponseOpts};
use sbc_sip::message::{HeaderName, Message};
use sbc_sip::scan::{offset_in, parse_decimal, trim};
use sbc_sip::uri::{find_param, Uri};
use smallvec::SmallVec;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The registration part of the route table, read per REGISTER (reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The lifetime handed to phones; `None`: split expiry off, every REGISTER forwarded.
    pub phone_expires: Option<Duration>,
    /// Random spread of `phone_expires`, in percent either way.
    pub spread_percent: u32,
}

/// Why a REGISTER went to the PBX (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardReason {
    /// Split expiry is off.
    Off,
    /// No binding for this contact yet.
    New,
    /// The contact moved to another flow, or the phone started a new registration (Call-ID).
    Changed,
    /// The binding is held by a node that is no longer the active one (after a failover).
    NodeChanged,
    /// The PBX's binding would end before the phone's next refresh.
    Expiring,
    /// Expires 0 or `*`.
    Deregister,
    /// Several contacts, an unparseable one, or an out-of-order CSeq: the registrar decides.
    Other,
}

impl ForwardReason {
    pub fn label(self) -> &'static str {
        match self {
            ForwardReason::Off => "off",
            ForwardReason::New => "new",
            ForwardReason::Changed => "changed",
            ForwardReason::NodeChanged => "node_changed",
            ForwardReason::Expiring => "expiring",
            ForwardReason::Deregister => "deregister",
            ForwardReason::Other => "other",
        }
    }
}

/// A shadow registration of a binding on a node other than the one holding it.
#[derive(Debug, Clone)]
pub struct Shadow {
    pub node: Arc<str>,
    /// Until when the node holds it (what it granted); `None` until the first 2xx.
    pub until: Option<Instant>,
    /// When to send the next REGISTER for it.
    pub next: Instant,
    pub call_id: Box<str>,
    pub cseq: u32,
    /// The last final status, for status reports (200, or the refusal).
    pub last_status: u16,
    /// A REGISTER for it is in flight.
    pub pending: bool,
}

#[derive(Debug, Clone)]
struct Binding {
    /// `user@host` of the To URI (host lowercased).
    aor: Box<str>,
    /// The To header value of the phone's REGISTER (for shadow registrations).
    to: Box<str>,
    /// The Contact URI exactly as the phone sent it.
    contact: Box<str>,
    flow: Flow,
    /// The node that granted the binding.
    node: Option<Arc<str>>,
    pbx_until: Instant,
    phone_until: Instant,
    call_id: Box<[u8]>,
    cseq: u32,
    /// The registrar's To tag, reused in answers from the cache.
    to_tag: Box<[u8]>,
    /// Service-Route and Path lines of the registrar's 2xx, repeated in answers from the cache.
    replay: Box<[u8]>,
    /// The Path values the REGISTER carried to the PBX (ours first), for shadow registrations.
    path: Box<str>,
    shadows: SmallVec<[Shadow; 1]>,
}

#[derive(Debug, Clone)]
struct FlowEntry {
    contacts: SmallVec<[Box<[u8]>; 1]>,
    /// The latest phone lifetime of its contacts: the flow is served until then.
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    by_flow: AHashMap<Flow, FlowEntry>,
    bindings: AHashMap<Box<[u8]>, Binding>,
}

/// Counts for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bindings a phone keeps fresh (not lapsed).
    pub live: usize,
    /// Of those, held by the given node (the active one), directly or by a live shadow.
    pub on_node: usize,
    /// Live bindings with a live shadow registration.
    pub shadowed: usize,
    /// Flows with live bindings.
    pub flows: usize,
    /// Entries in the cache, lapsed ones included.
    pub entries: usize,
}

/// One binding as /status lists it.
#[derive(Debug, Clone)]
pub struct BindingView {
    pub aor: String,
    pub contact: String,
    pub flow: String,
    pub node: Option<String>,
    pub pbx_expires_in: u64,
    pub phone_expires_in: u64,
    pub shadows: Vec<(String, Option<u64>, u16)>,
}

/// What the shadow task must send: one REGISTER per entry.
#[derive(Debug, Clone)]
pub struct ShadowJob {
    pub key: Box<[u8]>,
    pub node: Arc<str>,
    pub aor: Box<str>,
    pub to: Box<str>,
    pub contact: Box<str>,
    pub path: Box<str>,
    pub call_id: Box<str>,
    pub cseq: u32,
    pub expires: u32,
}

/// A contact of a registrar's 2xx: its value, its header parameters (slices of the message)
/// and its binding key.
type Echoed<'a> = (&'a [u8], &'a [u8], ContactKey);

/// The header parameters of `rv` when it is `na` echoed verbatim (`<uri>` and parameters):
/// what registrars do with the contacts they accept, adding `expires`. The key is then
/// `na`'s, and the URI need not be parsed a second time (~1,000 instructions per REGISTER).
fn echoed_params<'a>(rv: &'a [u8], na: &NameAddr<'_>) -> Option<&'a [u8]> {
    if !na.bracketed || na.display.is_some() {
        return None;
    }
    let rest = rv
        .strip_prefix(b"<")?
        .strip_prefix(na.uri_raw)?
        .strip_prefix(b">")?;
    let params = trim(rest);
    (params.is_empty() || params.starts_with(b";")).then_some(params)
}

/// Registration bindings; read on every request from a phone, written on REGISTER answers.
#[derive(Default)]
pub struct Registrations {
    inner: RwLock<Inner>,
}

/// A binding's key, built on the stack: every REGISTER builds one per contact, and only a
/// new binding needs it on the heap.
type ContactKey = SmallVec<[u8; 64]>;

/// A contact URI reduced to what identifies where it points: user@host:port, lowercased host.
fn contact_key(uri: &Uri<'_>) -> ContactKey {
    let mut k = ContactKey::new();
    k.extend_from_slice(uri.user.unwrap_or_default());
    k.push(b'@');
    // Copied, then lowercased in place: a byte-wise mapped extend checks capacity per byte.
    let host = k.len();
    k.extend_from_slice(uri.host);
    k[host..].make_ascii_lowercase();
    k.push(b':');
    k.extend_from_slice(&uri.port_or_default().to_be_bytes());
    k
}

fn aor_of(msg: &Message) -> Option<Box<str>> {
    let to = msg.to()?;
    let mut s = String::with_capacity(48);
    s.push_str(&String::from_utf8_lossy(to.uri.user.unwrap_or_default()));
    s.push('@');
    s.push_str(&String::from_utf8_lossy(to.uri.host).to_ascii_lowercase());
    Some(s.into())
}

fn text(b: &[u8]) -> Box<str> {
    String::from_utf8_lossy(b).into()
}

/// The `Expires` header of a REGISTER or its 2xx: the lifetime of contacts without their own.
pub(crate) fn header_expires(msg: &Message) -> Option<u64> {
    msg.header_value(HeaderName::Expires)
        .and_then(|e| parse_decimal(trim(e), u32::MAX as u64))
}

/// A contact's own `expires` parameter.
pub(crate) fn contact_expires(na: &NameAddr<'_>) -> Option<u64> {
    params_expires(na.params)
}

/// The `expires` parameter among a contact's header parameters.
fn params_expires(params: &[u8]) -> Option<u64> {
    find_param(params, b"expires")
        .flatten()
        .and_then(|e| parse_decimal(e, u32::MAX as u64))
}

/// The phone's lifetime: the configured one spread by a random +-`spread` percent, never
/// above what the PBX granted (nor what the phone asked for).
fn phone_lifetime(policy: &Policy, cap: u64) -> u64 {
    let Some(base) = policy.phone_expires else {
        return cap;
    };
    let base = base.as_secs().max(1);
    let spread = base * u64::from(policy.spread_percent) / 100;
    let e = if spread == 0 {
        base
    } else {
        base - spread + rand::random::<u64>() % (2 * spread + 1)
    };
    e.min(cap).max(1)
}

/// Sets the `expires` parameter of the Contact value `value` (a slice of `buf`) to `n`.
fn set_expires_param(buf: &[u8], value: &[u8], params: &[u8], n: u64, edits: &mut Edits) {
    let value = trim(value);
    let Some(vstart) = offset_in(buf, value) else {
        return;
    };
    match find_param(params, b"expires") {
        Some(Some(v)) => {
            if let Some(at) = offset_in(buf, v) {
                edits.replace(at..at + v.len(), n.to_string().as_bytes());
            }
        }
        // `;expires` without a value, or none: append one at the value's end.
        _ => {
            let end = vstart + value.len();
            edits.insert(end, format!(";expires={n}").as_bytes());
        }
    }
}

/// The Contact value `value` with its expires parameter set to `n`, as a new string.
fn contact_with_expires(value: &[u8], n: u64) -> Vec<u8> {
    let value = trim(value);
    let Ok(na) = NameAddr::parse(value) else {
        return value.to_vec();
    };
    let mut e = Edits::new();
    set_expires_param(value, value, na.params, n, &mut e);
    e.apply(value)
}

impl Registrations {
    /// Answers a phone's refresh from the cache when split expiry allows it: same contact,
    /// flow and Call-ID, a later CSeq, the binding held by the `active` node, and the PBX's
    /// binding good for longer than the phone's next lifetime. Returns the 200 to send, or
    /// why the REGISTER must go to the PBX.
    pub fn absorb(
        &self,
        flow: &Flow,
        req: &Message,
        active: Option<&str>,
        policy: &Policy,
        now: Instant,
    ) -> Result<Vec<u8>, ForwardReason> {
        let Some(phone_expires) = policy.phone_expires else {
            return Err(ForwardReason::Off);
        };
        let mut contacts = req.values(HeaderName::Contact);
        let (Some((_, value)), None) = (contacts.next(), contacts.next()) else {
            return Err(ForwardReason::Other);
        };
        let value = trim(value);
        if value == b"*" {
            return Err(ForwardReason::Deregister);
        }
        let na = NameAddr::parse(value).map_err(|_| ForwardReason::Other)?;
        let header_expires = header_expires(req);
        let requested = contact_expires(&na).or(header_expires).unwrap_or(3600);
        if requested == 0 {
            return Err(ForwardReason::Deregister);
        }
        let key = contact_key(&na.uri);
        // Most REGISTERs that reach here are refreshes that will be answered; the checks
        // still only read, so a plain reader (has_flow, on every phone request) never waits.
        let inner = self.inner.upgradable_read();
        let Some(b) = inner.bindings.get(&key[..]) else {
            return Err(ForwardReason::New);
        };
        if b.flow != *flow || *b.contact.as_bytes() != *na.uri_raw || *b.call_id != *req.call_id() {
            return Err(ForwardReason::Changed);
        }
        if req.cseq() <= b.cseq {
            return Err(ForwardReason::Other);
        }
        if active.is_none() || b.node.as_deref() != active {
            return Err(ForwardReason::NodeChanged);
        }
        let left = b.pbx_until.saturating_duration_since(now).as_secs();
        let next = phone_lifetime(policy, requested);
        // The phone's next refresh comes within `next` seconds; the PBX's binding must outlive
        // that by a margin for the forwarded refresh's round trip (and a phone refreshing late).
        let margin = (phone_expires.as_secs() / 2).max(10);
        if left < next + margin {
            return Err(ForwardReason::Expiring);
        }
        let mut inner = parking_lot::RwLockUpgradableReadGuard::upgrade(inner);
        let Some(b) = inner.bindings.get_mut(&key[..]) else {
            return Err(ForwardReason::New);
        };
        b.cseq = req.cseq();
        b.phone_until = now + Duration::from_secs(next);
        let mut extra = Vec::with_capacity(128 + b.replay.len());
        extra.extend_from_slice(b"Contact: ");
        extra.extend_from_slice(&contact_with_expires(value, next));
        extra.extend_from_slice(b"\r\n");
        extra.extend_from_slice(&b.replay);
        let to_tag = b.to_tag.clone();
        let until = b.phone_until;
        if let Some(e) = inner.by_flow.get_mut(flow) {
            e.expires = e.expires.max(until);
        }
        drop(inner);
        Ok(edit::response(
            req,
            200,
            "OK",
            &ResponseOpts {
                to_tag: Some(&to_tag),
                source: Some((flow.remote.ip(), flow.remote.port())),
                extra: &extra,
                ..Default::default()
            },
        ))
    }

    /// Records the outcome of a 2xx to a REGISTER that arrived over `flow` and was granted by
    /// `node`, and rewrites the 2xx for the phone (`edits`, on `response`): with split expiry,
    /// each of the phone's contacts gets its short lifetime. `path` is the Path the REGISTER
    /// carried to the PBX.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        flow: Flow,
        request: &Message,
        response: &Message,
        node: Option<&str>,
        path: Option<&str>,
        policy: &Policy,
        now: Instant,
        edits: &mut Edits,
    ) {
        let default_expires = header_expires(request).unwrap_or(3600);
        let resp_expires = header_expires(response);
        let to_tag: &[u8] = response.to_tag().unwrap_or_default();
        // Service-Route and Path lines of the 2xx, in order; usually none.
        let mut replay = Vec::new();
        for h in response.headers() {
            let name: &[u8] = match h.name {
                HeaderName::Path => b"Path",
                HeaderName::Other
                    if response.as_bytes()[h.name_span.range()]
                        .eq_ignore_ascii_case(b"service-route") =>
                {
                    b"Service-Route"
                }
                _ => continue,
            };
            replay.extend_from_slice(name);
            replay.extend_from_slice(b": ");
            replay.extend_from_slice(trim(&response.as_bytes()[h.value.range()]));
            replay.extend_from_slice(b"\r\n");
        }
        let buf = response.as_bytes();
        // The request's contacts, parsed once (`None`: the "*" of a removal); a value that
        // does not parse is skipped.
        let asked: SmallVec<[Option<(NameAddr<'_>, ContactKey)>; 2]> = request
            .values(HeaderName::Contact)
            .filter_map(|(_, v)| {
                let v = trim(v);
                if v == b"*" {
                    return Some(None);
                }
                let na = NameAddr::parse(v).ok()?;
                let k = contact_key(&na.uri);
                Some(Some((na, k)))
            })
            .collect();
        // The response's contacts: those echoing one of the request's verbatim take its key,
        // the others are parsed.
        let echoed: SmallVec<[Echoed<'_>; 2]> = response
            .values(HeaderName::Contact)
            .filter_map(|(_, rv)| {
                let rv = trim(rv);
                for (na, k) in asked.iter().flatten() {
                    if let Some(params) = echoed_params(rv, na) {
                        return Some((rv, params, k.clone()));
                    }
                }
                let na = NameAddr::parse(rv).ok()?;
                Some((rv, na.params, contact_key(&na.uri)))
            })
            .collect();
        let mut shortest: Option<u64> = None;
        let mut inner = self.inner.write();
        for contact in asked {
            let Some((na, key)) = contact else {
                // Remove every binding this flow made.
                if let Some(e) = inner.by_flow.remove(&flow) {
                    for c in e.contacts {
                        inner.bindings.remove(&c);
                    }
                }
                continue;
            };
            let echo = echoed.iter().find(|(_, _, k)| *k == key);
            // The expiry the registrar granted this contact, as echoed in the 2xx.
            let granted = echo.map(|(_, params, _)| {
                params_expires(params)
                    .or(resp_expires)
                    .unwrap_or(default_expires)
            });
            let requested = contact_expires(&na).unwrap_or(default_expires);
            let exp = match granted {
                Some(g) => g,
                // Not echoed: removed (if it asked for 0) or the registrar lists nothing.
                None if requested == 0 => 0,
                None => requested,
            };
            if exp == 0 {
                if inner.bindings.remove(&key[..]).is_some() {
                    if let Some(e) = inner.by_flow.get_mut(&flow) {
                        e.contacts.retain(|c| **c != *key);
                        if e.contacts.is_empty() {
                            inner.by_flow.remove(&flow);
                        }
                    }
                }
                continue;
            }
            let phone = phone_lifetime(policy, exp);
            if let Some((rv, params, _)) = echo {
                if phone != exp {
                    set_expires_param(buf, rv, params, phone, edits);
                }
            }
            shortest = Some(shortest.map_or(phone, |s| s.min(phone)));
            let pbx_until = now + Duration::from_secs(exp);
            let phone_until = now + Duration::from_secs(phone);
            // A refresh of a binding in the same place (the common case): updated in place,
            // no allocation.
            if let Some(b) = inner.bindings.get_mut(&key[..]) {
                if b.flow == flow && *b.contact.as_bytes() == *na.uri_raw {
                    b.pbx_until = pbx_until;
                    b.phone_until = phone_until;
                    b.cseq = request.cseq();
                    if *b.call_id != *request.call_id() {
                        b.call_id = request.call_id().into();
                    }
                    if b.node.as_deref() != node {
                        b.node = node.map(Arc::from);
                    }
                    if *b.to_tag != *to_tag {
                        b.to_tag = to_tag.into();
                    }
                    if *b.replay != *replay {
                        b.replay = replay.as_slice().into();
                    }
                    if let Some(p) = path.filter(|p| *b.path != **p) {
                        b.path = p.into();
                    }
                    if let Some(e) = inner.by_flow.get_mut(&flow) {
                        e.expires = e.expires.max(phone_until);
                    }
                    continue;
                }
            }
            let key: Box<[u8]> = Box::from(&key[..]);
            let old = inner.bindings.insert(
                key.clone(),
                Binding {
                    aor: aor_of(request).unwrap_or_default(),
                    to: request
                        .header_value(HeaderName::To)
                        .map(text)
                        .unwrap_or_default(),
                    contact: text(na.uri_raw),
                    flow,
                    node: node.map(Arc::from),
                    pbx_until,
                    phone_until,
                    call_id: request.call_id().into(),
                    cseq: request.cseq(),
                    to_tag: to_tag.into(),
                    replay: replay.as_slice().into(),
                    path: path.unwrap_or_default().into(),
                    shadows: SmallVec::new(),
                },
            );
            // Shadows stay with the binding (same contact): they are refreshed, not redone.
            let listed = match old {
                Some(o) => {
                    let moved = o.flow != flow;
                    if let Some(b) = inner.bindings.get_mut(&key) {
                        b.shadows = o.shadows;
                    }
                    if moved {
                        // The contact moved to another flow (the phone reconnected).
                        if let Some(e) = inner.by_flow.get_mut(&o.flow) {
                            e.contacts.retain(|c| **c != *key);
                            if e.contacts.is_empty() {
                                inner.by_flow.remove(&o.flow);
                            }
                        }
                    }
                    !moved
                }
                None => false,
            };
            let e = inner.by_flow.entry(flow).or_insert_with(|| FlowEntry {
                contacts: SmallVec::new(),
                expires: phone_until,
            });
            if !listed {
                e.contacts.push(key);
            }
            e.expires = e.expires.max(phone_until);
        }
        drop(inner);
        // A registrar that states the lifetime only in Expires: the phone reads it there.
        if let (Some(s), Some(h)) = (shortest, response.header(HeaderName::Expires)) {
            if resp_expires.is_some_and(|r| r != s) && policy.phone_expires.is_some() {
                edits.replace(h.value.range(), format!(" {s}").as_bytes());
            }
        }
    }

    /// Whether requests from this flow come from a phone we serve.
    pub fn has_flow(&self, flow: &Flow) -> bool {
        let now = Instant::now();
        self.inner
            .read()
            .by_flow
            .get(flow)
            .is_some_and(|e| e.expires > now)
    }

    /// Whether every binding made over this flow has lapsed (the phone stopped refreshing):
    /// a request toward it would only time out.
    pub fn lapsed(&self, flow: &Flow) -> bool {
        let now = Instant::now();
        self.inner
            .read()
            .by_flow
            .get(flow)
            .is_some_and(|e| e.expires <= now)
    }

    /// The flow for a Request-URI that is a registered Contact.
    pub fn flow_for_contact(&self, ruri: &[u8]) -> Option<Flow> {
        let uri = Uri::parse(ruri).ok()?;
        let key = contact_key(&uri);
        let now = Instant::now();
        self.inner
            .read()
            .bindings
            .get(&key[..])
            .filter(|b| b.phone_until > now)
            .map(|b| b.flow)
    }

    /// A TCP/TLS flow is gone: its registrations are useless (RFC 5626 4.4: the phone will
    /// register again over a new flow).
    pub fn flow_closed(&self, flow: &Flow) {
        {
            let mut inner = self.inner.write();
            if let Some(e) = inner.by_flow.remove(flow) {
                for c in e.contacts {
                    if inner.bindings.get(&c).is_some_and(|b| b.flow == *flow) {
                        inner.bindings.remove(&c);
                    }
                }
            }
        }
    }

    /// Drops bindings past both lifetimes (called from the timer task).
    pub fn expire(&self, now: Instant) {
        {
            let mut guard = self.inner.write();
            let inner = &mut *guard;
            inner
                .bindings
                .retain(|_, b| b.pbx_until.max(b.phone_until) > now);
            // A flow's list names exactly the contacts whose binding is on it (record relies
            // on that), so expired contacts leave the lists too.
            let bindings = &inner.bindings;
            inner.by_flow.retain(|flow, e| {
                e.contacts
                    .retain(|c| bindings.get(c).is_some_and(|b| b.flow == *flow));
                !e.contacts.is_empty()
            });
        }
    }

    /// Number of flows with live registrations.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.inner
            .read()
            .by_flow
            .values()
            .filter(|e| e.expires > now)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts of live bindings, and of those reachable on `node`.
    pub fn counts(&self, node: Option<&str>, now: Instant) -> Counts {
        let inner = self.inner.read();
        let mut c = Counts {
            flows: inner.by_flow.values().filter(|e| e.expires > now).count(),
            entries: inner.bindings.len(),
            ..Counts::default()
        };
        for b in inner.bindings.values().filter(|b| b.phone_until > now) {
            c.live += 1;
            let shadow_on = |n: Option<&str>| {
                b.shadows
                    .iter()
                    .any(|s| Some(&*s.node) == n && s.until.is_some_and(|u| u > now))
            };
            if b.shadows.iter().any(|s| s.until.is_some_and(|u| u > now)) {
                c.shadowed += 1;
            }
            if node.is_some() && (b.node.as_deref() == node || shadow_on(node)) {
                c.on_node += 1;
            }
        }
        c
    }

    /// TCP/TLS flows whose live bindings are held by another node than `active` (and not
    /// shadowed on it): the phones to move by closing their flow.
    pub fn flows_off(&self, active: &str, now: Instant) -> Vec<Flow> {
        let inner = self.inner.read();
        let mut out: Vec<Flow> = inner
            .bindings
            .values()
            .filter(|b| {
                b.flow.conn.is_some()
                    && b.phone_until > now
                    && b.node.as_deref() != Some(active)
                    && !b
                        .shadows
                        .iter()
                        .any(|s| &*s.node == active && s.until.is_some_and(|u| u > now))
            })
            .map(|b| b.flow)
            .collect();
        out.sort_unstable_by_key(|f| (f.remote, f.conn.map(|c| c.0)));
        out.dedup();
        out
    }

    /// Shadow REGISTERs due now: for each live binding held by a node in `pool_nodes`, one per
    /// other node of the pool that has no fresh shadow. Marks them pending.
    pub fn shadow_jobs(
        &self,
        pool_nodes: &[Arc<str>],
        lifetime: u32,
        now: Instant,
        max: usize,
    ) -> Vec<ShadowJob> {
        let mut inner = self.inner.write();
        let mut jobs = Vec::new();
        for (key, b) in inner.bindings.iter_mut() {
            if jobs.len() >= max {
                break;
            }
            if b.phone_until <= now || b.path.is_empty() {
                continue;
            }
            let Some(holder) = b.node.clone() else {
                continue;
            };
            if !pool_nodes.contains(&holder) {
                continue;
            }
            // Shadows on nodes that left the pool, or on the holder itself, are forgotten.
            b.shadows
                .retain(|s| *s.node != *holder && pool_nodes.contains(&s.node));
            for n in pool_nodes.iter().filter(|n| **n != holder) {
                let idx = match b.shadows.iter().position(|s| s.node == *n) {
                    Some(i) => i,
                    None => {
                        b.shadows.push(Shadow {
                            node: n.clone(),
                            until: None,
                            next: now,
                            call_id: format!("sbc-shadow-{:016x}", rand::random::<u64>()).into(),
                            cseq: 0,
                            last_status: 0,
                            pending: false,
                        });
                        b.shadows.len() - 1
                    }
                };
                let s = &mut b.shadows[idx];
                if s.pending || s.next > now {
                    continue;
                }
                s.pending = true;
                s.cseq += 1;
                jobs.push(ShadowJob {
                    key: key.clone(),
                    node: n.clone(),
                    aor: b.aor.clone(),
                    to: b.to.clone(),
                    contact: b.contact.clone(),
                    path: b.path.clone(),
                    call_id: s.call_id.clone(),
                    cseq: s.cseq,
                    expires: lifetime,
                });
            }
        }
        jobs
    }

    /// The outcome of a shadow REGISTER: `granted` seconds on 2xx, or the failure status
    /// (0: no answer). A failed one is retried after `retry`.
    pub fn shadow_done(
        &self,
        job: &ShadowJob,
        status: u16,
        granted: u64,
        retry: Duration,
        now: Instant,
    ) {
        let mut inner = self.inner.write();
        let Some(b) = inner.bindings.get_mut(&job.key) else {
            return;
        };
        let Some(s) = b.shadows.iter_mut().find(|s| s.node == job.node) else {
            return;
        };
        s.pending = false;
        s.last_status = status;
        if (200..300).contains(&status) && granted > 0 {
            s.until = Some(now + Duration::from_secs(granted));
            // Refreshed at half its lifetime, as a UA would.
            s.next = now + Duration::from_secs(granted / 2).max(Duration::from_secs(1));
        } else {
            s.next = now + retry;
        }
    }

    /// Every binding, for /status (bounded by `max`).
    pub fn view(&self, max: usize, now: Instant) -> Vec<BindingView> {
        let secs = |t: Instant| t.saturating_duration_since(now).as_secs();
        let inner = self.inner.read();
        inner
            .bindings
            .values()
            .take(max)
            .map(|b| BindingView {
                aor: b.aor.to_string(),
                contact: b.contact.to_string(),
                flow: b.flow.to_string(),
                node: b.node.as_deref().map(str::to_string),
                pbx_expires_in: secs(b.pbx_until),
                phone_expires_in: secs(b.phone_until),
                shadows: b
                    .shadows
                    .iter()
                    .map(|s| (s.node.to_string(), s.until.map(secs), s.last_status))
                    .collect(),
            })
            .collect()
    }
}

/// Builds a shadow REGISTER: the phone's AOR and contact, with its Path (so the standby's
/// calls to the phone come back through the SBC and its flow), from the SBC itself.
pub fn shadow_register(
    job: &ShadowJob,
    request_uri: &str,
    via: (&str, &str, u16),
    branch: &str,
    agent: &str,
) -> String {
    let (transport, host, port) = via;
    let mut r = String::with_capacity(512 + job.path.len());
    let _ = write!(
        r,
        "REGISTER {request_uri} SIP/2.0\r\nVia: SIP/2.0/{transport} {host}:{port};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: {to};tag=sbcsh{tag:x}\r\nTo: {to}\r\nCall-ID: {cid}\r\n\
         CSeq: {cseq} REGISTER\r\nContact: <{contact}>;expires={exp}\r\nPath: {path}\r\n\
         Supported: path\r\nUser-Agent: {agent}\r\nContent-Length: 0\r\n\r\n",
        to = strip_tag(&job.to),
        tag = job.cseq,
        cid = job.call_id,
        cseq = job.cseq,
        contact = job.contact,
        exp = job.expires,
        path = job.path,
    );
    r
}

/// A To value without a tag parameter (a REGISTER's To has none, but be safe).
fn strip_tag(to: &str) -> &str {
    match to.find(";tag=") {
        Some(i) => &to[..i],
        None => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sbc_sip::Transport;

    #[test]
    fn an_echoed_contact_is_recognised_without_a_parse() {
        let na = NameAddr::parse(b"<sip:u1@192.0.2.7:5060;ob>").unwrap();
        let echo = |rv: &'static [u8]| echoed_params(rv, &na);
        assert_eq!(
            echo(b"<sip:u1@192.0.2.7:5060;ob>;expires=60"),
            Some(&b";expires=60"[..])
        );
        assert_eq!(echo(b"<sip:u1@192.0.2.7:5060;ob>"), Some(&b""[..]));
        assert_eq!(
            echo(b"<sip:u1@192.0.2.7:5060;ob> ;q=0.5"),
            Some(&b";q=0.5"[..])
        );
        assert_eq!(
            echo(b"<sip:u1@192.0.2.7:5061;ob>;expires=60"),
            None,
            "another port"
        );
        assert_eq!(echo(b"<sip:u1@192.0.2.7:5060;ob>x"), None, "not parameters");
        assert_eq!(echo(b"<sip:u1@192.0.2.7:5060"), None, "unclosed");
        assert_eq!(
            echo(b"\"A\" <sip:u1@192.0.2.7:5060;ob>"),
            None,
            "display name: parsed"
        );
        let bare = NameAddr::parse(b"sip:u1@192.0.2.7:5060").unwrap();
        assert_eq!(
            echoed_params(b"sip:u1@192.0.2.7:5060;expires=5", &bare),
            None
        );
        // What the fast path finds is what a full parse finds.
        let rv = &b"<sip:u1@192.0.2.7:5060;ob>;expires=60;+sip.instance=\"<urn:x>\""[..];
        let full = NameAddr::parse(rv).unwrap();
        assert_eq!(echoed_params(rv, &na), Some(full.params));
        assert_eq!(contact_key(&full.uri), contact_key(&na.uri));
    }

    fn flow(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: format!("127.0.0.9:{port}").parse().unwrap(),
            conn: None,
        }
    }

    const OFF: Policy = Policy {
        phone_expires: None,
        spread_percent: 0,
    };

    fn split(secs: u64, spread: u32) -> Policy {
        Policy {
            phone_expires: Some(Duration::from_secs(secs)),
            spread_percent: spread,
        }
    }

    fn register_cseq(contact: &str, expires: u32, cseq: u32) -> (Message, Message) {
        let req = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK{cseq}\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: r1\r\n\
             CSeq: {cseq} REGISTER\r\nContact: <{contact}>\r\nExpires: {expires}\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let resp = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK{cseq}\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>;tag=2\r\nCall-ID: r1\r\n\
             CSeq: {cseq} REGISTER\r\nContact: <{contact}>;expires={expires}\r\n\
             Service-Route: <sip:orig@pbx;lr>\r\nContent-Length: 0\r\n\r\n"
        );
        (
            Message::parse(Bytes::from(req)).unwrap(),
            Message::parse(Bytes::from(resp)).unwrap(),
        )
    }

    fn register(contact: &str, expires: u32) -> (Message, Message) {
        register_cseq(contact, expires, 1)
    }

    fn rec(r: &Registrations, f: Flow, q: &Message, a: &Message, p: &Policy, now: Instant) {
        let mut e = Edits::new();
        r.record(
            f,
            q,
            a,
            Some("pbx1"),
            Some("<sip:t@sbc;lr>"),
            p,
            now,
            &mut e,
        );
    }

    #[test]
    fn many_contacts_on_one_flow_and_refreshes_are_not_duplicated() {
        let r = Registrations::default();
        let now = Instant::now();
        for round in 0..3 {
            for i in 0..50 {
                let (q, a) = register(&format!("sip:u{i}@127.0.0.9:5062"), 300);
                rec(
                    &r,
                    flow(5062),
                    &q,
                    &a,
                    &OFF,
                    now + Duration::from_secs(round),
                );
            }
        }
        let inner = r.inner.read();
        assert_eq!(inner.by_flow.len(), 1);
        assert_eq!(inner.by_flow[&flow(5062)].contacts.len(), 50);
        assert_eq!(inner.bindings.len(), 50);
    }

    #[test]
    fn a_contact_that_moves_flow_leaves_the_old_one() {
        let r = Registrations::default();
        let now = Instant::now();
        let (q, a) = register("sip:u1@127.0.0.9:5062", 300);
        rec(&r, flow(5062), &q, &a, &OFF, now);
        rec(&r, flow(6000), &q, &a, &OFF, now);
        assert!(
            !r.has_flow(&flow(5062)),
            "old flow still serves the moved contact"
        );
        assert!(r.has_flow(&flow(6000)));
        assert_eq!(
            r.flow_for_contact(b"sip:u1@127.0.0.9:5062"),
            Some(flow(6000))
        );
        // De-registration removes both sides.
        let (q, a) = register("sip:u1@127.0.0.9:5062", 0);
        let a = Message::parse(Bytes::from(
            String::from_utf8_lossy(a.as_bytes())
                .replace("Contact: <sip:u1@127.0.0.9:5062>;expires=0\r\n", ""),
        ))
        .unwrap();
        rec(&r, flow(6000), &q, &a, &OFF, now);
        assert!(r.is_empty());
        assert_eq!(r.flow_for_contact(b"sip:u1@127.0.0.9:5062"), None);
    }

    #[test]
    fn expiry_sweeps_contacts_out_of_flow_lists() {
        let r = Registrations::default();
        let now = Instant::now();
        let (q, a) = register("sip:u1@127.0.0.9:5062", 10);
        rec(&r, flow(5062), &q, &a, &OFF, now);
        let (q2, a2) = register("sip:u2@127.0.0.9:5062", 100);
        rec(&r, flow(5062), &q2, &a2, &OFF, now);
        r.expire(now + Duration::from_secs(20));
        assert_eq!(r.inner.read().by_flow[&flow(5062)].contacts.len(), 1);
        // Registering u1 again lists it once.
        rec(&r, flow(5062), &q, &a, &OFF, now + Duration::from_secs(21));
        assert_eq!(r.inner.read().by_flow[&flow(5062)].contacts.len(), 2);
        r.expire(now + Duration::from_secs(200));
        assert!(r.inner.read().bindings.is_empty());
        assert!(r.inner.read().by_flow.is_empty());
    }

    #[test]
    fn split_expiry_rewrites_the_2xx_and_answers_refreshes_from_the_cache() {
        let r = Registrations::default();
        let now = Instant::now();
        let p = split(120, 10);
        let (q, a) = register_cseq("sip:u1@127.0.0.9:5062", 3600, 1);
        let mut e = Edits::new();
        r.record(flow(5062), &q, &a, Some("pbx1"), None, &p, now, &mut e);
        let out = String::from_utf8(e.apply(a.as_bytes())).unwrap();
        let given: u64 = out
            .split("expires=")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!((108..=132).contains(&given), "phone got {given}: {out}");
        // A refresh (same Call-ID, later CSeq, same flow) on the same active node: absorbed.
        let (q2, _) = register_cseq("sip:u1@127.0.0.9:5062", 3600, 2);
        let t = now + Duration::from_secs(60);
        let ok = r.absorb(&flow(5062), &q2, Some("pbx1"), &p, t).unwrap();
        let ok = Message::parse(Bytes::from(ok)).unwrap();
        assert_eq!(ok.status(), Some(200));
        assert_eq!(ok.to_tag(), Some(&b"2"[..]));
        let c = ok.header_value(HeaderName::Contact).unwrap();
        assert!(c.starts_with(b"<sip:u1@127.0.0.9:5062>;expires=1"), "{c:?}");
        assert!(ok.header_value_by_name(b"service-route").is_some());
        // The same CSeq again is not a refresh.
        assert_eq!(
            r.absorb(&flow(5062), &q2, Some("pbx1"), &p, t),
            Err(ForwardReason::Other)
        );
        // Another node active: forwarded.
        let (q3, _) = register_cseq("sip:u1@127.0.0.9:5062", 3600, 3);
        assert_eq!(
            r.absorb(&flow(5062), &q3, Some("pbx2"), &p, t),
            Err(ForwardReason::NodeChanged)
        );
        // Another flow: forwarded.
        assert_eq!(
            r.absorb(&flow(5999), &q3, Some("pbx1"), &p, t),
            Err(ForwardReason::Changed)
        );
        // Near the PBX's end: forwarded.
        let late = now + Duration::from_secs(3600 - 100);
        assert_eq!(
            r.absorb(&flow(5062), &q3, Some("pbx1"), &p, late),
            Err(ForwardReason::Expiring)
        );
        // De-registration: forwarded.
        let (q4, _) = register_cseq("sip:u1@127.0.0.9:5062", 0, 4);
        assert_eq!(
            r.absorb(&flow(5062), &q4, Some("pbx1"), &p, t),
            Err(ForwardReason::Deregister)
        );
        // Off: forwarded.
        assert_eq!(
            r.absorb(&flow(5062), &q3, Some("pbx1"), &OFF, t),
            Err(ForwardReason::Off)
        );
    }

    /// Ten minutes of 200 phones refreshing at half their 120 s lifetime, against a PBX that
    /// grants 3600 s: the PBX sees one REGISTER per phone, the phones send eleven.
    #[test]
    fn ten_minutes_of_refreshes_cut_the_pbx_load_by_more_than_five() {
        let r = Registrations::default();
        let p = split(120, 10);
        let start = Instant::now();
        let (mut sent, mut forwarded) = (0u32, 0u32);
        let mut next: Vec<(Instant, u32)> = (0..200).map(|_| (start, 1)).collect();
        let end = start + Duration::from_secs(600);
        while let Some((i, &(t, cseq))) = next.iter().enumerate().min_by_key(|(_, (t, _))| *t) {
            if t > end {
                break;
            }
            let contact = format!("sip:u{i}@127.0.0.9:{}", 6000 + i);
            let (q, a) = register_cseq(&contact, 3600, cseq);
            sent += 1;
            let f = flow(6000 + i as u16);
            let given = match r.absorb(&f, &q, Some("pbx1"), &p, t) {
                Ok(ok) => Message::parse(Bytes::from(ok)).unwrap(),
                Err(_) => {
                    forwarded += 1;
                    let mut e = Edits::new();
                    r.record(f, &q, &a, Some("pbx1"), None, &p, t, &mut e);
                    Message::parse(Bytes::from(e.apply(a.as_bytes()))).unwrap()
                }
            };
            let c = NameAddr::parse(given.header_value(HeaderName::Contact).unwrap()).unwrap();
            let exp = parse_decimal(c.param(b"expires").flatten().unwrap(), 100_000).unwrap();
            assert!((108..=132).contains(&exp), "lifetime {exp}");
            next[i] = (t + Duration::from_secs(exp / 2), cseq + 1);
        }
        eprintln!("10 minutes, 200 phones: {sent} REGISTERs sent, {forwarded} reached the PBX");
        assert!(sent >= 200 * 10, "{sent}");
        assert_eq!(forwarded, 200, "only the first REGISTER of each phone");
        assert!(sent >= 5 * forwarded);
        assert_eq!(r.counts(Some("pbx1"), end).live, 200);
    }

    #[test]
    fn lapsed_bindings_are_known_until_the_pbx_forgets_them() {
        let r = Registrations::default();
        let now = Instant::now();
        let p = split(120, 0);
        let (q, a) = register("sip:u1@127.0.0.9:5062", 3600);
        rec(&r, flow(5062), &q, &a, &p, now);
        let later = now + Duration::from_secs(200);
        r.expire(later);
        let inner = r.inner.read();
        assert!(inner.by_flow[&flow(5062)].expires <= later);
        drop(inner);
        assert_eq!(r.counts(None, later).live, 0);
        r.expire(now + Duration::from_secs(3601));
        assert!(r.inner.read().bindings.is_empty());
    }

    #[test]
    fn shadow_jobs_cover_other_nodes_and_refresh_at_half_life() {
        let r = Registrations::default();
        let now = Instant::now();
        let (q, a) = register("sip:u1@127.0.0.9:5062", 3600);
        rec(&r, flow(5062), &q, &a, &OFF, now);
        let nodes: Vec<Arc<str>> = vec!["pbx1".into(), "pbx2".into()];
        let jobs = r.shadow_jobs(&nodes, 600, now, 100);
        assert_eq!(jobs.len(), 1);
        assert_eq!(&*jobs[0].node, "pbx2");
        let reg = shadow_register(
            &jobs[0],
            "sip:example.com",
            ("UDP", "127.0.0.1", 5060),
            "z9hG4bK-sbcl-1",
            "sbc",
        );
        let m = Message::parse(Bytes::from(reg)).unwrap();
        assert_eq!(
            m.header_value(HeaderName::Path),
            Some(&b"<sip:t@sbc;lr>"[..])
        );
        // Pending: not sent twice.
        assert!(r.shadow_jobs(&nodes, 600, now, 100).is_empty());
        r.shadow_done(&jobs[0], 200, 600, Duration::from_secs(5), now);
        assert_eq!(r.counts(Some("pbx2"), now).on_node, 1);
        assert_eq!(r.counts(Some("pbx2"), now).shadowed, 1);
        assert!(r
            .shadow_jobs(&nodes, 600, now + Duration::from_secs(299), 100)
            .is_empty());
        let again = r.shadow_jobs(&nodes, 600, now + Duration::from_secs(300), 100);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].cseq, 2);
        assert_eq!(again[0].call_id, jobs[0].call_id);
    }
}
