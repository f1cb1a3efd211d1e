//! Parse and parse-edit-serialise cost of the messages the proxy sees most: an INVITE with
//! SDP, the 200 OK answering it, and a REGISTER with digest credentials. Numbers feed
//! benchmarks/README.md and sip/PERF.md.
//!
//! Run: cargo run --release -p sbc-sip --example parse_bench
//!
//! Iterations per measurement default to 200 000; pass a number as the first argument (or set
//! `PARSE_BENCH_ITERS`) to change it, e.g. `1000` under callgrind, where only the instruction
//! counts matter. A second argument keeps only the messages whose name contains it
//! (`INVITE`, `200`, `REGISTER`), to profile one at a time.
//!
//! Each round prints one line per message; the last lines give the median over the rounds,
//! which is what PERF.md reports (itself the median of three runs), because this 2-core
//! machine is shared and single rounds wander.

use bytes::Bytes;
use sbc_sip::edit::{self, Edits};
use sbc_sip::{HeaderName, Message};
use std::time::{Duration, Instant};

const INVITE: &str = "INVITE sip:+15551234567@pbx.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:+15551234567@pbx.example.com>\r\n\
From: \"Alice\" <sip:alice@pbx.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@192.0.2.10:5060;transport=udp>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE\r\n\
Supported: replaces, timer\r\n\
User-Agent: bench\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 140\r\n\r\n\
v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\n";

/// The far end's answer to the INVITE above after the SBC forwarded it: the SBC's Via on top,
/// the caller's below, a Record-Route, and an SDP answer. The hop for it is what the proxy does
/// to every response it relays: drop its own Via and serialise.
const OK_200: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bK-sbc-1;rport=5060;received=203.0.113.1\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport=40000;received=198.51.100.7\r\n\
Record-Route: <sip:203.0.113.1;lr>\r\n\
To: <sip:+15551234567@pbx.example.com>;tag=a6c85cf\r\n\
From: \"Alice\" <sip:alice@pbx.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:+15551234567@198.51.100.20:5060>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
Supported: timer\r\n\
Server: pbx\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 135\r\n\r\n\
v=0\r\no=pbx 2890844527 2890844527 IN IP4 198.51.100.20\r\ns=-\r\nc=IN IP4 198.51.100.20\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n";

/// A phone's re-REGISTER with digest credentials and RFC 5626 outbound parameters.
const REGISTER: &str = "REGISTER sip:pbx.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnashds7;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:alice@pbx.example.com>\r\n\
From: <sip:alice@pbx.example.com>;tag=456248\r\n\
Call-ID: 843817637684230@998sdasdh09\r\n\
CSeq: 1827 REGISTER\r\n\
Contact: <sip:alice@192.0.2.10:5060;ob>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1\r\n\
Authorization: Digest username=\"alice\", realm=\"pbx.example.com\", nonce=\"ea9c8e88df84f1cec4341ae6cbe5a359\", uri=\"sip:pbx.example.com\", response=\"dfe56131d1958046689d83306477ecc\", algorithm=MD5\r\n\
Expires: 3600\r\n\
Supported: path, outbound\r\n\
User-Agent: bench\r\n\
Content-Length: 0\r\n\r\n";

/// What the proxy does to a request it forwards: its Via on top, received/rport stamped on
/// the previous one, Max-Forwards decremented, one copy out.
fn request_hop(raw: &Bytes) -> Vec<u8> {
    let m = Message::parse(raw.clone()).expect("parses");
    let via = m.top_via().expect("via");
    let mut e = Edits::new();
    e.insert(
        edit::top_insert_point(&m, HeaderName::Via),
        b"Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bK-sbc-1;rport\r\n",
    );
    edit::stamp_via(&m, &via, "198.51.100.7".parse().expect("ip"), 40000, &mut e);
    if let Some(h) = m.header(HeaderName::MaxForwards) {
        e.replace(h.value.range(), b"69");
    }
    e.apply(m.as_bytes())
}

/// What the proxy does to a response it relays: read the top Via (branch for matching), then
/// remove it.
fn response_hop(raw: &Bytes) -> Vec<u8> {
    let m = Message::parse(raw.clone()).expect("parses");
    let via = m.top_via().expect("via");
    std::hint::black_box(via.branch);
    let mut e = Edits::new();
    if let Some(h) = m.header(HeaderName::Via) {
        e.delete(edit::remove_value_range(&m, h, via.raw));
    }
    e.apply(m.as_bytes())
}

/// A message to measure: its name, its bytes, and what the proxy does to it.
type Case = (&'static str, Bytes, fn(&Bytes) -> Vec<u8>);

fn time(n: u32, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PARSE_BENCH_ITERS").ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
        .max(1);
    let only = std::env::args().nth(2).unwrap_or_default();
    let cases: Vec<Case> = vec![
        ("INVITE", Bytes::from_static(INVITE.as_bytes()), request_hop),
        (
            "200 OK",
            Bytes::from_static(OK_200.as_bytes()),
            response_hop,
        ),
        (
            "REGISTER",
            Bytes::from_static(REGISTER.as_bytes()),
            request_hop,
        ),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(name, _, _)| name.contains(only.as_str()))
        .collect();
    // The edited output must itself be a valid message, or the hop numbers mean nothing.
    for (name, raw, hop) in &cases {
        Message::parse(Bytes::from(hop(raw))).unwrap_or_else(|e| panic!("{name} hop: {e}"));
    }
    let rounds = 3;
    let mut parse: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut hops: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (k, (name, raw, hop)) in cases.iter().enumerate() {
            let p = time(n, || {
                let m = Message::parse(raw.clone()).expect("parses");
                std::hint::black_box(&m);
            });
            let h = time(n, || {
                std::hint::black_box(hop(raw));
            });
            parse[k].push(p);
            hops[k].push(h);
            let what = if *name == "200 OK" {
                "parse+drop-top-Via+serialise"
            } else {
                "parse+Via+rport+Max-Forwards+serialise"
            };
            println!(
                "round {round}: {name:<8} {:>3} bytes: parse {p:?}, {what} {h:?}",
                raw.len()
            );
        }
    }
    for (k, (name, raw, _)) in cases.iter().enumerate() {
        println!(
            "median of {rounds}: {name:<8} {:>3} bytes: parse {:?}, hop {:?}",
            raw.len(),
            median(parse[k].clone()),
            median(hops[k].clone())
        );
    }
}
