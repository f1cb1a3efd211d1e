//! Topology hiding: what a PBX or a carrier sees of the phones behind the SBC.
//!
//! Media already flows through the relay, so SDP names only the SBC. In SIP a phone's
//! address is in two places a proxy normally passes on: the Via stack of its requests and its
//! Contact. With `phones.hide_topology` (on by default):
//!
//! - **Via**: a request from a phone leaves with the SBC's Via only. The phone's Via lines
//!   (with the received/rport the SBC would have stamped) are kept with the transaction and
//!   put back, in place of the SBC's Via, on every response returned to the phone. A
//!   stateful proxy has the transaction anyway, so this costs no extra table.
//! - **Contact**: a phone's Contact URI becomes an alias on the SBC,
//!   `sip:USER@SBC:PORT;transport=T;sbcc=SEALED`, where `SEALED` carries the phone's own URI
//!   under the SBC's MAC (see [`crate::flow_token::FlowTokens::seal`]). Registrars store the
//!   alias, and dialogs use it as the remote target; a request that comes back addressed to it
//!   gets the phone's URI back as its Request-URI at the SBC, and a registrar's 2xx that lists
//!   it is shown to the phone with its own URI. Nothing needs remembering, and no one but the
//!   SBC can make an alias point somewhere.
//!
//! The Call-ID passes through untouched (the SBC is a proxy, not a B2BUA): phones that put
//! their address in it still show it there.

use crate::flow_token::FlowTokens;
use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, Edits};
use sbc_sip::message::{HeaderName, Message};
use sbc_sip::scan::{offset_in, trim};
use sbc_sip::uri::Uri;
use sbc_sip::via::Via;
use sbc_sip::Transport;
use std::net::IpAddr;

/// The URI parameter of an alias.
const PARAM: &[u8] = b"sbcc";

/// Deletes every Via line of `msg` (the SBC then inserts its own as the only one), and
/// returns those lines as the phone must get them back: the top one stamped with
/// received/rport for `source` (RFC 3581), as forwarding would have.
pub fn hide_vias(msg: &Message, top: &Via<'_>, source: (IpAddr, u16), edits: &mut Edits) -> Bytes {
    let buf = msg.as_bytes();
    let mut stamp = Edits::new();
    edit::stamp_via(msg, top, source.0, source.1, &mut stamp);
    let mut saved = Vec::with_capacity(128);
    let mut first = true;
    for h in msg.headers_named(HeaderName::Via) {
        let line = h.line.range();
        if first {
            saved.extend_from_slice(&stamp.apply_within(buf, line.clone()));
            first = false;
        } else {
            saved.extend_from_slice(&buf[line.clone()]);
        }
        edits.delete(line);
    }
    Bytes::from(saved)
}

/// On a response going back to a phone: replaces the SBC's Via (`ours`, the top value) with
/// the phone's saved Via lines.
pub fn restore_vias(resp: &Message, ours: &Via<'_>, saved: &[u8], edits: &mut Edits) {
    if let Some(h) = resp.header(HeaderName::Via) {
        let range = edit::remove_value_range(resp, h, ours.raw);
        let at = range.start;
        edits.delete(range);
        // Our Via was inserted as a line of its own, so the deleted range is that line and
        // the saved lines take its place; if it shared a line, they go above that line.
        let at = if at == h.line.start as usize {
            at
        } else {
            h.line.start as usize
        };
        edits.insert(at, saved);
    }
}

/// The alias of a phone's Contact URI.
pub fn alias_uri(
    uri_raw: &[u8],
    user: Option<&[u8]>,
    at: (&str, u16, Transport),
    tokens: &FlowTokens,
) -> String {
    let (host, port, transport) = at;
    let mut s = String::with_capacity(64 + uri_raw.len() * 4 / 3);
    s.push_str(if transport == Transport::Tls {
        "sips:"
    } else {
        "sip:"
    });
    if let Some(u) = user {
        s.push_str(&String::from_utf8_lossy(u));
        s.push('@');
    }
    s.push_str(host);
    s.push(':');
    s.push_str(&port.to_string());
    if transport != Transport::Udp {
        s.push_str(";transport=");
        s.push_str(transport.uri_param());
    }
    s.push(';');
    s.push_str(std::str::from_utf8(PARAM).unwrap_or("sbcc"));
    s.push('=');
    s.push_str(&tokens.seal(uri_raw));
    s
}

