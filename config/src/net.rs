//! Parsing of hosts, `host[:port]` addresses and source networks.
//!
//! Errors are complete sentences quoting the offending text, because they
//! end up verbatim after `file:line:column: field:`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

/// A host as the SIP `host` production allows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl Host {
    /// The host as written into a SIP header: IPv6 in brackets.
    pub(crate) fn header_text(&self) -> String {
        match self {
            Host::Name(name) => name.clone(),
            Host::V4(ip) => ip.to_string(),
            Host::V6(ip) => format!("[{ip}]"),
        }
    }

    pub(crate) fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::V4(ip) => Some(IpAddr::V4(*ip)),
            Host::V6(ip) => Some(IpAddr::V6(*ip)),
        }
    }
}

/// Whether `s` is a DNS hostname (RFC 1123 labels, not all-numeric at the
/// end, so a mistyped IPv4 address like `10.0.0.300` is not taken as a name).
pub(crate) fn is_hostname(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels_ok = s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    let last_numeric = s
        .rsplit('.')
        .next()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// Parses a hostname, an IPv4 address or a bracketed IPv6 address.
pub(crate) fn parse_host(s: &str) -> Result<Host, String> {
    if let Some(inner) = s.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
            Some(Ok(ip)) => Ok(Host::V6(ip)),
            _ => Err(format!("\"{s}\" is not a valid [IPv6] address")),
        };
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Host::V4(ip));
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Err(format!(
            "IPv6 address \"{s}\" must be written in brackets: \"[{s}]\""
        ));
    }
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("\"{s}\" is not a valid IPv4 address"));
    }
    if is_hostname(s) {
        return Ok(Host::Name(s.to_string()));
    }
    Err(format!(
        "\"{s}\" is not a hostname, IPv4 address or [IPv6] address"
    ))
}

/// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; port 0 is refused
/// because nothing can be sent to or advertised as port 0.
pub(crate) fn parse_host_port(s: &str) -> Result<(Host, Option<u16>), String> {
    if s.is_empty() {
        return Err("address is empty".to_string());
    }
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => {
                let rest = &s[end + 1..];
                match rest.strip_prefix(':') {
                    Some(port) => (&s[..=end], Some(port)),
                    None if rest.is_empty() => (s, None),
                    None => {
                        return Err(format!(
                            "\"{s}\" is not host:port (unexpected \"{rest}\" after \"]\")"
                        ))
                    }
                }
            }
            None => return Err(format!("\"{s}\" is missing the closing \"]\"")),
        }
    } else {
        match s.matches(':').count() {
            0 => (s, None),
            1 => match s.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            },
            _ if s.parse::<Ipv6Addr>().is_ok() => {
                return Err(format!(
                "\"{s}\": IPv6 addresses must be written in brackets, as in \"[2001:db8::1]:5060\""
            ))
            }
            _ => return Err(format!("\"{s}\" is not host:port")),
        }
    };
    let host = parse_host(host)?;
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => Some(n),
            _ => {
                return Err(format!(
                    "port \"{p}\" in \"{s}\" is not a number from 1 to 65535"
                ))
            }
        },
    };
    Ok((host, port))
}

/// Parses an `http://` / `https://` URL (see [`crate::HttpUrl::parse`]).
pub(crate) fn parse_http_url(url: &str) -> Result<crate::HttpUrl, String> {
    let scheme_end = url.find("://").ok_or_else(|| {
        format!("\"{url}\" is not a URL; expected http://host[:port]/path or https://...")
    })?;
    let tls = match url[..scheme_end].to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "scheme \"{other}\" in \"{url}\" is not supported; expected http or https"
            ))
        }
    };
    let rest = &url[scheme_end + 3..];
    if let Some(c) = rest.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "\"{url}\" contains {c:?}; spaces, control and non-ASCII characters must be percent-encoded"
        ));
    }
    if rest.contains('#') {
        return Err(format!(
            "\"{url}\" has a fragment (#...), which is never sent to the server; remove it"
        ));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(format!(
            "\"{url}\" carries credentials; put them in a header (headers = {{ Authorization = \"...\" }}) instead"
        ));
    }
    if authority.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    let (host, port) = parse_host_port(authority).map_err(|e| format!("in \"{url}\": {e}"))?;
    if host.ip().is_some_and(|ip| ip.is_unspecified()) {
        return Err(format!(
            "\"{url}\" names a wildcard address; give the server's real address"
        ));
    }
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    Ok(crate::HttpUrl {
        tls,
        host: host.header_text(),
        port: port.unwrap_or(if tls { 443 } else { 80 }),
        authority: authority.to_string(),
        path,
    })
}

