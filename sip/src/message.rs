//! [`Message`]: a SIP message as received, indexed once.
//!
//! Parsing does three things and no more: it reads the start line, records one [`Header`]
//! entry per header (name, value span, whole-line span; folded continuation lines belong to
//! their header), and finds the body by Content-Length. It then validates what a proxy must
//! refuse before forwarding (RFC 3261 16.3 and the RFC 4475 torture cases): the mandatory
//! headers, single-valued headers given twice, scalar overflows, the CSeq method, and the top
//! Via. Everything else stays bytes until someone asks.
//!
//! What validation had to parse anyway and the proxy asks for on every message is kept (as
//! spans, so [`Message`] stays self-contained and cheap to clone): the top Via and, for
//! requests, the From and To tags. Parsing cost is measured and explained in sip/PERF.md.

use crate::addr::NameAddr;
use crate::scan::{self, eq_ic, is_token, parse_decimal, trim, CommaSplit};
use crate::uri::{Scheme, Uri};
use crate::via::Via;
use crate::Transport;
use bytes::Bytes;
use smallvec::SmallVec;
use std::ops::Range;

/// Byte range into the message buffer. u32 keeps [`Header`] small; messages are far below
/// 4 GiB (the transports cap them at the configured maximum size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }
    pub fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(self) -> bool {
        self.end == self.start
    }
}

/// SIP methods the proxy treats specially; the rest are carried by their text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 3261 7.1), so `invite` is an unknown method.
    pub fn from_bytes(b: &[u8]) -> Method {
        match b {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"INFO" => Method::Info,
            b"UPDATE" => Method::Update,
            b"PRACK" => Method::Prack,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"REFER" => Method::Refer,
            b"MESSAGE" => Method::Message,
            b"PUBLISH" => Method::Publish,
            _ => Method::Other,
        }
    }

    /// A label for metrics; unknown methods share one label to keep cardinality low.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other => "other",
        }
    }
}

/// Header names the SBC looks at, compact forms folded in (RFC 3261 7.3.3, IANA registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    ContentLength,
    ContentType,
    Contact,
    Route,
    RecordRoute,
    Path,
    Supported,
    Require,
    ProxyRequire,
    Unsupported,
    Expires,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    UserAgent,
    Server,
    Allow,
    Event,
    Subject,
    ReferTo,
    SessionExpires,
    ContentEncoding,
    Accept,
    RetryAfter,
    Other,
}

impl HeaderName {
    /// Classifies a header name, case-insensitively, compact forms included.
    ///
    /// Called for every header line of every message, so it dispatches on the length and the
    /// first letter to one candidate and compares once, a word at a time, instead of walking
    /// the whole name table (the linear walk was ~17% of the parse in the profile).
    pub fn from_bytes(n: &[u8]) -> HeaderName {
        use HeaderName as H;
        let Some(&first) = n.first() else {
            return H::Other;
        };
        // `| 0x20` lowercases letters; a non-letter that lands on a letter is caught by the
        // exact comparisons below.
        let f = first | 0x20;
        let (name, h): (&[u8], HeaderName) = match (n.len(), f) {
            (1, _) => {
                return match first.to_ascii_lowercase() {
                    b'v' => H::Via,
                    b'f' => H::From,
                    b't' => H::To,
                    b'i' => H::CallId,
                    b'm' => H::Contact,
                    b'l' => H::ContentLength,
                    b'c' => H::ContentType,
                    b'k' => H::Supported,
                    b's' => H::Subject,
                    b'o' => H::Event,
                    b'r' => H::ReferTo,
                    b'x' => H::SessionExpires,
                    b'e' => H::ContentEncoding,
                    _ => H::Other,
                };
            }
            (2, b't') => (b"to", H::To),
            (3, b'v') => (b"via", H::Via),
            (4, b'f') => (b"from", H::From),
            (4, b'c') => (b"cseq", H::CSeq),
            (4, b'p') => (b"path", H::Path),
            (5, b'r') => (b"route", H::Route),
            (5, b'a') => (b"allow", H::Allow),
            (5, b'e') => (b"event", H::Event),
            (6, b's') => (b"server", H::Server),
            (6, b'a') => (b"accept", H::Accept),
            (7, b'c') => {
                if n[1] | 0x20 == b'a' {
                    (b"call-id", H::CallId)
                } else {
                    (b"contact", H::Contact)
                }
            }
            (7, b'r') => (b"require", H::Require),
            (7, b'e') => (b"expires", H::Expires),
            (7, b's') => (b"subject", H::Subject),
            (8, b'r') => (b"refer-to", H::ReferTo),
            (9, b's') => (b"supported", H::Supported),
            (10, b'u') => (b"user-agent", H::UserAgent),
            (11, b'u') => (b"unsupported", H::Unsupported),
            (11, b'r') => (b"retry-after", H::RetryAfter),
            (12, b'm') => (b"max-forwards", H::MaxForwards),
            (12, b'c') => (b"content-type", H::ContentType),
            (12, b'r') => (b"record-route", H::RecordRoute),
            (13, b'p') => (b"proxy-require", H::ProxyRequire),
            (13, b'a') => (b"authorization", H::Authorization),
            (14, b'c') => (b"content-length", H::ContentLength),
            (15, b's') => (b"session-expires", H::SessionExpires),
            (16, b'w') => (b"www-authenticate", H::WwwAuthenticate),
            (16, b'c') => (b"content-encoding", H::ContentEncoding),
            (18, b'p') => (b"proxy-authenticate", H::ProxyAuthenticate),
            (19, b'p') => (b"proxy-authorization", H::ProxyAuthorization),
            _ => return H::Other,
        };
        if scan::eq_name(n, name) {
            h
        } else {
            H::Other
        }
    }

