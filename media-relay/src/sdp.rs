//! SDP (RFC 4566/8866) reading and rewriting for media anchoring.
//!
//! # Why our own parser
//! The relay needs a handful of fields (o=, c=, m= port and proto, a=rtcp, a=rtcp-mux,
//! direction, a=rtpmap clock rates) and must leave every other byte exactly as it came: phones
//! and carriers are picky about attribute order, case, trailing spaces and CRLF vs LF, and
//! SRTP keys (a=crypto) must survive untouched. The crates on crates.io either re-serialise a
//! typed tree (webrtc-sdp, sdp-types, the `sdp` crate of webrtc-rs), which reorders and
//! normalises lines and rejects SDP real phones send (missing s=/t=, odd attributes), or are
//! unmaintained. So this module indexes the lines of the body once (spans into the original
//! bytes), parses only what the relay uses, and rewrites by splicing: untouched lines are copied
//! byte for byte with their own line terminator.
//!
//! # What is rewritten
//! - `o=`: the unicast address becomes the relay's (the far side never sees the sender's
//!   address); the session version is managed by [`OriginTracker`].
//! - `c=` (session and media level): the relay's address, in its address family. A hold
//!   address (`0.0.0.0`, `::`) stays unspecified so hold keeps its meaning end to end.
//! - `m=`: the port becomes the relay's RTP port; port 0 (disabled stream) stays 0. A `/count`
//!   suffix (layered coding, never seen from phones) is dropped: the relay gives one pair.
//!   Streams over TCP (TCP/MSRP, TCP/BFCP, ...) cannot be relayed and are refused with port 0
//!   and without their attributes (which may name the endpoint, like MSRP's a=path).
//! - `a=rtcp` (RFC 3605): the relay's RTCP port, and its address when the line names one.
//! - ICE lines (`a=candidate`, `a=ice-*`, `a=remote-candidates`, `a=end-of-candidates`) are
//!   removed: candidates name the endpoint's own addresses, which must not leak, and ICE across
//!   an anchoring relay would route media around it.
//!
//! Everything else, including direction attributes, `a=rtcp-mux`, codecs, `a=crypto`, `b=`,
//! `a=ptime` and `a=silenceSupp`, is copied unchanged.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use smallvec::SmallVec;

/// Largest SDP body accepted; real offers are a few hundred bytes, video ones a few KiB.
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Most m= lines accepted; bounds the ports one offer can take.
pub const MAX_MEDIA: usize = 16;

/// Why an SDP body was refused. Carries the 1-based line number where one applies, so a log line
/// points at the offending line of a capture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// No body, or only blank lines.
    #[error("empty SDP body")]
    Empty,
    /// Larger than [`MAX_SDP_LEN`].
    #[error("SDP body of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// The first line is not `v=`: not SDP at all.
    #[error("SDP does not start with v=")]
    NoVersion,
    /// A line the relay must understand is malformed.
    #[error("line {line}: {what}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A connection address is a host name; the relay needs an address to send to.
    #[error("line {line}: connection address is not an IP literal")]
    NotAnAddress {
        /// 1-based line number.
        line: usize,
    },
    /// An active media line has no c= at media or session level.
    #[error("media line {index} has no connection address")]
    MissingConnection {
        /// 0-based m= index.
        index: usize,
    },
    /// More than [`MAX_MEDIA`] m= lines.
    #[error("more than {MAX_MEDIA} media lines")]
    TooManyMedia,
}

/// Media direction attribute (RFC 3264 section 5.1). Kept as written; the relay reads it only to
/// know whether a leg is on hold (which lengthens its media timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// a=sendrecv, also the default.
    SendRecv,
    /// a=sendonly: the usual hold.
    SendOnly,
    /// a=recvonly: the answer to a hold.
    RecvOnly,
    /// a=inactive: hold without music.
    Inactive,
}

impl Direction {
    fn parse(name: &[u8]) -> Option<Direction> {
        Some(match name {
            b"sendrecv" => Direction::SendRecv,
            b"sendonly" => Direction::SendOnly,
            b"recvonly" => Direction::RecvOnly,
            b"inactive" => Direction::Inactive,
            _ => return None,
        })
    }

    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }
}

/// What carries a media line, as far as relaying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// RTP/AVP, RTP/SAVP, RTP/AVPF, RTP/SAVPF, UDP/TLS/RTP/SAVP(F): RTP headers are readable
    /// (SRTP encrypts only the payload), so latching waits for a valid RTP packet.
    Rtp,
    /// Other datagram transports (udptl for T.38 fax, plain udp): relayed, latched on the
    /// first packet.
    Udp,
    /// TCP-based (TCP/MSRP, TCP/BFCP, TCP/TLS/...): cannot be relayed as datagrams.
    Unsupported,
}

