//! Byte-level helpers shared by the typed views: LWS skipping (folding included), token
//! classes, and splitting comma lists outside quotes and angle brackets.
//!
//! Header values are kept as received, folding and all, so every parser here treats CR and LF
//! like spaces: after indexing, a CRLF inside a value can only be a fold (RFC 3261 7.3.1).

/// Linear whitespace as seen inside an indexed header value.
#[inline]
pub fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// RFC 3261 `token` characters.
#[inline]
pub fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Strips leading and trailing LWS.
#[inline]
pub fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_lws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_lws(b)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// Index of the first non-LWS byte at or after `i` (or `s.len()`).
#[inline]
pub fn skip_lws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_lws(s[i]) {
        i += 1;
    }
    i
}

/// Index just past a quoted string starting at `i` (which must be `"`); `None` when the
/// string is not terminated (RFC 4475 "quotbal").
pub fn skip_quoted(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Splits a header value on top-level commas (outside quoted strings and `<...>`), yielding
/// trimmed, non-empty-checked pieces. An unterminated quote or bracket yields an error piece
/// so that callers reject the header rather than guess.
pub struct CommaSplit<'a> {
    s: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> CommaSplit<'a> {
    pub fn new(s: &'a [u8]) -> Self {
        CommaSplit {
            s,
            pos: 0,
            done: false,
        }
    }
}

impl<'a> Iterator for CommaSplit<'a> {
    /// Each item is the raw (untrimmed) piece; `Err(())` for unbalanced quoting.
    type Item = Result<&'a [u8], ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let s = self.s;
        let start = self.pos;
        let mut i = start;
        let mut in_angle = false;
        while i < s.len() {
            match s[i] {
                b'"' => match skip_quoted(s, i) {
                    Some(j) => {
                        i = j;
                        continue;
                    }
                    None => {
                        self.done = true;
                        return Some(Err(()));
                    }
                },
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                b',' if !in_angle => {
                    self.pos = i + 1;
                    return Some(Ok(&s[start..i]));
                }
                _ => {}
            }
            i += 1;
        }
        self.done = true;
        if in_angle {
            return Some(Err(()));
        }
        Some(Ok(&s[start..]))
    }
}

/// Parses an unsigned decimal that must fit in `max`; rejects empty input, signs, and
/// overflow (RFC 4475 "scalar02": huge values must be errors, never wrap).
pub fn parse_decimal(s: &[u8], max: u64) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        // 20 digits can still overflow u64; checked below.
        if s.is_empty() {
            return None;
        }
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        if v > max {
            return None;
        }
    }
    Some(v)
}

/// Case-insensitive ASCII comparison.
#[inline]
pub fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_split_respects_quotes_and_angles() {
        let v: Vec<_> = CommaSplit::new(b"\"a,b\" <sip:x@y;p=1,2>, <sip:z>")
            .map(|r| trim(r.unwrap_or(b"ERR")).to_vec())
            .collect();
        assert_eq!(
            v,
            vec![b"\"a,b\" <sip:x@y;p=1,2>".to_vec(), b"<sip:z>".to_vec()]
        );
        assert!(CommaSplit::new(b"\"open").any(|r| r.is_err()));
    }

    #[test]
    fn decimal_limits() {
        assert_eq!(parse_decimal(b"0068", 255), Some(68));
        assert_eq!(parse_decimal(b"300", 255), None);
        assert_eq!(parse_decimal(b"36893488147419103232", u64::MAX), None);
        assert_eq!(parse_decimal(b"", 10), None);
        assert_eq!(parse_decimal(b"-1", 10), None);
    }

    #[test]
    fn trim_handles_folds() {
        assert_eq!(trim(b"\r\n  abc \t"), b"abc");
        assert_eq!(trim(b"   "), b"");
    }
}
