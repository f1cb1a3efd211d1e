//! The flows phones registered over.
//!
//! The SBC must know which public sources are phones it serves (everyone else gets 403: no
//! open relay), and where a request for a phone's Contact goes when a PBX routes by Contact
//! instead of by Path. Both come from the REGISTER transactions it proxied: an entry is made
//! when the registrar answers 2xx, with the expiry the registrar granted, and removed on
//! de-registration, expiry, or when the TCP/TLS connection it came over closes (RFC 5626).

use crate::transport::Flow;
use ahash::AHashMap;
use parking_lot::RwLock;
use sbc_sip::addr::NameAddr;
use sbc_sip::message::{HeaderName, Message};
use sbc_sip::scan::{parse_decimal, trim};
use sbc_sip::uri::Uri;
use smallvec::SmallVec;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct FlowEntry {
    contacts: SmallVec<[Box<[u8]>; 1]>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    by_flow: AHashMap<Flow, FlowEntry>,
    by_contact: AHashMap<Box<[u8]>, (Flow, Instant)>,
}

/// Registration flows; read on every request from a phone, written on REGISTER answers.
#[derive(Default)]
pub struct Registrations {
    inner: RwLock<Inner>,
}

/// A contact URI reduced to what identifies where it points: user@host:port, lowercased host.
fn contact_key(uri: &Uri<'_>) -> Box<[u8]> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(uri.user.unwrap_or_default());
    k.push(b'@');
    k.extend(uri.host.iter().map(|b| b.to_ascii_lowercase()));
    k.push(b':');
    k.extend_from_slice(&uri.port_or_default().to_be_bytes());
    k.into_boxed_slice()
}

impl Registrations {
    /// Records the outcome of a 2xx to a REGISTER that arrived over `flow`.
    pub fn record(&self, flow: Flow, request: &Message, response: &Message, now: Instant) {
        let default_expires = request
            .header_value(HeaderName::Expires)
            .and_then(|e| parse_decimal(trim(e), u32::MAX as u64))
            .unwrap_or(3600);
        let resp_expires = response
            .header_value(HeaderName::Expires)
            .and_then(|e| parse_decimal(trim(e), u32::MAX as u64));
        let mut inner = self.inner.write();
        for (_, v) in request.values(HeaderName::Contact) {
            if trim(v) == b"*" {
                // Remove every binding this flow made.
                if let Some(e) = inner.by_flow.remove(&flow) {
                    for c in e.contacts {
                        inner.by_contact.remove(&c);
                    }
                }
                metrics::gauge!("sbc_registrations").set(inner.by_flow.len() as f64);
                return;
            }
            let Ok(na) = NameAddr::parse(v) else { continue };
            let key = contact_key(&na.uri);
            // The expiry the registrar granted this contact, as echoed in the 2xx.
            let granted = response
                .values(HeaderName::Contact)
                .filter_map(|(_, rv)| NameAddr::parse(rv).ok())
                .find(|rna| contact_key(&rna.uri) == key)
                .map(|rna| {
                    rna.param(b"expires")
                        .flatten()
                        .and_then(|e| parse_decimal(e, u32::MAX as u64))
                        .or(resp_expires)
                        .unwrap_or(default_expires)
                });
            let requested = na
                .param(b"expires")
                .flatten()
                .and_then(|e| parse_decimal(e, u32::MAX as u64))
                .unwrap_or(default_expires);
            let exp = match granted {
                Some(g) => g,
                // Not echoed: removed (if it asked for 0) or the registrar lists nothing.
                None if requested == 0 => 0,
                None => requested,
            };
            if exp == 0 {
                inner.by_contact.remove(&key);
                if let Some(e) = inner.by_flow.get_mut(&flow) {
                    e.contacts.retain(|c| **c != *key);
                    if e.contacts.is_empty() {
                        inner.by_flow.remove(&flow);
                    }
                }
                continue;
            }
            let until = now + Duration::from_secs(exp);
            // by_contact says which flow lists a contact, so a flow carrying many contacts
            // (a gateway, or a load generator) costs no scan of its list on a refresh.
            let listed = match inner.by_contact.insert(key.clone(), (flow, until)) {
                Some((old, _)) if old == flow => true,
                Some((old, _)) => {
                    // The contact moved to another flow (the phone reconnected).
                    if let Some(e) = inner.by_flow.get_mut(&old) {
                        e.contacts.retain(|c| **c != *key);
                        if e.contacts.is_empty() {
                            inner.by_flow.remove(&old);
                        }
                    }
                    false
                }
                None => false,
            };
            let e = inner.by_flow.entry(flow).or_insert_with(|| FlowEntry {
                contacts: SmallVec::new(),
                expires: until,
            });
            if !listed {
                e.contacts.push(key);
            }
            e.expires = e.expires.max(until);
        }
        metrics::gauge!("sbc_registrations").set(inner.by_flow.len() as f64);
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

    /// The flow for a Request-URI that is a registered Contact.
    pub fn flow_for_contact(&self, ruri: &[u8]) -> Option<Flow> {
        let uri = Uri::parse(ruri).ok()?;
        let key = contact_key(&uri);
        let now = Instant::now();
        self.inner
            .read()
            .by_contact
            .get(&key)
            .filter(|(_, until)| *until > now)
            .map(|(f, _)| *f)
    }

    /// A TCP/TLS flow is gone: its registrations are useless (RFC 5626 4.4: the phone will
    /// register again over a new flow).
    pub fn flow_closed(&self, flow: &Flow) {
        let mut inner = self.inner.write();
        if let Some(e) = inner.by_flow.remove(flow) {
            for c in e.contacts {
                if inner.by_contact.get(&c).is_some_and(|(f, _)| f == flow) {
                    inner.by_contact.remove(&c);
                }
            }
        }
        metrics::gauge!("sbc_registrations").set(inner.by_flow.len() as f64);
    }

    /// Drops expired entries (called from the timer task).
    pub fn expire(&self, now: Instant) {
        let mut guard = self.inner.write();
        let inner = &mut *guard;
        inner.by_contact.retain(|_, (_, until)| *until > now);
        // A flow's list names exactly the contacts by_contact attributes to it (record relies
        // on that), so expired contacts leave the lists too.
        let by_contact = &inner.by_contact;
        inner.by_flow.retain(|flow, e| {
            e.contacts
                .retain(|c| by_contact.get(c).is_some_and(|(f, _)| f == flow));
            e.expires > now && !e.contacts.is_empty()
        });
        metrics::gauge!("sbc_registrations").set(inner.by_flow.len() as f64);
    }

    /// Number of flows with live registrations.
    pub fn len(&self) -> usize {
        self.inner.read().by_flow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sbc_sip::Transport;

    fn flow(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: format!("127.0.0.9:{port}").parse().unwrap(),
            conn: None,
        }
    }

    fn register(contact: &str, expires: u32) -> (Message, Message) {
        let req = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK1\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: r1\r\n\
             CSeq: 1 REGISTER\r\nContact: <{contact}>\r\nExpires: {expires}\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let resp = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.9;branch=z9hG4bK1\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>;tag=2\r\nCall-ID: r1\r\n\
             CSeq: 1 REGISTER\r\nContact: <{contact}>;expires={expires}\r\nContent-Length: 0\r\n\r\n"
        );
        (
            Message::parse(Bytes::from(req)).unwrap(),
            Message::parse(Bytes::from(resp)).unwrap(),
        )
    }

