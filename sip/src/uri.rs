//! A borrowed view of a URI (RFC 3261 19.1, RFC 3966 for `tel:`), parsed on demand.
//!
//! The proxy needs a URI's host, port, transport and a few parameters (`lr`, `ob`, the user
//! part carrying a flow token), never a rebuilt URI, so this view only slices the original
//! bytes. Escapes are left in place; comparisons that must see through them use
//! [`unescape_eq`].
//!
//! Every request's Request-URI and the URIs in its From and To are parsed at validation, so
//! this runs three times per request. URIs are short (20-40 bytes): a sip: URI is split in one
//! pass (`parse_sip`), the remaining searches avoid `memchr::memchr`'s per-call dispatch
//! (`scan::find_byte`), and character checks are branch-free folds over a class table.

use crate::scan::{
    self, all_class, eq_ic, eq_lower, find_byte, parse_decimal, CTL, HOST, SCHEME, V6,
};
use crate::Transport;
use std::net::IpAddr;

/// The URI schemes a proxy routes on; anything else is kept as text (RFC 4475 "novelsc").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UriError {
    Empty,
    NoScheme,
    BadHost,
    BadPort,
    BadParam,
}

/// A parsed URI borrowing the message bytes.
#[derive(Clone, Debug)]
pub struct Uri<'a> {
    pub raw: &'a [u8],
    pub scheme: Scheme,
    /// The scheme token as written (for `Other`).
    pub scheme_raw: &'a [u8],
    /// sip/sips: the user part (without password); tel: the number.
    pub user: Option<&'a [u8]>,
    /// sip/sips: host as written, IPv6 with its brackets. Empty for tel/other.
    pub host: &'a [u8],
    pub port: Option<u16>,
    /// `;name[=value]` parameters after `host[:port]` (sip/sips) or after the number (tel).
    pub params: &'a [u8],
    /// `?headers` part, if any.
    pub headers: Option<&'a [u8]>,
}

impl<'a> Uri<'a> {
    /// Parses a URI as found in a Request-URI or inside `<...>`. LWS must already be trimmed.
    pub fn parse(raw: &'a [u8]) -> Result<Uri<'a>, UriError> {
        if raw.is_empty() {
            return Err(UriError::Empty);
        }
        let colon = find_byte(raw, b':').ok_or(UriError::NoScheme)?;
        let scheme_raw = &raw[..colon];
        if scheme_raw.is_empty()
            || !scheme_raw[0].is_ascii_alphabetic()
            || !all_class(scheme_raw, SCHEME)
        {
            return Err(UriError::NoScheme);
        }
        let rest = &raw[colon + 1..];
        let scheme = if eq_lower(scheme_raw, b"sip") {
            Scheme::Sip
        } else if eq_lower(scheme_raw, b"sips") {
            Scheme::Sips
        } else if eq_lower(scheme_raw, b"tel") {
            Scheme::Tel
        } else {
            Scheme::Other
        };
        let mut uri = Uri {
            raw,
            scheme,
            scheme_raw,
            user: None,
            host: b"",
            port: None,
            params: b"",
            headers: None,
        };
        let ctl = match scheme {
            // The scheme is validated above and holds no control character, so `rest` is
            // all that can.
            Scheme::Sip | Scheme::Sips => parse_sip(rest, &mut uri)?,
            Scheme::Tel => {
                let (num, params) = match find_byte(rest, b';') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, &rest[rest.len()..]),
                };
                if num.is_empty() {
                    return Err(UriError::BadHost);
                }
                uri.user = Some(num);
                uri.params = params;
                has_ctl(raw)
            }
            Scheme::Other => {
                if rest.is_empty() {
                    return Err(UriError::Empty);
                }
                has_ctl(raw)
            }
        };
        // Checked last so that a URI with several faults reports the same one as always.
        if ctl {
            return Err(UriError::BadHost);
        }
        Ok(uri)
    }

    pub fn is_sip(&self) -> bool {
        matches!(self.scheme, Scheme::Sip | Scheme::Sips)
    }

    /// Host without IPv6 brackets.
    pub fn host_unbracketed(&self) -> &'a [u8] {
        unbracket(self.host)
    }

    /// The host as an IP address, if it is one (tolerating RFC 5118 4.10's three colons).
    pub fn host_ip(&self) -> Option<IpAddr> {
        parse_ip(self.host_unbracketed())
    }

    /// Looks a parameter up by name (case-insensitive). `Some(None)` for a flag like `lr`.
    pub fn param(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        find_param(self.params, name)
    }

    /// The `transport=` parameter, UDP when absent (RFC 3263 defaults for sip:), TLS for sips:.
    pub fn transport(&self) -> Option<Transport> {
        match self.param(b"transport") {
            Some(Some(t)) => Transport::from_token(t),
            _ if self.scheme == Scheme::Sips => Some(Transport::Tls),
            _ => Some(Transport::Udp),
        }
    }

    /// Port, or the scheme default for the transport.
    pub fn port_or_default(&self) -> u16 {
        // Lazily: finding the transport parameter scans the parameters.
        self.port.unwrap_or_else(|| match self.transport() {
            Some(Transport::Tls) => 5061,
            _ => 5060,
        })
    }
}