    /// Headers that may hold several comma-separated values (RFC 3261 7.3.1) and that the
    /// proxy edits value by value.
    pub fn is_list(self) -> bool {
        matches!(
            self,
            HeaderName::Via
                | HeaderName::Route
                | HeaderName::RecordRoute
                | HeaderName::Path
                | HeaderName::Contact
        )
    }
}

/// One header line (with its folded continuations).
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub name: HeaderName,
    pub name_span: Span,
    /// The value after the colon, leading whitespace skipped, trailing CR/LF excluded.
    pub value: Span,
    /// From the first byte of the name to just past the line's terminating LF.
    pub line: Span,
}

/// Why a message was refused; carries its SIP meaning in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty message")]
    Empty,
    #[error("malformed start line")]
    StartLine,
    #[error("unsupported SIP version")]
    Version,
    #[error("bad status code")]
    StatusCode,
    #[error("malformed header line")]
    HeaderLine,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("no end of headers")]
    Truncated,
    #[error("missing header: {0}")]
    Missing(&'static str),
    #[error("header given more than once: {0}")]
    Duplicate(&'static str),
    #[error("malformed {0}")]
    Bad(&'static str),
    #[error("Content-Length larger than the message")]
    ShortBody,
    #[error("too many Via headers")]
    TooManyVias,
    #[error("CSeq method does not match the request method")]
    CSeqMismatch,
}

impl ParseError {
    /// The status to answer a request with (responses are only ever dropped).
    pub fn sip_status(&self) -> u16 {
        match self {
            ParseError::Version => 505,
            _ => 400,
        }
    }

    /// A reason phrase that tells the sender what was wrong (RFC 3261 21.4.1 invites this).
    pub fn reason(&self) -> String {
        match self {
            ParseError::Version => "Version Not Supported".to_string(),
            other => format!("Bad Request ({other})"),
        }
    }

    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ParseError::Empty => "empty",
            ParseError::StartLine => "start_line",
            ParseError::Version => "version",
            ParseError::StatusCode => "status_code",
            ParseError::HeaderLine => "header_line",
            ParseError::TooManyHeaders => "too_many_headers",
            ParseError::Truncated => "truncated",
            ParseError::Missing(_) => "missing_header",
            ParseError::Duplicate(_) => "duplicate_header",
            ParseError::Bad(_) => "bad_header",
            ParseError::ShortBody => "content_length",
            ParseError::TooManyVias => "too_many_vias",
            ParseError::CSeqMismatch => "cseq_mismatch",
        }
    }
}

