//! Finding the SDP inside a SIP body, which is not always the whole body.
//!
//! SIP-I/SIP-T trunks (ITU-T Q.1912.5, RFC 3204) send the ISUP message beside the SDP in a
//! `multipart/mixed` body (RFC 5621), and some phones attach XML (location, call info) the
//! same way. Anchoring only `application/sdp` bodies would let such calls' media bypass the
//! relay and show the phone's address to the carrier. So the SBC locates the SDP part, the
//! relay rewrites it, and the rest of the body, its boundaries and the other parts, passes
//! byte for byte.
//!
//! Input comes from the network: every function here works on any bytes and returns `None`
//! for what it does not understand, which the caller treats as "no SDP to anchor".

use crate::scan::{skip_lws, skip_quoted, trim};
use memchr::memmem;
use std::ops::Range;

/// Where the SDP is in `body`, given the message's Content-Type (`None`: no header). The
/// whole body for `application/sdp` (or no Content-Type and a body that starts like SDP), the
/// first `application/sdp` part of a `multipart/*` body, else `None`.
pub fn sdp_span(content_type: Option<&[u8]>, body: &[u8]) -> Option<Range<usize>> {
    if body.is_empty() {
        return None;
    }
    let Some(ct) = content_type else {
        // RFC 3261 20.15: a body without Content-Type is unusual; an SDP-looking one is SDP.
        return body.starts_with(b"v=0").then_some(0..body.len());
    };
    let (mime, params) = split_media_type(ct);
    if mime.eq_ignore_ascii_case(b"application/sdp") {
        return Some(0..body.len());
    }
    if mime.len() > 10 && mime[..10].eq_ignore_ascii_case(b"multipart/") {
        let boundary = param(params, b"boundary")?;
        return sdp_part(boundary, body);
    }
    None
}

/// The body with `span` replaced by `replacement`.
pub fn splice(body: &[u8], span: Range<usize>, replacement: &[u8]) -> Vec<u8> {
    let start = span.start.min(body.len());
    let end = span.end.clamp(start, body.len());
    let mut out = Vec::with_capacity(body.len() - (end - start) + replacement.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(replacement);
    out.extend_from_slice(&body[end..]);
    out
}

/// `type/subtype` (trimmed) and the `;`-separated parameters after it.
fn split_media_type(ct: &[u8]) -> (&[u8], &[u8]) {
    let ct = trim(ct);
    match ct.iter().position(|&b| b == b';') {
        Some(i) => (trim(&ct[..i]), &ct[i + 1..]),
        None => (ct, &[]),
    }
}

/// A parameter's value (quotes removed) from `a=1; b="x;y"`.
fn param<'a>(mut params: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    while !params.is_empty() {
        let eq = params.iter().position(|&b| b == b'=');
        let semi = params.iter().position(|&b| b == b';');
        let eq = match (eq, semi) {
            (Some(e), Some(s)) if e > s => None,
            (e, _) => e,
        };
        let Some(eq) = eq else {
            // A parameter without a value: skip it.
            params = semi.map_or(&[][..], |s| &params[s + 1..]);
            continue;
        };
        let key = trim(&params[..eq]);
        let rest = &params[skip_lws(params, eq + 1)..];
        let (value, after) = if rest.first() == Some(&b'"') {
            let past = skip_quoted(rest, 0)?;
            let after = &rest[past..];
            let next = after.iter().position(|&b| b == b';');
            (
                &rest[1..past - 1],
                next.map_or(&[][..], |n| &after[n + 1..]),
            )
        } else {
            let end = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
            (trim(&rest[..end]), rest.get(end + 1..).unwrap_or_default())
        };
        if key.eq_ignore_ascii_case(name) {
            return Some(value);
        }
        params = after;
    }
    None
}

/// The content of the first part whose Content-Type is `application/sdp` (RFC 2046 5.1.1:
/// a part starts after a line `--boundary` and ends before the line break that precedes the
/// next one; `--boundary--` closes the body).
fn sdp_part(boundary: &[u8], body: &[u8]) -> Option<Range<usize>> {
    // RFC 2046: 1 to 70 characters.
    if boundary.is_empty() || boundary.len() > 70 {
        return None;
    }
    let mut delim = Vec::with_capacity(boundary.len() + 2);
    delim.extend_from_slice(b"--");
    delim.extend_from_slice(boundary);
    // Delimiter lines: at the start of the body or of a line.
    let lines: Vec<usize> = memmem::find_iter(body, &delim)
        .filter(|&pos| pos == 0 || body[pos - 1] == b'\n')
        .collect();
    for pair in lines.windows(2) {
        let (open, next) = (pair[0], pair[1]);
        let after = &body[open + delim.len()..];
        if after.starts_with(b"--") {
            return None; // the close delimiter: no part after it
        }
        // The rest of the delimiter line (transport padding) and its line break.
        let start = open + delim.len() + after.iter().position(|&b| b == b'\n')? + 1;
        // The line break before the next delimiter belongs to the delimiter.
        let mut end = next;
        if end > start && body[end - 1] == b'\n' {
            end -= 1;
            if end > start && body[end - 1] == b'\r' {
                end -= 1;
            }
        }
        if start > end {
            continue;
        }
        let part = &body[start..end];
        let (headers_len, content_off) = split_part(part)?;
        if part_is_sdp(&part[..headers_len]) {
            return Some(start + content_off..end);
        }
    }
    None
}

