//! Producing messages: byte splicing for forwarded messages, and locally generated responses.
//!
//! A proxy changes a handful of places in a message it forwards (its Via on top, received and
//! rport on the previous Via, Max-Forwards, a Route popped, Record-Route or Path added, later
//! the SDP). [`Edits`] records those changes as (range, replacement) pairs and [`Edits::apply`]
//! copies the original once with the changes spliced in, so forwarding costs one memcpy of
//! the message, not a serialisation of every header.

use crate::message::{index, Header, HeaderName, Message, ParseLimits};
use crate::scan::{trim, CommaSplit};
use crate::via::Via;
use smallvec::SmallVec;
use std::io::Write;
use std::net::IpAddr;
use std::ops::Range;

#[derive(Clone, Debug)]
struct Op {
    start: u32,
    end: u32,
    data: Range<u32>,
    seq: u16,
}

/// A set of non-overlapping edits against one source buffer.
#[derive(Default, Debug)]
pub struct Edits {
    ops: SmallVec<[Op; 8]>,
    scratch: Vec<u8>,
}

impl Edits {
    pub fn new() -> Self {
        Edits {
            ops: SmallVec::new(),
            scratch: Vec::with_capacity(256),
        }
    }

    fn push(&mut self, range: Range<usize>, data: &[u8]) {
        let d0 = self.scratch.len();
        self.scratch.extend_from_slice(data);
        let seq = self.ops.len() as u16;
        self.ops.push(Op {
            start: range.start as u32,
            end: range.end as u32,
            data: d0 as u32..self.scratch.len() as u32,
            seq,
        });
    }

    /// Inserts bytes before offset `at`. Several inserts at one offset keep their order.
    pub fn insert(&mut self, at: usize, data: &[u8]) {
        self.push(at..at, data);
    }

    /// Inserts formatted text, without an intermediate String.
    pub fn insert_fmt(&mut self, at: usize, args: std::fmt::Arguments<'_>) {
        // Writing into a Vec cannot fail.
        self.insert_with(at, |b| {
            let _ = b.write_fmt(args);
        });
    }

    /// Inserts at `at` what `write` appends to the buffer it is given: bytes written in
    /// place, without `fmt` machinery (the forwarding hot path builds its Via and Path so).
    pub fn insert_with(&mut self, at: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let d0 = self.scratch.len();
        write(&mut self.scratch);
        let seq = self.ops.len() as u16;
        self.ops.push(Op {
            start: at as u32,
            end: at as u32,
            data: d0 as u32..self.scratch.len() as u32,
            seq,
        });
    }

    pub fn replace(&mut self, range: Range<usize>, data: &[u8]) {
        self.push(range, data);
    }