/// Limits applied while indexing; they bound the work one datagram can cause.
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    pub max_headers: usize,
    pub max_vias: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_headers: 128,
            // RFC 4475 "longreq" carries 34 Vias and must be accepted.
            max_vias: 70,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum StartLine {
    Request {
        method: Method,
        method_span: Span,
        uri: Span,
    },
    Response {
        status: u16,
        reason: Span,
    },
}

/// The top Via as spans into the message, kept from validation.
///
/// Validation must parse the top Via anyway (a request with a bad one is refused), and the
/// proxy then reads it for every request and response it handles (branch for matching,
/// sent-by and rport for NAT). Keeping the parse as spans turns [`Message::top_via`] into a
/// few loads instead of a second comma split and parse of the same bytes.
#[derive(Clone, Copy, Debug, Default)]
struct ViaSpans {
    raw: Span,
    transport_raw: Span,
    transport: Option<Transport>,
    host: Span,
    port: Option<u16>,
    params: Span,
    branch: Option<Span>,
    received: Option<Span>,
    rport: Option<Option<u16>>,
    rport_raw: Option<Span>,
}

/// A received message and its index. Cheap to clone (the buffer is shared).
#[derive(Clone, Debug)]
pub struct Message {
    buf: Bytes,
    start: StartLine,
    headers: SmallVec<[Header; 20]>,
    /// Offset of the blank line ending the headers: where new headers can be appended.
    headers_end: u32,
    body: Span,
    cseq: u32,
    cseq_method: Method,
    cseq_method_span: Span,
    max_forwards: Option<u8>,
    top_via: ViaSpans,
    /// From and To tags of a request, found while validating its From and To (responses do
    /// not have them validated, so their tags are looked up on demand).
    tags: Option<[Option<Span>; 2]>,
    /// The Request-URI's scheme, from its parse in validation (the proxy checks it for 416);
    /// `None` for a response.
    ruri_scheme: Option<Scheme>,
}

impl Message {
    /// Parses and validates with default limits.
    pub fn parse(buf: Bytes) -> Result<Message, ParseError> {
        Self::parse_with(buf, &ParseLimits::default())
    }

    /// Parses and validates. For datagrams, bytes past Content-Length are ignored (RFC 3261
    /// 18.3; RFC 4475 "dblreq"); a Content-Length beyond the datagram is an error ("clerr").
    /// Headers that end the datagram without a blank line are accepted, and the message then
    /// holds a copy with the blank line added, so that what is spliced from it stays framed.
    pub fn parse_with(buf: Bytes, limits: &ParseLimits) -> Result<Message, ParseError> {
        // The header index is built in place: the inline SmallVec is ~560 bytes, and building
        // it elsewhere and moving it in cost two extra copies per parse.
        let mut m = Message {
            start: StartLine::Response {
                status: 0,
                reason: Span::default(),
            },
            headers: SmallVec::new(),
            headers_end: 0,
            body: Span::default(),
            cseq: 0,
            cseq_method: Method::Other,
            cseq_method_span: Span::default(),
            max_forwards: None,
            top_via: ViaSpans::default(),
            tags: None,
            ruri_scheme: None,
            buf,
        };
        let mut info = index_into(&m.buf, limits, &mut m.headers)?;
        if info.headers_end == m.buf.len() {
            // No blank line ends the headers (tolerated on datagrams: RFC 5118's archive and
            // RFC 4475 "baddn" lack it). Everything built from this message by splicing would
            // lack it too: a header added at the end would be glued to an unterminated last
            // line, and a forwarded copy sent over TCP would swallow the next message on the
            // stream as its own headers. So such a message is re-based, once, on a copy that
            // ends its headers properly; well-formed messages never take this path.
            let mut fixed = Vec::with_capacity(m.buf.len() + 4);
            fixed.extend_from_slice(&m.buf);
            if !fixed.ends_with(b"\n") {
                fixed.extend_from_slice(b"\r\n");
            }
            fixed.extend_from_slice(b"\r\n");
            m.buf = Bytes::from(fixed);
            m.headers.clear();
            info = index_into(&m.buf, limits, &mut m.headers)?;
        }
        m.start = info.start.ok_or(info.start_err)?;
        m.headers_end = info.headers_end as u32;
        m.validate(info.body_start, limits)?;
        Ok(m)
    }

