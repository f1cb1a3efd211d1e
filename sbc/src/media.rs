//! Media anchoring on the SIP path: which SIP message feeds which relay call, and how.
//!
//! The proxy sees SDP in requests (INVITE, UPDATE, ACK, PRACK) and in responses (18x, 2xx).
//! This module maps each to the relay's offer / answer / delete, keeps the one piece of state
//! that mapping needs, and leaves the proxy with a rewritten body or a SIP status to answer.
//!
//! The state: a Call-ID can cross the SBC twice when a PBX proxies instead of bridging (phone
//! -> SBC -> PBX -> SBC -> trunk, same Call-ID and tags on both passes). Each pass must be its
//! own relay call, or the second offer would be taken for a re-offer of the first. A pass is
//! told apart by the side its caller is on: on the first pass the caller (the From-tag party
//! of the dialog-creating INVITE) is on the public side, on the second it arrives from the
//! PBX. So the proxy remembers each Call-ID's caller tag, and every message is keyed by
//! `(Call-ID, side of the caller)`.

use crate::transport::{Dest, Flow};
use ahash::AHashMap;
use parking_lot::Mutex;
use sbc_media_relay::{CallKey, MediaError, Relay, Side};
use sbc_sip::message::{HeaderName, Message, Method};
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::Arc;

/// The relay plus the caller tags that key its calls.
pub struct MediaAnchor {
    relay: Arc<Relay>,
    calls: Mutex<AHashMap<Box<[u8]>, CallEntry>>,
    /// Established dialogs of anchored calls, by relay key: what the SBC needs to hang a
    /// call up by itself when its media dies.
    dialogs: Mutex<AHashMap<CallKey, Arc<DialogInfo>>>,
    /// What the SBC needs to carry a dialog on when its PBX dies (see [`Survival`]).
    survival: Mutex<AHashMap<CallKey, Survival>>,
    /// Internal-side relay RTP port -> the relay call it belongs to: SDP from a PBX that
    /// names one of these is a hairpin (the PBX left media end to end).
    internal_ports: Mutex<AHashMap<u16, CallKey>>,
    /// Dialogs released while their hairpin peer was still up, with when: a BYE that the
    /// dead PBX never passed on still finds the other leg to hang up.
    widowed: Mutex<AHashMap<CallKey, (CallKey, std::time::Instant)>>,
    /// How long a call whose media the PBX anchored may stay silent on the PBX side after its
    /// node went Down before the SBC ends it.
    unsaveable_after: Mutex<std::time::Duration>,
    /// Ended calls by how their media went (see [`MediaFlow`]), for this SBC alone.
    ended: [std::sync::atomic::AtomicU64; 3],
}

/// How an established call's media went, judged when it ends: by the RTP packets each end
/// sent into the relay. One-way audio (a NAT or firewall that lets media through one way
/// only, a phone that never got the right address) and calls with no media at all are what
/// an operator hunts for, and the relay is the one place that sees both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaFlow {
    /// Both ends sent RTP.
    Both = 0,
    /// One end sent RTP, the other nothing.
    OneWay = 1,
    /// Neither end sent any.
    None = 2,
}

impl MediaFlow {
    /// From the RTP packets each end sent.
    pub fn of(sent: [u64; 2]) -> MediaFlow {
        match sent {
            [0, 0] => MediaFlow::None,
            [0, _] | [_, 0] => MediaFlow::OneWay,
            _ => MediaFlow::Both,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            MediaFlow::Both => "both",
            MediaFlow::OneWay => "one_way",
            MediaFlow::None => "none",
        }
    }
}

/// A call that ends sooner after its answer is not judged: its ends may not have sent yet.
const JUDGE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// One dialog's chances when its PBX dies. A dialog is saveable when the PBX left its media
/// end to end: the SDP the PBX sent us names our own relay address of another leg (a B2BUA
/// bridging two legs through us) or of the other pass of the same Call-ID (a proxy). Then
/// media never touched the PBX and the SBC can answer for it. When the PBX named its own
/// media address, the media dies with it.
#[derive(Debug, Default)]
struct Survival {
    /// The PBX node the dialog runs through.
    node: Option<usize>,
    /// The other leg (B2BUA) or pass (proxy) of the hairpin.
    peer: Option<CallKey>,
    /// `Some(true)`: media end to end through our relay; `Some(false)`: the PBX anchors it.
    saveable: Option<bool>,
    /// The last SDP the SBC sent toward the caller / the callee of this dialog.
    sdp_to_caller: Option<Arc<[u8]>>,
    sdp_to_callee: Option<Arc<[u8]>>,
    /// When the SBC saw the node dead while the dialog was up.
    outlived: Option<std::time::Instant>,
    /// RTP packets received from the PBX side at the last check (unsaveable calls).
    internal_packets: u64,
    /// Our internal-side RTP ports named toward the PBX (keys of `internal_ports`).
    internal_ports: SmallVec<[u16; 2]>,
    /// When the dialog was established (its first 2xx).
    established: Option<std::time::Instant>,
    /// The relay joined it with `peer`: its internal leg relays nothing, the peer's public
    /// leg carries what the far end sends.
    joined: bool,
    /// The trunk channel the call holds, freed when the dialog is forgotten.
    slot: Option<crate::trunk_calls::CallSlot>,
}

