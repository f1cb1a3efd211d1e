//! Parse and parse-edit-serialise cost of a typical INVITE, for benchmarks/README.md.
//! Run: cargo run --release -p sbc-sip --example parse_bench

use bytes::Bytes;
use sbc_sip::edit::{self, Edits};
use sbc_sip::{HeaderName, Message};
use std::time::Instant;

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

fn main() {
    let raw = Bytes::from_static(INVITE.as_bytes());
    let n = 200_000u32;
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            let m = Message::parse(raw.clone()).expect("parses");
            std::hint::black_box(&m);
        }
        let parse = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
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
            std::hint::black_box(e.apply(m.as_bytes()));
        }
        let hop = t.elapsed() / n;
        println!(
            "round {round}: {} bytes: parse {:?}, parse+Via+rport+Max-Forwards+serialise {:?}",
            raw.len(),
            parse,
            hop
        );
    }
}
