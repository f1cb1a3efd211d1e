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
use std::sync::Arc;

/// The relay plus the caller tags that key its calls.
pub struct MediaAnchor {
    relay: Arc<Relay>,
    calls: Mutex<AHashMap<Box<[u8]>, CallEntry>>,
    /// Established dialogs of anchored calls, by relay key: what the SBC needs to hang a
    /// call up by itself when its media dies.
    dialogs: Mutex<AHashMap<CallKey, Arc<DialogInfo>>>,
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
    if msg.body().is_empty() {
        return false;
    }
    match msg.header_value(HeaderName::ContentType) {
        Some(ct) => {
            let ct = sbc_sip::scan::trim(ct);
            let mime = ct.split(|&b| b == b';').next().unwrap_or_default();
            sbc_sip::scan::trim(mime).eq_ignore_ascii_case(b"application/sdp")
        }
        // RFC 3261 20.15: a body without Content-Type is unusual; an SDP-looking one is SDP.
        None => msg.body().starts_with(b"v=0"),
    }
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
        if !has_sdp(msg) {
            return MediaAction::Pass;
        }
        let initial = method == Method::Invite && msg.to_tag().is_none();
        match method {
            Method::Invite | Method::Update => {
                let (key, side) = self.key(call_id, from_tag, in_side, out_side, initial);
                match self
                    .relay
                    .offer(&key, text(from_tag), in_side, out_side, msg.body())
                {
                    Ok(b) => MediaAction::Body(b),
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
                let (key, _) = self.key(call_id, from_tag, in_side, out_side, false);
                match self
                    .relay
                    .answer(&key, text(to_tag), text(from_tag), msg.body())
                {
                    Ok(b) => MediaAction::Body(b),
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
        if status < 180 || !has_sdp(msg) {
            return MediaAction::Pass;
        }
        let to_tag = msg.to_tag().unwrap_or_default();
        let (key, _) = self.key(call_id, from_tag, req_in, req_out, initial);
        let result = if request_offered {
            self.relay
                .answer(&key, text(from_tag), text(to_tag), msg.body())
        } else {
            // Late offer: the callee offers in its 18x/2xx; the ACK (or PRACK) answers.
            self.relay
                .offer(&key, text(to_tag), req_out, req_in, msg.body())
        };
        match result {
            Ok(b) => MediaAction::Body(b),
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
        self.relay.delete(key);
        self.dialogs.lock().remove(key);
        let mut calls = self.calls.lock();
        if let Some(e) = calls.get_mut(call_id) {
            e.passes &= !side_bit(caller_side);
            if e.passes == 0 {
                calls.remove(call_id);
            }
        }
    }

    /// Remembers the dialog a 2xx to a dialog-creating INVITE established, for the pass that
    /// INVITE belongs to (it crossed from `req_in` to `req_out`).
    pub fn record_dialog(&self, request: &Message, req_in: Side, req_out: Side, info: DialogInfo) {
        let cid = String::from_utf8_lossy(request.call_id());
        let from_tag = request.from_tag().unwrap_or_default();
        let (key, _) = self.key(cid.as_bytes(), from_tag, req_in, req_out, false);
        if self.relay.answered(&key).is_some() {
            self.dialogs.lock().insert(key, Arc::new(info));
        }
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
