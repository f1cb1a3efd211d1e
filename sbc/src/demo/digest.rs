//! Just enough HTTP digest (RFC 2617 / RFC 3261 22.4, MD5 with qop=auth) for the demo
//! registrar to challenge and the phones to answer.
//!
//! The demo authenticates because a real PBX does: the first REGISTER of every phone is
//! answered 401, and an SBC must pass that challenge and the retried REGISTER through
//! untouched. Showing it makes the 401 in a real trace unsurprising.

use md5::{Digest, Md5};

fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

/// The digest parameters of a WWW-Authenticate or Authorization value, with quotes removed.
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses `Digest k=v, k="v", ...`. Quoted values may contain commas.
    pub fn parse(value: &[u8]) -> Option<Params> {
        let s = std::str::from_utf8(value).ok()?.trim();
        let (scheme, mut rest) = s.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let mut out = Vec::new();
        loop {
            rest = rest.trim_start_matches([',', ' ', '\t']);
            if rest.is_empty() {
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start();
            let (val, tail) = match after.strip_prefix('"') {
                Some(q) => {
                    let end = q.find('"')?;
                    (&q[..end], &q[end + 1..])
                }
                None => {
                    let end = after.find(',').unwrap_or(after.len());
                    (after[..end].trim(), &after[end..])
                }
            };
            out.push((key.trim().to_ascii_lowercase(), val.to_string()));
            rest = tail;
        }
        Some(Params(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What a client and the server both compute: the `response` parameter.
pub struct Answer<'a> {
    pub user: &'a str,
    pub realm: &'a str,
    pub password: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    pub nonce: &'a str,
    pub nc: &'a str,
    pub cnonce: &'a str,
}

impl Answer<'_> {
    /// RFC 2617 3.2.2.1 with qop=auth.
    pub fn response(&self) -> String {
        let ha1 = md5_hex(&format!("{}:{}:{}", self.user, self.realm, self.password));
        let ha2 = md5_hex(&format!("{}:{}", self.method, self.uri));
        md5_hex(&format!(
            "{ha1}:{}:{}:{}:auth:{ha2}",
            self.nonce, self.nc, self.cnonce
        ))
    }

    /// The Authorization header line a client sends.
    pub fn header(&self) -> String {
        format!(
            "Authorization: Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{}\", algorithm=MD5, qop=auth, nc={}, cnonce=\"{}\"\r\n",
            self.user,
            self.realm,
            self.nonce,
            self.uri,
            self.response(),
            self.nc,
            self.cnonce
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of "" from RFC 1321's test suite: the MD5 in use is the real one.
    #[test]
    fn md5_known_value() {
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn rfc2617_example() {
        // RFC 2617 section 3.5 (GET, qop=auth).
        let a = Answer {
            user: "Mufasa",
            realm: "testrealm@host.com",
            password: "Circle Of Life",
            method: "GET",
            uri: "/dir/index.html",
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            nc: "00000001",
            cnonce: "0a4f113b",
        };
        assert_eq!(a.response(), "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn parses_quoted_and_bare() {
        let p = Params::parse(br#"Digest realm="a, b", nonce="n1", algorithm=MD5, qop="auth""#)
            .unwrap();
        assert_eq!(p.get("realm"), Some("a, b"));
        assert_eq!(p.get("nonce"), Some("n1"));
        assert_eq!(p.get("algorithm"), Some("MD5"));
        assert_eq!(p.get("qop"), Some("auth"));
        assert!(Params::parse(b"Basic abc").is_none());
    }
}