    #[test]
    fn many_contacts_on_one_flow_and_refreshes_are_not_duplicated() {
        let r = Registrations::default();
        let now = Instant::now();
        for round in 0..3 {
            for i in 0..50 {
                let (q, a) = register(&format!("sip:u{i}@127.0.0.9:5062"), 300);
                r.record(flow(5062), &q, &a, now + Duration::from_secs(round));
            }
        }
        let inner = r.inner.read();
        assert_eq!(inner.by_flow.len(), 1);
        assert_eq!(inner.by_flow[&flow(5062)].contacts.len(), 50);
        assert_eq!(inner.by_contact.len(), 50);
    }

    #[test]
    fn a_contact_that_moves_flow_leaves_the_old_one() {
        let r = Registrations::default();
        let now = Instant::now();
        let (q, a) = register("sip:u1@127.0.0.9:5062", 300);
        r.record(flow(5062), &q, &a, now);
        r.record(flow(6000), &q, &a, now);
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
        r.record(flow(6000), &q, &a, now);
        assert!(r.is_empty());
        assert_eq!(r.flow_for_contact(b"sip:u1@127.0.0.9:5062"), None);
    }

    #[test]
    fn expiry_sweeps_contacts_out_of_flow_lists() {
        let r = Registrations::default();
        let now = Instant::now();
        let (q, a) = register("sip:u1@127.0.0.9:5062", 10);
        r.record(flow(5062), &q, &a, now);
        let (q2, a2) = register("sip:u2@127.0.0.9:5062", 100);
        r.record(flow(5062), &q2, &a2, now);
        r.expire(now + Duration::from_secs(20));
        assert_eq!(r.len(), 1);
        assert_eq!(r.inner.read().by_flow[&flow(5062)].contacts.len(), 1);
        // Registering u1 again lists it once.
        r.record(flow(5062), &q, &a, now + Duration::from_secs(21));
        assert_eq!(r.inner.read().by_flow[&flow(5062)].contacts.len(), 2);
        r.expire(now + Duration::from_secs(200));
        assert!(r.is_empty());
    }
}