/// Splits the part of a sip:/sips: URI after the scheme, in one pass over the bytes.
///
/// It finds what the step-by-step definition finds (the first '@'; after it, the first '?',
/// then ';' and ':' before that), visiting each byte once instead of once per search (five
/// searches before), and notes control characters on the way. sip/tests/differential.rs
/// checks it against the step-by-step version, exhaustively over short URIs.
///
/// Returns whether `rest` holds a control character or space, which the caller reports after
/// every other fault, as before. Bracketed IPv6 hosts, rare and with their own rules, go
/// through the step-by-step code.
fn parse_sip<'a>(rest: &'a [u8], uri: &mut Uri<'a>) -> Result<bool, UriError> {
    let n = rest.len();
    let mut at: Option<usize> = None;
    let mut user_colon: Option<usize> = None;
    // First '?', ';' and ':' after the '@' (or from the start while none has been seen);
    // `n` when absent.
    let (mut q, mut semi, mut colon) = (n, n, n);
    let mut ctl = false;
    let mut i = 0;
    loop {
        i = scan::find_class(rest, i, scan::URI_DELIM);
        if i >= n {
            break;
        }
        match rest[i] {
            b'@' if at.is_none() => {
                // userinfo cannot hold an unescaped '@' (and the headers part cannot either),
                // so the first '@' ends it even when the user part contains ';' or '?'
                // (RFC 4475 "semiuri", "intmeth").
                at = Some(i);
                user_colon = (colon < i).then_some(colon);
                (q, semi, colon) = (n, n, n);
            }
            b'?' => q = q.min(i),
            b';' => semi = semi.min(i),
            b':' => colon = colon.min(i),
            _ => ctl |= scan::class(rest[i]) & scan::CTL != 0,
        }
        i += 1;
    }
    let host_start = match at {
        Some(a) => {
            uri.user = Some(&rest[..user_colon.unwrap_or(a)]);
            a + 1
        }
        None => 0,
    };
    uri.headers = (q < n).then(|| &rest[q + 1..]);
    if rest.get(host_start) == Some(&b'[') {
        let (hostport, params) = split_hostport_params(&rest[host_start..q])?;
        let (host, port) = split_host_port(hostport)?;
        uri.host = host;
        uri.port = port;
        uri.params = params;
    } else {
        // host[:port] ends at the first ';' of the host part, the port at its first ':'.
        let semi = semi.min(q);
        if semi == host_start {
            return Err(UriError::BadHost);
        }
        let (host, port_raw) = if colon < semi {
            (&rest[host_start..colon], Some(&rest[colon + 1..semi]))
        } else {
            (&rest[host_start..semi], None)
        };
        if host.is_empty() || !all_class(host, HOST) {
            return Err(UriError::BadHost);
        }
        uri.host = host;
        uri.port = match port_raw {
            None => None,
            Some(p) => Some(parse_decimal(p, 65535).ok_or(UriError::BadPort)? as u16),
        };
        uri.params = &rest[semi..q];
    }
    if !uri.params.is_empty() {
        validate_params(uri.params)?;
    }
    Ok(ctl)
}