/// The o= line, with the fields the relay uses.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Username and session id: together they identify the originator's session, so a change
    /// means a different session (e.g. another fork answered).
    pub session: String,
    /// sess-version, if numeric.
    pub version: Option<u64>,
    version_span: Range<usize>,
    addr_span: Range<usize>,
}

/// A c= line.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// The address; unspecified (0.0.0.0 or ::) for RFC 2543-style hold.
    pub addr: IpAddr,
    span: (usize, usize),
}

/// An a=rtcp attribute (RFC 3605).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpAttr {
    /// RTCP port.
    pub port: u16,
    /// RTCP address, when the attribute names one.
    pub addr: Option<IpAddr>,
}

/// One m= section.
#[derive(Debug, Clone)]
pub struct Media {
    /// Media type: audio, video, image, application, ...
    pub kind: String,
    /// Port from the m= line; 0 means the stream is disabled or rejected.
    pub port: u16,
    /// The protocol token (RTP/AVP, RTP/SAVP, udptl, ...).
    pub proto: String,
    /// How the relay can carry it.
    pub transport: Transport,
    /// Media-level c=, overriding the session's.
    pub connection: Option<Connection>,
    /// a=rtcp, if present.
    pub rtcp: Option<RtcpAttr>,
    /// a=rtcp-mux present (RFC 5761): RTCP may arrive on the RTP port.
    pub rtcp_mux: bool,
    /// Media-level direction attribute, if any.
    pub direction: Option<Direction>,
    /// Payload type -> RTP clock rate, from a=rtpmap and the static table of RFC 3551, for
    /// jitter in real time units.
    pub clock_rates: SmallVec<[(u8, u32); 8]>,
    port_span: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Origin,
    Connection,
    Media(usize),
    Rtcp(usize),
    Ice,
    Keep,
}

#[derive(Debug, Clone, Copy)]
struct Line {
    start: usize,
    /// End of content (before CR/LF).
    end: usize,
    /// End including the terminator.
    next: usize,
    kind: LineKind,
    /// The m= section the line belongs to (`None`: session level).
    section: Option<usize>,
}

/// A parsed SDP body: spans into the original bytes plus the fields the relay needs.
#[derive(Debug, Clone)]
pub struct Sdp<'a> {
    src: &'a [u8],
    lines: Vec<Line>,
    /// The o= line, if present (lenient: some gateways omit it).
    pub origin: Option<Origin>,
    /// Session-level c=.
    pub connection: Option<Connection>,
    /// Session-level direction attribute.
    pub direction: Option<Direction>,
    /// The m= sections in order.
    pub media: Vec<Media>,
}

/// Where one media line's relay sockets are, for the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaTarget {
    /// The relay's RTP port toward the receiver of this SDP.
    pub rtp_port: u16,
    /// The relay's RTCP port (RTP + 1 with our allocator, but the rewrite does not assume it).
    pub rtcp_port: u16,
}

/// A rewritten body and where its o= version sits, so [`OriginTracker`] can adjust it.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The new body.
    pub sdp: Vec<u8>,
    version_span: Option<Range<usize>>,
}