    pub fn delete(&mut self, range: Range<usize>) {
        self.push(range, b"");
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The bytes of `range` of `src` with the edits that fall inside it applied (edits
    /// outside it are ignored): a header line as the forwarded message would carry it,
    /// without building the whole message.
    pub fn apply_within(&self, src: &[u8], range: Range<usize>) -> Vec<u8> {
        let range = range.start.min(src.len())..range.end.min(src.len());
        let mut inner = Edits::new();
        for o in &self.ops {
            let (start, end) = (o.start as usize, o.end as usize);
            if start >= range.start && end <= range.end && !(start == range.end && end == start) {
                inner.push(
                    start - range.start..end - range.start,
                    &self.scratch[o.data.start as usize..o.data.end as usize],
                );
            }
        }
        inner.apply(&src[range])
    }

    /// Builds the edited message. Overlapping edits are a caller bug; the later-starting one
    /// is clipped rather than corrupting memory.
    pub fn apply(&self, src: &[u8]) -> Vec<u8> {
        let mut ops = self.ops.clone();
        ops.sort_unstable_by_key(|o| (o.start, o.seq));
        let added: usize = ops.iter().map(|o| o.data.len()).sum();
        let mut out = Vec::with_capacity(src.len() + added);
        let mut pos = 0usize;
        for o in &ops {
            let start = (o.start as usize).clamp(pos, src.len());
            let end = (o.end as usize).clamp(start, src.len());
            out.extend_from_slice(&src[pos..start]);
            out.extend_from_slice(&self.scratch[o.data.start as usize..o.data.end as usize]);
            pos = end;
        }
        out.extend_from_slice(&src[pos..]);
        out
    }
}

/// The byte range to delete to remove one value (`value`, a slice of `h`'s value) from a list
/// header: the whole line when it is the only value, else the value and its separating comma.
pub fn remove_value_range(msg: &Message, h: &Header, value: &[u8]) -> Range<usize> {
    let buf = msg.as_bytes();
    let vals: SmallVec<[&[u8]; 4]> = CommaSplit::new(&buf[h.value.range()])
        .map_while(|r| r.ok())
        .map(trim)
        .filter(|v| !v.is_empty())
        .collect();
    if vals.len() <= 1 {
        return h.line.range();
    }
    let span = msg.span_of(value).range();
    // Extend to the next value's start (eating ", ") or, for the last value, back to the
    // previous comma.
    let after = &buf[span.end..h.value.end as usize];
    if let Some(c) = after.iter().position(|&b| b == b',') {
        let mut e = span.end + c + 1;
        while e < h.value.end as usize && crate::scan::is_lws(buf[e]) {
            e += 1;
        }
        span.start..e
    } else {
        let before = &buf[h.value.start as usize..span.start];
        match before.iter().rposition(|&b| b == b',') {
            Some(c) => h.value.start as usize + c..span.end,
            None => span,
        }
    }
}

/// Adds `received` and fills `rport` on a Via (RFC 3261 18.2.1, RFC 3581 4), returning the
/// edits against the message. `received` is added whenever the source differs from sent-by or
/// rport was requested.
///
/// Runs for every request forwarded, so the text is written by hand: the `format!` machinery
/// for an IPv4 address and the `to_string` of the port were most of a hop's edit cost.
pub fn stamp_via(msg: &Message, via: &Via<'_>, src_ip: IpAddr, src_port: u16, edits: &mut Edits) {
    // With rport present, received is added whatever sent-by says: no need to parse it.
    let need_received = via.rport.is_some() || crate::uri::parse_ip(via.host) != Some(src_ip);
    let end = msg.span_of(via.raw).end as usize;
    if let (Some(None), Some(raw)) = (via.rport, via.rport_raw) {
        let r = msg.span_of(raw).range();
        let mut b = [0u8; 11];
        b[..6].copy_from_slice(b"rport=");
        let n = 6 + write_decimal(&mut b[6..], u32::from(src_port));
        edits.replace(r, &b[..n]);
    }
    if need_received && via.received.is_none() {
        match src_ip {
            IpAddr::V4(ip) => {
                // ";received=" and at most 15 bytes of dotted quad.
                let mut b = [0u8; 26];
                b[..10].copy_from_slice(b";received=");
                let mut n = 10;
                for (k, octet) in ip.octets().into_iter().enumerate() {
                    if k > 0 {
                        b[n] = b'.';
                        n += 1;
                    }
                    n += write_decimal(&mut b[n..], u32::from(octet));
                }
                edits.insert(end, &b[..n]);
            }
            IpAddr::V6(ip) => edits.insert_fmt(end, format_args!(";received=[{ip}]")),
        }
    }
}

/// Writes `v` in decimal at the start of `out` (which must have room: 10 bytes for any u32,
/// fewer for the ports and octets passed here); returns the length. Public for the proxy's
/// forwarding path, which writes its ports and Max-Forwards without `fmt`.
pub fn write_decimal(out: &mut [u8], mut v: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for (o, d) in out.iter_mut().zip(digits[..n].iter().rev()) {
        *o = *d;
    }
    n.min(out.len())
}

/// Where a new header line can go so that it becomes the topmost of its name: before the
/// first existing header of that name, else at the end of the header section.
pub fn top_insert_point(msg: &Message, name: HeaderName) -> usize {
    msg.header(name)
        .map_or(msg.headers_end(), |h| h.line.start as usize)
}

/// Replaces the whole body and its Content-Length (used when a body is rewritten).
///
/// A repeated Content-Length (accepted when the copies agree) is removed: left with the old
/// value, it would contradict the new length, and a peer reading the other copy would cut
/// the body short or, on a stream, take the start of the next message as body.
pub fn replace_body(msg: &Message, body: &[u8], edits: &mut Edits) {
    let cl = msg
        .headers()
        .iter()
        .filter(|h| h.name == HeaderName::ContentLength)
        .collect::<SmallVec<[&Header; 2]>>();
    if let Some(first) = cl.first() {
        edits.replace(first.value.range(), body.len().to_string().as_bytes());
        for repeated in &cl[1..] {
            edits.delete(repeated.line.range());
        }
    } else {
        edits.insert_fmt(
            msg.headers_end(),
            format_args!("Content-Length: {}\r\n", body.len()),
        );
    }
    let b = msg.body_span();
    edits.replace(b.start as usize..msg.as_bytes().len(), body);
}

/// Options for a locally generated response.
#[derive(Default)]
pub struct ResponseOpts<'a> {
    /// To-tag to add when the request's To has none (all final and 1xx-except-100 responses
    /// a UAS creates need one, RFC 3261 8.2.6.2).
    pub to_tag: Option<&'a [u8]>,
    /// Where the request really came from, to stamp received/rport on the top Via as the
    /// forwarding path does.
    pub source: Option<(IpAddr, u16)>,
    /// Extra header lines, each ending in CRLF.
    pub extra: &'a [u8],
    /// Body with its content type.
    pub body: Option<(&'a str, &'a [u8])>,
    /// Server header text.
    pub server: Option<&'a str>,
}

/// Builds a response to a parsed request (RFC 3261 8.2.6): Via, From, To, Call-ID and CSeq
/// copied; To-tag added if asked; Content-Length always present.
pub fn response(req: &Message, status: u16, reason: &str, opts: &ResponseOpts<'_>) -> Vec<u8> {
    let buf = req.as_bytes();
    let mut out = Vec::with_capacity(256 + opts.extra.len());
    let _ = write!(out, "SIP/2.0 {status} {reason}\r\n");
    let mut first_via = true;
    for h in req.headers() {
        match h.name {
            HeaderName::Via => {
                if first_via && opts.source.is_some() {
                    first_via = false;
                    if let (Some(via), Some((ip, port))) = (req.top_via(), opts.source) {
                        let mut e = Edits::new();
                        stamp_via(req, &via, ip, port, &mut e);
                        let line = h.line.range();
                        // Apply the edits to this line only (they all fall inside it).
                        let shifted = shift_edits(&e, line.start);
                        out.extend_from_slice(&shifted.apply(&buf[line]));
                        continue;
                    }
                }
                first_via = false;
                push_line(&mut out, &buf[h.line.range()]);
            }
            HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                push_line(&mut out, &buf[h.line.range()]);
            }
            HeaderName::To => {
                let has_tag = req.to_tag().is_some();
                match opts.to_tag {
                    Some(tag) if !has_tag && status > 100 => {
                        out.extend_from_slice(b"To: ");
                        out.extend_from_slice(trim(&buf[h.value.range()]));
                        out.extend_from_slice(b";tag=");
                        out.extend_from_slice(tag);
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => push_line(&mut out, &buf[h.line.range()]),
                }
            }
            _ => {}
        }
    }
    if let Some(s) = opts.server {
        let _ = write!(out, "Server: {s}\r\n");
    }
    out.extend_from_slice(opts.extra);
    match opts.body {
        Some((ct, body)) => {
            let _ = write!(
                out,
                "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            out.extend_from_slice(body);
        }
        None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    out
}

fn shift_edits(e: &Edits, by: usize) -> Edits {
    let mut out = Edits::new();
    for o in &e.ops {
        out.push(
            (o.start as usize).saturating_sub(by)..(o.end as usize).saturating_sub(by),
            &e.scratch[o.data.start as usize..o.data.end as usize],
        );
    }
    out
}

fn push_line(out: &mut Vec<u8>, line: &[u8]) {
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    } else if !line.ends_with(b"\r\n") {
        // Normalise a bare-LF line to CRLF.
        out.pop();
        out.extend_from_slice(b"\r\n");
    }
}

/// Builds an error response to bytes that did not parse, when they are a request with enough
/// headers to answer (RFC 3261 16.3: a 400 where possible). `None`: drop silently.
pub fn response_to_unparsed(buf: &[u8], status: u16, reason: &str) -> Option<Vec<u8>> {
    let (raw, _) = crate::message::answerable(buf)?;
    let mut out = Vec::with_capacity(256);
    let _ = write!(out, "SIP/2.0 {status} {reason}\r\n");
    for h in &raw.headers {
        if matches!(
            h.name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
        ) {
            push_line(&mut out, &buf[h.line.range()]);
        }
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    Some(out)
}

/// Re-indexes a message without validation; for tests and tools that want to look at header
/// lines of something that failed to parse.
pub fn header_lines(buf: &[u8]) -> Vec<(HeaderName, Vec<u8>)> {
    match index(buf, &ParseLimits::default()) {
        Ok(raw) => raw
            .headers
            .iter()
            .map(|h| (h.name, trim(&buf[h.value.range()]).to_vec()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn write_decimal_writes_every_width() {
        for v in [
            0u32,
            7,
            9,
            10,
            42,
            99,
            100,
            255,
            999,
            1000,
            5060,
            65535,
            u32::MAX,
        ] {
            let mut b = [0u8; 10];
            let n = write_decimal(&mut b, v);
            assert_eq!(&b[..n], v.to_string().as_bytes());
        }
        // A buffer too short gets the digits that fit.
        let mut two = [0u8; 2];
        assert_eq!(write_decimal(&mut two, 7), 1);
        assert_eq!(two[0], b'7');
    }

    const INV: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK1;rport\r\n\
Route: <sip:sbc.example.com;lr>, <sip:pbx.example.com;lr>\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: c1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn splice_via_rport_route() {
        let m = Message::parse(Bytes::from_static(INV)).unwrap();
        let mut e = Edits::new();
        let via = m.top_via().unwrap();
        stamp_via(&m, &via, "203.0.113.9".parse().unwrap(), 40000, &mut e);
        let (h, v) = m
            .values(HeaderName::Route)
            .next()
            .map(|(h, v)| (*h, v))
            .unwrap();
        e.delete(remove_value_range(&m, &h, v));
        e.insert(
            top_insert_point(&m, HeaderName::Via),
            b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n",
        );
        let out = e.apply(m.as_bytes());
        let out = Message::parse(Bytes::from(out)).unwrap();
        let s = String::from_utf8_lossy(out.as_bytes()).to_string();
        assert!(s.contains("Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\nVia: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK1;rport=40000;received=203.0.113.9\r\n"), "{s}");
        assert!(s.contains("Route: <sip:pbx.example.com;lr>\r\n"), "{s}");
        assert_eq!(out.via_count(), 2);
    }

    #[test]
    fn remove_only_and_last_values() {
        let m = Message::parse(Bytes::from_static(INV)).unwrap();
        let vals: Vec<_> = m.values(HeaderName::Route).map(|(h, v)| (*h, v)).collect();
        let mut e = Edits::new();
        e.delete(remove_value_range(&m, &vals[1].0, vals[1].1));
        let out = String::from_utf8(e.apply(m.as_bytes())).unwrap();
        assert!(out.contains("Route: <sip:sbc.example.com;lr>\r\n"), "{out}");
        let mut e = Edits::new();
        let via = m.header(HeaderName::Via).unwrap();
        e.delete(remove_value_range(&m, via, m.top_via().unwrap().raw));
        let out = String::from_utf8(e.apply(m.as_bytes())).unwrap();
        assert!(!out.contains("Via:"));
    }

    #[test]
    fn responses() {
        let m = Message::parse(Bytes::from_static(INV)).unwrap();
        let r = response(
            &m,
            486,
            "Busy Here",
            &ResponseOpts {
                to_tag: Some(b"t9"),
                source: Some(("203.0.113.9".parse().unwrap(), 40000)),
                ..Default::default()
            },
        );
        let r = Message::parse(Bytes::from(r)).unwrap();
        assert_eq!(r.status(), Some(486));
        assert_eq!(r.to_tag(), Some(&b"t9"[..]));
        assert_eq!(r.top_via().unwrap().rport, Some(Some(40000)));
        assert_eq!(r.cseq_method(), crate::Method::Invite);
        let raw = b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK2\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 10\r\n\r\n";
        let r = response_to_unparsed(raw, 400, "Bad Request").unwrap();
        assert!(Message::parse(Bytes::from(r)).is_ok());
        assert!(response_to_unparsed(b"SIP/2.0 200 OK\r\n\r\n", 400, "x").is_none());
    }

    #[test]
    fn body_replace() {
        let raw = b"INVITE sip:x@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK2\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 3\r\n\r\nabc";
        let m = Message::parse(Bytes::from_static(raw)).unwrap();
        let mut e = Edits::new();
        replace_body(&m, b"hello", &mut e);
        let out = Message::parse(Bytes::from(e.apply(m.as_bytes()))).unwrap();
        assert_eq!(out.body(), b"hello");
    }
}
