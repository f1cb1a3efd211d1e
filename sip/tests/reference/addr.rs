//! A borrowed view of `name-addr` / `addr-spec` header values (From, To, Contact, Route,
//! Record-Route, Path), RFC 3261 20.10 and 25.1.
//!
//! The distinction that matters to a proxy and a registrar: parameters after `>` are header
//! parameters (tag, expires, q, +sip.instance); parameters inside `<...>` belong to the URI
//! (lr, transport, ob). Without angle brackets every `;` parameter is a header parameter
//! (RFC 4475 "cparam01", "regbadct").

use crate::scan::{is_lws, is_token, skip_lws, skip_quoted};
use crate::uri::{find_param, Uri, UriError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrError {
    UnterminatedQuote,
    BadDisplayName,
    Unclosed,
    Uri(UriError),
    Param,
}

#[derive(Clone, Debug)]
pub struct NameAddr<'a> {
    pub raw: &'a [u8],
    /// Display name as written (quotes included), if any.
    pub display: Option<&'a [u8]>,
    /// The URI text (inside `<>` when present).
    pub uri_raw: &'a [u8],
    pub uri: Uri<'a>,
    /// Header parameters, starting at the first ';' (empty when none).
    pub params: &'a [u8],
    /// Whether the URI was enclosed in `<>`.
    pub bracketed: bool,
}

impl<'a> NameAddr<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<NameAddr<'a>, AddrError> {
        let raw = crate::scan::trim(raw);
        let mut i = 0;
        let mut display = None;
        if raw.first() == Some(&b'"') {
            let end = skip_quoted(raw, 0).ok_or(AddrError::UnterminatedQuote)?;
            display = Some(&raw[..end]);
            i = skip_lws(raw, end);
            if raw.get(i) != Some(&b'<') {
                return Err(AddrError::BadDisplayName);
            }
        } else if let Some(lt) = find_top_level_lt(raw) {
            // Unquoted display name: tokens and LWS only.
            let name = crate::scan::trim(&raw[..lt]);
            if !name.iter().all(|&b| is_token(b) || is_lws(b)) {
                return Err(AddrError::BadDisplayName);
            }
            if !name.is_empty() {
                display = Some(name);
            }
            i = lt;
        }
        let (uri_raw, bracketed, after) = if raw.get(i) == Some(&b'<') {
            let close = memchr::memchr(b'>', &raw[i..]).ok_or(AddrError::Unclosed)? + i;
            (&raw[i + 1..close], true, close + 1)
        } else {
            // addr-spec: up to the first ';' or LWS.
            let mut j = i;
            while j < raw.len() && raw[j] != b';' && !is_lws(raw[j]) {
                j += 1;
            }
            (&raw[i..j], false, j)
        };
        if uri_raw.iter().any(|&b| is_lws(b)) {
            // RFC 4475 "badaspec": spaces inside the addr-spec.
            return Err(AddrError::Uri(UriError::BadHost));
        }
        let uri = Uri::parse(uri_raw).map_err(AddrError::Uri)?;
        let j = skip_lws(raw, after);
        let params = &raw[j..];
        if !params.is_empty() {
            if params[0] != b';' {
                return Err(AddrError::Param);
            }
            validate_header_params(params)?;
        }
        Ok(NameAddr {
            raw,
            display,
            uri_raw,
            uri,
            params,
            bracketed,
        })
    }

    /// A header parameter (`tag`, `expires`, `+sip.instance`...). `Some(None)` for a flag.
    pub fn param(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        find_param(self.params, name)
    }

    pub fn tag(&self) -> Option<&'a [u8]> {
        self.param(b"tag").flatten()
    }
}

fn find_top_level_lt(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => i = skip_quoted(s, i)?,
            b'<' => return Some(i),
            b';' => return None,
            _ => i += 1,
        }
    }
    None
}

fn validate_header_params(params: &[u8]) -> Result<(), AddrError> {
    let mut i = 0;
    while i < params.len() {
        // at ';'
        i = skip_lws(params, i + 1);
        let ns = i;
        while i < params.len() && is_token(params[i]) {
            i += 1;
        }
        if i == ns {
            return Err(AddrError::Param);
        }
        i = skip_lws(params, i);
        if params.get(i) == Some(&b'=') {
            i = skip_lws(params, i + 1);
            let vs = i;
            if params.get(i) == Some(&b'"') {
                i = skip_quoted(params, i).ok_or(AddrError::UnterminatedQuote)?;
            } else {
                while i < params.len() && params[i] != b';' && !is_lws(params[i]) {
                    i += 1;
                }
            }
            if i == vs {
                return Err(AddrError::Param);
            }
            i = skip_lws(params, i);
        }
        if i < params.len() && params[i] != b';' {
            return Err(AddrError::Param);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let a = NameAddr::parse(
            b"\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
        )
        .unwrap();
        assert_eq!(a.uri.host, b"example.com");
        assert_eq!(a.tag(), Some(&b"98asjd8"[..]));
        let a =
            NameAddr::parse(b"sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n").unwrap();
        assert_eq!(a.tag(), Some(&b"1918181833n"[..]));
        assert!(!a.bracketed);
        let a = NameAddr::parse(b"caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(a.display, Some(&b"caller"[..]));
        let a =
            NameAddr::parse(b"<sip:u@h;lr;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=1").unwrap();
        assert_eq!(a.uri.param(b"ob"), Some(None));
        assert_eq!(a.param(b"reg-id"), Some(Some(&b"1"[..])));
    }

    #[test]
    fn params_outside_brackets_belong_to_header() {
        let a = NameAddr::parse(b"sip:user@host.example.com;unknownparam").unwrap();
        assert_eq!(a.uri.param(b"unknownparam"), None);
        assert_eq!(a.param(b"unknownparam"), Some(None));
    }

    #[test]
    fn rejects() {
        assert!(NameAddr::parse(b"\"Mr. J. User <sip:j.user@example.com>").is_err());
        assert!(NameAddr::parse(b"<sip:user@example.com").is_err());
        assert!(NameAddr::parse(b"<sip:user@ example.com>").is_err());
        assert!(NameAddr::parse(b"<sip:u@h>;;;;").is_err());
        assert!(NameAddr::parse(b"Bell, Alexander <sip:a.g.bell@bell-tel.com>").is_err());
    }
}