impl<'a> Sdp<'a> {
    /// Indexes and parses `src`. Errors are values; no input makes this panic.
    pub fn parse(src: &'a [u8]) -> Result<Sdp<'a>, SdpError> {
        if src.len() > MAX_SDP_LEN {
            return Err(SdpError::TooLarge(src.len()));
        }
        let mut sdp = Sdp {
            src,
            lines: Vec::with_capacity(32),
            origin: None,
            connection: None,
            direction: None,
            media: Vec::new(),
        };
        let mut pos = 0;
        let mut seen_version = false;
        let mut lineno = 0;
        while pos < src.len() {
            lineno += 1;
            let nl = src[pos..].iter().position(|&b| b == b'\n');
            let (mut end, next) = match nl {
                Some(i) => (pos + i, pos + i + 1),
                None => (src.len(), src.len()),
            };
            if end > pos && src[end - 1] == b'\r' {
                end -= 1;
            }
            let start = pos;
            pos = next;
            let content = &src[start..end];
            let mut line = Line {
                start,
                end,
                next,
                kind: LineKind::Keep,
                section: sdp.media.len().checked_sub(1),
            };
            if content.iter().all(|b| b.is_ascii_whitespace()) {
                sdp.lines.push(line);
                continue;
            }
            if content.len() < 2 || content[1] != b'=' || !content[0].is_ascii_alphabetic() {
                if !seen_version {
                    return Err(SdpError::NoVersion);
                }
                return Err(SdpError::Malformed {
                    line: lineno,
                    what: "not a type=value line",
                });
            }
            if !seen_version {
                if content[0] != b'v' {
                    return Err(SdpError::NoVersion);
                }
                seen_version = true;
            }
            let value_start = start + 2;
            match content[0] {
                b'o' => {
                    // RFC 4566 5.2: exactly one o= per session. A second one is malformed, and
                    // rewriting it against the first one's spans would be meaningless.
                    if sdp.origin.is_some() {
                        return Err(SdpError::Malformed {
                            line: lineno,
                            what: "a second o= line",
                        });
                    }
                    sdp.origin = Some(parse_origin(src, value_start, end, lineno)?);
                    line.kind = LineKind::Origin;
                }
                b'c' => {
                    let c = parse_connection(src, value_start, end, lineno)?;
                    match sdp.media.last_mut() {
                        Some(m) => m.connection = Some(c),
                        None => sdp.connection = Some(c),
                    }
                    line.kind = LineKind::Connection;
                }
                b'm' => {
                    if sdp.media.len() == MAX_MEDIA {
                        return Err(SdpError::TooManyMedia);
                    }
                    let m = parse_media(src, value_start, end, lineno)?;
                    line.kind = LineKind::Media(sdp.media.len());
                    line.section = Some(sdp.media.len());
                    sdp.media.push(m);
                }
                b'a' => {
                    line.kind = sdp.parse_attribute(value_start, end, lineno)?;
                }
                _ => {}
            }
            sdp.lines.push(line);
        }
        if !seen_version {
            return Err(SdpError::Empty);
        }
        for (index, m) in sdp.media.iter().enumerate() {
            if m.port != 0
                && m.transport != Transport::Unsupported
                && m.connection.is_none()
                && sdp.connection.is_none()
            {
                return Err(SdpError::MissingConnection { index });
            }
        }
        Ok(sdp)
    }

    fn parse_attribute(
        &mut self,
        start: usize,
        end: usize,
        line: usize,
    ) -> Result<LineKind, SdpError> {
        let value = &self.src[start..end];
        let (name, arg) = match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (trim(value), None),
        };
        if let Some(d) = Direction::parse(name) {
            match self.media.last_mut() {
                Some(m) => m.direction = Some(d),
                None => self.direction = Some(d),
            }
            return Ok(LineKind::Keep);
        }
        match name {
            b"candidate" | b"ice-ufrag" | b"ice-pwd" | b"ice-options" | b"ice-lite"
            | b"ice-mismatch" | b"ice-pacing" | b"remote-candidates" | b"end-of-candidates" => {
                Ok(LineKind::Ice)
            }
            b"rtcp-mux" => {
                if let Some(m) = self.media.last_mut() {
                    m.rtcp_mux = true;
                }
                Ok(LineKind::Keep)
            }
            b"rtcp" => {
                let Some(m) = self.media.last_mut() else {
                    // RFC 3605 defines a=rtcp at media level only; leave a stray one alone.
                    return Ok(LineKind::Keep);
                };
                let arg = arg.unwrap_or_default();
                let toks = tokens(arg);
                let malformed = SdpError::Malformed {
                    line,
                    what: "a=rtcp needs a port",
                };
                let port = toks
                    .first()
                    .and_then(|t| parse_num::<u16>(&arg[t.clone()]))
                    .ok_or(malformed)?;
                let addr = if toks.len() >= 4 {
                    let addr = parse_addr(&arg[toks[2].clone()], &arg[toks[3].clone()], line)?;
                    Some(addr)
                } else {
                    None
                };
                m.rtcp = Some(RtcpAttr { port, addr });
                Ok(LineKind::Rtcp(self.media.len() - 1))
            }
            b"rtpmap" => {
                if let (Some(m), Some(arg)) = (self.media.last_mut(), arg) {
                    if let Some((pt, rate)) = parse_rtpmap(arg) {
                        set_rate(&mut m.clock_rates, pt, rate);
                    }
                }
                Ok(LineKind::Keep)
            }
            _ => Ok(LineKind::Keep),
        }
    }

    /// The address a media line's RTP is to be sent to, per this SDP: `None` when the stream is
    /// disabled, not relayable, or on hold with an unspecified address.
    pub fn rtp_addr(&self, index: usize) -> Option<SocketAddr> {
        let m = self.media.get(index)?;
        if m.port == 0 || m.transport == Transport::Unsupported {
            return None;
        }
        let ip = self.media_connection(index)?;
        if ip.is_unspecified() {
            return None;
        }
        Some(SocketAddr::new(ip, m.port))
    }

