//! Content-Length framing of SIP over TCP/TLS streams, and CRLF keep-alives.
//!
//! A stream carries SIP messages back to back with nothing between them but optional CRLFs, so
//! the only way to find where one message ends is the Content-Length header (RFC 3261 18.3,
//! where it is mandatory on streams). Between messages a peer may also send RFC 5626 4.4.1
//! keep-alives: a double CRLF ("ping") that must be answered with a single CRLF ("pong").
//!
//! [`StreamFramer`] is sans-IO: the transport pushes whatever bytes a read returned and pulls
//! whole frames out. Received bytes are kept in one `BytesMut`, and a message is handed out as
//! a `Bytes` split off its front, so framing never copies a message a second time.
//!
//! Every [`FramingError`] is fatal for the stream: once a length is unknown or wrong there is no
//! way to find the next message boundary, so the caller closes the connection.

use bytes::{Buf, Bytes, BytesMut};

/// One unit pulled off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One whole SIP message: the header section and exactly Content-Length bytes of body.
    Message(Bytes),
    /// A CRLFCRLF keep-alive between messages; the caller answers with a single CRLF.
    Ping,
    /// A single CRLF between messages: the answer to a ping we sent.
    Pong,
}

/// Why a stream can no longer be framed. All of these are fatal for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The header section, or header section plus body, exceeds the configured maximum.
    #[error("message exceeds the maximum message size")]
    TooLarge,
    /// A message on a stream had no Content-Length header (mandatory per RFC 3261 18.3).
    #[error("message on a stream has no Content-Length header")]
    MissingContentLength,
    /// The Content-Length value is not a non-negative decimal number that fits in memory.
    #[error("malformed Content-Length value")]
    BadContentLength,
    /// Two Content-Length headers with different values: the body length is ambiguous.
    #[error("conflicting Content-Length headers")]
    ConflictingContentLength,
}

/// Splits a byte stream into SIP messages and keep-alives.
///
/// Keep-alive handling: "\r\n\r\n" between messages is a [`Frame::Ping`]; "\r\n" followed by
/// any byte other than '\r' is a [`Frame::Pong`]. A buffer holding only "\r\n" is ambiguous
/// (a pong, or the first half of a ping split across reads), so [`StreamFramer::next_frame`]
/// waits for more bytes; a caller that has sent a ping and is waiting for its pong resolves
/// the ambiguity with [`StreamFramer::take_pending_pong`].
#[derive(Debug)]
pub struct StreamFramer {
    buf: BytesMut,
    max_message_size: usize,
    /// Offset in `buf` from which the search for the end of the header section resumes, so
    /// a header section arriving a few bytes at a time is scanned once, not once per read.
    scan_from: usize,
    /// Total length (headers + body) of the message at the front of `buf`, once its header
    /// section has been parsed.
    message_len: Option<usize>,
    /// The error that ended the stream; repeated on every later call so a caller that keeps
    /// pulling cannot resynchronise on garbage.
    failed: Option<FramingError>,
}

impl StreamFramer {
    /// A framer refusing messages (headers plus body) larger than `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        StreamFramer {
            buf: BytesMut::with_capacity(4096),
            max_message_size,
            scan_from: 0,
            message_len: None,
            failed: None,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet handed out as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// If the buffer holds exactly one CRLF between messages, consumes it and returns true.
    ///
    /// Only a caller that has sent a ping and awaits the pong should call this: for any other
    /// caller a lone CRLF may be the first half of the peer's ping, which `next_frame` keeps
    /// until it can tell.
    pub fn take_pending_pong(&mut self) -> bool {
        if self.failed.is_none() && self.message_len.is_none() && &self.buf[..] == b"\r\n" {
            self.buf.clear();
            self.scan_from = 0;
            true
        } else {
            false
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that makes
    /// the stream unusable.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FramingError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        match self.next_frame_inner() {
            Err(err) => {
                self.failed = Some(err);
                Err(err)
            }
            ok => ok,
        }
    }