    /// What a proxy must refuse before forwarding. One pass over the header index collects
    /// the headers validation looks at; the checks then run in a fixed order, so a message
    /// with several faults always reports the same one.
    fn validate(&mut self, body_start: usize, limits: &ParseLimits) -> Result<(), ParseError> {
        let buf: &[u8] = &self.buf;
        // How many From, To, Call-ID, CSeq, Max-Forwards and Content-Length headers there
        // are, and the value of the first of each (what `header_value` would return).
        let mut counts = [0u8; 6];
        let mut first = [Span::default(); 6];
        let mut expires: Option<Span> = None;
        let mut content_length: Option<u64> = None;
        let mut vias = 0usize;
        let mut first_via: Option<Span> = None;
        for h in &self.headers {
            let slot = match h.name {
                HeaderName::From => 0,
                HeaderName::To => 1,
                HeaderName::CallId => 2,
                HeaderName::CSeq => 3,
                HeaderName::MaxForwards => 4,
                HeaderName::ContentLength => 5,
                HeaderName::Via => {
                    if first_via.is_none() {
                        first_via = Some(h.value);
                    }
                    vias += 1;
                    if vias > limits.max_vias {
                        return Err(ParseError::TooManyVias);
                    }
                    continue;
                }
                HeaderName::Expires => {
                    if expires.is_none() {
                        expires = Some(h.value);
                    }
                    continue;
                }
                _ => continue,
            };
            if counts[slot] == 0 {
                first[slot] = h.value;
            }
            counts[slot] = counts[slot].saturating_add(1);
            if slot == 5 {
                let v = parse_decimal(trim(&buf[h.value.range()]), u32::MAX as u64)
                    .ok_or(ParseError::Bad("Content-Length"))?;
                if content_length.is_some_and(|c| c != v) {
                    return Err(ParseError::Duplicate("Content-Length"));
                }
                content_length = Some(v);
            }
        }
        const NAMES: [&str; 6] = [
            "From",
            "To",
            "Call-ID",
            "CSeq",
            "Max-Forwards",
            "Content-Length",
        ];
        for (i, name) in NAMES.iter().enumerate().take(5) {
            if counts[i] > 1 {
                return Err(ParseError::Duplicate(name));
            }
        }
        let first_via = first_via.ok_or(ParseError::Missing("Via"))?;
        for (i, name) in NAMES.iter().enumerate().take(4) {
            if counts[i] == 0 {
                return Err(ParseError::Missing(name));
            }
        }
        let span_of = |sub: &[u8]| span_in(buf, sub);
        // Body.
        let avail = buf.len().saturating_sub(body_start);
        let body_len = match content_length {
            Some(cl) => {
                let cl = cl as usize;
                if cl > avail {
                    return Err(ParseError::ShortBody);
                }
                cl
            }
            None => avail,
        };
        let body = Span::new(body_start, body_start + body_len);
        // CSeq.
        let (num, method) = split_cseq(&buf[first[3].range()]).ok_or(ParseError::Bad("CSeq"))?;
        let (cseq_method, mspan) = (Method::from_bytes(method), span_of(method));
        // Call-ID must be non-empty.
        if trim(&buf[first[2].range()]).is_empty() {
            return Err(ParseError::Bad("Call-ID"));
        }
        // Top Via.
        let top = first_via_value(&buf[first_via.range()]).ok_or(ParseError::Bad("Via"))?;
        let via = Via::parse(top).map_err(|_| ParseError::Bad("Via"))?;
        let top_via = ViaSpans {
            raw: span_of(via.raw),
            transport_raw: span_of(via.transport_raw),
            transport: via.transport,
            host: span_of(via.host),
            port: via.port,
            params: span_of(via.params),
            branch: via.branch.map(span_of),
            received: via.received.map(span_of),
            rport: via.rport,
            rport_raw: via.rport_raw.map(span_of),
        };
        let mut max_forwards = None;
        let mut tags = None;
        let mut ruri_scheme = None;
        match self.start {
            StartLine::Request {
                method_span, uri, ..
            } => {
                if buf[method_span.range()] != buf[mspan.range()] {
                    return Err(ParseError::CSeqMismatch);
                }
                if counts[4] > 0 {
                    let mf = &buf[first[4].range()];
                    let v = parse_decimal(trim(mf), 255).ok_or(ParseError::Bad("Max-Forwards"))?;
                    max_forwards = Some(v as u8);
                }
                if let Some(e) = expires {
                    parse_decimal(trim(&buf[e.range()]), u32::MAX as u64)
                        .ok_or(ParseError::Bad("Expires"))?;
                }
                let ruri =
                    Uri::parse(&buf[uri.range()]).map_err(|_| ParseError::Bad("Request-URI"))?;
                if ruri.is_sip() && ruri.headers.is_some() {
                    // RFC 4475 "escruri": headers are not allowed in a Request-URI.
                    return Err(ParseError::Bad("Request-URI"));
                }
                let (_, from_tag) = NameAddr::parse_with_tag(&buf[first[0].range()])
                    .map_err(|_| ParseError::Bad("From"))?;
                let (_, to_tag) = NameAddr::parse_with_tag(&buf[first[1].range()])
                    .map_err(|_| ParseError::Bad("To"))?;
                tags = Some([from_tag.map(span_of), to_tag.map(span_of)]);
                ruri_scheme = Some(ruri.scheme);
            }
            StartLine::Response { .. } => {}
        }
        self.body = body;
        self.cseq = num;
        self.cseq_method = cseq_method;
        self.cseq_method_span = mspan;
        self.top_via = top_via;
        self.max_forwards = max_forwards;
        self.tags = tags;
        self.ruri_scheme = ruri_scheme;
        Ok(())
    }