    /// The address a media line's RTCP is to be sent to: a=rtcp when present, else the RTP
    /// port + 1 (RFC 3550 section 11).
    pub fn rtcp_addr(&self, index: usize) -> Option<SocketAddr> {
        let rtp = self.rtp_addr(index)?;
        let m = &self.media[index];
        match m.rtcp {
            Some(RtcpAttr {
                port,
                addr: Some(ip),
            }) if !ip.is_unspecified() => Some(SocketAddr::new(ip, port)),
            Some(RtcpAttr { addr: Some(_), .. }) => None,
            Some(RtcpAttr { port, addr: None }) => Some(SocketAddr::new(rtp.ip(), port)),
            None => Some(SocketAddr::new(rtp.ip(), rtp.port().checked_add(1)?)),
        }
    }

    /// Effective connection address of a media line (media level, else session level).
    pub fn media_connection(&self, index: usize) -> Option<IpAddr> {
        let m = self.media.get(index)?;
        m.connection.or(self.connection).map(|c| c.addr)
    }

    /// Effective direction of a media line (media level, else session level, else sendrecv).
    pub fn media_direction(&self, index: usize) -> Direction {
        self.media
            .get(index)
            .and_then(|m| m.direction)
            .or(self.direction)
            .unwrap_or(Direction::SendRecv)
    }

    /// True when every enabled stream is on hold by either convention: a non-sendrecv
    /// direction (RFC 3264) or an unspecified connection address (RFC 2543). Such a leg may be
    /// silent for long, so the relay gives it the hold timeout.
    pub fn is_held(&self) -> bool {
        let mut any = false;
        for (i, m) in self.media.iter().enumerate() {
            if m.port == 0 || m.transport == Transport::Unsupported {
                continue;
            }
            any = true;
            let unspecified = match self.media_connection(i) {
                Some(ip) => ip.is_unspecified(),
                None => true,
            };
            if !unspecified && self.media_direction(i) == Direction::SendRecv {
                return false;
            }
        }
        any
    }

