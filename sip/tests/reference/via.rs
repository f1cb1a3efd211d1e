//! A borrowed view of one `via-parm` (RFC 3261 20.42, RFC 3581 rport, RFC 5118 IPv6).
//!
//! The proxy reads the top Via of every request (branch for transaction matching, sent-by
//! and rport for NAT) and of every response (to recognise its own), so this parser is on the
//! hot path: one pass, no allocation, slices into the message.

use crate::scan::{is_lws, is_token, skip_lws, skip_quoted};
use crate::uri::split_host_port;
use crate::Transport;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViaError {
    Protocol,
    SentBy,
    Param,
}

/// One Via entry.
#[derive(Clone, Debug)]
pub struct Via<'a> {
    /// The whole via-parm, trimmed.
    pub raw: &'a [u8],
    /// The transport token as written (`UDP`, `TCP`, `SCTP`, or something new).
    pub transport_raw: &'a [u8],
    /// The transport, when it is one the SBC speaks.
    pub transport: Option<Transport>,
    /// sent-by host as written (IPv6 with brackets).
    pub host: &'a [u8],
    pub port: Option<u16>,
    /// The `;...` parameter list, from the first ';' to the end of the via-parm.
    pub params: &'a [u8],
    pub branch: Option<&'a [u8]>,
    pub received: Option<&'a [u8]>,
    /// `Some(None)` when `rport` is present without a value (the client asks for it).
    pub rport: Option<Option<u16>>,
    /// The whole `rport[=N]` parameter text, so an editor can replace it.
    pub rport_raw: Option<&'a [u8]>,
}

