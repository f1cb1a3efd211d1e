//! SIP on the wire: the parts of the SBC that read, edit and time SIP messages.
//!
//! The proxy's hot path never builds a typed tree of a message: it indexes the received bytes
//! once (start line, one entry per header line, body), parses typed views (URI, Via,
//! name-addr) only where a decision needs them, and produces the forwarded message by splicing
//! bytes into a copy of the original. rsip 0.4 was measured unfit for this (it rejects messages
//! RFC 3261 requires a proxy to accept and costs ~5.5 us per INVITE parse), so this crate is
//! ours. It lives apart from the `sbc` crate so that health probes, test peers and the load
//! generator use the same parser without pulling in the proxy.
//!
//! Layout:
//! - [`message`]: [`Message`], the indexed view over received bytes, and [`HeaderName`].
//! - [`uri`], [`via`], [`addr`]: typed views parsed on demand.
//! - [`edit`]: byte-splicing edits that produce the forwarded message.
//! - [`framing`]: Content-Length framing of TCP/TLS streams and CRLF keep-alives.
//! - [`transaction`]: RFC 3261 section 17 client and server transactions, sans-IO.

pub mod framing;
pub mod transaction;

use std::fmt;

/// The transport a SIP message travels over. Kept here (not in the proxy) because Via headers,
/// URIs and the framing layer all name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// The token used in a Via sent-protocol (`SIP/2.0/UDP`).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The value of a URI `transport=` parameter.
    pub fn uri_param(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Stream transports frame by Content-Length and never retransmit (RFC 3261 17).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// Parses a Via or URI transport token, case-insensitively.
    pub fn from_token(token: &[u8]) -> Option<Transport> {
        if scan::eq_lower(token, b"udp") {
            Some(Transport::Udp)
        } else if scan::eq_lower(token, b"tcp") {
            Some(Transport::Tcp)
        } else if scan::eq_lower(token, b"tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.uri_param())
    }
}

pub mod addr;
pub mod edit;
pub mod message;
pub mod multipart;
pub mod scan;
pub mod uri;
pub mod via;

pub use message::{Header, HeaderName, Message, Method, ParseError, ParseLimits, Span, StartLine};
