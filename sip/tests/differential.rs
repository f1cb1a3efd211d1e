//! Differential test: the optimised parser against the parser as it was before the
//! performance work (a verbatim copy lives in tests/reference/).
//!
//! The torture tests check verdicts on ~80 hand-picked messages; speed work touches every
//! branch of the scanners, so this test also feeds both parsers tens of thousands of mutated
//! messages (byte flips, inserted delimiters, folded lines, truncations...) and requires the
//! same observable result from each: the same `Result` and error, the same index, the same
//! typed views, the same edits, and no panic. Any behaviour change shows up here as a
//! readable diff of two summaries.
//!
//! Two differences are intended, both found by fuzzing (`fuzz/`): headers that end the buffer
//! without a blank line are given one by the new parser (spliced copies of such a message
//! stayed unterminated and, forwarded over TCP, swallowed the next message), so the reference
//! is fed the terminated buffer in that case; and `replace_body` removes a repeated
//! Content-Length, so its output is compared only for messages with at most one.
//!
//! `DIFF_ITERS` sets the number of mutated messages (default 20 000; CI-friendly in debug).

#![allow(dead_code, clippy::all)]

// The reference modules name each other through `crate::`, so they sit at this crate's root
// and `crate::Transport` must resolve: the type is shared, not copied.
use sbc_sip::Transport;
// The reference edit.rs tests name `crate::Method`, as the original lib.rs re-exported it.
use message::Method;

#[path = "reference/addr.rs"]
pub mod addr;
#[path = "reference/edit.rs"]
pub mod edit;
#[path = "reference/message.rs"]
pub mod message;
#[path = "reference/scan.rs"]
pub mod scan;
#[path = "reference/uri.rs"]
pub mod uri;
#[path = "reference/via.rs"]
pub mod via;

mod reference {
    pub use crate::{addr, edit, message, scan, uri, via};
}

use bytes::Bytes;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Every header name either parser knows, for name dispatch checks.
const NAMES: &[&str] = &[
    "via",
    "from",
    "to",
    "call-id",
    "cseq",
    "max-forwards",
    "content-length",
    "content-type",
    "contact",
    "route",
    "record-route",
    "path",
    "supported",
    "require",
    "proxy-require",
    "unsupported",
    "expires",
    "authorization",
    "proxy-authorization",
    "www-authenticate",
    "proxy-authenticate",
    "user-agent",
    "server",
    "allow",
    "event",
    "subject",
    "refer-to",
    "session-expires",
    "content-encoding",
    "accept",
    "retry-after",
    "v",
    "f",
    "t",
    "i",
    "m",
    "l",
    "c",
    "k",
    "s",
    "o",
    "r",
    "x",
    "e",
    "x-custom",
    "date",
    "call-info",
    "contacts",
    "tox",
    "vià",
];

/// Header names whose accessors are compared; `Other` covers everything unknown.
macro_rules! all_names {
    ($root:ident) => {{
        use $root::message::HeaderName as H;
        [
            H::Via,
            H::From,
            H::To,
            H::CallId,
            H::CSeq,
            H::MaxForwards,
            H::ContentLength,
            H::ContentType,
            H::Contact,
            H::Route,
            H::RecordRoute,
            H::Path,
            H::Supported,
            H::Require,
            H::ProxyRequire,
            H::Unsupported,
            H::Expires,
            H::Authorization,
            H::ProxyAuthorization,
            H::WwwAuthenticate,
            H::ProxyAuthenticate,
            H::UserAgent,
            H::Server,
            H::Allow,
            H::Event,
            H::Subject,
            H::ReferTo,
            H::SessionExpires,
            H::ContentEncoding,
            H::Accept,
            H::RetryAfter,
            H::Other,
        ]
    }};
}

