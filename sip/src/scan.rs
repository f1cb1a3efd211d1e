//! Byte-level helpers shared by the typed views: LWS skipping (folding included), token
//! classes, and splitting comma lists outside quotes and angle brackets.
//!
//! Header values are kept as received, folding and all, so every parser here treats CR and LF
//! like spaces: after indexing, a CRLF inside a value can only be a fold (RFC 3261 7.3.1).
//!
//! Character classes are looked up in one 256-entry table (`class`) rather than tested with
//! chains of comparisons: the scanners run once per byte of every message, and a profile of
//! the parse benchmark showed `is_token` alone (not always inlined, ~10 compares per byte) at
//! an eighth of the parse.

/// `token` (RFC 3261 25.1).
pub(crate) const TOKEN: u8 = 1;
/// LWS inside an indexed value: SP, HT, CR, LF.
pub(crate) const LWS: u8 = 2;
/// Host name characters outside IPv6 brackets: alphanumeric, `-`, `.`, `_`.
pub(crate) const HOST: u8 = 4;
/// URI scheme characters after the first: alphanumeric, `+`, `-`, `.`.
pub(crate) const SCHEME: u8 = 8;
/// Inside an IPv6 reference: hex digits, `:`, `.`.
pub(crate) const V6: u8 = 16;
/// Bytes a URI may not contain: controls, SP, DEL.
pub(crate) const CTL: u8 = 32;
/// Ends an unquoted parameter value or addr-spec: `;` or LWS.
pub(crate) const PARAM_END: u8 = 64;
/// Bytes that split a SIP URI after its scheme (`@`, `?`, `;`, `:`) and bytes it may not
/// contain at all (CTL), so that one pass finds the parts and the faults.
pub(crate) const URI_DELIM: u8 = 128;