/// Whether `s` holds a byte no URI may contain: a control character, space or DEL.
fn has_ctl(s: &[u8]) -> bool {
    s.iter().fold(0, |acc, &b| acc | scan::class(b)) & CTL != 0
}

/// Splits `host[:port];params` where an IPv6 reference may contain ':' and ';' never occurs
/// inside the host.
fn split_hostport_params(s: &[u8]) -> Result<(&[u8], &[u8]), UriError> {
    let search_from = if s.first() == Some(&b'[') {
        find_byte(s, b']').ok_or(UriError::BadHost)?
    } else {
        0
    };
    match find_byte(&s[search_from..], b';') {
        Some(i) => Ok((&s[..search_from + i], &s[search_from + i..])),
        None => Ok((s, &s[s.len()..])),
    }
}

/// Splits `host[:port]`, validating both. Used for URIs and Via sent-by.
pub(crate) fn split_host_port(s: &[u8]) -> Result<(&[u8], Option<u16>), UriError> {
    if s.is_empty() {
        return Err(UriError::BadHost);
    }
    let (host, port_raw) = if s[0] == b'[' {
        let close = find_byte(s, b']').ok_or(UriError::BadHost)?;
        let host = &s[..=close];
        let inner = &host[1..host.len() - 1];
        if inner.is_empty() || !all_class(inner, V6) {
            return Err(UriError::BadHost);
        }
        let after = &s[close + 1..];
        match after.first() {
            None => (host, None),
            Some(b':') => (host, Some(&after[1..])),
            Some(_) => return Err(UriError::BadHost),
        }
    } else {
        match find_byte(s, b':') {
            Some(c) => (&s[..c], Some(&s[c + 1..])),
            None => (s, None),
        }
    };
    if host.is_empty() || (host[0] != b'[' && !all_class(host, HOST)) {
        return Err(UriError::BadHost);
    }
    let port = match port_raw {
        None => None,
        Some(p) => {
            let v = parse_decimal(p, 65535).ok_or(UriError::BadPort)?;
            Some(v as u16)
        }
    };
    Ok((host, port))
}

fn validate_params(params: &[u8]) -> Result<(), UriError> {
    // params starts with ';'. Each must have a non-empty name: the byte after every ';'
    // exists and is neither another ';' nor the '=' of a nameless value.
    let mut i = 0;
    while let Some(k) = find_byte(&params[i..], b';') {
        i += k + 1;
        if matches!(params.get(i), None | Some(b';') | Some(b'=')) {
            return Err(UriError::BadParam);
        }
    }
    Ok(())
}

/// Finds `name` in a `;a=b;c` parameter list (leading ';' optional, LWS around names and
/// values tolerated as in header parameters).
pub fn find_param<'a>(params: &'a [u8], name: &[u8]) -> Option<Option<&'a [u8]>> {
    for p in params.split(|&b| b == b';') {
        let eq = find_byte(p, b'=');
        let n = crate::scan::trim(&p[..eq.unwrap_or(p.len())]);
        // The value is only trimmed for the parameter asked for.
        if !n.is_empty() && eq_ic(n, name) {
            return Some(eq.map(|i| crate::scan::trim(&p[i + 1..])));
        }
    }
    None
}

/// Strips `[` `]` around an IPv6 reference.
pub fn unbracket(h: &[u8]) -> &[u8] {
    if h.len() >= 2 && h[0] == b'[' && h[h.len() - 1] == b']' {
        &h[1..h.len() - 1]
    } else {
        h
    }
}

