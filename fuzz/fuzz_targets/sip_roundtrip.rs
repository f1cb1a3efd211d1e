//! SIP parsing with re-serialisation: what the parser accepts, the proxy's edits must turn
//! into something it accepts again, meaning the same thing.
//!
//! The proxy never re-serialises a typed tree; it splices bytes into the message it received
//! (its Via on top, received/rport on the sender's Via, Max-Forwards, Route popped,
//! Record-Route added, a new SDP body) and builds local responses by copying header lines. A
//! splice at a wrong offset, or a copied line that no longer parses, would send a peer a
//! message it must reject. So for every input that parses:
//!
//! 1. a no-op edit gives the same bytes, which parse to the same start line, header count and
//!    body;
//! 2. for a request, the edits the proxy makes when forwarding give a message that parses
//!    with the same method, Request-URI, Call-ID and CSeq, one more Via (ours, on top), the
//!    sender's Via stamped, Max-Forwards one less, one Route value fewer when one was popped,
//!    and exactly the new body;
//! 3. for a request, a locally generated error response parses as that response, with the
//!    request's Call-ID, CSeq and every Via, and a To-tag (unless the request's To had a
//!    valueless `tag`, see `local_response`).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits, ResponseOpts};
use sbc_sip::message::{HeaderName, Message, ParseLimits, StartLine};
use std::net::{IpAddr, Ipv4Addr};

/// The reparse must not fail only because the edits added a Via or a header to a message
/// that was at the limit.
const ROOMY: ParseLimits = ParseLimits {
    max_headers: 4096,
    max_vias: 4096,
};
const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const BRANCH: &[u8] = b"z9hG4bK-fuzz-1";
const NEW_BODY: &[u8] = b"v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\ns=-\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";

fn start_of(m: &Message) -> (Vec<u8>, Vec<u8>, Option<u16>) {
    match m.start() {
        StartLine::Request { .. } => (m.method_bytes().to_vec(), m.uri_bytes().to_vec(), None),
        StartLine::Response { .. } => (Vec::new(), m.reason_bytes().to_vec(), m.status()),
    }
}

fn reparse(bytes: Vec<u8>, what: &str) -> Message {
    match Message::parse_with(Bytes::from(bytes.clone()), &ROOMY) {
        Ok(m) => m,
        Err(e) => panic!(
            "{what}: the edited message no longer parses ({e}):\n{}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}

fn no_op(msg: &Message) {
    let same = Edits::new().apply(msg.as_bytes());
    assert_eq!(same, msg.as_bytes(), "an empty edit changed the bytes");
    let again = reparse(same, "no-op");
    assert_eq!(start_of(&again), start_of(msg));
    assert_eq!(again.headers().len(), msg.headers().len());
    assert_eq!(again.body(), msg.body());
}

fn forward(msg: &Message) {
    let Some(via) = msg.top_via() else { return };
    let mut e = Edits::new();
    e.insert_fmt(
        edit::top_insert_point(msg, HeaderName::Via),
        format_args!(
            "Via: SIP/2.0/UDP 198.51.100.1:5060;branch={};rport\r\n",
            String::from_utf8_lossy(BRANCH)
        ),
    );
    edit::stamp_via(msg, &via, SRC, 5999, &mut e);
    let want_mf = match (msg.header(HeaderName::MaxForwards), msg.max_forwards()) {
        (Some(h), Some(mf)) => {
            e.replace(h.value.range(), mf.saturating_sub(1).to_string().as_bytes());
            mf.saturating_sub(1)
        }
        _ => {
            e.insert(msg.headers_end(), b"Max-Forwards: 70\r\n");
            70
        }
    };
    // Pop the first Route value as if it named us.
    let routes = msg.values(HeaderName::Route).count();
    let mut popped = false;
    if let Some((h, v)) = msg.values(HeaderName::Route).next() {
        if NameAddr::parse(v).is_ok() {
            e.delete(edit::remove_value_range(msg, h, v));
            popped = true;
        }
    }
    e.insert(
        edit::top_insert_point(msg, HeaderName::RecordRoute),
        b"Record-Route: <sip:198.51.100.1:5060;transport=udp;lr>\r\n",
    );
    edit::replace_body(msg, NEW_BODY, &mut e);

    let out = reparse(e.apply(msg.as_bytes()), "forwarded");
    let text = || String::from_utf8_lossy(out.as_bytes()).into_owned();
    assert_eq!(out.method_bytes(), msg.method_bytes(), "{}", text());
    assert_eq!(out.uri_bytes(), msg.uri_bytes(), "{}", text());
    assert_eq!(out.call_id(), msg.call_id(), "{}", text());
    assert_eq!(out.cseq(), msg.cseq(), "{}", text());
    assert_eq!(out.body(), NEW_BODY, "{}", text());
    assert_eq!(out.max_forwards(), Some(want_mf), "{}", text());
    assert_eq!(out.via_count(), msg.via_count() + 1, "{}", text());
    let top = out.top_via().map(|v| v.branch.map(<[u8]>::to_vec));
    assert_eq!(top, Some(Some(BRANCH.to_vec())), "our Via is not on top:\n{}", text());
    let sender = out
        .values(HeaderName::Via)
        .nth(1)
        .and_then(|(_, v)| sbc_sip::via::Via::parse(v).ok());
    let Some(sender) = sender else {
        panic!("the sender's Via no longer parses:\n{}", text())
    };
    assert_eq!(sender.branch, via.branch, "{}", text());
    let needs_received = via.rport.is_some() || sbc_sip::uri::parse_ip(via.host) != Some(SRC);
    if needs_received {
        assert!(sender.received.is_some(), "received not stamped:\n{}", text());
    }
    if via.rport == Some(None) {
        assert_eq!(sender.rport, Some(Some(5999)), "rport not filled:\n{}", text());
    }
    let routes_after = out.values(HeaderName::Route).count();
    assert_eq!(
        routes_after,
        routes - usize::from(popped),
        "Route values before {routes}, popped {popped}:\n{}",
        text()
    );
}

fn local_response(msg: &Message) {
    let bytes = edit::response(
        msg,
        503,
        "Service Unavailable",
        &ResponseOpts {
            to_tag: Some(b"fz"),
            source: Some((SRC, 5999)),
            extra: b"Retry-After: 5\r\n",
            server: Some("sbc"),
            ..Default::default()
        },
    );
    let out = reparse(bytes, "local response");
    let text = || String::from_utf8_lossy(out.as_bytes()).into_owned();
    assert_eq!(out.status(), Some(503), "{}", text());
    assert_eq!(out.call_id(), msg.call_id(), "{}", text());
    assert_eq!(out.cseq(), msg.cseq(), "{}", text());
    assert_eq!(out.via_count(), msg.via_count(), "{}", text());
    // A request whose To carries `tag` without a value (bad grammar, tolerated) has no
    // To-tag to keep, and that empty `tag` shadows the one the response adds; the response
    // only goes back to the sender that wrote it, so this is accepted.
    let valueless_tag = msg
        .to()
        .is_some_and(|to| sbc_sip::uri::find_param(to.params, b"tag") == Some(None));
    if !valueless_tag {
        assert!(out.to_tag().is_some(), "no To-tag:\n{}", text());
    }
    assert_eq!(
        out.top_via().map(|v| v.branch.map(<[u8]>::to_vec)),
        msg.top_via().map(|v| v.branch.map(<[u8]>::to_vec)),
        "{}",
        text()
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    no_op(&msg);
    if msg.is_request() {
        forward(&msg);
        local_response(&msg);
    }
});