    fn next_frame_inner(&mut self) -> Result<Option<Frame>, FramingError> {
        if self.message_len.is_none() {
            // Between messages: keep-alives.
            if self.buf.starts_with(b"\r\n\r\n") {
                self.buf.advance(4);
                return Ok(Some(Frame::Ping));
            }
            if self.buf.starts_with(b"\r\n") {
                match self.buf.get(2) {
                    // Lone CRLF, or CRLF CR: cannot tell a pong from half a ping yet.
                    None => return Ok(None),
                    Some(b'\r') if self.buf.len() == 3 => return Ok(None),
                    _ => {
                        self.buf.advance(2);
                        return Ok(Some(Frame::Pong));
                    }
                }
            }
            if &self.buf[..] == b"\r" {
                return Ok(None);
            }
            let header_len = match self.find_header_end() {
                Some(len) => len,
                None => {
                    if self.buf.len() > self.max_message_size {
                        return Err(FramingError::TooLarge);
                    }
                    return Ok(None);
                }
            };
            if header_len > self.max_message_size {
                return Err(FramingError::TooLarge);
            }
            let body_len = content_length(&self.buf[..header_len])?;
            let total = header_len
                .checked_add(body_len)
                .ok_or(FramingError::TooLarge)?;
            if total > self.max_message_size {
                return Err(FramingError::TooLarge);
            }
            self.message_len = Some(total);
            self.scan_from = 0;
        }
        match self.message_len {
            Some(total) if self.buf.len() >= total => {
                self.message_len = None;
                let msg = self.buf.split_to(total).freeze();
                Ok(Some(Frame::Message(msg)))
            }
            _ => Ok(None),
        }
    }

    /// Length of the header section including the empty line that ends it, if complete.
    ///
    /// The empty line is a line feed followed by either another line feed or CRLF, which
    /// accepts CRLFCRLF, LFLF and the mixtures sloppy peers send.
    fn find_header_end(&mut self) -> Option<usize> {
        let buf = &self.buf[..];
        let mut pos = self.scan_from;
        while let Some(off) = memchr::memchr(b'\n', &buf[pos..]) {
            let lf = pos + off;
            match buf.get(lf + 1) {
                None => {
                    self.scan_from = lf;
                    return None;
                }
                Some(b'\n') => return Some(lf + 2),
                Some(b'\r') => match buf.get(lf + 2) {
                    None => {
                        self.scan_from = lf;
                        return None;
                    }
                    Some(b'\n') => return Some(lf + 3),
                    Some(_) => {}
                },
                Some(_) => {}
            }
            pos = lf + 1;
        }
        self.scan_from = buf.len();
        None
    }
}

/// The body length declared by a complete header section (start line included).
fn content_length(headers: &[u8]) -> Result<usize, FramingError> {
    let mut found: Option<usize> = None;
    // The value of the Content-Length header being collected, across folded lines.
    let mut current: Option<Vec<u8>> = None;
    fn record(value: &[u8], found: &mut Option<usize>) -> Result<(), FramingError> {
        let n = parse_length(value)?;
        match *found {
            Some(prev) if prev != n => Err(FramingError::ConflictingContentLength),
            _ => {
                *found = Some(n);
                Ok(())
            }
        }
    }
    // Skip the start line: it can never be a header.
    let mut lines = headers.split(|&b| b == b'\n').skip(1);
    for line in &mut lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            // Folded continuation of the previous header line.
            if let Some(value) = current.as_mut() {
                value.push(b' ');
                value.extend_from_slice(line);
            }
            continue;
        }
        if let Some(value) = current.take() {
            record(&value, &mut found)?;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = trim(&line[..colon]);
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            current = Some(line[colon + 1..].to_vec());
        }
    }
    if let Some(value) = current.take() {
        record(&value, &mut found)?;
    }
    found.ok_or(FramingError::MissingContentLength)
}