/// Parses an IP address, tolerating the `:::` of the RFC 3261 ABNF bug (RFC 5118 4.10).
pub fn parse_ip(s: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(unbracket(s)).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if text.contains(":::") {
        return text.replacen(":::", "::", 1).parse().ok();
    }
    None
}

/// Compares two URI components, decoding `%XX` escapes on both sides (RFC 3261 19.1.4) and
/// ignoring ASCII case when `ignore_case`.
pub fn unescape_eq(a: &[u8], b: &[u8], ignore_case: bool) -> bool {
    let mut ia = Unescape { s: a, i: 0 };
    let mut ib = Unescape { s: b, i: 0 };
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) => {
                let eq = if ignore_case {
                    x.eq_ignore_ascii_case(&y)
                } else {
                    x == y
                };
                if !eq {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

struct Unescape<'a> {
    s: &'a [u8],
    i: usize,
}

impl Iterator for Unescape<'_> {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        let b = *self.s.get(self.i)?;
        if b == b'%' && self.i + 2 < self.s.len() {
            let h = hexval(self.s[self.i + 1]);
            let l = hexval(self.s[self.i + 2]);
            if let (Some(h), Some(l)) = (h, l) {
                self.i += 3;
                return Some(h * 16 + l);
            }
        }
        self.i += 1;
        Some(b)
    }
}

fn hexval(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uri_parts() {
        let u = Uri::parse(b"sip:alice:pw@example.com:5070;transport=tcp;lr?Subject=x").unwrap();
        assert_eq!(u.scheme, Scheme::Sip);
        assert_eq!(u.user, Some(&b"alice"[..]));
        assert_eq!(u.host, b"example.com");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport(), Some(Transport::Tcp));
        assert_eq!(u.param(b"lr"), Some(None));
        assert_eq!(u.headers, Some(&b"Subject=x"[..]));
    }

    #[test]
    fn ipv6_references() {
        let u = Uri::parse(b"sip:[2001:db8::10]").unwrap();
        assert_eq!(u.host_ip(), "2001:db8::10".parse().ok());
        assert_eq!(u.port, None);
        let u = Uri::parse(b"sip:[2001:db8::10:5070]").unwrap();
        assert_eq!(u.port, None, "RFC 5118 4.3: no port inside the brackets");
        let u = Uri::parse(b"sip:[2001:db8::10]:5070").unwrap();
        assert_eq!(u.port, Some(5070));
        let u = Uri::parse(b"sip:user@[2001:db8:::192.0.2.1]").unwrap();
        assert_eq!(u.host_ip(), "2001:db8::192.0.2.1".parse().ok());
        assert!(Uri::parse(b"sip:2001:db8::10").is_err(), "unbracketed IPv6");
    }

    #[test]
    fn semicolon_in_user_and_tel() {
        let u = Uri::parse(b"sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user, Some(&b"user;par=u%40example.net"[..]));
        assert_eq!(u.host, b"example.com");
        let t = Uri::parse(b"tel:+1-201-555-0123;phone-context=example.com").unwrap();
        assert_eq!(t.scheme, Scheme::Tel);
        assert_eq!(t.user, Some(&b"+1-201-555-0123"[..]));
    }

    #[test]
    fn escapes_compare_equal() {
        assert!(unescape_eq(b"%75se%72", b"user", false));
        assert!(!unescape_eq(b"%75se%72", b"users", false));
        assert!(unescape_eq(b"a%", b"a%", false));
    }

    #[test]
    fn bad_uris() {
        assert!(Uri::parse(b"").is_err());
        assert!(Uri::parse(b"nocolon").is_err());
        assert!(Uri::parse(b"sip:host:99999").is_err());
        assert!(Uri::parse(b"sip:ho st").is_err());
        assert!(Uri::parse(b"sip:host;;lr").is_err());
        assert!(Uri::parse(b"sip:[::1").is_err());
    }
}