/// A call as `/status` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallView {
    pub call_id: String,
    /// `p` (caller on the public side) or `i` (caller behind the PBX).
    pub pass: String,
    /// Index of the PBX node that set the dialog up.
    pub node: Option<usize>,
    /// The other leg of the hairpin (Call-ID and pass), when known.
    pub peer: Option<String>,
    pub saveable: Option<bool>,
    /// The dialog outlived its PBX node.
    pub outlived: bool,
}

/// What the SBC should do with an in-dialog request whose PBX is dead and that cannot go
/// around it (see [`MediaAnchor::orphan`]).
#[derive(Debug)]
pub struct Orphan {
    pub key: CallKey,
    pub dialog: Option<Arc<DialogInfo>>,
    /// The request came from the dialog's caller.
    pub from_caller: bool,
    /// The SDP that sender last received from us.
    pub current_sdp: Option<Arc<[u8]>>,
    /// The other leg of the hairpin.
    pub peer: Option<CallKey>,
    pub saveable: Option<bool>,
}

/// One established dialog, as the SBC saw it pass: enough to send a BYE to each end in the
/// dialog's own terms (RFC 3261 12.2.1.1: Request-URI from the remote target, Route from the
/// route set, the tags, a CSeq above what that end has used).
#[derive(Debug)]
pub struct DialogInfo {
    pub call_id: Box<str>,
    /// The caller's From header value (with its tag).
    pub caller_from: Box<str>,
    /// The callee's To header value from the 2xx (with its tag).
    pub callee_to: Box<str>,
    /// The caller's Contact URI (remote target of requests toward the caller).
    pub caller_target: Box<str>,
    /// The callee's Contact URI from the 2xx.
    pub callee_target: Box<str>,
    /// Record-Route entries between the SBC and the caller, in the order to put in Route.
    pub routes_to_caller: Vec<Box<str>>,
    /// Record-Route entries between the SBC and the callee, in the order to put in Route.
    pub routes_to_callee: Vec<Box<str>>,
    /// The hop toward the caller: the flow the INVITE arrived on.
    pub caller_flow: Flow,
    /// The hop toward the callee: where the INVITE was sent.
    pub callee_dest: Dest,
    /// CSeq number of the caller's INVITE.
    pub caller_cseq: u32,
    /// The PBX node the dialog runs through (the INVITE came from it or went to it).
    pub node: Option<usize>,
}

struct CallEntry {
    caller_tag: Box<[u8]>,
    /// Bit 0: the pass whose caller is public; bit 1: internal.
    passes: u8,
}

/// What the proxy does with a message after the relay saw it.
#[derive(Debug)]
pub enum MediaAction {
    /// Nothing to do: no SDP, or media anchoring does not apply.
    Pass,
    /// Forward with this body instead of the received one.
    Body(Vec<u8>),
    /// The relay refused the offer: answer the request with this status.
    Refuse(u16, MediaError),
}

/// Whether a message carries SDP we must anchor.
pub fn has_sdp(msg: &Message) -> bool {
    sdp_span(msg, msg.body()).is_some()
}

/// Where the SDP is in `body` (the message's own, or one that replaces it: the SDP one relay
/// pass produced, handed to the next pass when the SBC skips a dead PBX between two passes):
/// all of it, or one part of a multipart body (see [`sbc_sip::multipart`]).
fn sdp_span(msg: &Message, body: &[u8]) -> Option<Range<usize>> {
    sbc_sip::multipart::sdp_span(msg.header_value(HeaderName::ContentType), body)
}

/// Runs the relay on the SDP at `span` in `body` and puts its result back in place: the body
/// to forward and where the SDP sits in it (what was sent, for [`MediaAnchor::sent_sdp`]).
fn with_sdp(
    body: &[u8],
    span: Range<usize>,
    relay: impl FnOnce(&[u8]) -> Result<Vec<u8>, MediaError>,
) -> Result<(Vec<u8>, Range<usize>), MediaError> {
    let sdp = body
        .get(span.clone())
        .ok_or(MediaError::Sdp(sbc_media_relay::sdp::SdpError::Empty))?;
    let out = relay(sdp)?;
    if span.start == 0 && span.end == body.len() {
        let n = out.len();
        return Ok((out, 0..n));
    }
    let at = span.start..span.start + out.len();
    Ok((sbc_sip::multipart::splice(body, span, &out), at))
}