const fn build_classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0usize;
    while i < 256 {
        let b = i as u8;
        let mut c = 0u8;
        let alnum = b.is_ascii_alphanumeric();
        if alnum
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            )
        {
            c |= TOKEN;
        }
        if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            c |= LWS | PARAM_END;
        }
        if alnum || matches!(b, b'-' | b'.' | b'_') {
            c |= HOST;
        }
        if alnum || matches!(b, b'+' | b'-' | b'.') {
            c |= SCHEME;
        }
        if b.is_ascii_hexdigit() || b == b':' || b == b'.' {
            c |= V6;
        }
        if b <= b' ' || b == 0x7f {
            c |= CTL;
        }
        if b == b';' {
            c |= PARAM_END;
        }
        if matches!(b, b'@' | b'?' | b';' | b':') || b <= b' ' || b == 0x7f {
            c |= URI_DELIM;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CLASSES: [u8; 256] = build_classes();

/// The class bits of a byte (the constants above).
#[inline(always)]
pub(crate) fn class(b: u8) -> u8 {
    CLASSES[b as usize]
}

/// True when every byte of `s` has one of the `bits`. Branch-free: these checks run over
/// whole hosts and names that are nearly always valid, so there is nothing to exit early for.
#[inline]
pub(crate) fn all_class(s: &[u8], bits: u8) -> bool {
    s.iter().fold(true, |acc, &b| acc & (class(b) & bits != 0))
}

/// Index of the first byte at or after `i` that has none of the `bits` (or `s.len()`).
#[inline]
pub(crate) fn skip_class(s: &[u8], mut i: usize, bits: u8) -> usize {
    while i < s.len() && class(s[i]) & bits != 0 {
        i += 1;
    }
    i
}

/// Index of the first byte at or after `i` that has one of the `bits` (or `s.len()`).
#[inline]
pub(crate) fn find_class(s: &[u8], mut i: usize, bits: u8) -> usize {
    while i < s.len() && class(s[i]) & bits == 0 {
        i += 1;
    }
    i
}

/// Position of the first `needle` in `s`.
///
/// The typed views search short slices (a host, a parameter, a URI). `memchr::memchr` pays a
/// runtime CPU-feature dispatch per call that costs more than scanning twenty bytes, so short
/// slices get a plain loop and longer ones the SSE2 searcher directly (baseline on x86_64, so
/// no dispatch), which takes 16 bytes per step.
#[inline]
pub(crate) fn find_byte(s: &[u8], needle: u8) -> Option<usize> {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    if s.len() >= 16 {
        if let Some(one) = memchr::arch::x86_64::sse2::memchr::One::new(needle) {
            return one.find(s);
        }
    }
    s.iter().position(|&b| b == needle)
}

/// Position of the first LF at or after `from`.
///
/// The indexer calls this once per line, on lines of 20-100 bytes. `memchr::memchr` pays a
/// runtime CPU-feature dispatch and setup per call that a line does not amortise. On x86_64
/// the SSE2 searcher is called directly (SSE2 is baseline there: no dispatch); elsewhere
/// [`find_lf_swar`] does eight bytes at a time.
#[inline]
pub(crate) fn find_lf(buf: &[u8], from: usize) -> Option<usize> {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    if let Some(one) = memchr::arch::x86_64::sse2::memchr::One::new(b'\n') {
        return buf.get(from..).and_then(|t| one.find(t)).map(|k| from + k);
    }
    find_lf_swar(buf, from)
}

/// [`find_lf`] eight bytes at a time with the classic has-zero-byte test on `word ^ LF`: the
/// lowest flagged byte is always exact (borrows only run upwards from a zero byte).
#[inline]
pub(crate) fn find_lf_swar(buf: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LF: u64 = ONES * b'\n' as u64;
    let mut i = from;
    while let Some(chunk) = buf.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let x = u64::from_le_bytes(bytes) ^ LF;
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    buf.get(i..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|k| i + k)
}

/// Where a header name starting at `from` can end at the earliest: the first `:` or byte at
/// or below SP (space, tab, CR, LF, controls), looked for eight bytes at a time within the
/// first 24. `None` when there is none there (long or unterminated names): the caller then
/// scans byte by byte.
///
/// Header names are the one token the indexer meets on every line; when the bytes before this
/// position form a name the parser knows, they are all letters and `-`, so the token check
/// that would otherwise run per byte is already done.
#[inline]
pub(crate) fn name_end(buf: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const COLON: u64 = ONES * b':' as u64;
    const SPACE_PLUS_ONE: u64 = ONES * 0x21;
    let mut i = from;
    for _ in 0..3 {
        let w = u64::from_le_bytes(<[u8; 8]>::try_from(buf.get(i..i + 8)?).ok()?);
        let x = w ^ COLON;
        // Has-zero-byte for ':' and has-byte-below-0x21; in both, the lowest flagged byte is
        // exact (borrows only run upwards from a flagged byte).
        let found = (x.wrapping_sub(ONES) & !x | w.wrapping_sub(SPACE_PLUS_ONE) & !w) & HIGHS;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    None
}

/// Linear whitespace as seen inside an indexed header value.
#[inline(always)]
pub fn is_lws(b: u8) -> bool {
    class(b) & LWS != 0
}

/// RFC 3261 `token` characters.
#[inline(always)]
pub fn is_token(b: u8) -> bool {
    class(b) & TOKEN != 0
}

/// Byte offset of `inner` inside `outer`, when `inner` is a sub-slice of it (a typed view's
/// field inside the message it was parsed from); `None` otherwise. Edits address the
/// message by offset, views hand out slices.
pub fn offset_in(outer: &[u8], inner: &[u8]) -> Option<usize> {
    let o = outer.as_ptr() as usize;
    let i = inner.as_ptr() as usize;
    (i >= o && i + inner.len() <= o + outer.len()).then(|| i - o)
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
pub fn skip_lws(s: &[u8], i: usize) -> usize {
    skip_class(s, i, LWS)
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
            // Jump to the next byte that can change anything: outside `<...>` a quote, '<'
            // or ','; inside, a quote or '>'. Via values run to 60-100 bytes, so memchr's
            // vector search pays for its call here, unlike in the short scans elsewhere.
            let hit = if in_angle {
                memchr::memchr2(b'"', b'>', &s[i..])
            } else {
                memchr::memchr3(b'"', b'<', b',', &s[i..])
            };
            match hit {
                Some(k) => i += k,
                None => break,
            }
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

/// Case-insensitive comparison of `n` against `name`, which must consist of lowercase
/// letters and `-` only (header names): the same answer as [`eq_ic`], a word at a time.
///
/// Per byte, `n | mask == name` where the mask holds 0x20 under the letters of `name`
/// (0x40 is set in every lowercase letter and not in `-`): a letter matches either case
/// exactly (0x20 is the only bit that differs), and `-` must match itself. Words overlap
/// rather than handle a tail, so any length costs at most three loads a side.
#[inline]
pub(crate) fn eq_name(n: &[u8], name: &[u8]) -> bool {
    #[inline(always)]
    fn word(s: &[u8], at: usize) -> u64 {
        match s.get(at..at + 8).map(<[u8; 8]>::try_from) {
            Some(Ok(b)) => u64::from_le_bytes(b),
            _ => 0,
        }
    }
    #[inline(always)]
    fn half(s: &[u8], at: usize) -> u64 {
        match s.get(at..at + 4).map(<[u8; 4]>::try_from) {
            Some(Ok(b)) => u64::from(u32::from_le_bytes(b)),
            _ => 0,
        }
    }
    #[inline(always)]
    fn same(w: u64, t: u64) -> bool {
        w | ((t & 0x4040_4040_4040_4040) >> 1) == t
    }
    let len = n.len();
    if len != name.len() {
        return false;
    }
    if len >= 8 {
        let mut i = 0;
        while i + 8 < len {
            if !same(word(n, i), word(name, i)) {
                return false;
            }
            i += 8;
        }
        same(word(n, len - 8), word(name, len - 8))
    } else if len >= 4 {
        same(half(n, 0), half(name, 0)) && same(half(n, len - 4), half(name, len - 4))
    } else {
        n.iter()
            .zip(name)
            .all(|(&a, &b)| same(u64::from(a), u64::from(b)))
    }
}

/// Case-insensitive comparison of `a` against `lower`, which must be lowercase ASCII: the
/// same answer as [`eq_ic`] at half the work, for matching against known names.
#[inline]
pub(crate) fn eq_lower(a: &[u8], lower: &[u8]) -> bool {
    a.len() == lower.len()
        && a.iter()
            .zip(lower)
            .fold(0u8, |acc, (&x, &y)| acc | (x.to_ascii_lowercase() ^ y))
            == 0
}

/// Case-insensitive ASCII comparison; the same answer as `<[u8]>::eq_ignore_ascii_case`.
///
/// Written as a branch-free fold because the standard version, as compiled here, cost ~50
/// instructions per byte in the profile, and this runs for every header name and parameter
/// name the parser classifies.
#[inline]
pub fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (&x, &y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
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

    /// Buffers of every length up to 40 made of a few bytes that matter (and bytes with the
    /// high bit set, which upset careless word tricks), from a fixed pseudo-random stream.
    fn buffers() -> impl Iterator<Item = Vec<u8>> {
        const ALPHA: &[u8] = b"\n\r :aA-\x00\x09\x20\x21\x7f\x80\xff\x0b;";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..40usize).flat_map(move |len| {
            (0..200)
                .map(|_| {
                    (0..len)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            ALPHA[(x % ALPHA.len() as u64) as usize]
                        })
                        .collect::<Vec<u8>>()
                })
                .collect::<Vec<_>>()
        })
    }

    #[test]
    fn word_searches_match_byte_searches() {
        for buf in buffers() {
            for from in 0..=buf.len() + 1 {
                let naive = buf
                    .get(from..)
                    .and_then(|t| t.iter().position(|&b| b == b'\n'))
                    .map(|k| from + k);
                assert_eq!(find_lf(&buf, from), naive, "{buf:?} from {from}");
                assert_eq!(find_lf_swar(&buf, from), naive, "{buf:?} from {from}");
                let stop = buf
                    .get(from..)
                    .and_then(|t| t.iter().take(24).position(|&b| b == b':' || b <= b' '))
                    .map(|k| from + k);
                // `name_end` may give up (None) but never gives a wrong answer, and only gives
                // up when a whole word could not be read.
                match name_end(&buf, from) {
                    Some(e) => assert_eq!(Some(e), stop, "{buf:?} from {from}"),
                    None => {
                        assert!(stop.is_none() || from + 8 > buf.len() || stop > Some(from + 7))
                    }
                }
            }
            for needle in [b'>', b':', b'\n'] {
                assert_eq!(
                    find_byte(&buf, needle),
                    buf.iter().position(|&b| b == needle)
                );
            }
        }
    }

    #[test]
    fn name_compare_is_case_insensitive_and_exact() {
        let names: &[&[u8]] = &[
            b"to",
            b"via",
            b"call-id",
            b"content-length",
            b"proxy-authorization",
        ];
        for &name in names {
            for buf in buffers().filter(|b| b.len() == name.len()) {
                assert_eq!(eq_name(&buf, name), eq_ic(&buf, name), "{buf:?}");
            }
            let upper = name.to_ascii_uppercase();
            assert!(eq_name(&upper, name));
            for i in 0..name.len() {
                for b in 0..=255u8 {
                    let mut v = name.to_vec();
                    v[i] = b;
                    assert_eq!(eq_name(&v, name), eq_ic(&v, name), "{v:?}");
                    assert_eq!(eq_lower(&v, name), eq_ic(&v, name), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn class_table_matches_the_definitions() {
        for b in 0..=255u8 {
            let token = b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
                );
            assert_eq!(is_token(b), token, "{b}");
            assert_eq!(is_lws(b), matches!(b, b' ' | b'\t' | b'\r' | b'\n'), "{b}");
            assert_eq!(class(b) & CTL != 0, b <= b' ' || b == 0x7f, "{b}");
            assert_eq!(class(b) & PARAM_END != 0, b == b';' || is_lws(b), "{b}");
        }
    }

    #[test]
    fn case_folding_compare_matches_std() {
        for a in buffers().filter(|b| b.len() < 6) {
            for b in [&b"a:"[..], b"A:", b"\xff", b"", b"aa-\r"] {
                assert_eq!(eq_ic(&a, b), a.eq_ignore_ascii_case(b));
            }
        }
    }
}
