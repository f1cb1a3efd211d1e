//! A minimal bencode encoder/decoder for rtpengine's ng control protocol.
//!
//! ng messages are small dictionaries of strings, integers and lists ("cookie d7:command5:offer
//! ...e"); this is all the benchmark needs to drive rtpengine, so a crate dependency is not
//! worth it. The decoder takes untrusted input (a reply datagram): it never panics, bounds its
//! nesting depth and rejects trailing garbage.

/// A bencoded value. Dictionary keys keep their wire order; [`Value::get`] looks one up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(Vec<(Vec<u8>, Value)>),
}

/// Deep enough for any ng reply (they nest three or four levels); bounds recursion on hostile
/// input.
const MAX_DEPTH: usize = 32;

impl Value {
    /// A byte-string value from text.
    pub fn str(s: &str) -> Value {
        Value::Bytes(s.as_bytes().to_vec())
    }

    /// A dictionary from (key, value) pairs; keys are sorted on encoding as bencode requires.
    pub fn dict(pairs: Vec<(&str, Value)>) -> Value {
        Value::Dict(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
        )
    }

    /// The value under `key` of a dictionary; `None` for a missing key or a non-dictionary.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d.iter().find(|(k, _)| k == key.as_bytes()).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The bytes of a byte-string value.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// Appends the encoding of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Value::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Value::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode_into(out);
                }
                out.push(b'e');
            }
            Value::Dict(d) => {
                let mut sorted: Vec<&(Vec<u8>, Value)> = d.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(b'd');
                for (k, v) in sorted {
                    out.extend_from_slice(format!("{}:", k.len()).as_bytes());
                    out.extend_from_slice(k);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }

    /// The encoding of `self`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Decodes exactly one value spanning all of `input`.
pub fn decode(input: &[u8]) -> Result<Value, String> {
    let mut pos = 0;
    let v = decode_at(input, &mut pos, 0)?;
    if pos != input.len() {
        return Err(format!("{} trailing bytes", input.len() - pos));
    }
    Ok(v)
}

fn decode_at(input: &[u8], pos: &mut usize, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    match input.get(*pos) {
        None => Err("unexpected end".into()),
        Some(b'i') => {
            *pos += 1;
            let end = find(input, *pos, b'e')?;
            let n = std::str::from_utf8(&input[*pos..end])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or("bad integer")?;
            *pos = end + 1;
            Ok(Value::Int(n))
        }
        Some(b'l') => {
            *pos += 1;
            let mut items = Vec::new();
            while input.get(*pos) != Some(&b'e') {
                items.push(decode_at(input, pos, depth + 1)?);
            }
            *pos += 1;
            Ok(Value::List(items))
        }
        Some(b'd') => {
            *pos += 1;
            let mut items = Vec::new();
            while input.get(*pos) != Some(&b'e') {
                let Value::Bytes(k) = decode_at(input, pos, depth + 1)? else {
                    return Err("dictionary key is not a string".into());
                };
                let v = decode_at(input, pos, depth + 1)?;
                items.push((k, v));
            }
            *pos += 1;
            Ok(Value::Dict(items))
        }
        Some(c) if c.is_ascii_digit() => {
            let colon = find(input, *pos, b':')?;
            let len = std::str::from_utf8(&input[*pos..colon])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or("bad string length")?;
            let start = colon + 1;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= input.len())
                .ok_or("string runs past the end")?;
            *pos = end;
            Ok(Value::Bytes(input[start..end].to_vec()))
        }
        Some(c) => Err(format!("unexpected byte {c:#04x}")),
    }
}

fn find(input: &[u8], from: usize, byte: u8) -> Result<usize, String> {
    input[from..]
        .iter()
        .position(|&b| b == byte)
        .map(|i| from + i)
        .ok_or_else(|| format!("missing '{}'", byte as char))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sorted_keys() {
        let v = Value::dict(vec![
            ("sdp", Value::str("v=0\r\n")),
            ("command", Value::str("offer")),
            ("n", Value::Int(-3)),
            ("flags", Value::List(vec![Value::str("a")])),
        ]);
        let enc = v.encode();
        assert_eq!(
            enc,
            b"d7:command5:offer5:flagsl1:ae1:ni-3e3:sdp5:v=0\r\ne".to_vec()
        );
        let back = decode(&enc).unwrap();
        assert_eq!(back.get("command").unwrap().as_bytes(), Some(&b"offer"[..]));
        assert_eq!(back.get("n"), Some(&Value::Int(-3)));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"i12",
            b"5:abc",
            b"d3:abce",
            b"di1ei2ee",
            b"l",
            b"x",
            b"i1ei2e",
            b"99999999999999999999:a",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = vec![b'l'; 100];
        assert!(decode(&deep).is_err());
    }
}