fn side_bit(side: Side) -> u8 {
    match side {
        Side::Public => 1,
        Side::Internal => 2,
    }
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

impl MediaAnchor {
    pub fn new(relay: Arc<Relay>) -> MediaAnchor {
        MediaAnchor {
            relay,
            calls: Mutex::new(AHashMap::default()),
            dialogs: Mutex::new(AHashMap::default()),
            survival: Mutex::new(AHashMap::default()),
            internal_ports: Mutex::new(AHashMap::default()),
            widowed: Mutex::new(AHashMap::default()),
            unsaveable_after: Mutex::new(std::time::Duration::from_secs(5)),
            ended: Default::default(),
        }
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Calls with anchored media (passes of a Call-ID counted apart).
    pub fn sessions(&self) -> usize {
        self.relay.sessions()
    }

    /// The relay key of the pass a message belongs to. `sender_is_caller` says whether the
    /// From-tag party sent this request (for a response: sent the request it answers);
    /// `sender_side` / `receiver_side` are where that request came from and went to.
    fn key(
        &self,
        call_id: &[u8],
        from_tag: &[u8],
        sender_side: Side,
        receiver_side: Side,
        create: bool,
    ) -> (CallKey, Side) {
        let mut calls = self.calls.lock();
        let caller_side = match calls.get_mut(call_id) {
            Some(e) => {
                let side = if *e.caller_tag == *from_tag {
                    sender_side
                } else {
                    receiver_side
                };
                if create {
                    e.passes |= side_bit(side);
                }
                side
            }
            None => {
                if create {
                    calls.insert(
                        call_id.into(),
                        CallEntry {
                            caller_tag: from_tag.into(),
                            passes: side_bit(sender_side),
                        },
                    );
                }
                sender_side
            }
        };
        (pass_key(call_id, caller_side), caller_side)
    }

    /// A request on its way from `in_side` to `out_side`.
    pub fn on_request(&self, msg: &Message, in_side: Side, out_side: Side) -> MediaAction {
        self.on_request_body(msg, msg.body(), in_side, out_side)
    }

    /// [`MediaAnchor::on_request`] with `body` in place of the message's own: a request that
    /// crosses both passes of a proxied call in one step (its PBX is dead) goes through the
    /// first pass with its own SDP and through the second with what the first produced.
    pub fn on_request_body(
        &self,
        msg: &Message,
        body: &[u8],
        in_side: Side,
        out_side: Side,
    ) -> MediaAction {
        let Some(method) = msg.method() else {
            return MediaAction::Pass;
        };
        // Keyed by the Call-ID as the relay spells it (lossy UTF-8), so a timeout event names
        // the same entry.
        let cid = String::from_utf8_lossy(msg.call_id());
        let call_id = cid.as_bytes();
        let from_tag = msg.from_tag().unwrap_or_default();
        if method == Method::Bye {
            let (key, side) = self.key(call_id, from_tag, in_side, out_side, false);
            self.release(call_id, &key, side);
            return MediaAction::Pass;
        }
        let Some(span) = sdp_span(msg, body) else {
            return MediaAction::Pass;
        };
        let initial = method == Method::Invite && msg.to_tag().is_none();
        match method {
            Method::Invite | Method::Update => {
                let (key, side) = self.key(call_id, from_tag, in_side, out_side, initial);
                let offered = with_sdp(body, span, |sdp| {
                    self.relay
                        .offer(&key, text(from_tag), in_side, out_side, sdp)
                });
                match offered {
                    Ok((b, at)) => {
                        self.sent_sdp(&key, side != in_side, out_side, &b[at]);
                        MediaAction::Body(b)
                    }
                    Err(e) => {
                        if initial {
                            self.release(call_id, &key, side);
                        }
                        MediaAction::Refuse(e.sip_status(), e)
                    }
                }
            }
            // The answer to an offer the callee made in a 2xx (INVITE without SDP) or in a
            // reliable 18x: the callee (To tag) is the offerer.
            Method::Ack | Method::Prack => {
                let to_tag = msg.to_tag().unwrap_or_default();
                let (key, side) = self.key(call_id, from_tag, in_side, out_side, false);
                let answered = with_sdp(body, span, |sdp| {
                    self.relay.answer(&key, text(to_tag), text(from_tag), sdp)
                });
                match answered {
                    Ok((b, at)) => {
                        self.sent_sdp(&key, side != in_side, out_side, &b[at]);
                        MediaAction::Body(b)
                    }
                    Err(e) => {
                        tracing::debug!(call = %key, error = %e, "answer in {} not anchored", method.as_str());
                        metrics::counter!("sbc_media_errors_total", "stage" => "answer")
                            .increment(1);
                        MediaAction::Pass
                    }
                }
            }
            _ => MediaAction::Pass,
        }
    }

    /// A response to `request` (which crossed from `req_in` to `req_out`), coming back from
    /// `req_out`. `request_offered` says whether the request carried an offer.
    pub fn on_response(
        &self,
        request: &Message,
        request_offered: bool,
        req_in: Side,
        req_out: Side,
        msg: &Message,
    ) -> MediaAction {
        self.on_response_body(request, request_offered, req_in, req_out, msg, msg.body())
    }

    /// [`MediaAnchor::on_response`] with `body` in place of the response's own (see
    /// [`MediaAnchor::on_request_body`]).
    pub fn on_response_body(
        &self,
        request: &Message,
        request_offered: bool,
        req_in: Side,
        req_out: Side,
        msg: &Message,
        body: &[u8],
    ) -> MediaAction {
        let Some(method) = request.method() else {
            return MediaAction::Pass;
        };
        let status = msg.status().unwrap_or(0);
        if !matches!(method, Method::Invite | Method::Update) {
            return MediaAction::Pass;
        }
        // Keyed by the Call-ID as the relay spells it (lossy UTF-8), so a timeout event names
        // the same entry.
        let cid = String::from_utf8_lossy(msg.call_id());
        let call_id = cid.as_bytes();
        let from_tag = msg.from_tag().unwrap_or_default();
        let initial = method == Method::Invite && request.to_tag().is_none();
        if status >= 300 {
            if initial {
                self.release_unanswered(call_id, from_tag, req_in, req_out);
            }
            return MediaAction::Pass;
        }
        if status < 180 {
            return MediaAction::Pass;
        }
        let Some(span) = sdp_span(msg, body) else {
            return MediaAction::Pass;
        };
        let to_tag = msg.to_tag().unwrap_or_default();
        let (key, side) = self.key(call_id, from_tag, req_in, req_out, initial);
        let result = with_sdp(body, span, |sdp| {
            if request_offered {
                self.relay.answer(&key, text(from_tag), text(to_tag), sdp)
            } else {
                // Late offer: the callee offers in its 18x/2xx; the ACK (or PRACK) answers.
                self.relay.offer(&key, text(to_tag), req_out, req_in, sdp)
            }
        });
        match result {
            Ok((b, at)) => {
                // The response goes back to the request's sender.
                self.sent_sdp(&key, side == req_in, req_in, &b[at]);
                MediaAction::Body(b)
            }
            Err(e) => {
                tracing::warn!(call = %key, status, error = %e, "SDP in response not anchored; forwarded as is");
                metrics::counter!("sbc_media_errors_total", "stage" => "response").increment(1);
                MediaAction::Pass
            }
        }
    }

    /// Drops a pass: its ports go back to the pool; the Call-ID is forgotten with its last
    /// pass.
    fn release(&self, call_id: &[u8], key: &CallKey, caller_side: Side) {
        self.report_end(key);
        self.relay.delete(key);
        self.dialogs.lock().remove(key);
        if let Some(s) = self.survival.lock().remove(key) {
            {
                let mut ports = self.internal_ports.lock();
                for p in &s.internal_ports {
                    if ports.get(p) == Some(key) {
                        ports.remove(p);
                    }
                }
            }
            let mut widowed = self.widowed.lock();
            widowed.remove(key);
            if let Some(peer) = s.peer {
                // The peer's own end: nothing to remember. Otherwise the peer may still need
                // hanging up if the PBX never passes this end's BYE on.
                if widowed.remove(&peer).is_none() && self.relay.answered(&peer).is_some() {
                    widowed.insert(key.clone(), (peer, std::time::Instant::now()));
                }
            }
        }
        let mut calls = self.calls.lock();
        if let Some(e) = calls.get_mut(call_id) {
            e.passes &= !side_bit(caller_side);
            if e.passes == 0 {
                calls.remove(call_id);
            }
        }
    }

    /// An established dialog ends: judges how its media went ([`MediaFlow`]), counts it
    /// (`sbc_call_media_total{flow}`, [`MediaAnchor::ended_calls`]) and logs it. A joined
    /// hairpin is judged once, by whichever of its two dialogs ends first, from both public
    /// legs (its internal legs relay nothing); a call on hold at its end, or shorter than
    /// [`JUDGE_AFTER`] since its answer, is logged but not judged.
    fn report_end(&self, key: &CallKey) {
        let Some((established, joined, peer)) = self
            .survival
            .lock()
            .get(key)
            .and_then(|s| Some((s.established?, s.joined, s.peer.clone())))
        else {
            return;
        };
        let Some(st) = self.relay.stats(key) else {
            return;
        };
        let from_leg =
            |l: &sbc_media_relay::LegStats| -> u64 { l.media.iter().map(|m| m.rtp.packets).sum() };
        let mut sent = [from_leg(&st.legs[0]), from_leg(&st.legs[1])];
        let lost: u64 = st
            .legs
            .iter()
            .flat_map(|l| l.media.iter())
            .map(|m| m.rtp.lost)
            .sum();
        let jitter_us = st
            .legs
            .iter()
            .flat_map(|l| l.media.iter())
            .map(|m| m.rtp.jitter_us)
            .max()
            .unwrap_or(0);
        let lasted = established.elapsed();
        let mut judged = !st.on_hold && lasted >= JUDGE_AFTER;
        if joined {
            match peer.as_ref().and_then(|p| self.relay.stats(p)) {
                Some(ps) => {
                    let far: u64 = ps
                        .legs
                        .iter()
                        .filter(|l| l.side == Side::Public)
                        .map(from_leg)
                        .sum();
                    for (leg, n) in st.legs.iter().zip(sent.iter_mut()) {
                        if leg.side == Side::Internal {
                            *n = far;
                        }
                    }
                }
                // The peer ended first and judged the pair.
                None => judged = false,
            }
        }
        let secs = lasted.as_secs();
        if judged {
            let flow = MediaFlow::of(sent);
            self.ended[flow as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("sbc_call_media_total", "flow" => flow.label()).increment(1);
            if flow != MediaFlow::Both {
                tracing::info!(
                    call = %key,
                    secs,
                    from_caller = sent[0],
                    from_callee = sent[1],
                    flow = flow.label(),
                    "call ended without media both ways"
                );
            }
        }
        tracing::debug!(
            call = %key,
            secs,
            from_caller = sent[0],
            from_callee = sent[1],
            lost,
            jitter_us,
            "call ended"
        );
    }

    /// Ended calls judged so far by this SBC, by how their media went:
    /// `[both ways, one way, none]` (see [`MediaFlow`]).
    pub fn ended_calls(&self) -> [u64; 3] {
        self.ended
            .each_ref()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Remembers the dialog a 2xx to a dialog-creating INVITE established, for the pass that
    /// INVITE belongs to (it crossed from `req_in` to `req_out`).
    ///
    /// `slot` is the trunk channel the call holds (see [`crate::trunk_calls`]): kept until the
    /// dialog ends.
    pub fn record_dialog(
        &self,
        request: &Message,
        req_in: Side,
        req_out: Side,
        info: DialogInfo,
        slot: Option<crate::trunk_calls::CallSlot>,
    ) {
        let cid = String::from_utf8_lossy(request.call_id());
        let from_tag = request.from_tag().unwrap_or_default();
        let (key, _) = self.key(cid.as_bytes(), from_tag, req_in, req_out, false);
        if self.relay.answered(&key).is_some() {
            let node = info.node;
            self.dialogs.lock().insert(key.clone(), Arc::new(info));
            let mut survival = self.survival.lock();
            let s = survival.entry(key.clone()).or_default();
            s.node = node;
            s.established.get_or_insert_with(std::time::Instant::now);
            if slot.is_some() {
                s.slot = slot;
            }
            drop(survival);
            self.pair(&key);
        }
    }

    /// Remembers the SDP the SBC sent toward one party of a relay call (`toward` is the side
    /// it went to): what a refresh answered by the SBC itself returns, and, toward the PBX,
    /// the relay port that marks a hairpin.
    fn sent_sdp(&self, key: &CallKey, to_caller: bool, toward: Side, body: &[u8]) {
        let body: Arc<[u8]> = Arc::from(body);
        let mut port = None;
        if toward == Side::Internal {
            if let Ok(sdp) = sbc_media_relay::sdp::Sdp::parse(&body) {
                if let Some(m) = sdp.media.iter().find(|m| m.port != 0) {
                    self.internal_ports.lock().insert(m.port, key.clone());
                    port = Some(m.port);
                }
            }
        }
        let mut survival = self.survival.lock();
        let s = survival.entry(key.clone()).or_default();
        if let Some(p) = port.filter(|p| !s.internal_ports.contains(p)) {
            s.internal_ports.push(p);
        }
        if to_caller {
            s.sdp_to_caller = Some(body);
        } else {
            s.sdp_to_callee = Some(body);
        }
    }

    /// Whether an address is the relay's own (either side).
    fn is_relay_addr(&self, addr: std::net::SocketAddr) -> bool {
        let c = self.relay.config();
        [&c.public, &c.internal]
            .iter()
            .any(|s| s.advertise.unwrap_or(s.bind) == addr.ip() || s.bind == addr.ip())
    }

    /// Looks at where the PBX sends this established dialog's media: our relay port of
    /// another leg (a hairpin: saveable, paired with that leg) or its own address (the PBX
    /// anchors the media: unsaveable).
    fn pair(&self, key: &CallKey) {
        let Some(stats) = self.relay.stats(key) else {
            return;
        };
        let Some(leg) = stats.legs.iter().find(|l| l.side == Side::Internal) else {
            return;
        };
        let Some(adv) = leg
            .media
            .iter()
            .find_map(|m| m.rtp.advertised.filter(|a| a.port() != 0))
        else {
            return;
        };
        let verdict = if self.is_relay_addr(adv) {
            let peer = self
                .internal_ports
                .lock()
                .get(&adv.port())
                .filter(|p| *p != key)
                .cloned();
            Some((true, peer))
        } else {
            Some((false, None))
        };
        let my_port = leg.media.iter().find_map(|m| m.relay_port);
        {
            let mut survival = self.survival.lock();
            if let Some((saveable, peer)) = &verdict {
                if let Some(p) = peer {
                    let other = survival.entry(p.clone()).or_default();
                    other.peer = Some(key.clone());
                    other.saveable = Some(true);
                }
                let s = survival.entry(key.clone()).or_default();
                s.saveable = Some(*saveable);
                if peer.is_some() {
                    s.peer = peer.clone();
                }
            }
        }
        // Once each side of the hairpin sends to the other (the second dialog's answer is
        // in), the relay joins them: one hop instead of two.
        if let (Some((_, Some(peer))), Some(my_port)) = (verdict, my_port) {
            let mutual = self.relay.stats(&peer).is_some_and(|st| {
                st.legs
                    .iter()
                    .filter(|l| l.side == Side::Internal)
                    .flat_map(|l| l.media.iter())
                    .any(|m| m.rtp.advertised.is_some_and(|a| a.port() == my_port))
            });
            if mutual && self.relay.join(key, &peer) {
                let mut survival = self.survival.lock();
                for k in [key, &peer] {
                    if let Some(s) = survival.get_mut(k) {
                        s.joined = true;
                    }
                }
                drop(survival);
                metrics::counter!("sbc_media_joined_total").increment(1);
                tracing::debug!(call = %key, %peer, "hairpin joined in the relay");
            }
        }
    }

    /// An in-dialog request (crossing from `in_side` to `out_side`) whose PBX is dead and
    /// that cannot go around it: what the SBC knows to answer it by itself.
    pub fn orphan(&self, msg: &Message, in_side: Side, out_side: Side) -> Option<Orphan> {
        let cid = String::from_utf8_lossy(msg.call_id());
        let from_tag = msg.from_tag().unwrap_or_default();
        let (key, side) = self.key(cid.as_bytes(), from_tag, in_side, out_side, false);
        let from_caller = side == in_side;
        let dialog = self.dialog(&key);
        let survival = self.survival.lock();
        match survival.get(&key) {
            Some(s) => Some(Orphan {
                current_sdp: if from_caller {
                    s.sdp_to_caller.clone()
                } else {
                    s.sdp_to_callee.clone()
                },
                peer: s.peer.clone(),
                saveable: s.saveable,
                key,
                dialog,
                from_caller,
            }),
            None => {
                drop(survival);
                // Released already (a BYE the dead PBX did not pass on): its peer may wait.
                let peer = self.widowed.lock().remove(&key).map(|(p, _)| p)?;
                Some(Orphan {
                    key,
                    dialog,
                    from_caller,
                    current_sdp: None,
                    peer: Some(peer),
                    saveable: Some(true),
                })
            }
        }
    }

    /// Drops a relay call the SBC ended by itself (ports back, dialog forgotten).
    pub fn end(&self, key: &CallKey) {
        self.forget(key);
        self.widowed.lock().remove(key);
    }

    /// A dialog's PBX died while it was up: counted once, as saved when it is a hairpin
    /// (one count per pair: the pass or leg seen first).
    pub fn count_outlived(&self, key: &CallKey) {
        let was = {
            let survival = self.survival.lock();
            survival.get(key).map(|s| {
                let peer_counted = s
                    .peer
                    .as_ref()
                    .and_then(|p| survival.get(p))
                    .is_some_and(|p| p.outlived.is_some());
                (s.saveable, peer_counted)
            })
        };
        let Some((saveable, peer_counted)) = was else {
            return;
        };
        if !self.mark_outlived(key) {
            return;
        }
        if saveable == Some(true) {
            if !peer_counted {
                metrics::counter!("sbc_calls_saved_total").increment(1);
            }
            tracing::info!(call = %key, "call outlives its PBX");
        } else {
            tracing::info!(call = %key, "call cannot outlive its PBX (the PBX anchors its media)");
        }
    }

    /// Marks a dialog as having outlived its PBX; true the first time (for counting).
    fn mark_outlived(&self, key: &CallKey) -> bool {
        let mut survival = self.survival.lock();
        let Some(s) = survival.get_mut(key) else {
            return false;
        };
        if s.outlived.is_some() {
            return false;
        }
        s.outlived = Some(std::time::Instant::now());
        true
    }

    /// Sets how long an unsaveable call may stay silent on the PBX side after its node died.
    pub fn set_unsaveable_after(&self, d: std::time::Duration) {
        *self.unsaveable_after.lock() = d;
    }

    /// Calls with a dialog, for `/status`.
    pub fn calls(&self) -> Vec<CallView> {
        let survival = self.survival.lock();
        let dialogs = self.dialogs.lock();
        let mut v: Vec<CallView> = dialogs
            .keys()
            .map(|k| {
                let s = survival.get(k);
                CallView {
                    call_id: k.call_id().to_string(),
                    pass: k.discriminator().unwrap_or_default().to_string(),
                    node: s.and_then(|s| s.node),
                    peer: s.and_then(|s| s.peer.as_ref()).map(|p| p.to_string()),
                    saveable: s.and_then(|s| s.saveable),
                    outlived: s.is_some_and(|s| s.outlived.is_some()),
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.call_id, &a.pass).cmp(&(&b.call_id, &b.pass)));
        v
    }

    /// Once a second: dialogs whose node is dead are counted saved (hairpins) or, when the
    /// PBX anchored their media, ended on both ends after `unsaveable_after` without a
    /// packet from the PBX side. Returns the dialogs to hang up.
    fn sweep_dead_nodes(&self, dead: &dyn Fn(usize) -> bool) -> Vec<(CallKey, Arc<DialogInfo>)> {
        let after = *self.unsaveable_after.lock();
        let now = std::time::Instant::now();
        type Row = (CallKey, usize, Option<bool>, Option<std::time::Instant>);
        let keys: Vec<Row> = self
            .survival
            .lock()
            .iter()
            .filter_map(|(k, s)| Some((k.clone(), s.node?, s.saveable, s.outlived)))
            .filter(|(_, n, ..)| dead(*n))
            .collect();
        let mut end = Vec::new();
        for (key, _node, saveable, outlived) in keys {
            if self.dialog(&key).is_none() {
                continue;
            }
            if outlived.is_none() {
                self.count_outlived(&key);
            }
            if saveable == Some(true) {
                continue;
            }
            // Unsaveable: wait until the PBX side has been silent for `after`.
            let packets = self.relay.stats(&key).map(|st| {
                st.legs
                    .iter()
                    .filter(|l| l.side == Side::Internal)
                    .flat_map(|l| l.media.iter())
                    .map(|m| m.rtp.packets)
                    .sum::<u64>()
            });
            let mut survival = self.survival.lock();
            let Some(s) = survival.get_mut(&key) else {
                continue;
            };
            let since = s.outlived.unwrap_or(now);
            match packets {
                Some(p) if p != s.internal_packets => {
                    s.internal_packets = p;
                    s.outlived = Some(now);
                }
                _ if now.duration_since(since) >= after => {
                    drop(survival);
                    if let Some(d) = self.dialog(&key) {
                        end.push((key, d));
                    }
                }
                _ => {}
            }
        }
        end
    }

    /// Forgets widowed entries nobody asked for within a minute.
    fn expire_widowed(&self) {
        let now = std::time::Instant::now();
        self.widowed
            .lock()
            .retain(|_, (_, at)| now.duration_since(*at) < std::time::Duration::from_secs(60));
    }

    /// The dialog of a relay call, if it was established.
    pub fn dialog(&self, key: &CallKey) -> Option<Arc<DialogInfo>> {
        self.dialogs.lock().get(key).cloned()
    }

    /// Dialogs remembered (a soak test checks this returns to zero).
    pub fn dialogs(&self) -> usize {
        self.dialogs.lock().len()
    }

    /// The phone-side flows that carry an established call: the re-registration wave after a
    /// failover leaves them open until the call ends (closing one would cut the call's
    /// in-dialog requests to the phone).
    pub fn flows_in_calls(&self) -> ahash::AHashSet<Flow> {
        let dialogs = self.dialogs.lock();
        let mut out = ahash::AHashSet::with_capacity(dialogs.len() * 2);
        for d in dialogs.values() {
            out.insert(d.caller_flow);
            if let Dest::Flow(f) = &d.callee_dest {
                out.insert(*f);
            }
        }
        out
    }

    /// The relay ended a call by itself (media timeout): forget it.
    pub fn forget(&self, key: &CallKey) {
        let side = if key.discriminator() == Some(INTERNAL_PASS) {
            Side::Internal
        } else {
            Side::Public
        };
        self.release(key.call_id().as_bytes(), key, side);
    }

    /// A dialog-creating INVITE ended without an answer: its pass frees its ports now. A
    /// fork may already have answered (one branch per transaction here), so only a call the
    /// relay never saw answered goes.
    fn release_unanswered(&self, call_id: &[u8], from_tag: &[u8], req_in: Side, req_out: Side) {
        let (key, side) = self.key(call_id, from_tag, req_in, req_out, false);
        if self.relay.answered(&key) == Some(false) {
            self.release(call_id, &key, side);
        }
    }

    /// Call-IDs remembered (a soak test checks this returns to zero).
    pub fn tracked_calls(&self) -> usize {
        self.calls.lock().len()
    }
}

const PUBLIC_PASS: &str = "p";
const INTERNAL_PASS: &str = "i";

fn pass_key(call_id: &[u8], caller_side: Side) -> CallKey {
    CallKey::with_discriminator(
        &String::from_utf8_lossy(call_id),
        match caller_side {
            Side::Public => PUBLIC_PASS,
            Side::Internal => INTERNAL_PASS,
        },
    )
}

impl MediaAnchor {
    /// The SBC itself ended a request the relay saw (all nodes failed, timeout, CANCEL): a
    /// dialog-creating INVITE that was never answered frees its ports now, not at the media
    /// timeout.
    pub fn abandon(&self, request: &Message, req_in: Side, req_out: Side) {
        if request.method() != Some(Method::Invite) || request.to_tag().is_some() {
            return;
        }
        let cid = String::from_utf8_lossy(request.call_id());
        let from_tag = request.from_tag().unwrap_or_default();
        self.release_unanswered(cid.as_bytes(), from_tag, req_in, req_out);
    }
}

fn publish_metrics(anchor: &MediaAnchor) {
    let t = anchor.relay.totals();
    metrics::gauge!("sbc_media_sessions").set(t.sessions as f64);
    metrics::gauge!("sbc_calls").set(anchor.dialogs() as f64);
    metrics::counter!("sbc_media_packets_total").absolute(t.packets);
    metrics::counter!("sbc_media_bytes_total").absolute(t.bytes);
    metrics::counter!("sbc_media_dropped_total").absolute(t.dropped);
    metrics::counter!("sbc_media_buffer_waits_total").absolute(t.buffer_waits);
    metrics::gauge!("sbc_media_ports_free", "side" => "public").set(t.free_pairs[0] as f64);
    metrics::gauge!("sbc_media_ports_free", "side" => "internal").set(t.free_pairs[1] as f64);
}

/// The relay's settings from the `[media]` section.
pub fn relay_config(m: &sbc_config::Media) -> sbc_media_relay::RelayConfig {
    use sbc_media_relay::{RelayConfig, SideConfig};
    let side = |s: &sbc_config::MediaSide| SideConfig {
        bind: s.address,
        advertise: (s.advertise != s.address).then_some(s.advertise),
        ports: m.port_min..=m.port_max,
    };
    let mut c = RelayConfig::new(side(&m.public), side(&m.internal));
    c.workers = m.workers;
    c.io = match m.io {
        sbc_config::MediaIo::Epoll => sbc_media_relay::IoBackend::Epoll,
        sbc_config::MediaIo::Uring => sbc_media_relay::IoBackend::Uring,
    };
    c.timeout = m.timeout;
    c.hold_timeout = m.hold_timeout;
    c.relatch_after = m.relatch_quiet;
    c
}

/// Handles what the relay reports by itself: a call whose media died is hung up on both
/// legs (a BYE to each end, in the dialog's terms), forgotten and counted. A call that never
/// got to a dialog (no 2xx seen) is only forgotten: its INVITE transaction ends it.
pub async fn run_events(
    proxy: Arc<crate::proxy::Proxy>,
    anchor: Arc<MediaAnchor>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<sbc_media_relay::MediaEvent>,
) {
    // The relay counts in atomics on its own threads; metrics are published from here once
    // a second, so the forwarding loop never touches the metrics registry.
    let mut publish = tokio::time::interval(std::time::Duration::from_secs(1));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => return,
            },
            _ = publish.tick() => {
                publish_metrics(&anchor);
                anchor.expire_widowed();
                let dead = |n: usize| proxy.node_dead(n);
                for (key, d) in anchor.sweep_dead_nodes(&dead) {
                    tracing::info!(call = %key, "call whose PBX anchored its media ended after its PBX died");
                    metrics::counter!("sbc_calls_unsaveable_total").increment(1);
                    metrics::counter!("sbc_calls_ended_locally_total").increment(1);
                    anchor.end(&key);
                    proxy.end_dialog(&d, "PBX unavailable");
                }
                continue;
            }
        };
        match ev {
            sbc_media_relay::MediaEvent::Timeout { call, idle } => {
                let dialog = anchor.dialog(&call);
                tracing::info!(%call, idle_secs = idle.as_secs(), hangup = dialog.is_some(), "media timeout: call ended");
                metrics::counter!("sbc_media_timeouts_total").increment(1);
                anchor.forget(&call);
                if let Some(d) = dialog {
                    proxy.end_dialog(&d, "media timeout");
                }
            }
        }
    }
}
