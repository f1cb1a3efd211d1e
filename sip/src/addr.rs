//! A borrowed view of `name-addr` / `addr-spec` header values (From, To, Contact, Route,
//! Record-Route, Path), RFC 3261 20.10 and 25.1.
//!
//! The distinction that matters to a proxy and a registrar: parameters after `>` are header
//! parameters (tag, expires, q, +sip.instance); parameters inside `<...>` belong to the URI
//! (lr, transport, ob). Without angle brackets every `;` parameter is a header parameter
//! (RFC 4475 "cparam01", "regbadct").

use crate::scan::skip_quoted;
use crate::scan::{all_class, class, eq_lower, find_byte, find_class, skip_class, skip_lws};
use crate::scan::{LWS, PARAM_END, TOKEN};
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
        Self::parse_with_tag(raw).map(|(a, _)| a)
    }

    /// [`NameAddr::parse`] that also returns [`NameAddr::tag`], found while the parameters
    /// are validated instead of by a second pass over them. Message validation parses From
    /// and To of every request and keeps their tags, which the proxy asks for repeatedly.
    pub(crate) fn parse_with_tag(
        raw: &'a [u8],
    ) -> Result<(NameAddr<'a>, Option<&'a [u8]>), AddrError> {
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
            if !all_class(name, TOKEN | LWS) {
                return Err(AddrError::BadDisplayName);
            }
            if !name.is_empty() {
                display = Some(name);
            }
            i = lt;
        }
        let (uri_raw, bracketed, after) = if raw.get(i) == Some(&b'<') {
            let close = find_byte(&raw[i..], b'>').ok_or(AddrError::Unclosed)? + i;
            (&raw[i + 1..close], true, close + 1)
        } else {
            // addr-spec: up to the first ';' or LWS.
            let j = find_class(raw, i, PARAM_END);
            (&raw[i..j], false, j)
        };
        // RFC 4475 "badaspec": spaces inside the addr-spec are refused as a bad host, before
        // any other fault of the URI. A URI that parses holds no control character or space,
        // so the LWS check is only needed, and only made, when the parse fails.
        let uri = Uri::parse(uri_raw).map_err(|e| {
            if uri_raw.iter().fold(0, |acc, &b| acc | class(b)) & LWS != 0 {
                AddrError::Uri(UriError::BadHost)
            } else {
                AddrError::Uri(e)
            }
        })?;
        let j = skip_lws(raw, after);
        let params = &raw[j..];
        let mut tag = None;
        if !params.is_empty() {
            if params[0] != b';' {
                return Err(AddrError::Param);
            }
            let scanned = validate_header_params(params)?;
            tag = if scanned.quoted {
                // A quoted value may hold ';', which `find_param` (and so `tag()`) splits on
                // regardless: ask it, to give the same answer.
                find_param(params, b"tag").flatten()
            } else {
                scanned.tag.flatten()
            };
        }
        Ok((
            NameAddr {
                raw,
                display,
                uri_raw,
                uri,
                params,
                bracketed,
            },
            tag,
        ))
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

/// What [`validate_header_params`] saw besides validity.
struct ParamScan<'a> {
    /// The first `tag` parameter: `Some(None)` for a bare flag.
    tag: Option<Option<&'a [u8]>>,
    /// Whether any value was a quoted string.
    quoted: bool,
}

/// Checks `;name[=value]` header parameters. Without quoted values, the parameters seen here
/// are exactly the `;`-separated pieces [`find_param`] looks at (names and values with the
/// LWS around them trimmed), so the `tag` found here is the one `tag()` would find.
fn validate_header_params(params: &[u8]) -> Result<ParamScan<'_>, AddrError> {
    let mut scan = ParamScan {
        tag: None,
        quoted: false,
    };
    let mut i = 0;
    while i < params.len() {
        // at ';'
        i = skip_lws(params, i + 1);
        let ns = i;
        i = skip_class(params, i, TOKEN);
        if i == ns {
            return Err(AddrError::Param);
        }
        let name = &params[ns..i];
        i = skip_lws(params, i);
        let mut value = None;
        if params.get(i) == Some(&b'=') {
            i = skip_lws(params, i + 1);
            let vs = i;
            if params.get(i) == Some(&b'"') {
                scan.quoted = true;
                i = skip_quoted(params, i).ok_or(AddrError::UnterminatedQuote)?;
            } else {
                i = find_class(params, i, PARAM_END);
            }
            if i == vs {
                return Err(AddrError::Param);
            }
            value = Some(&params[vs..i]);
            i = skip_lws(params, i);
        }
        if i < params.len() && params[i] != b';' {
            return Err(AddrError::Param);
        }
        if scan.tag.is_none() && eq_lower(name, b"tag") {
            scan.tag = Some(value);
        }
    }
    Ok(scan)
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
