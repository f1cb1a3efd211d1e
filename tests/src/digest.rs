//! HTTP Digest authentication as SIP uses it (RFC 2617, RFC 7616 with MD5, RFC 3261 22).
//!
//! Both sides live here so the test phone (client) and the test PBX (server) agree by
//! construction *and* are checked against the RFC 2617 section 3.5 example: if both were
//! wrong the same way, the SBC (which only relays these headers) would not notice, but a real
//! registrar would. Only MD5 and `qop=auth` (or no qop) are implemented: that is what SIP
//! phones and PBXes use; `auth-int`, `MD5-sess` and SHA-256 are left out.

use anyhow::{anyhow, bail};
use md5::{Digest, Md5};
use rand::Rng;

/// A `WWW-Authenticate` / `Proxy-Authenticate` Digest challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    /// The qop options offered, as written (`auth`, `auth,auth-int`...).
    pub qop: Option<String>,
    pub algorithm: Option<String>,
    pub stale: bool,
}

impl Challenge {
    /// Parses a challenge header value (`Digest realm="...", nonce="..."`).
    pub fn parse(value: &str) -> anyhow::Result<Challenge> {
        let params = parse_digest_params(value)?;
        let mut c = Challenge::default();
        for (k, v) in params {
            match k.to_ascii_lowercase().as_str() {
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "opaque" => c.opaque = Some(v),
                "qop" => c.qop = Some(v),
                "algorithm" => c.algorithm = Some(v),
                "stale" => c.stale = v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        if c.nonce.is_empty() {
            bail!("digest challenge without nonce: {value}");
        }
        if let Some(a) = &c.algorithm {
            if !a.eq_ignore_ascii_case("MD5") {
                bail!("unsupported digest algorithm {a}");
            }
        }
        Ok(c)
    }

    /// True when the server offers `qop=auth` (then the client must use it, RFC 2617 3.2.2).
    pub fn offers_auth_qop(&self) -> bool {
        self.qop
            .as_deref()
            .is_some_and(|q| q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")))
    }

    /// The header value a server sends: MD5, and `qop="auth"` when `qop` is set.
    pub fn to_header(&self) -> String {
        let mut s = format!(
            "Digest realm=\"{}\", nonce=\"{}\", algorithm=MD5",
            self.realm, self.nonce
        );
        if let Some(q) = &self.qop {
            s.push_str(&format!(", qop=\"{q}\""));
        }
        if let Some(o) = &self.opaque {
            s.push_str(&format!(", opaque=\"{o}\""));
        }
        if self.stale {
            s.push_str(", stale=TRUE");
        }
        s
    }
}

/// An `Authorization` / `Proxy-Authorization` Digest credentials value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Option<String>,
    pub cnonce: Option<String>,
    pub opaque: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<String>,
}

impl Credentials {
    pub fn parse(value: &str) -> anyhow::Result<Credentials> {
        let params = parse_digest_params(value)?;
        let mut c = Credentials::default();
        for (k, v) in params {
            match k.to_ascii_lowercase().as_str() {
                "username" => c.username = v,
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "uri" => c.uri = v,
                "response" => c.response = v,
                "algorithm" => c.algorithm = Some(v),
                "cnonce" => c.cnonce = Some(v),
                "opaque" => c.opaque = Some(v),
                "qop" => c.qop = Some(v),
                "nc" => c.nc = Some(v),
                _ => {}
            }
        }
        if c.username.is_empty() || c.nonce.is_empty() || c.response.is_empty() {
            bail!("incomplete digest credentials: {value}");
        }
        Ok(c)
    }

    /// Answers `challenge` for a request (`method`, Request-URI `uri`). Uses `qop=auth` when
    /// offered (with a random cnonce and nc=00000001), else the RFC 2069 compatible form.
    pub fn answer(
        challenge: &Challenge,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
    ) -> Credentials {
        let (qop, nc, cnonce) = if challenge.offers_auth_qop() {
            let cnonce = format!("{:016x}", rand::thread_rng().gen::<u64>());
            (
                Some("auth".to_string()),
                Some("00000001".to_string()),
                Some(cnonce),
            )
        } else {
            (None, None, None)
        };
        let response = compute_response(
            username,
            &challenge.realm,
            password,
            method,
            uri,
            &challenge.nonce,
            qop.as_deref()
                .zip(nc.as_deref())
                .zip(cnonce.as_deref())
                .map(|((q, n), c)| QopParams {
                    qop: q,
                    nc: n,
                    cnonce: c,
                }),
        );
        Credentials {
            username: username.to_string(),
            realm: challenge.realm.clone(),
            nonce: challenge.nonce.clone(),
            uri: uri.to_string(),
            response,
            algorithm: Some("MD5".to_string()),
            cnonce,
            opaque: challenge.opaque.clone(),
            qop,
            nc,
        }
    }

    /// The header value (`Digest username="...", ...`). qop and nc are unquoted tokens
    /// (RFC 2617 3.2.2; quoting them breaks some servers).
    pub fn to_header(&self) -> String {
        let mut s = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{}\"",
            self.username, self.realm, self.nonce, self.uri, self.response
        );
        if let Some(a) = &self.algorithm {
            s.push_str(&format!(", algorithm={a}"));
        }
        if let Some(c) = &self.cnonce {
            s.push_str(&format!(", cnonce=\"{c}\""));
        }
        if let Some(o) = &self.opaque {
            s.push_str(&format!(", opaque=\"{o}\""));
        }
        if let Some(q) = &self.qop {
            s.push_str(&format!(", qop={q}"));
        }
        if let Some(n) = &self.nc {
            s.push_str(&format!(", nc={n}"));
        }
        s
    }

    /// Server side: recomputes the response from the stored password and compares.
    pub fn verify(&self, password: &str, method: &str) -> bool {
        let qop = match (&self.qop, &self.nc, &self.cnonce) {
            (Some(q), Some(n), Some(c)) => Some(QopParams {
                qop: q,
                nc: n,
                cnonce: c,
            }),
            (None, _, _) => None,
            // qop without nc/cnonce is malformed.
            _ => return false,
        };
        let expected = compute_response(
            &self.username,
            &self.realm,
            password,
            method,
            &self.uri,
            &self.nonce,
            qop,
        );
        expected.eq_ignore_ascii_case(&self.response)
    }
}

/// The `qop`-related inputs of the response computation.
#[derive(Clone, Copy, Debug)]
pub struct QopParams<'a> {
    pub qop: &'a str,
    pub nc: &'a str,
    pub cnonce: &'a str,
}