/// A part's header block length and where its content starts (after the empty line). A part
/// that starts with the empty line has no headers (and is text/plain).
fn split_part(part: &[u8]) -> Option<(usize, usize)> {
    if part.starts_with(b"\r\n") {
        return Some((0, 2));
    }
    if part.starts_with(b"\n") {
        return Some((0, 1));
    }
    if let Some(i) = memmem::find(part, b"\r\n\r\n") {
        return Some((i, i + 4));
    }
    memmem::find(part, b"\n\n").map(|i| (i, i + 2))
}

fn part_is_sdp(headers: &[u8]) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let name = trim(&line[..colon]);
        (name.eq_ignore_ascii_case(b"content-type") || name.eq_ignore_ascii_case(b"c"))
            && split_media_type(&line[colon + 1..])
                .0
                .eq_ignore_ascii_case(b"application/sdp")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &[u8] = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    const ISUP: &[u8] =
        b"\x01\x00\x49\x00\x00\x03\x02\x00\x07\x04\x10\x00\x33\x63\x21\x43\x00\r\n--b\x00";

    fn mixed(boundary: &str, preamble: &str, eol: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(preamble.as_bytes());
        b.extend_from_slice(format!("--{boundary}{eol}Content-Type: application/isup;version=itu-t92+{eol}Content-Disposition: signal;handling=optional{eol}{eol}").as_bytes());
        b.extend_from_slice(ISUP);
        b.extend_from_slice(
            format!("{eol}--{boundary}  {eol}content-type:Application/SDP{eol}{eol}").as_bytes(),
        );
        b.extend_from_slice(SDP);
        b.extend_from_slice(format!("{eol}--{boundary}--{eol}epilogue").as_bytes());
        b
    }

    #[test]
    fn whole_body_sdp() {
        assert_eq!(
            sdp_span(Some(b" application/sdp "), SDP),
            Some(0..SDP.len())
        );
        assert_eq!(
            sdp_span(Some(b"Application/SDP;charset=x"), SDP),
            Some(0..SDP.len())
        );
        assert_eq!(sdp_span(None, SDP), Some(0..SDP.len()));
        assert_eq!(sdp_span(None, b"hello"), None);
        assert_eq!(sdp_span(Some(b"application/sdp"), b""), None);
        assert_eq!(sdp_span(Some(b"text/plain"), SDP), None);
    }

    #[test]
    fn sdp_part_of_multipart_mixed_is_found_and_spliced() {
        for (ct, boundary, preamble, eol) in [
            (
                "multipart/mixed;boundary=unique-boundary-1",
                "unique-boundary-1",
                "",
                "\r\n",
            ),
            (
                "multipart/mixed; boundary=\"a;b c\"",
                "a;b c",
                "preamble\r\n",
                "\r\n",
            ),
            (
                "Multipart/Related ; type=application/sdp; BOUNDARY=xyz",
                "xyz",
                "",
                "\n",
            ),
        ] {
            let body = mixed(boundary, preamble, eol);
            let span = sdp_span(Some(ct.as_bytes()), &body).unwrap_or_else(|| panic!("{ct}"));
            assert_eq!(&body[span.clone()], SDP, "{ct}");
            let out = splice(&body, span, b"v=0\r\nNEW\r\n");
            let want = String::from_utf8_lossy(&body)
                .replace(std::str::from_utf8(SDP).unwrap(), "v=0\r\nNEW\r\n");
            assert_eq!(String::from_utf8_lossy(&out), want);
            // The ISUP part, with its binary bytes, is untouched.
            assert!(out.windows(ISUP.len()).any(|w| w == ISUP));
        }
    }

    #[test]
    fn multipart_without_sdp_or_malformed_is_none() {
        let body = mixed("b", "", "\r\n");
        assert_eq!(
            sdp_span(Some(b"multipart/mixed"), &body),
            None,
            "no boundary"
        );
        assert_eq!(sdp_span(Some(b"multipart/mixed;boundary=zz"), &body), None);
        assert_eq!(sdp_span(Some(b"multipart/mixed;boundary=\"b"), &body), None);
        assert_eq!(sdp_span(Some(b"multipart/mixed;boundary="), &body), None);
        let no_sdp = b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n";
        assert_eq!(sdp_span(Some(b"multipart/mixed;boundary=b"), no_sdp), None);
        // Unterminated: the SDP part has no closing delimiter, so it is not taken.
        let open = b"--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n";
        assert_eq!(sdp_span(Some(b"multipart/mixed;boundary=b"), open), None);
    }

    #[test]
    fn any_bytes_are_safe() {
        // Every prefix and a few byte flips of a real body: no panic, and a span is always
        // inside the body.
        let body = mixed("b", "x", "\r\n");
        let ct = b"multipart/mixed;boundary=b";
        for n in 0..=body.len() {
            if let Some(s) = sdp_span(Some(ct), &body[..n]) {
                assert!(s.start <= s.end && s.end <= n);
            }
        }
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x55;
            if let Some(s) = sdp_span(Some(ct), &b) {
                assert!(s.start <= s.end && s.end <= b.len());
            }
        }
        for p in [&b"boundary"[..], b";;;", b"boundary=\"", b"=;=", b"\"\""] {
            let _ = param(p, b"boundary");
        }
    }
}
