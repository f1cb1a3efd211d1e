//! Locating the SDP in a SIP body (`sbc_sip::multipart`), which reads Content-Type and body
//! straight from the network.
//!
//! For any Content-Type and body:
//! - `sdp_span` returns, if anything, a range inside the body;
//! - splicing the found SDP back in unchanged gives the body back, byte for byte;
//! - after splicing a replacement in, the SDP is found again, at the same start, and is
//!   exactly the replacement (the boundaries and other parts are left as they were).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sbc_sip::multipart::{sdp_span, splice};

fuzz_target!(|data: &[u8]| {
    // First line: the Content-Type ("-" for none); the rest: the body.
    let (ct, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => return,
    };
    let ct = (ct != b"-").then_some(ct);
    let Some(span) = sdp_span(ct, body) else {
        return;
    };
    assert!(span.start <= span.end && span.end <= body.len());
    let sdp = &body[span.clone()];
    assert_eq!(splice(body, span.clone(), sdp), body);
    let replacement = b"v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\ns=-\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let out = splice(body, span.clone(), replacement);
    // A replacement cannot make a delimiter appear (it holds no "--"), so the parts stay.
    let again = sdp_span(ct, &out).expect("SDP found again after the splice");
    assert_eq!(again.start, span.start);
    assert_eq!(&out[again], &replacement[..]);
});
