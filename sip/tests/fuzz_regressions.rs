//! Inputs the fuzz targets in `fuzz/` found to break an invariant, kept as tests once fixed.
//! Each names the target and what went wrong.

use bytes::Bytes;
use sbc_sip::edit::{self, Edits};
use sbc_sip::framing::{Frame, StreamFramer};
use sbc_sip::message::{HeaderName, Message};

/// What the proxy does to a request it forwards, reduced to the splices that matter here: a
/// header appended at the end of the header section and a new body.
fn forward(msg: &Message, body: &[u8]) -> Vec<u8> {
    let mut e = Edits::new();
    e.insert(
        edit::top_insert_point(msg, HeaderName::RecordRoute),
        b"Record-Route: <sip:198.51.100.1;lr>\r\n",
    );
    e.insert(msg.headers_end(), b"Supported: path\r\n");
    edit::replace_body(msg, body, &mut e);
    e.apply(msg.as_bytes())
}

/// `sip_roundtrip`: a datagram whose headers end without a blank line (tolerated, as RFC
/// 5118's archive lacks it) was forwarded without one too; the body then read as headers,
/// and over TCP the next message on the stream would have been swallowed as its headers.
#[test]
fn headers_without_a_blank_line_are_forwarded_terminated() {
    let inputs: [&[u8]; 3] = [
        // As found: the last line a whitespace-only fold, no blank line.
        b"OPTIONS sip:user@example.com SIP/2.0\r\nTo: sip:j_user@example.com\r\n\
          From: sip:caller@example.org;tag=33242\r\nMax-Forwards: 3\r\nCall-ID: semiuri.0ha\r\n\
          CSeq: 8 OPTIONS\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw\r\nl: 0\r\n\t\n",
        // The last header line terminated, no blank line.
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@b>\r\n\
          From: <sip:c@d>;tag=1\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n",
        // The last header line not even terminated.
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@b>\r\n\
          From: <sip:c@d>;tag=1\r\nCall-ID: x\r\nCSeq: 1 OPTIONS",
    ];
    for input in inputs {
        let shown = String::from_utf8_lossy(input);
        let msg = Message::parse(Bytes::from_static(input)).expect("tolerated input parses");
        assert!(
            msg.as_bytes().ends_with(b"\r\n\r\n") || msg.as_bytes().ends_with(b"\n\r\n"),
            "not terminated: {shown:?}"
        );
        assert!(msg.body().is_empty());

        let body = b"v=0\r\n";
        let out = forward(&msg, body);
        let again = Message::parse(Bytes::from(out.clone()))
            .unwrap_or_else(|e| panic!("{e} for {:?}", String::from_utf8_lossy(&out)));
        assert_eq!(again.body(), body);
        // Record-Route, Supported, and Content-Length where there was none.
        let added = 2 + usize::from(msg.header(HeaderName::ContentLength).is_none());
        assert_eq!(again.headers().len(), msg.headers().len() + added);
        assert_eq!(again.call_id(), msg.call_id());

        // On a stream, the forwarded copy and the next message stay two messages.
        let next = b"OPTIONS sip:z@z SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK2\r\n\
                     Content-Length: 0\r\n\r\n";
        let mut framer = StreamFramer::new(65535);
        framer.push(&out);
        framer.push(next);
        let first = framer.next_frame().expect("framed");
        let second = framer.next_frame().expect("framed");
        assert_eq!(first, Some(Frame::Message(Bytes::from(out.clone()))));
        assert_eq!(second, Some(Frame::Message(Bytes::from_static(next))));
    }
}

/// `sip_roundtrip`: two Content-Length headers with the same value are accepted, but a new
/// body (the SDP the media relay rewrites) only updated the first; the copy kept the old
/// length, so the forwarded message contradicted itself, and a peer trusting the second
/// would have cut the body or, on a stream, read into the next message.
#[test]
fn a_new_body_leaves_no_stale_content_length() {
    let input: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK390skdjuw\r\n\
        To: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=1\r\n\
        Call-ID: dup-cl\r\nContent-Length: 4\r\nCSeq: 9 INVITE\r\nl: 4\r\n\
        Content-Type: application/sdp\r\n\r\nv=0\n";
    let msg = Message::parse(Bytes::from_static(input)).expect("agreeing copies are accepted");
    assert_eq!(msg.headers_named(HeaderName::ContentLength).count(), 2);
    let body = b"v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\n";
    let out = forward(&msg, body);
    let again = Message::parse(Bytes::from(out.clone()))
        .unwrap_or_else(|e| panic!("{e} for {:?}", String::from_utf8_lossy(&out)));
    assert_eq!(again.body(), body);
    let lengths: Vec<&[u8]> = again
        .headers_named(HeaderName::ContentLength)
        .map(|h| &again.as_bytes()[h.value.range()])
        .collect();
    assert_eq!(lengths, vec![body.len().to_string().as_bytes()]);
}