    /// Rewrites the body for its receiver: the relay's `addr` in o= and c=, each media line's
    /// port from `targets` (by m= index; a missing or `None` target gives port 0, as does port 0
    /// in the input), a=rtcp to the relay's RTCP port, ICE lines removed. Every other byte is
    /// copied as it came, line terminators included.
    pub fn rewrite(&self, addr: IpAddr, targets: &[Option<MediaTarget>]) -> Rewritten {
        let src = self.src;
        let mut out = Vec::with_capacity(src.len() + 64);
        let mut version_span = None;
        let family = if addr.is_ipv4() { "IP4" } else { "IP6" };
        let target = |i: usize| -> Option<MediaTarget> {
            let m = self.media.get(i)?;
            if m.port == 0 || m.transport == Transport::Unsupported {
                return None;
            }
            targets.get(i).copied().flatten()
        };
        for line in &self.lines {
            // The attributes of a section we refuse (TCP-based) go: they may name the
            // endpoint's address (a=path of MSRP), and the refused stream needs none.
            let refused = line
                .section
                .and_then(|i| self.media.get(i))
                .is_some_and(|m| m.transport == Transport::Unsupported);
            if refused && src.get(line.start) == Some(&b'a') {
                continue;
            }
            match line.kind {
                LineKind::Keep => out.extend_from_slice(&src[line.start..line.end]),
                LineKind::Ice => continue,
                LineKind::Origin => {
                    // The spans must lie in this line, in order; anything else is copied as it
                    // is rather than sliced out of order (a bug here must never panic the SIP
                    // path).
                    let Some(o) = self.origin.as_ref().filter(|o| {
                        line.start <= o.version_span.start
                            && o.version_span.start <= o.version_span.end
                            && o.version_span.end <= o.addr_span.start
                            && o.addr_span.start <= o.addr_span.end
                            && o.addr_span.end <= line.end
                    }) else {
                        out.extend_from_slice(&src[line.start..line.end]);
                        continue;
                    };
                    out.extend_from_slice(&src[line.start..o.version_span.start]);
                    let vstart = out.len();
                    out.extend_from_slice(&src[o.version_span.clone()]);
                    if o.version.is_some() {
                        version_span = Some(vstart..out.len());
                    }
                    out.extend_from_slice(&src[o.version_span.end..o.addr_span.start]);
                    out.extend_from_slice(family.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(addr.to_string().as_bytes());
                    out.extend_from_slice(&src[o.addr_span.end..line.end]);
                }
                LineKind::Connection => {
                    let c = self.connection_on_line(line);
                    let Some(c) = c else {
                        out.extend_from_slice(&src[line.start..line.end]);
                        continue;
                    };
                    out.extend_from_slice(&src[line.start..c.span.0]);
                    out.extend_from_slice(family.as_bytes());
                    out.push(b' ');
                    if c.addr.is_unspecified() {
                        out.extend_from_slice(if addr.is_ipv4() { b"0.0.0.0" } else { b"::" });
                    } else {
                        out.extend_from_slice(addr.to_string().as_bytes());
                    }
                    out.extend_from_slice(&src[c.span.1..line.end]);
                }
                LineKind::Media(i) => {
                    let m = &self.media[i];
                    out.extend_from_slice(&src[line.start..m.port_span.start]);
                    match target(i) {
                        Some(t) => out.extend_from_slice(t.rtp_port.to_string().as_bytes()),
                        None => out.push(b'0'),
                    }
                    out.extend_from_slice(&src[m.port_span.end..line.end]);
                }
                LineKind::Rtcp(i) => {
                    let Some(t) = target(i) else { continue };
                    let has_addr = self.media[i].rtcp.is_some_and(|r| r.addr.is_some());
                    out.extend_from_slice(b"a=rtcp:");
                    out.extend_from_slice(t.rtcp_port.to_string().as_bytes());
                    if has_addr {
                        out.extend_from_slice(b" IN ");
                        out.extend_from_slice(family.as_bytes());
                        out.push(b' ');
                        out.extend_from_slice(addr.to_string().as_bytes());
                    }
                }
            }
            out.extend_from_slice(&src[line.end..line.next]);
        }
        Rewritten {
            sdp: out,
            version_span,
        }
    }

    fn connection_on_line(&self, line: &Line) -> Option<Connection> {
        let inside = |c: &Connection| c.span.0 >= line.start && c.span.1 <= line.end;
        // The parser stores the last c= of each level; earlier duplicates are re-parsed here.
        if let Some(c) = self.connection.filter(inside) {
            return Some(c);
        }
        if let Some(c) = self.media.iter().filter_map(|m| m.connection).find(inside) {
            return Some(c);
        }
        parse_connection(self.src, line.start + 2, line.end, 0).ok()
    }
}

/// Keeps the o= session version of one sender's SDP honest across rewrites.
///
/// RFC 3264 section 8 requires the version to grow whenever the description changes and to
/// stay put when it does not (a session refresh re-INVITE with identical SDP). The relay's
/// output changes exactly when the sender's input changes, except in rare cases where the
/// relay itself changes something (a stream refused, a re-allocated port). So the output
/// version follows the sender's: unchanged output keeps the last version, a sender increment
/// of n adds n, and a change the sender did not number adds 1. A new origin session (another
/// fork's answer) starts over with its own numbers. One tracker belongs to each leg as sender.
#[derive(Debug, Clone, Default)]
pub struct OriginTracker {
    state: Option<OriginState>,
}

#[derive(Debug, Clone)]
struct OriginState {
    session: String,
    last_in: u64,
    last_out: u64,
    hash: u64,
}

impl OriginTracker {
    /// Sets the version in `out` (rewritten from `sdp`) and remembers it.
    pub fn apply(&mut self, sdp: &Sdp<'_>, out: &mut Rewritten) {
        let (Some(origin), Some(span)) = (&sdp.origin, out.version_span.clone()) else {
            return;
        };
        let Some(in_v) = origin.version else { return };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        out.sdp[..span.start].hash(&mut h);
        out.sdp[span.end..].hash(&mut h);
        let hash = h.finish();
        let out_v = match &self.state {
            Some(s) if s.session == origin.session => {
                if in_v == s.last_in && hash == s.hash {
                    s.last_out
                } else if in_v > s.last_in {
                    s.last_out.saturating_add(in_v - s.last_in)
                } else {
                    s.last_out.saturating_add(1)
                }
            }
            _ => in_v,
        };
        self.state = Some(OriginState {
            session: origin.session.clone(),
            last_in: in_v,
            last_out: out_v,
            hash,
        });
        if out_v != in_v {
            let text = out_v.to_string();
            out.sdp.splice(span.clone(), text.bytes());
            out.version_span = Some(span.start..span.start + text.len());
        }
    }

