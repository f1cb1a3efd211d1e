//! The one error type of the crate and the byte-offset → line/column math.

use std::ops::Range;
use std::path::PathBuf;

/// Why a configuration was rejected, pointing at the exact place in the
/// file, so an operator can fix it without guessing.
///
/// Displays as `{file}:{line}:{column}: {field}: {message}`, e.g.
/// `sbc.toml:14:10: trunk[1].sources[0]: "10.0.0.300/8" is not an IP address or CIDR network`,
/// the format editors and CI logs turn into a clickable location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {field}: {message}", file.display())]
pub struct ConfigError {
    /// The configuration file, as the caller named it.
    pub file: PathBuf,
    /// 1-based line of the offending key or value; 0 when the file could
    /// not be read at all (I/O error).
    pub line: usize,
    /// 1-based column (in characters) on that line; 0 with `line` 0.
    pub column: usize,
    /// Dotted path of the offending key, e.g. `listen[0].cert`;
    /// `(file)` for I/O errors, `(document)` for a syntax error outside any key.
    pub field: String,
    /// What is wrong and, where it helps, what would be accepted.
    pub message: String,
}

impl ConfigError {
    /// An error at a byte range of `text`.
    pub(crate) fn at(
        file: PathBuf,
        text: &str,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_column(text, span.start);
        let mut field = field.into();
        if field.is_empty() {
            // The key is the empty string (`[""]`, `"" = 1`): TOML's own spelling, so the
            // error still names something an operator can find.
            field.push_str("\"\"");
        }
        ConfigError {
            file,
            line,
            column,
            field: escape_controls(field),
            message: escape_controls(message.into()),
        }
    }
}

/// Control characters (a newline from a `"\n"` escape in a value, a terminal escape sequence)
/// written as Rust-style escapes. Messages quote what the file says, and an error must stay
/// one line of plain text: a value could otherwise add forged lines to a log or CI output.
fn escape_controls(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // "bé" is 3 bytes; the "=" after it and a space is the 4th character.
        assert_eq!(line_column(text, 10), (2, 4));
        assert_eq!(line_column(text, 1000), (3, 1));
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        // Found by fuzzing (fuzz/fuzz_targets/config.rs): a value with a "\n" escape made a
        // two-line error.
        let e = ConfigError::at(
            PathBuf::from("sbc.toml"),
            "a = 1\n",
            0..1,
            "listen[0].\u{1b}[31m",
            "port \"5\n060\" is not a number",
        );
        assert_eq!(e.message, "port \"5\\n060\" is not a number");
        assert_eq!(e.field, "listen[0].\\u{1b}[31m");
        assert!(!e.to_string().chars().any(char::is_control));
    }

    #[test]
    fn an_empty_key_is_named_as_written() {
        // Found by fuzzing: `[""]` gave an error with an empty field.
        let e = crate::parse("[\"\"]", std::path::Path::new("sbc.toml")).expect_err("bad");
        assert_eq!(e.field, "\"\"", "{e}");
        assert_eq!((e.line, e.column), (1, 2), "{e}");
    }

    #[test]
    fn display_is_file_line_column_field_message() {
        let e = ConfigError {
            file: PathBuf::from("sbc.toml"),
            line: 14,
            column: 10,
            field: "trunk[1].sources[0]".into(),
            message: "\"10.0.0.300/8\" is not an IP address or CIDR network".into(),
        };
        assert_eq!(
            e.to_string(),
            "sbc.toml:14:10: trunk[1].sources[0]: \"10.0.0.300/8\" is not an IP address or CIDR network"
        );
    }
}