fn parse_length(value: &[u8]) -> Result<usize, FramingError> {
    let digits = trim(value);
    if digits.is_empty() {
        return Err(FramingError::BadContentLength);
    }
    let mut n: usize = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(FramingError::BadContentLength);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or(FramingError::BadContentLength)?;
    }
    Ok(n)
}

fn trim(s: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| matches!(*b, b' ' | b'\t' | b'\r' | b'\n');
    let start = s.iter().position(|b| !is_ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ws(b)).map_or(start, |e| e + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bK1\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 8\r\n\
\r\n\
v=0\r\n\r\n!";

    const OPTIONS: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\n\r\n";

    fn frames_of(framer: &mut StreamFramer) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = framer.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    fn feed_in_chunks(stream: &[u8], chunks: &[usize]) -> Vec<Frame> {
        let mut framer = StreamFramer::new(4096);
        let mut out = Vec::new();
        let mut rest = stream;
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks[i % chunks.len()].clamp(1, rest.len());
            i += 1;
            framer.push(&rest[..n]);
            rest = &rest[n..];
            out.extend(frames_of(&mut framer));
        }
        assert_eq!(framer.buffered(), 0);
        out
    }

    /// Pipelined stream used by the split tests: keep-alives before, between and after
    /// messages, and a body containing CRLFCRLF.
    fn sample_stream() -> (Vec<u8>, Vec<Frame>) {
        let mut s = Vec::new();
        s.extend_from_slice(b"\r\n\r\n");
        s.extend_from_slice(INVITE);
        s.extend_from_slice(OPTIONS);
        s.extend_from_slice(b"\r\n\r\n");
        s.extend_from_slice(INVITE);
        s.extend_from_slice(b"\r\n");
        s.extend_from_slice(OPTIONS);
        s.extend_from_slice(b"\r\n\r\n");
        let expected = vec![
            Frame::Ping,
            Frame::Message(Bytes::from_static(INVITE)),
            Frame::Message(Bytes::from_static(OPTIONS)),
            Frame::Ping,
            Frame::Message(Bytes::from_static(INVITE)),
            Frame::Pong,
            Frame::Message(Bytes::from_static(OPTIONS)),
            Frame::Ping,
        ];
        (s, expected)
    }

    #[test]
    fn framing_whole_stream_at_once() {
        let (s, expected) = sample_stream();
        assert_eq!(feed_in_chunks(&s, &[s.len()]), expected);
    }

    #[test]
    fn framing_one_byte_at_a_time() {
        let (s, expected) = sample_stream();
        assert_eq!(feed_in_chunks(&s, &[1]), expected);
    }

    #[test]
    fn framing_split_at_every_position() {
        let (s, expected) = sample_stream();
        for split in 1..s.len() {
            let got = feed_in_chunks(&s, &[split, s.len()]);
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn framing_random_chunk_sizes() {
        let (s, expected) = sample_stream();
        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..500 {
            let chunks: Vec<usize> = (0..16)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 40) as usize + 1
                })
                .collect();
            assert_eq!(feed_in_chunks(&s, &chunks), expected, "chunks {chunks:?}");
        }
    }

    #[test]
    fn framing_body_with_crlfcrlf_is_not_split() {
        let mut f = StreamFramer::new(4096);
        f.push(INVITE);
        let frames = frames_of(&mut f);
        assert_eq!(frames, vec![Frame::Message(Bytes::from_static(INVITE))]);
        match &frames[0] {
            Frame::Message(m) => assert!(m.ends_with(b"v=0\r\n\r\n!")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn framing_waits_for_body() {
        let mut f = StreamFramer::new(4096);
        f.push(&INVITE[..INVITE.len() - 1]);
        assert_eq!(f.next_frame(), Ok(None));
        f.push(&INVITE[INVITE.len() - 1..]);
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::Message(Bytes::from_static(INVITE))))
        );
    }

    #[test]
    fn framing_lone_crlf_waits_then_pong() {
        let mut f = StreamFramer::new(4096);
        f.push(b"\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        f.push(b"\r");
        assert_eq!(f.next_frame(), Ok(None));
        f.push(b"\n");
        assert_eq!(f.next_frame(), Ok(Some(Frame::Ping)));
        f.push(b"\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        f.push(OPTIONS);
        assert_eq!(f.next_frame(), Ok(Some(Frame::Pong)));
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::Message(Bytes::from_static(OPTIONS))))
        );
    }

    #[test]
    fn framing_take_pending_pong() {
        let mut f = StreamFramer::new(4096);
        assert!(!f.take_pending_pong());
        f.push(b"\r\n");
        assert!(f.take_pending_pong());
        assert_eq!(f.buffered(), 0);
        assert!(!f.take_pending_pong());
        f.push(b"INV");
        assert!(!f.take_pending_pong());
    }

    #[test]
    fn framing_compact_and_odd_content_length_forms() {
        let cases: &[&[u8]] = &[
            b"MESSAGE sip:a@b SIP/2.0\r\nl: 3\r\n\r\nabc",
            b"MESSAGE sip:a@b SIP/2.0\r\nL:3\r\n\r\nabc",
            b"MESSAGE sip:a@b SIP/2.0\r\ncontent-LENGTH \t:  3 \r\n\r\nabc",
            b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length:\r\n 3\r\n\r\nabc",
            b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 3\r\nl: 3\r\n\r\nabc",
            b"MESSAGE sip:a@b SIP/2.0\nContent-Length: 3\n\nabc",
            b"SIP/2.0 200 OK\r\nX-Len: 9\r\n  Content-Length: 7\r\nContent-Length: 3\r\n\r\nabc",
        ];
        for &case in cases {
            let mut f = StreamFramer::new(4096);
            f.push(case);
            f.push(OPTIONS);
            assert_eq!(
                frames_of(&mut f),
                vec![
                    Frame::Message(Bytes::copy_from_slice(case)),
                    Frame::Message(Bytes::from_static(OPTIONS))
                ],
                "{}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn framing_errors() {
        let cases: &[(&[u8], FramingError)] = &[
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n",
                FramingError::MissingContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -1\r\n\r\n",
                FramingError::BadContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: abc\r\n\r\n",
                FramingError::BadContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length:\r\n\r\n",
                FramingError::BadContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1 2\r\n\r\n",
                FramingError::BadContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
                FramingError::BadContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\n",
                FramingError::ConflictingContentLength,
            ),
            (
                b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 5000\r\n\r\n",
                FramingError::TooLarge,
            ),
        ];
        for &(case, err) in cases {
            let mut f = StreamFramer::new(1024);
            f.push(case);
            assert_eq!(
                f.next_frame(),
                Err(err),
                "{}",
                String::from_utf8_lossy(case)
            );
            // Fatal: the same error again, even after more bytes.
            f.push(OPTIONS);
            assert_eq!(f.next_frame(), Err(err));
        }
    }

    #[test]
    fn framing_unterminated_headers_too_large() {
        let mut f = StreamFramer::new(64);
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        for _ in 0..4 {
            f.push(b"X-Pad: aaaaaaaaaa\r\n");
        }
        assert_eq!(f.next_frame(), Err(FramingError::TooLarge));
    }

    #[test]
    fn framing_too_large_before_body_is_buffered() {
        let mut f = StreamFramer::new(100);
        f.push(b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 80\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FramingError::TooLarge));
        // Exactly at the limit is fine.
        let msg = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 53\r\n\r\n";
        let mut full = msg.to_vec();
        full.resize(100, b'x');
        let mut f = StreamFramer::new(100);
        f.push(&full);
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::Message(Bytes::from(full.clone()))))
        );
    }
}