    /// Forgets the sender's session, for when another endpoint takes the leg over.
    pub fn reset(&mut self) {
        self.state = None;
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// Token spans (relative to `b`) separated by ASCII whitespace.
fn tokens(b: &[u8]) -> SmallVec<[Range<usize>; 8]> {
    let mut out = SmallVec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let s = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > s {
            out.push(s..i);
        }
    }
    out
}

fn parse_num<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn shift(r: &Range<usize>, by: usize) -> Range<usize> {
    r.start + by..r.end + by
}

fn parse_addr(addrtype: &[u8], addr: &[u8], line: usize) -> Result<IpAddr, SdpError> {
    // Multicast TTL / count suffixes ("/127/3") are not addresses; drop them.
    let addr = addr.split(|&b| b == b'/').next().unwrap_or_default();
    let text = std::str::from_utf8(addr).map_err(|_| SdpError::NotAnAddress { line })?;
    if addrtype.eq_ignore_ascii_case(b"IP4") {
        text.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| SdpError::NotAnAddress { line })
    } else if addrtype.eq_ignore_ascii_case(b"IP6") {
        text.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| SdpError::NotAnAddress { line })
    } else {
        Err(SdpError::Malformed {
            line,
            what: "address type is neither IP4 nor IP6",
        })
    }
}

fn parse_origin(src: &[u8], start: usize, end: usize, line: usize) -> Result<Origin, SdpError> {
    let v = &src[start..end];
    let t = tokens(v);
    // Positions are taken from the end: a few UAs put spaces in the username.
    if t.len() < 6 {
        return Err(SdpError::Malformed {
            line,
            what: "o= needs six fields",
        });
    }
    let n = t.len();
    let version_span = shift(&t[n - 4], start);
    let addr_span = start + t[n - 2].start..start + t[n - 1].end;
    let version = parse_num::<u64>(&v[t[n - 4].clone()]);
    let session = String::from_utf8_lossy(&v[t[0].start..t[n - 5].end]).into_owned();
    Ok(Origin {
        session,
        version,
        version_span,
        addr_span,
    })
}

fn parse_connection(
    src: &[u8],
    start: usize,
    end: usize,
    line: usize,
) -> Result<Connection, SdpError> {
    let v = &src[start..end];
    let t = tokens(v);
    if t.len() != 3 || !v[t[0].clone()].eq_ignore_ascii_case(b"IN") {
        return Err(SdpError::Malformed {
            line,
            what: "c= must be IN <addrtype> <address>",
        });
    }
    let addr = parse_addr(&v[t[1].clone()], &v[t[2].clone()], line)?;
    Ok(Connection {
        addr,
        span: (start + t[1].start, start + t[2].end),
    })
}

fn parse_media(src: &[u8], start: usize, end: usize, line: usize) -> Result<Media, SdpError> {
    let v = &src[start..end];
    let t = tokens(v);
    if t.len() < 3 {
        return Err(SdpError::Malformed {
            line,
            what: "m= needs media, port and proto",
        });
    }
    let port_tok = &v[t[1].clone()];
    let port_num = port_tok.split(|&b| b == b'/').next().unwrap_or_default();
    let port = parse_num::<u16>(port_num).ok_or(SdpError::Malformed {
        line,
        what: "m= port is not a number in 0-65535",
    })?;
    let proto = String::from_utf8_lossy(&v[t[2].clone()]).into_owned();
    let upper = proto.to_ascii_uppercase();
    let transport = if upper.starts_with("TCP") {
        Transport::Unsupported
    } else if upper.contains("RTP/") {
        Transport::Rtp
    } else {
        Transport::Udp
    };
    let mut clock_rates = SmallVec::new();
    if transport == Transport::Rtp {
        for fmt in &t[3..] {
            if let Some(pt) = parse_num::<u8>(&v[fmt.clone()]) {
                if let Some(rate) = static_clock_rate(pt) {
                    set_rate(&mut clock_rates, pt, rate);
                }
            }
        }
    }
    Ok(Media {
        kind: String::from_utf8_lossy(&v[t[0].clone()]).into_owned(),
        port,
        proto,
        transport,
        connection: None,
        rtcp: None,
        rtcp_mux: false,
        direction: None,
        clock_rates,
        port_span: shift(&t[1], start),
    })
}

fn parse_rtpmap(arg: &[u8]) -> Option<(u8, u32)> {
    let t = tokens(arg);
    let pt = parse_num::<u8>(&arg[t.first()?.clone()])?;
    let enc = &arg[t.get(1)?.clone()];
    let mut parts = enc.split(|&b| b == b'/');
    parts.next()?;
    let rate = parse_num::<u32>(parts.next()?)?;
    (pt < 128 && rate > 0).then_some((pt, rate))
}