    pub fn buf(&self) -> &Bytes {
        &self.buf
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    pub fn start(&self) -> &StartLine {
        &self.start
    }
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }
    pub fn method(&self) -> Option<Method> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }
    /// The method text as written (for unknown methods).
    pub fn method_bytes(&self) -> &[u8] {
        match self.start {
            StartLine::Request { method_span, .. } => &self.buf[method_span.range()],
            StartLine::Response { .. } => &self.buf[self.cseq_method_span.range()],
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status, .. } => Some(status),
            StartLine::Request { .. } => None,
        }
    }
    pub fn reason_bytes(&self) -> &[u8] {
        match self.start {
            StartLine::Response { reason, .. } => &self.buf[reason.range()],
            StartLine::Request { .. } => b"",
        }
    }
    pub fn uri_span(&self) -> Option<Span> {
        match self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }
    pub fn uri_bytes(&self) -> &[u8] {
        self.uri_span().map_or(&b""[..], |s| &self.buf[s.range()])
    }
    /// The Request-URI (validated at parse time, so this only fails for responses).
    pub fn uri(&self) -> Option<Uri<'_>> {
        Uri::parse(self.uri_bytes()).ok()
    }
    pub fn cseq(&self) -> u32 {
        self.cseq
    }
    pub fn cseq_method(&self) -> Method {
        self.cseq_method
    }
    pub fn cseq_method_bytes(&self) -> &[u8] {
        &self.buf[self.cseq_method_span.range()]
    }
    pub fn max_forwards(&self) -> Option<u8> {
        self.max_forwards
    }
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }
    pub fn headers_end(&self) -> usize {
        self.headers_end as usize
    }
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.range()]
    }
    pub fn body_span(&self) -> Span {
        self.body
    }
    /// Bytes of a span of this message.
    pub fn slice(&self, s: Span) -> &[u8] {
        &self.buf[s.range()]
    }
    /// The span of a sub-slice of this message's buffer (from a typed view).
    pub fn span_of(&self, sub: &[u8]) -> Span {
        span_in(&self.buf, sub)
    }

    pub fn header(&self, name: HeaderName) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }
    /// The raw value of the first header of that name.
    pub fn header_value(&self, name: HeaderName) -> Option<&[u8]> {
        self.header(name).map(|h| &self.buf[h.value.range()])
    }
    /// The raw value of the first header with that (unknown) name, case-insensitive.
    pub fn header_value_by_name(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| eq_ic(&self.buf[h.name_span.range()], name))
            .map(|h| &self.buf[h.value.range()])
    }
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &Header> {
        self.headers.iter().filter(move |h| h.name == name)
    }
    /// Every comma-separated value of every header of that name, in order, trimmed; each with
    /// the header it came from. Malformed lists yield nothing past the error.
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = (&Header, &[u8])> {
        self.headers_named(name).flat_map(move |h| {
            CommaSplit::new(&self.buf[h.value.range()])
                .map_while(|r| r.ok())
                .map(trim)
                .filter(|v| !v.is_empty())
                .map(move |v| (h, v))
        })
    }

    pub fn call_id(&self) -> &[u8] {
        trim(self.header_value(HeaderName::CallId).unwrap_or(b""))
    }
    /// The topmost Via (validated at parse time, and kept parsed: this costs no parse).
    pub fn top_via(&self) -> Option<Via<'_>> {
        let v = &self.top_via;
        let s = |span: Span| &self.buf[span.range()];
        Some(Via {
            raw: s(v.raw),
            transport_raw: s(v.transport_raw),
            transport: v.transport,
            host: s(v.host),
            port: v.port,
            params: s(v.params),
            branch: v.branch.map(s),
            received: v.received.map(s),
            rport: v.rport,
            rport_raw: v.rport_raw.map(s),
        })
    }
    /// All Via values, topmost first.
    pub fn via_count(&self) -> usize {
        self.values(HeaderName::Via).count()
    }
    pub fn from(&self) -> Option<NameAddr<'_>> {
        NameAddr::parse(self.header_value(HeaderName::From)?).ok()
    }
    pub fn to(&self) -> Option<NameAddr<'_>> {
        NameAddr::parse(self.header_value(HeaderName::To)?).ok()
    }
    /// The From tag; for requests it was found at validation, so this costs no parse.
    pub fn from_tag(&self) -> Option<&[u8]> {
        if let Some(tags) = &self.tags {
            return tags[0].map(|t| &self.buf[t.range()]);
        }
        NameAddr::parse_with_tag(self.header_value(HeaderName::From)?)
            .ok()?
            .1
    }
    /// The To tag (the proxy asks for every request, to tell dialog-creating ones apart).
    pub fn to_tag(&self) -> Option<&[u8]> {
        if let Some(tags) = &self.tags {
            return tags[1].map(|t| &self.buf[t.range()]);
        }
        NameAddr::parse_with_tag(self.header_value(HeaderName::To)?)
            .ok()?
            .1
    }
    /// The first Route value, parsed.
    pub fn first_route(&self) -> Option<(&Header, NameAddr<'_>)> {
        let (h, v) = self.values(HeaderName::Route).next()?;
        Some((h, NameAddr::parse(v).ok()?))
    }
    pub fn has_body(&self) -> bool {
        !self.body.is_empty()
    }
    /// Request-URI scheme, for the 416 check.
    pub fn uri_scheme(&self) -> Option<Scheme> {
        self.ruri_scheme
    }
}