/// The typed views of one header value (or any byte string), as text.
macro_rules! views {
    ($root:ident, $out:expr, $v:expr) => {{
        use $root::addr::NameAddr;
        use $root::scan;
        use $root::uri::{self, Uri};
        use $root::via::Via;
        let out: &mut String = $out;
        let v: &[u8] = $v;
        let t = scan::trim(v);
        let _ = writeln!(out, "  trim {:?} skip {}", t, scan::skip_lws(v, 0));
        let _ = writeln!(out, "  dec {:?}", scan::parse_decimal(t, u32::MAX as u64));
        let _ = writeln!(out, "  ip {:?}", uri::parse_ip(t));
        let _ = writeln!(
            out,
            "  name {:?}",
            $root::message::HeaderName::from_bytes(t)
        );
        match Uri::parse(t) {
            Ok(u) => {
                let _ = writeln!(
                    out,
                    "  uri {u:?} {} {:?} {:?} {} {:?} {:?} {:?} {:?}",
                    u.is_sip(),
                    u.host_unbracketed(),
                    u.host_ip(),
                    u.port_or_default(),
                    u.transport(),
                    u.param(b"lr"),
                    u.param(b"transport"),
                    u.param(b"user"),
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  uri err {e:?}");
            }
        }
        match Via::parse(v) {
            Ok(x) => {
                let _ = writeln!(out, "  via {x:?} {}", x.has_rfc3261_branch());
            }
            Err(e) => {
                let _ = writeln!(out, "  via err {e:?}");
            }
        }
        match NameAddr::parse(v) {
            Ok(a) => {
                let _ = writeln!(
                    out,
                    "  na {a:?} {:?} {:?} {:?}",
                    a.tag(),
                    a.param(b"expires"),
                    a.param(b"+sip.instance")
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  na err {e:?}");
            }
        }
        for piece in scan::CommaSplit::new(v) {
            let _ = writeln!(out, "  piece {piece:?}");
            if let Ok(p) = piece {
                let p = scan::trim(p);
                let _ = writeln!(out, "   via {:?}", Via::parse(p));
                let _ = writeln!(out, "   na {:?}", NameAddr::parse(p));
            }
        }
        if let (Some(a), Some(b)) = (
            t.iter().position(|&c| c == b'<'),
            t.iter().position(|&c| c == b'>'),
        ) {
            if a < b {
                let _ = writeln!(out, "  inner {:?}", Uri::parse(&t[a + 1..b]));
            }
        }
        let _ = writeln!(
            out,
            "  find {:?} {:?}",
            uri::find_param(t, b"tag"),
            uri::find_param(t, b"lr")
        );
        let _ = writeln!(
            out,
            "  uneq {}",
            uri::unescape_eq(t, b"sip:%61lice@h", true)
        );
    }};
}

/// Everything observable about parsing and editing one buffer, as text.
macro_rules! summary {
    ($root:ident, $buf:expr, $parse_buf:expr) => {{
        use $root::edit::{self, Edits, ResponseOpts};
        use $root::message::{HeaderName, Message};
        let buf: &[u8] = $buf;
        let mut out = String::new();
        let lines = edit::header_lines(buf);
        let _ = writeln!(out, "lines {lines:?}");
        let _ = writeln!(
            out,
            "unparsed {:?}",
            edit::response_to_unparsed(buf, 400, "Bad Request")
        );
        for (_, v) in &lines {
            views!($root, &mut out, v);
        }
        match Message::parse(Bytes::copy_from_slice($parse_buf)) {
            Err(e) => {
                let _ = writeln!(
                    out,
                    "ERR {e:?} {} {} {}",
                    e.sip_status(),
                    e.reason(),
                    e.label()
                );
            }
            Ok(m) => {
                let _ = writeln!(out, "start {:?}", m.start());
                let _ = writeln!(out, "headers {:?}", m.headers());
                let _ = writeln!(
                    out,
                    "end {} body {:?} {:?} {} cseq {} {:?} {:?} mf {:?}",
                    m.headers_end(),
                    m.body_span(),
                    m.body(),
                    m.has_body(),
                    m.cseq(),
                    m.cseq_method(),
                    m.cseq_method_bytes(),
                    m.max_forwards()
                );
                let _ = writeln!(
                    out,
                    "req {} {:?} {:?} {:?} {:?} {:?} {:?}",
                    m.is_request(),
                    m.method(),
                    m.method_bytes(),
                    m.status(),
                    m.reason_bytes(),
                    m.uri_span(),
                    m.uri_bytes()
                );
                let _ = writeln!(out, "uri {:?} {:?}", m.uri(), m.uri_scheme());
                let _ = writeln!(out, "callid {:?}", m.call_id());
                let _ = writeln!(out, "topvia {:?} count {}", m.top_via(), m.via_count());
                let _ = writeln!(out, "from {:?} {:?}", m.from(), m.from_tag());
                let _ = writeln!(out, "to {:?} {:?}", m.to(), m.to_tag());
                let _ = writeln!(out, "route {:?}", m.first_route());
                let _ = writeln!(
                    out,
                    "byname {:?} {:?}",
                    m.header_value_by_name(b"x-custom"),
                    m.header_value_by_name(b"VIA")
                );
                for name in all_names!($root) {
                    let vals: Vec<_> = m.values(name).map(|(h, v)| (*h, v)).collect();
                    let _ = writeln!(
                        out,
                        "{name:?} {:?} {:?} n={} {:?}",
                        m.header(name),
                        m.header_value(name),
                        m.headers_named(name).count(),
                        vals
                    );
                    for (h, v) in &vals {
                        let _ = writeln!(out, "  rm {:?}", edit::remove_value_range(&m, h, v));
                    }
                    let _ = writeln!(out, "  top {}", edit::top_insert_point(&m, name));
                }
                if let Some(via) = m.top_via() {
                    for (ip, port) in [
                        ("198.51.100.7", 40000u16),
                        ("2001:db8::1", 1),
                        ("192.0.2.10", 5060),
                        ("10.0.0.5", 65535),
                    ] {
                        let mut e = Edits::new();
                        e.insert(
                            edit::top_insert_point(&m, HeaderName::Via),
                            b"Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bK-sbc-1;rport\r\n",
                        );
                        edit::stamp_via(&m, &via, ip.parse().unwrap(), port, &mut e);
                        if let Some(h) = m.header(HeaderName::MaxForwards) {
                            e.replace(h.value.range(), b"69");
                        }
                        let _ = writeln!(out, "hop {:?}", e.apply(m.as_bytes()));
                    }
                }
                for status in [100u16, 180, 200, 486] {
                    let r = edit::response(
                        &m,
                        status,
                        "Reason",
                        &ResponseOpts {
                            to_tag: Some(b"t9"),
                            source: Some(("203.0.113.9".parse().unwrap(), 40000)),
                            extra: b"X-A: b\r\n",
                            body: if status == 200 {
                                Some(("application/sdp", b"v=0\r\n"))
                            } else {
                                None
                            },
                            server: Some("sbc"),
                        },
                    );
                    let _ = writeln!(out, "resp {r:?}");
                }
                // A repeated Content-Length is now removed by replace_body (found by
                // fuzzing); the reference left the copy with the old value.
                if m.headers_named(HeaderName::ContentLength).count() <= 1 {
                    let mut e = Edits::new();
                    edit::replace_body(&m, b"hello", &mut e);
                    let _ = writeln!(out, "body {:?}", e.apply(m.as_bytes()));
                }
            }
        }
        out
    }};
}

fn new_summary(buf: &[u8]) -> String {
    summary!(sbc_sip, buf, buf)
}

fn old_summary(buf: &[u8]) -> String {
    summary!(reference, buf, &terminated(buf))
}

/// `buf` as the new parser indexes it: with a blank line after headers that end the buffer.
fn terminated(buf: &[u8]) -> Vec<u8> {
    let mut out = buf.to_vec();
    let unterminated = message::index(buf, &message::ParseLimits::default())
        .is_ok_and(|raw| raw.headers_end == buf.len());
    if unterminated {
        if !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn first_diff(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {i}:\n  new: {x}\n  old: {y}");
        }
    }
    format!(
        "lengths differ: new {} lines, old {} lines",
        a.lines().count(),
        b.lines().count()
    )
}

fn check(buf: &[u8]) {
    let new = std::panic::catch_unwind(|| new_summary(buf))
        .unwrap_or_else(|_| panic!("new parser panicked on {:?}", String::from_utf8_lossy(buf)));
    let old = old_summary(buf);
    if new != old {
        panic!(
            "behaviour changed for {:?}\n{}",
            String::from_utf8_lossy(buf),
            first_diff(&new, &old)
        );
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/torture");
    let mut files = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("torture dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "dat") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    let bench = include_str!("../examples/parse_bench.rs");
    // The bench messages, taken from its string constants.
    for start in bench.match_indices("const ").map(|(i, _)| i) {
        let rest = &bench[start..];
        let Some(q) = rest.find('"') else { continue };
        let Some(e) = rest[q + 1..].find("\";") else {
            continue;
        };
        let lit = &rest[q + 1..q + 1 + e];
        let msg = lit
            .replace("\\\r\n", "")
            .replace("\\\n", "")
            .replace("\\r", "\r")
            .replace("\\n", "\n")
            .replace("\\\"", "\"");
        out.push(msg.into_bytes());
    }
    out.push(
        b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK1;rport, SIP/2.0/TCP [2001:db8::1]:5070;received=1.2.3.4;branch=z9hG4bK0\r\n\
Route: <sip:sbc.example.com;lr>, <sip:pbx.example.com;lr>\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a1\r\n\
To: Bob <sip:bob@example.com>\r\n\
Call-ID: c1\r\n\
CSeq: 1 INVITE\r\n\
Expires: 60\r\n\
Record-Route: <sip:p1.example.com;lr>\r\n\
Path: <sip:path@p.example.com;lr;ob>\r\n\
Supported: path, outbound\r\n\
Content-Length: 0\r\n\r\n"
            .to_vec(),
    );
    // Parameters that tag lookups treat specially: quoted values holding ';' and "tag=",
    // flags, case, folding.
    for (from, to) in [
        ("<sip:a@b>;x=\"a;tag=b\";tag=c", "<sip:c@d>;TAG=\"q\""),
        ("sip:a@b;tag", "<sip:c@d> ; Tag = t1 ;tag=t2"),
        (
            "\"A\" <sip:a@b>;tag=x\r\n ;y=\"\\\";\"",
            "B <sip:c@d>;x=a\"b;tag=z",
        ),
    ] {
        for start in ["INVITE sip:x@h SIP/2.0", "SIP/2.0 200 OK"] {
            out.push(
                format!(
                    "{start}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK2\r\nFrom: {from}\r\n\
                     To: {to}\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
                )
                .into_bytes(),
            );
        }
    }
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const BYTES: &[u8] = b"\r\n \t:;,\"<>@[]?=/\\%.-+_!~*'`0123456789aAzZ\x00\x7f\xff\x80";
const TOKENS: &[&[u8]] = &[
    b",",
    b"\r\n ",
    b"\r\n\t",
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"\"",
    b"<",
    b">",
    b";",
    b";;",
    b"[",
    b"]",
    b":",
    b"@",
    b"?",
    b"%00",
    b"SIP/2.0",
    b";rport",
    b";rport=",
    b";branch=",
    b";received=",
    b";tag=",
    b";lr",
    b"sips:",
    b"tel:",
    b"sip:",
    b"[::1]",
    b":::",
    b"99999",
    b"4294967296",
    b"  ",
    b"Via: SIP/2.0/UDP h\r\n",
    b"To: <sip:a@b>\r\n",
    b"Content-Length: 5\r\n",
    b"Max-Forwards: 256\r\n",
    b"v: SIP/2.0/TCP x:1\r\n",
];

fn mutate(rng: &mut Rng, m: &mut Vec<u8>) {
    let n = 1 + rng.below(3);
    for _ in 0..n {
        let len = m.len();
        let at = rng.below(len + 1);
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                m[i] = BYTES[rng.below(BYTES.len())];
            }
            1 => m.insert(at, BYTES[rng.below(BYTES.len())]),
            2 if len > 0 => {
                let e = (at + 1 + rng.below(8)).min(len);
                m.drain(at.min(e)..e);
            }
            3 => {
                // Duplicate the line around `at`.
                let s = m[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                let e = m[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(len, |i| at + i + 1);
                let line = m[s..e].to_vec();
                m.splice(e..e, line);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                m[i] ^= 0x20;
            }
            5 => m.truncate(at),
            _ => {
                let t = TOKENS[rng.below(TOKENS.len())];
                m.splice(at..at, t.iter().copied());
            }
        }
    }
}

#[test]
fn header_name_dispatch_matches() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for name in NAMES {
        for _ in 0..16 {
            let mixed: Vec<u8> = name
                .bytes()
                .map(|b| {
                    if rng.below(2) == 0 {
                        b.to_ascii_uppercase()
                    } else {
                        b
                    }
                })
                .collect();
            let mut variants = vec![mixed.clone()];
            let mut m = mixed.clone();
            if !m.is_empty() {
                let i = rng.below(m.len());
                m[i] = BYTES[rng.below(BYTES.len())];
            }
            variants.push(m);
            variants.push([&mixed[..], b"x"].concat());
            variants.push(mixed[..mixed.len().saturating_sub(1)].to_vec());
            for v in variants {
                assert_eq!(
                    format!("{:?}", sbc_sip::HeaderName::from_bytes(&v)),
                    format!("{:?}", message::HeaderName::from_bytes(&v)),
                    "{:?}",
                    String::from_utf8_lossy(&v)
                );
            }
        }
    }
    // Every byte in every position of short names.
    for len in 1..=3usize {
        let mut v = vec![b'a'; len];
        for i in 0..len {
            for b in 0..=255u8 {
                v[i] = b;
                assert_eq!(
                    format!("{:?}", sbc_sip::HeaderName::from_bytes(&v)),
                    format!("{:?}", message::HeaderName::from_bytes(&v)),
                );
            }
            v[i] = b'a';
        }
    }
}

#[test]
fn seeds_match() {
    for s in seeds() {
        check(&s);
    }
}

#[test]
fn mutations_match() {
    let iters: usize = std::env::var("DIFF_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let seeds = seeds();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut accepted = 0usize;
    for _ in 0..iters {
        let mut m = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut m);
        check(&m);
        accepted += usize::from(sbc_sip::Message::parse(Bytes::from(m)).is_ok());
    }
    // Mutations must exercise both verdicts, or the comparison proves little.
    eprintln!("{accepted} of {iters} mutated messages parse");
    assert!(accepted > iters / 10 && accepted < iters * 9 / 10);
}

/// Every URI up to six bytes over the bytes that matter to the URI splitter, after each
/// scheme, against the reference.
#[test]
fn uri_exhaustive() {
    const ALPHA: &[u8] = b"a@?;:[]1=. \x00";
    let mut buf = Vec::new();
    for prefix in [&b"sip:"[..], b"sips:", b"tel:", b"x:", b"sip:u@"] {
        for len in 0..=5usize {
            let total = ALPHA.len().pow(len as u32);
            for mut k in 0..total {
                buf.clear();
                buf.extend_from_slice(prefix);
                for _ in 0..len {
                    buf.push(ALPHA[k % ALPHA.len()]);
                    k /= ALPHA.len();
                }
                let new = format!("{:?}", sbc_sip::uri::Uri::parse(&buf));
                let old = format!("{:?}", uri::Uri::parse(&buf));
                assert_eq!(new, old, "{:?}", String::from_utf8_lossy(&buf));
            }
        }
    }
}

/// The tag seeds above must parse, or the cached-tag path is not what gets compared.
#[test]
fn tag_seeds_parse() {
    let seeds = seeds();
    let tagged: Vec<_> = seeds[seeds.len() - 6..]
        .iter()
        .map(|s| {
            sbc_sip::Message::parse(Bytes::copy_from_slice(s)).map(|m| {
                (
                    m.from_tag()
                        .map(|t| String::from_utf8_lossy(t).into_owned()),
                    m.to_tag().map(|t| String::from_utf8_lossy(t).into_owned()),
                )
            })
        })
        .collect();
    assert!(tagged.iter().all(|r| r.is_ok()), "{tagged:?}");
    assert_eq!(
        tagged[0].as_ref().ok(),
        Some(&(Some("b\"".to_string()), Some("\"q\"".to_string())))
    );
}