fn set_rate(rates: &mut SmallVec<[(u8, u32); 8]>, pt: u8, rate: u32) {
    match rates.iter_mut().find(|(p, _)| *p == pt) {
        Some(e) => e.1 = rate,
        None => rates.push((pt, rate)),
    }
}

/// RTP clock rates of the static payload types (RFC 3551 tables 4 and 5).
pub fn static_clock_rate(pt: u8) -> Option<u32> {
    Some(match pt {
        0 | 3 | 4 | 5 | 7 | 8 | 9 | 12 | 13 | 15 | 18 => 8000,
        6 => 16000,
        10 | 11 => 44100,
        16 => 11025,
        17 => 22050,
        14 | 25 | 26 | 28 | 31 | 32 | 33 | 34 => 90000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the sdp_rewrite fuzz target: a second o= line was rewritten with the first
    /// one's spans, slicing out of order and panicking the thread that called the relay (the
    /// SBC's UDP receive thread). It is refused now, and rewrite never slices out of order.
    #[test]
    fn a_second_origin_line_is_refused_not_a_panic() {
        let sdp = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n\
o=x 2 2 IN IP4 198.51.100.200\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert!(matches!(
            Sdp::parse(sdp),
            Err(SdpError::Malformed {
                line: 6,
                what: "a second o= line"
            })
        ));
    }

    const OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n\
s=-\r\n\
c=IN IP4 192.0.2.10\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0 8 101\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=rtcp:49171\r\n\
a=sendrecv\r\n";

    fn rw(sdp: &Sdp<'_>, ports: &[u16]) -> String {
        let t: Vec<_> = ports
            .iter()
            .map(|&p| {
                Some(MediaTarget {
                    rtp_port: p,
                    rtcp_port: p + 1,
                })
            })
            .collect();
        String::from_utf8(sdp.rewrite("203.0.113.5".parse().unwrap(), &t).sdp).unwrap()
    }

    #[test]
    fn rewrites_addresses_ports_and_keeps_the_rest() {
        let sdp = Sdp::parse(OFFER.as_bytes()).unwrap();
        assert_eq!(sdp.rtp_addr(0), Some("192.0.2.10:49170".parse().unwrap()));
        assert_eq!(sdp.rtcp_addr(0), Some("192.0.2.10:49171".parse().unwrap()));
        assert!(!sdp.is_held());
        let out = rw(&sdp, &[30000]);
        assert_eq!(
            out,
            OFFER
                .replace("192.0.2.10", "203.0.113.5")
                .replace("49170", "30000")
                .replace("49171", "30001")
        );
    }

    #[test]
    fn lf_only_and_missing_final_newline_are_kept() {
        let src =
            "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=x\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 4000 RTP/AVP 0";
        let sdp = Sdp::parse(src.as_bytes()).unwrap();
        let out = rw(&sdp, &[30000]);
        assert_eq!(
            out,
            "v=0\no=- 1 1 IN IP4 203.0.113.5\ns=x\nc=IN IP4 203.0.113.5\nt=0 0\nm=audio 30000 RTP/AVP 0"
        );
    }

    #[test]
    fn hold_is_recognised_and_zero_address_kept() {
        let held = OFFER.replace("c=IN IP4 192.0.2.10", "c=IN IP4 0.0.0.0");
        let sdp = Sdp::parse(held.as_bytes()).unwrap();
        assert!(sdp.is_held());
        assert_eq!(sdp.rtp_addr(0), None);
        assert!(rw(&sdp, &[30000]).contains("c=IN IP4 0.0.0.0\r\n"));
        let inactive = OFFER.replace("a=sendrecv", "a=inactive");
        assert!(Sdp::parse(inactive.as_bytes()).unwrap().is_held());
        let recvonly = OFFER.replace("a=sendrecv", "a=recvonly");
        let sdp = Sdp::parse(recvonly.as_bytes()).unwrap();
        assert!(sdp.is_held());
        assert_eq!(sdp.media_direction(0), Direction::RecvOnly);
    }

    #[test]
    fn port_zero_stays_zero_and_needs_no_connection() {
        let src = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 0 RTP/AVP 0\r\n";
        let sdp = Sdp::parse(src.as_bytes()).unwrap();
        assert_eq!(sdp.rtp_addr(0), None);
        assert!(rw(&sdp, &[30000]).contains("m=audio 0 RTP/AVP 0\r\n"));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert_eq!(Sdp::parse(b"").unwrap_err(), SdpError::Empty);
        assert_eq!(Sdp::parse(b"\r\n\r\n").unwrap_err(), SdpError::Empty);
        assert_eq!(Sdp::parse(b"<html>").unwrap_err(), SdpError::NoVersion);
        assert_eq!(
            Sdp::parse(b"o=x\r\nv=0\r\n").unwrap_err(),
            SdpError::NoVersion
        );
        let bad = |s: &str| Sdp::parse(s.as_bytes()).unwrap_err();
        assert!(matches!(
            bad("v=0\r\nm=audio x RTP/AVP 0\r\n"),
            SdpError::Malformed { line: 2, .. }
        ));
        assert!(matches!(
            bad("v=0\r\nm=audio 70000 RTP/AVP 0\r\n"),
            SdpError::Malformed { .. }
        ));
        assert!(matches!(
            bad("v=0\r\nc=IN IP4\r\n"),
            SdpError::Malformed { .. }
        ));
        assert!(matches!(
            bad("v=0\r\nc=IN IP4 pbx.example.com\r\n"),
            SdpError::NotAnAddress { line: 2 }
        ));
        assert!(matches!(
            bad("v=0\r\nc=IN IP6 10.0.0.1\r\n"),
            SdpError::NotAnAddress { .. }
        ));
        assert_eq!(
            bad("v=0\r\nm=audio 4000 RTP/AVP 0\r\n"),
            SdpError::MissingConnection { index: 0 }
        );
        assert!(matches!(
            bad("v=0\r\no=a b\r\n"),
            SdpError::Malformed { .. }
        ));
        assert!(matches!(
            bad("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4 RTP/AVP 0\r\na=rtcp:x\r\n"),
            SdpError::Malformed { line: 4, .. }
        ));
        assert!(matches!(
            bad("v=0\r\njunk\r\n"),
            SdpError::Malformed { line: 2, .. }
        ));
        let many = format!(
            "v=0\r\nc=IN IP4 1.2.3.4\r\n{}",
            "m=audio 4 RTP/AVP 0\r\n".repeat(17)
        );
        assert_eq!(bad(&many), SdpError::TooManyMedia);
        assert!(matches!(
            Sdp::parse(&vec![b'a'; MAX_SDP_LEN + 1]),
            Err(SdpError::TooLarge(_))
        ));
    }

    #[test]
    fn never_panics_on_truncations_of_a_real_offer() {
        let src = OFFER.as_bytes();
        for n in 0..src.len() {
            if let Ok(sdp) = Sdp::parse(&src[..n]) {
                let _ = rw(&sdp, &[30000]);
            }
        }
        // And on arbitrary byte soup.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut buf = b"v=0\r\n".to_vec();
            for _ in 0..40 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push(b"c=IN IP46 0.:/\r\nmoa rtcp"[(x >> 16) as usize % 24]);
            }
            if let Ok(sdp) = Sdp::parse(&buf) {
                let _ = rw(&sdp, &[30000, 30002]);
            }
        }
    }

    #[test]
    fn origin_version_follows_sender_and_bumps_on_own_changes() {
        let mut tr = OriginTracker::default();
        let run = |tr: &mut OriginTracker, src: &str, port: u16| -> String {
            let sdp = Sdp::parse(src.as_bytes()).unwrap();
            let t = [Some(MediaTarget {
                rtp_port: port,
                rtcp_port: port + 1,
            })];
            let mut out = sdp.rewrite("203.0.113.5".parse().unwrap(), &t);
            tr.apply(&sdp, &mut out);
            let s = String::from_utf8(out.sdp).unwrap();
            s.lines()
                .nth(1)
                .unwrap()
                .split(' ')
                .nth(2)
                .unwrap()
                .to_owned()
        };
        assert_eq!(run(&mut tr, OFFER, 30000), "2890844526");
        // Identical re-offer (session refresh): same version.
        assert_eq!(run(&mut tr, OFFER, 30000), "2890844526");
        // Sender bumps by one with a change: we bump by one.
        let held = OFFER
            .replace("a=sendrecv", "a=sendonly")
            .replace("2890844526 IN", "2890844527 IN");
        assert_eq!(run(&mut tr, &held, 30000), "2890844527");
        // Our own change without a sender bump: +1 anyway.
        assert_eq!(run(&mut tr, &held, 30002), "2890844528");
        // Same again: stable.
        assert_eq!(run(&mut tr, &held, 30002), "2890844528");
        // Sender bumps by 2: we follow by 2.
        let h2 = held.replace("2890844527 IN", "2890844529 IN");
        assert_eq!(run(&mut tr, &h2, 30002), "2890844530");
        // A different origin session starts from its own number.
        let other = OFFER.replace("o=alice 2890844526", "o=bob 777");
        assert_eq!(run(&mut tr, &other, 30002), "2890844526");
    }
}