/// The span of `sub` within `buf`, clamped to it (sub-slices of typed views always lie inside).
fn span_in(buf: &[u8], sub: &[u8]) -> Span {
    let base = buf.as_ptr() as usize;
    let p = sub.as_ptr() as usize;
    let start = p.saturating_sub(base).min(buf.len());
    Span::new(start, (start + sub.len()).min(buf.len()))
}

/// The first via-parm of a Via header value.
fn first_via_value(v: &[u8]) -> Option<&[u8]> {
    let first = CommaSplit::new(v).next()?.ok()?;
    let t = trim(first);
    if t.is_empty() {
        None
    } else {
        Some(t)
    }
}

fn split_cseq(v: &[u8]) -> Option<(u32, &[u8])> {
    let v = trim(v);
    let mut i = 0;
    while i < v.len() && v[i].is_ascii_digit() {
        i += 1;
    }
    // RFC 3261 8.1.1.5: the sequence number must be less than 2**31.
    let num = parse_decimal(&v[..i], (1u64 << 31) - 1)? as u32;
    let method = trim(&v[i..]);
    if i == 0
        || i == v.len()
        || !scan::is_lws(v[i])
        || method.is_empty()
        || !method.iter().all(|&b| is_token(b))
    {
        return None;
    }
    Some((num, method))
}

/// The header lines of a message that may not validate: what is needed to answer an
/// unparseable request, and what tools look at.
pub(crate) struct RawIndex {
    pub headers: SmallVec<[Header; 20]>,
}