/// RFC 2617 3.2.2.1: `response = MD5(HA1:nonce[:nc:cnonce:qop]:HA2)`, with
/// `HA1 = MD5(user:realm:password)` and `HA2 = MD5(method:uri)`.
pub fn compute_response(
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    qop: Option<QopParams<'_>>,
) -> String {
    let ha1 = md5_hex(&format!("{username}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    match qop {
        Some(q) => md5_hex(&format!(
            "{ha1}:{nonce}:{}:{}:{}:{ha2}",
            q.nc, q.cnonce, q.qop
        )),
        None => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
    }
}

pub fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

/// Splits `Digest a=b, c="d, e"` into pairs, unquoting (and unescaping) quoted values.
fn parse_digest_params(value: &str) -> anyhow::Result<Vec<(String, String)>> {
    let v = value.trim();
    let scheme_end = v.find(|c: char| c.is_whitespace()).unwrap_or(v.len());
    if !v[..scheme_end].eq_ignore_ascii_case("Digest") {
        bail!("not a Digest header: {value}");
    }
    let b = &v.as_bytes()[scheme_end..];
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = String::from_utf8_lossy(&b[ks..i]).to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) != Some(&b'=') {
            bail!("digest parameter {key} without value in {value}");
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut val = Vec::new();
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(anyhow!("unterminated quoted string in {value}")),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        if let Some(&c) = b.get(i + 1) {
                            val.push(c);
                        }
                        i += 2;
                    }
                    Some(&c) => {
                        val.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                val.push(b[i]);
                i += 1;
            }
        }
        out.push((key, String::from_utf8_lossy(&val).to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2617 section 3.5.
    #[test]
    fn rfc2617_example() {
        let r = compute_response(
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            Some(QopParams {
                qop: "auth",
                nc: "00000001",
                cnonce: "0a4f113b",
            }),
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
        let creds = Credentials::parse(
            "Digest username=\"Mufasa\",\r\n realm=\"testrealm@host.com\",
                 nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",
                 uri=\"/dir/index.html\",
                 qop=auth,
                 nc=00000001,
                 cnonce=\"0a4f113b\",
                 response=\"6629fae49393a05397450978507c4ef1\",
                 opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert!(creds.verify("Circle Of Life", "GET"));
        assert!(!creds.verify("circle of life", "GET"));
        let ch = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert!(ch.offers_auth_qop());
        assert_eq!(
            ch.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
    }

    #[test]
    fn roundtrip_with_and_without_qop() {
        for qop in [Some("auth".to_string()), None] {
            let ch = Challenge {
                realm: "example.com".into(),
                nonce: "abc".into(),
                qop,
                ..Default::default()
            };
            let parsed = Challenge::parse(&ch.to_header()).unwrap();
            assert_eq!(parsed.realm, "example.com");
            let c = Credentials::answer(&parsed, "alice", "pw", "REGISTER", "sip:example.com");
            let back = Credentials::parse(&c.to_header()).unwrap();
            assert_eq!(back, c);
            assert!(back.verify("pw", "REGISTER"));
            assert!(!back.verify("pw", "INVITE"));
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Challenge::parse("Basic realm=\"x\"").is_err());
        assert!(Challenge::parse("Digest realm=\"x").is_err());
        assert!(Challenge::parse("Digest realm=\"x\"").is_err());
        assert!(Credentials::parse("Digest username=\"a\"").is_err());
    }
}