/// Replaces the URI of every Contact of `msg` (a request or response from a phone) with its
/// alias on the SBC, keeping display names and header parameters (expires, +sip.instance,
/// reg-id...). `*` and unparseable values are left alone.
pub fn alias_contacts(
    msg: &Message,
    at: (&str, u16, Transport),
    tokens: &FlowTokens,
    edits: &mut Edits,
) {
    let buf = msg.as_bytes();
    for (_, v) in msg.values(HeaderName::Contact) {
        let v = trim(v);
        if v == b"*" {
            continue;
        }
        let Ok(na) = NameAddr::parse(v) else { continue };
        if na.uri.param(PARAM).is_some() {
            // Already an alias (a request that crossed the SBC before).
            continue;
        }
        let Some(start) = offset_in(buf, na.uri_raw) else {
            continue;
        };
        let alias = alias_uri(na.uri_raw, na.uri.user, at, tokens);
        if na.bracketed {
            edits.replace(start..start + na.uri_raw.len(), alias.as_bytes());
        } else {
            // A bare URI cannot carry URI parameters: put it in angle brackets.
            edits.replace(
                start..start + na.uri_raw.len(),
                format!("<{alias}>").as_bytes(),
            );
        }
    }
}

/// The phone's URI an alias stands for, if `uri` is one of ours.
pub fn unalias(uri: &Uri<'_>, tokens: &FlowTokens) -> Option<Vec<u8>> {
    let sealed = uri.param(PARAM)??;
    tokens.open(sealed)
}