/// Splits the start line and the header lines. Fails only when no header section can be
/// found at all; a bad start line is reported in `start_err` so that a 400 can still be
/// built from the headers.
pub(crate) fn index(buf: &[u8], limits: &ParseLimits) -> Result<RawIndex, ParseError> {
    let mut headers = SmallVec::new();
    index_into(buf, limits, &mut headers)?;
    Ok(RawIndex { headers })
}

/// [`RawIndex`] without the headers, which [`index_into`] writes where the caller keeps them.
struct IndexInfo {
    start: Option<StartLine>,
    start_err: ParseError,
    headers_end: usize,
    body_start: usize,
}

fn index_into(
    buf: &[u8],
    limits: &ParseLimits,
    headers: &mut SmallVec<[Header; 20]>,
) -> Result<IndexInfo, ParseError> {
    // RFC 3261 7.5: ignore CRLFs before the start line.
    let mut pos = 0;
    while pos < buf.len() && (buf[pos] == b'\r' || buf[pos] == b'\n') {
        pos += 1;
    }
    if pos == buf.len() {
        return Err(ParseError::Empty);
    }
    let nl = scan::find_lf(buf, pos).ok_or(ParseError::Truncated)?;
    let line_end = if nl > pos && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let (start, start_err) = match parse_start_line(buf, pos, line_end) {
        Ok(s) => (Some(s), ParseError::StartLine),
        Err(e) => (None, e),
    };
    pos = nl + 1;
    // Where a line that starts at `from` and whose content scan reached `i` ends: (end of
    // content, CR excluded; start of the next line). Lines may end in CRLF or a bare LF; the
    // last one may have no terminator at all.
    let line_bounds = |from: usize, i: usize| -> (usize, usize) {
        match scan::find_lf(buf, i) {
            Some(n) if n > from && buf[n - 1] == b'\r' => (n - 1, n + 1),
            Some(n) => (n, n + 1),
            None => (buf.len(), buf.len()),
        }
    };
    loop {
        if pos >= buf.len() {
            // No blank line: tolerated only when the headers simply end the datagram (the
            // RFC 5118 archive and RFC 4475 "baddn" lack a final CRLF).
            return Ok(IndexInfo {
                start,
                start_err,
                headers_end: buf.len(),
                body_start: buf.len(),
            });
        }
        let first = buf[pos];
        // The blank line ending the headers: LF or CRLF.
        let blank = match first {
            b'\n' => Some(pos + 1),
            b'\r' if buf.get(pos + 1) == Some(&b'\n') => Some(pos + 2),
            _ => None,
        };
        if let Some(next) = blank {
            return Ok(IndexInfo {
                start,
                start_err,
                headers_end: pos,
                body_start: next,
            });
        }
        if first == b' ' || first == b'\t' {
            // Folded continuation of the previous header.
            let (end, next) = line_bounds(pos, pos);
            let h = headers.last_mut().ok_or(ParseError::HeaderLine)?;
            if h.value.is_empty() {
                // The value begins on the folded line ("TO :\r\n sip:...").
                let mut s = pos;
                while s < end && (buf[s] == b' ' || buf[s] == b'\t') {
                    s += 1;
                }
                h.value.start = s as u32;
            }
            h.value.end = end as u32;
            h.line.end = next as u32;
            pos = next;
            continue;
        }
        // The name and the colon are scanned before the line end is known: neither a token
        // nor SP/HT can be CR or LF, so these scans cannot run past the line, and the value is
        // then the only part searched for its end.
        //
        // The name is the longest run of token bytes. Fast path: take the bytes up to the
        // first ':' or blank/control byte; if they are a known name they are all letters and
        // '-', hence that very run. Otherwise scan token by token.
        let fast = scan::name_end(buf, pos).and_then(|e| {
            let name = HeaderName::from_bytes(&buf[pos..e]);
            (e > pos && name != HeaderName::Other).then_some((e, name))
        });
        let (mut i, name) = match fast {
            Some(found) => found,
            None => {
                let e = scan::skip_class(buf, pos, scan::TOKEN);
                (e, HeaderName::from_bytes(&buf[pos..e]))
            }
        };
        if i == pos {
            return Err(ParseError::HeaderLine);
        }
        let name_span = Span::new(pos, i);
        while i < buf.len() && (buf[i] == b' ' || buf[i] == b'\t') {
            i += 1;
        }
        if i >= buf.len() || buf[i] != b':' {
            return Err(ParseError::HeaderLine);
        }
        i += 1;
        while i < buf.len() && (buf[i] == b' ' || buf[i] == b'\t') {
            i += 1;
        }
        let (end, next) = line_bounds(pos, i);
        if headers.len() >= limits.max_headers {
            return Err(ParseError::TooManyHeaders);
        }
        headers.push(Header {
            name,
            name_span,
            value: Span::new(i, end),
            line: Span::new(pos, next),
        });
        pos = next;
    }
}