impl<'a> Via<'a> {
    /// Parses one via-parm (already split off its header on commas).
    pub fn parse(raw: &'a [u8]) -> Result<Via<'a>, ViaError> {
        let raw = crate::scan::trim(raw);
        let mut i = 0;
        // sent-protocol: name SWS "/" SWS version SWS "/" SWS transport
        let mut parts: [&[u8]; 3] = [b""; 3];
        for (k, part) in parts.iter_mut().enumerate() {
            i = skip_lws(raw, i);
            let start = i;
            while i < raw.len() && is_token(raw[i]) {
                i += 1;
            }
            if i == start {
                return Err(ViaError::Protocol);
            }
            *part = &raw[start..i];
            if k < 2 {
                i = skip_lws(raw, i);
                if raw.get(i) != Some(&b'/') {
                    return Err(ViaError::Protocol);
                }
                i += 1;
            }
        }
        if !parts[0].eq_ignore_ascii_case(b"SIP") || parts[1] != b"2.0" {
            return Err(ViaError::Protocol);
        }
        let transport_raw = parts[2];
        // LWS then sent-by up to ';' or LWS.
        let before = i;
        i = skip_lws(raw, i);
        if i == before {
            return Err(ViaError::SentBy);
        }
        let sb_start = i;
        while i < raw.len() && raw[i] != b';' && !is_lws(raw[i]) {
            i += 1;
        }
        let (host, port) = split_host_port(&raw[sb_start..i]).map_err(|_| ViaError::SentBy)?;
        i = skip_lws(raw, i);
        let params = &raw[i..];
        let mut via = Via {
            raw,
            transport_raw,
            transport: Transport::from_token(transport_raw),
            host,
            port,
            params,
            branch: None,
            received: None,
            rport: None,
            rport_raw: None,
        };
        if i < raw.len() && raw[i] != b';' {
            return Err(ViaError::SentBy);
        }
        while i < raw.len() {
            // at ';'
            i = skip_lws(raw, i + 1);
            let name_start = i;
            while i < raw.len() && is_token(raw[i]) {
                i += 1;
            }
            let name = &raw[name_start..i];
            if name.is_empty() {
                return Err(ViaError::Param);
            }
            i = skip_lws(raw, i);
            let mut value: Option<&[u8]> = None;
            if raw.get(i) == Some(&b'=') {
                i = skip_lws(raw, i + 1);
                let vs = i;
                if raw.get(i) == Some(&b'"') {
                    i = skip_quoted(raw, i).ok_or(ViaError::Param)?;
                } else {
                    while i < raw.len() && raw[i] != b';' && !is_lws(raw[i]) {
                        i += 1;
                    }
                }
                if i == vs {
                    return Err(ViaError::Param);
                }
                value = Some(&raw[vs..i]);
                i = skip_lws(raw, i);
            }
            let param_raw = &raw[name_start..value.map_or(name_start + name.len(), |v| {
                v.as_ptr() as usize - raw.as_ptr() as usize + v.len()
            })];
            if i < raw.len() && raw[i] != b';' {
                return Err(ViaError::Param);
            }
            if name.eq_ignore_ascii_case(b"branch") {
                via.branch = Some(value.ok_or(ViaError::Param)?);
            } else if name.eq_ignore_ascii_case(b"received") {
                via.received = Some(value.ok_or(ViaError::Param)?);
            } else if name.eq_ignore_ascii_case(b"rport") {
                via.rport = Some(match value {
                    None => None,
                    Some(v) => {
                        Some(crate::scan::parse_decimal(v, 65535).ok_or(ViaError::Param)? as u16)
                    }
                });
                via.rport_raw = Some(param_raw);
            }
        }
        Ok(via)
    }

    /// True for an RFC 3261 branch (magic cookie), which makes transaction matching by branch
    /// alone valid (17.2.3). A bare cookie (RFC 4475 "badbranch") is not unique.
    pub fn has_rfc3261_branch(&self) -> bool {
        matches!(self.branch, Some(b) if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"z9hG4bK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_and_rport() {
        let v = Via::parse(b"SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKabc;rport").unwrap();
        assert_eq!(v.transport, Some(Transport::Udp));
        assert_eq!(v.host, b"10.0.0.1");
        assert_eq!(v.port, Some(5062));
        assert_eq!(v.branch, Some(&b"z9hG4bKabc"[..]));
        assert_eq!(v.rport, Some(None));
        assert_eq!(v.rport_raw, Some(&b"rport"[..]));
        assert!(v.has_rfc3261_branch());
    }

    #[test]
    fn folded_wsinv_style() {
        let v = Via::parse(b"SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.host, b"192.0.2.2");
        assert_eq!(v.branch, Some(&b"390skdjuw"[..]));
        assert!(!v.has_rfc3261_branch());
        let v = Via::parse(
            b"SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ",
        )
        .unwrap();
        assert_eq!(v.transport, Some(Transport::Tcp));
        assert_eq!(v.branch, Some(&b"z9hG4bK9ikj8"[..]));
    }

    #[test]
    fn ipv6_received_forms() {
        let v =
            Via::parse(b"SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3")
                .unwrap();
        assert_eq!(v.received, Some(&b"[2001:db8::9:255]"[..]));
        let v =
            Via::parse(b"SIP/2.0/UDP [2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3")
                .unwrap();
        assert_eq!(v.received, Some(&b"2001:db8::9:255"[..]));
    }

    #[test]
    fn unknown_transport_kept() {
        let v = Via::parse(b"SIP/2.0/SCTP t.example.com;branch=z9hG4bKx").unwrap();
        assert_eq!(v.transport, None);
        assert_eq!(v.transport_raw, b"SCTP");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Via::parse(b"SIP/2.0/UDP 192.0.2.15;;").is_err());
        assert!(Via::parse(b";").is_err());
        assert!(Via::parse(b"").is_err());
        assert!(Via::parse(b"SIP/3.0/UDP h").is_err());
        assert!(Via::parse(b"SIP/2.0/UDP h;rport=99999").is_err());
        assert!(Via::parse(b"SIP/2.0/UDP h x").is_err());
    }
}