/// Rewrites the Contacts of a registrar's 2xx back to the phone's own URIs.
pub fn unalias_contacts(msg: &Message, tokens: &FlowTokens, edits: &mut Edits) {
    let buf = msg.as_bytes();
    for (_, v) in msg.values(HeaderName::Contact) {
        let Ok(na) = NameAddr::parse(trim(v)) else {
            continue;
        };
        let Some(orig) = unalias(&na.uri, tokens) else {
            continue;
        };
        if let Some(start) = offset_in(buf, na.uri_raw) {
            edits.replace(start..start + na.uri_raw.len(), &orig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Message {
        Message::parse(Bytes::from(s.to_string())).unwrap()
    }

    const REG: &str = "REGISTER sip:pbx.test SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.168.1.10:5062;branch=z9hG4bKa;rport\r\n\
        Via: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKb\r\n\
        From: <sip:alice@pbx.test>;tag=1\r\nTo: <sip:alice@pbx.test>\r\nCall-ID: c1\r\n\
        CSeq: 1 REGISTER\r\n\
        Contact: \"Alice\" <sip:alice@192.168.1.10:5062;ob>;expires=300;+sip.instance=\"<urn:uuid:1>\"\r\n\
        Content-Length: 0\r\n\r\n";

    #[test]
    fn vias_are_hidden_and_come_back_stamped() {
        let m = msg(REG);
        let top = m.top_via().unwrap();
        let mut e = Edits::new();
        let saved = hide_vias(&m, &top, ("203.0.113.5".parse().unwrap(), 40000), &mut e);
        let out = String::from_utf8(e.apply(m.as_bytes())).unwrap();
        assert!(!out.contains("Via:"), "{out}");
        let saved = String::from_utf8(saved.to_vec()).unwrap();
        assert_eq!(
            saved,
            "Via: SIP/2.0/UDP 192.168.1.10:5062;branch=z9hG4bKa;rport=40000;received=203.0.113.5\r\n\
             Via: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKb\r\n"
        );
        // The PBX answers with only our Via; the phone gets its own back.
        let resp = msg(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKsbc\r\n\
            From: <sip:alice@pbx.test>;tag=1\r\nTo: <sip:alice@pbx.test>;tag=2\r\nCall-ID: c1\r\n\
            CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n",
        );
        let ours = resp.top_via().unwrap();
        let mut e = Edits::new();
        restore_vias(&resp, &ours, saved.as_bytes(), &mut e);
        let back = msg(&String::from_utf8(e.apply(resp.as_bytes())).unwrap());
        let vias: Vec<_> = back.values(HeaderName::Via).collect();
        assert_eq!(vias.len(), 2);
        assert_eq!(back.top_via().unwrap().branch, Some(&b"z9hG4bKa"[..]));
        assert_eq!(back.top_via().unwrap().rport, Some(Some(40000)));
    }

    #[test]
    fn contacts_become_sealed_aliases_and_come_back() {
        let t = FlowTokens::new(Some("a secret of sixteen+ chars"));
        let m = msg(REG);
        let mut e = Edits::new();
        alias_contacts(&m, ("10.0.0.1", 5060, Transport::Udp), &t, &mut e);
        let out = msg(&String::from_utf8(e.apply(m.as_bytes())).unwrap());
        let c = out.header_value(HeaderName::Contact).unwrap();
        let text = String::from_utf8_lossy(c).to_string();
        assert!(!text.contains("192.168.1.10"), "{text}");
        assert!(
            text.starts_with("\"Alice\" <sip:alice@10.0.0.1:5060;sbcc="),
            "{text}"
        );
        assert!(
            text.ends_with(">;expires=300;+sip.instance=\"<urn:uuid:1>\""),
            "{text}"
        );
        let na = NameAddr::parse(c).unwrap();
        assert_eq!(
            unalias(&na.uri, &t).as_deref(),
            Some(&b"sip:alice@192.168.1.10:5062;ob"[..])
        );
        // Someone else's key, or a tampered alias: not ours.
        let other = FlowTokens::new(Some("another secret of 16+ chars"));
        assert_eq!(unalias(&na.uri, &other), None);
        let tampered = text.replace("sbcc=c2", "sbcc=c3");
        if tampered != text {
            let na2 = NameAddr::parse(tampered.as_bytes()).unwrap();
            assert_eq!(unalias(&na2.uri, &t), None);
        }
        // The registrar's 2xx lists the alias; the phone sees its own URI.
        let ok = msg(&format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx\r\nFrom: <sip:alice@pbx.test>;tag=1\r\n\
             To: <sip:alice@pbx.test>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 REGISTER\r\nContact: {text}\r\n\
             Content-Length: 0\r\n\r\n"
        ));
        let mut e = Edits::new();
        unalias_contacts(&ok, &t, &mut e);
        let back = msg(&String::from_utf8(e.apply(ok.as_bytes())).unwrap());
        let c = NameAddr::parse(back.header_value(HeaderName::Contact).unwrap()).unwrap();
        assert_eq!(c.uri_raw, b"sip:alice@192.168.1.10:5062;ob");
        assert_eq!(c.param(b"expires").flatten(), Some(&b"300"[..]));
    }

    #[test]
    fn a_bare_contact_gets_brackets_and_star_is_untouched() {
        let t = FlowTokens::new(None);
        let m = msg("REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/TCP 192.168.1.10;branch=z9hG4bKa\r\n\
            From: <sip:a@pbx.test>;tag=1\r\nTo: <sip:a@pbx.test>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\
            Contact: sip:a@192.168.1.10;expires=60\r\nContent-Length: 0\r\n\r\n");
        let mut e = Edits::new();
        alias_contacts(&m, ("10.0.0.1", 5060, Transport::Tcp), &t, &mut e);
        let out = msg(&String::from_utf8(e.apply(m.as_bytes())).unwrap());
        let na = NameAddr::parse(out.header_value(HeaderName::Contact).unwrap()).unwrap();
        assert!(na.bracketed);
        assert_eq!(na.uri.param(b"transport").flatten(), Some(&b"tcp"[..]));
        // Header params stay outside the brackets.
        assert_eq!(na.param(b"expires").flatten(), Some(&b"60"[..]));
        let star = msg("REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKa\r\n\
            From: <sip:a@pbx.test>;tag=1\r\nTo: <sip:a@pbx.test>\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\n\
            Contact: *\r\nExpires: 0\r\nContent-Length: 0\r\n\r\n");
        let mut e = Edits::new();
        alias_contacts(&star, ("10.0.0.1", 5060, Transport::Udp), &t, &mut e);
        assert!(e.is_empty());
    }
}