fn parse_start_line(buf: &[u8], start: usize, end: usize) -> Result<StartLine, ParseError> {
    let line = &buf[start..end];
    if line.len() >= 4 && &line[..4] == b"SIP/" {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let sp = memchr::memchr(b' ', line).ok_or(ParseError::StartLine)?;
        if &line[..sp] != b"SIP/2.0" {
            return Err(ParseError::Version);
        }
        let rest = &line[sp + 1..];
        let code_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        let code = &rest[..code_end];
        if code.len() != 3 {
            return Err(ParseError::StatusCode);
        }
        let status = parse_decimal(code, 699).ok_or(ParseError::StatusCode)? as u16;
        if status < 100 {
            return Err(ParseError::StatusCode);
        }
        let reason_start = start + sp + 1 + (code_end + 1).min(rest.len());
        Ok(StartLine::Response {
            status,
            reason: Span::new(reason_start, end),
        })
    } else {
        // Request-Line = Method SP Request-URI SP SIP-Version; exactly single spaces
        // (RFC 4475 "lwsstart"), tolerating trailing whitespace ("trws").
        let mut t = line.len();
        while t > 0 && (line[t - 1] == b' ' || line[t - 1] == b'\t') {
            t -= 1;
        }
        let line = &line[..t];
        let sp1 = memchr::memchr(b' ', line).ok_or(ParseError::StartLine)?;
        let sp2 = memchr::memrchr(b' ', line).ok_or(ParseError::StartLine)?;
        if sp2 <= sp1 + 1 {
            return Err(ParseError::StartLine);
        }
        let method = &line[..sp1];
        let uri = &line[sp1 + 1..sp2];
        let version = &line[sp2 + 1..];
        if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
            return Err(ParseError::StartLine);
        }
        // A branch-free fold (vectorised) rather than `any`: Request-URIs run to 30-60 bytes.
        let blank = uri
            .iter()
            .fold(false, |acc, &b| acc | (b == b' ') | (b == b'\t'));
        if uri.is_empty() || blank || uri[0] == b'<' {
            return Err(ParseError::StartLine);
        }
        if version.len() < 4 || !version[..4].eq_ignore_ascii_case(b"SIP/") {
            return Err(ParseError::StartLine);
        }
        if version != b"SIP/2.0" {
            return Err(ParseError::Version);
        }
        Ok(StartLine::Request {
            method: Method::from_bytes(method),
            method_span: Span::new(start, start + sp1),
            uri: Span::new(start + sp1 + 1, start + sp2),
        })
    }
}

/// Pulls the fields needed to answer a request out of bytes that failed to parse: whether it
/// is a request, and the raw header lines Via/From/To/Call-ID/CSeq. `None` when there is
/// nothing to answer (a response, or no usable Via).
pub(crate) fn answerable(buf: &[u8]) -> Option<(RawIndex, bool)> {
    let limits = ParseLimits {
        max_headers: 256,
        max_vias: 256,
    };
    let raw = index(buf, &limits).ok()?;
    let mut p = 0;
    while p < buf.len() && (buf[p] == b'\r' || buf[p] == b'\n') {
        p += 1;
    }
    let is_response = buf[p..].starts_with(b"SIP/");
    if is_response {
        return None;
    }
    // Answer whenever there is a Via to send the response by, even an unparseable one
    // (RFC 4475 "badinv01", "insuf": a 400 where possible); the transport sends it back over
    // the flow the request came from anyway.
    raw.headers.iter().find(|h| h.name == HeaderName::Via)?;
    Some((raw, true))
}
