//! Maps byte offsets in the file to dotted key paths and back.
//!
//! `toml`'s errors carry a byte span but not the key they are about, and
//! `serde_spanned` cannot span tables; so the text is parsed once more with
//! `toml_edit`, which keeps the span of every key, value and table, and the
//! result is flattened into a list of `(path, key span, value span)`.
//! When even that parse fails (a syntax error), [`guess_path`] recovers a
//! best-effort path from the table headers above the error.

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value};

struct Entry {
    path: String,
    key: Option<Range<usize>>,
    span: Option<Range<usize>>,
}

/// Every key, array element and table of a parsed document with its spans.
pub(crate) struct Index {
    entries: Vec<Entry>,
}

impl Index {
    /// Indexes `text`; `None` if it is not valid TOML.
    pub(crate) fn build(text: &str) -> Option<Index> {
        let doc = ImDocument::parse(text).ok()?;
        let mut index = Index {
            entries: Vec::new(),
        };
        index.table("", doc.as_table());
        Some(index)
    }

    fn table(&mut self, prefix: &str, table: &dyn TableLike) {
        for (name, item) in table.iter() {
            let path = join(prefix, name);
            let key = table.key(name).and_then(|k| k.span());
            self.entries.push(Entry {
                path: path.clone(),
                key,
                span: item.span(),
            });
            self.item(&path, item);
        }
    }

    fn item(&mut self, path: &str, item: &Item) {
        match item {
            Item::None => {}
            Item::Value(value) => self.value(path, value),
            Item::Table(table) => self.table(path, table),
            Item::ArrayOfTables(array) => {
                for (i, table) in array.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    self.entries.push(Entry {
                        path: path.clone(),
                        key: None,
                        span: table.span(),
                    });
                    self.table(&path, table);
                }
            }
        }
    }

    fn value(&mut self, path: &str, value: &Value) {
        match value {
            Value::Array(array) => {
                for (i, element) in array.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    self.entries.push(Entry {
                        path: path.clone(),
                        key: None,
                        span: element.span(),
                    });
                    self.value(&path, element);
                }
            }
            Value::InlineTable(table) => self.table(path, table),
            _ => {}
        }
    }

    /// The path of the key whose name is at `offset`, else of the innermost
    /// value or table containing `offset`.
    pub(crate) fn path_at(&self, offset: usize) -> Option<&str> {
        if let Some(entry) = self
            .entries
            .iter()
            .find(|e| e.key.as_ref().is_some_and(|k| k.contains(&offset)))
        {
            return Some(&entry.path);
        }
        let mut best: Option<&Entry> = None;
        for entry in &self.entries {
            let Some(span) = &entry.span else { continue };
            let contains = span.contains(&offset) || (span.is_empty() && span.start == offset);
            if !contains {
                continue;
            }
            // Children are listed after their parents, so `<=` prefers the
            // deeper of two entries with the same span.
            let better = match best.and_then(|b| b.span.as_ref()) {
                Some(b) => span.len() <= b.len(),
                None => true,
            };
            if better {
                best = Some(entry);
            }
        }
        best.map(|e| e.path.as_str())
    }

    /// Where to point for `path`: its value or table, else its key.
    pub(crate) fn span_of(&self, path: &str) -> Option<Range<usize>> {
        let entry = self.entries.iter().find(|e| e.path == path)?;
        entry.span.clone().or_else(|| entry.key.clone())
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Best-effort key path for a syntax error at `offset`, from the table
/// headers before it and the key at the start of its line. Counts
/// `[[array]]` headers to produce indexes (`pool[1].node[0].name`).
pub(crate) fn guess_path(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    // Array-of-tables headers seen so far and how often, with the indexed
    // path of the last one, so nested arrays restart at 0 under a new parent.
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut current = String::new();
    for line in text[..line_start].lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("[[")
            .and_then(|l| l.split("]]").next())
            .map(clean_key)
        {
            // The indexed parent, e.g. `pool[2]` for `pool.node`.
            let parent = match name.rsplit_once('.') {
                Some((parent, _)) => indexed(&counts, parent),
                None => String::new(),
            };
            let last = name.rsplit('.').next().unwrap_or(&name).to_string();
            let full = join(&parent, &last);
            // Children of a previous instance of this array start afresh.
            counts.retain(|(k, _)| !k.starts_with(&format!("{name}.")));
            let n = match counts.iter_mut().find(|(k, _)| *k == name) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.push((name.clone(), 0));
                    0
                }
            };
            current = format!("{full}[{n}]");
        } else if let Some(name) = line
            .strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(clean_key)
        {
            current = match name.rsplit_once('.') {
                Some((parent, last)) => join(&indexed(&counts, parent), last),
                None => name,
            };
        }
    }
    let line = &text[line_start..];
    let line = line.lines().next().unwrap_or("");
    let key = line
        .split('=')
        .next()
        .filter(|_| line.contains('='))
        .map(clean_key)
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    match key {
        Some(key) => Some(join(&current, &key)),
        None if current.is_empty() => None,
        None => Some(current),
    }
}

fn clean_key(raw: &str) -> String {
    raw.split('.')
        .map(|part| part.trim().trim_matches('"').trim_matches('\''))
        .collect::<Vec<_>>()
        .join(".")
}

/// `pool.node` → `pool[1].node[0]` using the current array counts.
fn indexed(counts: &[(String, usize)], dotted: &str) -> String {
    let mut out = String::new();
    let mut so_far = String::new();
    for part in dotted.split('.') {
        so_far = join(&so_far, part);
        out = join(&out, part);
        if let Some((_, n)) = counts.iter().find(|(k, _)| *k == so_far) {
            out = format!("{out}[{n}]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
[general]
name = \"x\"

[[pool]]
name = \"a\"
[[pool.node]]
name = \"n1\"
[[pool]]
name = \"b\"
[[pool.node]]
name = \"n2\"
[[pool.node]]
name = \"n3\"
sources = [\"a\", \"b\"]
";

    fn offset_of(needle: &str) -> usize {
        DOC.find(needle).expect("needle in DOC")
    }

    #[test]
    fn paths_of_keys_values_and_elements() {
        let index = Index::build(DOC).expect("valid TOML");
        assert_eq!(
            index.path_at(offset_of("name = \"x\"")),
            Some("general.name")
        );
        assert_eq!(index.path_at(offset_of("\"x\"")), Some("general.name"));
        assert_eq!(
            index.path_at(offset_of("\"n3\"")),
            Some("pool[1].node[1].name")
        );
        assert_eq!(
            index.path_at(offset_of("\"b\"]")),
            Some("pool[1].node[1].sources[1]")
        );
        assert_eq!(
            index.path_at(offset_of("[[pool.node]]\nname = \"n2\"")),
            Some("pool[1].node[0]")
        );
        assert!(index.span_of("pool[1].node[0]").is_some());
        assert!(index.span_of("pool[7]").is_none());
    }

    #[test]
    fn guesses_paths_from_headers() {
        assert_eq!(
            guess_path(DOC, offset_of("name = \"x\"")),
            Some("general.name".into())
        );
        assert_eq!(
            guess_path(DOC, offset_of("name = \"n3\"")),
            Some("pool[1].node[1].name".into())
        );
        assert_eq!(
            guess_path(DOC, offset_of("name = \"b\"")),
            Some("pool[1].name".into())
        );
        assert_eq!(guess_path(DOC, 0), None);
        assert_eq!(guess_path("x = 1", 4), Some("x".into()));
    }
}
