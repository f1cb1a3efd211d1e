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