/// Turns a host and port into one socket address, resolving names with
/// the system resolver; the first address returned wins.
pub(crate) fn resolve(host: &Host, port: u16) -> Result<SocketAddr, String> {
    match host {
        Host::V4(ip) => Ok(SocketAddr::new(IpAddr::V4(*ip), port)),
        Host::V6(ip) => Ok(SocketAddr::new(IpAddr::V6(*ip), port)),
        Host::Name(name) => match (name.as_str(), port).to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| format!("host \"{name}\" resolves to no addresses")),
            Err(e) => Err(format!("cannot resolve host \"{name}\": {e}")),
        },
    }
}

/// Parses an IP address (as a /32 or /128) or a CIDR network. A network
/// with host bits set (`10.0.0.5/8`) is refused: it is usually a typo for
/// either the host or the network, and silently picking one hides it.
pub(crate) fn parse_source(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    match s.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(format!(
            "\"{s}\" has host bits set; write the network \"{}\" or the single address \"{}\"",
            net.trunc(),
            net.addr()
        )),
        Err(_) => Err(format!("\"{s}\" is not an IP address or CIDR network")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(is_hostname("sbc.example.com"));
        assert!(is_hostname("localhost"));
        assert!(is_hostname("a-1.b"));
        assert!(!is_hostname("10.0.0.300"));
        assert!(!is_hostname("-a.com"));
        assert!(!is_hostname("a..com"));
        assert!(!is_hostname("a_b.com"));
        assert!(!is_hostname(""));
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("10.0.0.1:5070"),
            Ok((Host::V4(Ipv4Addr::new(10, 0, 0, 1)), Some(5070)))
        );
        assert_eq!(
            parse_host_port("[2001:db8::1]"),
            Ok((Host::V6("2001:db8::1".parse().expect("v6")), None))
        );
        assert_eq!(
            parse_host_port("[::1]:5061").map(|(h, p)| (h.header_text(), p)),
            Ok(("[::1]".to_string(), Some(5061)))
        );
        assert_eq!(
            parse_host_port("pbx.example.com"),
            Ok((Host::Name("pbx.example.com".into()), None))
        );
        assert!(parse_host_port("2001:db8::1")
            .unwrap_err()
            .contains("brackets"));
        assert!(parse_host_port("a:0").unwrap_err().contains("port"));
        assert!(parse_host_port("a:99999").unwrap_err().contains("port"));
        assert!(parse_host_port("[::1").unwrap_err().contains("\"]\""));
        assert!(parse_host_port("[::1]x").is_err());
        assert!(parse_host_port("10.0.0.300:5060")
            .unwrap_err()
            .contains("IPv4"));
        assert!(parse_host_port("").is_err());
    }

    #[test]
    fn http_urls() {
        let u = parse_http_url("http://10.0.0.10:8080/health").expect("valid");
        assert_eq!(
            (
                u.tls,
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.path.as_str()
            ),
            (false, "10.0.0.10", 8080, "10.0.0.10:8080", "/health")
        );
        let u = parse_http_url("HTTPS://pbx.example.com").expect("valid");
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = parse_http_url("http://[::1]?x=1").expect("valid");
        assert_eq!(
            (u.host.as_str(), u.connect_host(), u.port),
            ("[::1]", "::1", 80)
        );
        assert_eq!(u.path, "/?x=1");
        assert!(u.ip().is_some_and(|ip| ip.is_loopback()));
        for (bad, why) in [
            ("ftp://x/", "scheme"),
            ("10.0.0.1/health", "not a URL"),
            ("http://", "no host"),
            ("http://user:pw@x/", "credentials"),
            ("http://x/a b", "percent-encoded"),
            ("http://x/a#top", "fragment"),
            ("http://x:0/", "port"),
            ("http://x:70000/", "port"),
            ("http://0.0.0.0/", "wildcard"),
            ("http://10.0.0.300/", "IPv4"),
            ("http://2001:db8::1/", "brackets"),
        ] {
            let e = parse_http_url(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            parse_source("198.51.100.7").map(|n| n.to_string()),
            Ok("198.51.100.7/32".into())
        );
        assert_eq!(
            parse_source("2001:db8::/32").map(|n| n.to_string()),
            Ok("2001:db8::/32".into())
        );
        assert!(parse_source("10.0.0.5/8")
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!(parse_source("10.0.0.300/8")
            .unwrap_err()
            .contains("not an IP address or CIDR"));
    }

    #[test]
    fn resolves_ips_and_localhost() {
        assert_eq!(
            resolve(&Host::V4(Ipv4Addr::LOCALHOST), 5060).map(|a| a.to_string()),
            Ok("127.0.0.1:5060".into())
        );
        assert!(resolve(&Host::Name("localhost".into()), 5060).is_ok());
    }
}
