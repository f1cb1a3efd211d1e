//! Configuration of the SBC: one TOML file, validated as a whole at load.
//!
//! The SBC reads a single file (`sbc.toml`) describing its listeners, the
//! PBX pools it fronts, the carrier trunks it talks to, which phones it
//! admits, limits, timers and the admin endpoint. [`load`] / [`parse`]
//! either return a fully resolved [`Config`] — addresses parsed and
//! resolved, paths absolute and existing, references between sections
//! checked — or a [`ConfigError`] naming the file, line, column and dotted
//! key, e.g.
//!
//! ```text
//! sbc.toml:14:10: trunk[1].sources[0]: "10.0.0.300/8" is not an IP address or CIDR network
//! ```
//!
//! so a bad file is refused before the SBC takes traffic, with a message an
//! operator can act on. The schema, defaults and ranges are documented in
//! `docs/config.md`; `config/examples/` holds a minimal and a full file.
//!
//! # Layout
//!
//! - `types` — the public resolved types ([`Config`], [`Listener`], [`Pool`], …)
//!   and their `Default`s.
//! - `error` — [`ConfigError`] and byte-offset → line/column conversion.
//! - `raw` — serde structs mirroring the file, leaves wrapped in `toml::Spanned`.
//! - `validate` — raw → resolved conversion and every semantic check.
//! - `net` — host, `host:port`, source network parsing and name resolution.
//! - `locate` — maps an error's byte offset to the dotted key path.

#![warn(missing_docs)]

mod error;
mod locate;
mod net;
mod raw;
mod types;
mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use types::{
    fill_template, Admin, Advertise, Config, Failback, General, HttpUrl, Limits, Listener, Media,
    MediaIo, MediaSide, Node, Phones, Pool, Probe, Rate, RateLimit, Side, Timers, Transport, Trunk,
    Webhook, WebhookEvent, DEFAULT_SCANNER_AGENTS, TEMPLATE_PLACEHOLDERS,
};

/// Reads and validates the configuration file at `path`.
///
/// This is what the SBC calls at start and on reload; relative paths in the
/// file (certificates, CA bundles) are taken relative to the file's own
/// directory, so the SBC can be started from anywhere.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: "(file)".to_string(),
        message: format!("cannot read the configuration file: {e}"),
    })?;
    parse(&text, path)
}

/// Validates configuration `text` as if read from `origin`.
///
/// Lets tests and tools check a configuration without writing it to disk
/// first: `origin` is only used to name the file in errors and as the
/// directory that relative paths are resolved against.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let index = locate::Index::build(text);
    let raw: raw::RawConfig =
        toml::from_str(text).map_err(|e| toml_error(text, origin, index.as_ref(), &e))?;
    validate::build(raw, text, origin, index)
}

/// Turns a `toml` syntax or type error into a [`ConfigError`], adding the
/// dotted key path and rewording serde's messages in the file's terms.
fn toml_error(
    text: &str,
    origin: &Path,
    index: Option<&locate::Index>,
    error: &toml::de::Error,
) -> ConfigError {
    let span = error.span().unwrap_or(0..0);
    let located = match index {
        Some(index) => index.path_at(span.start).map(str::to_string),
        None => locate::guess_path(text, span.start),
    };
    let raw_message = error.message().trim();
    let (field, message) = if let Some(key) = backticked(raw_message, "missing field `") {
        // The span is the table missing the key.
        let field = match located {
            Some(table) => format!("{table}.{key}"),
            None => key.to_string(),
        };
        (Some(field), "required key is missing".to_string())
    } else if let Some(rest) = raw_message.strip_prefix("unknown field `") {
        (located, format!("unknown key `{rest}"))
    } else if raw_message.contains("spanned value") || raw_message.contains("borrowed string") {
        // serde_spanned's wording when a table or datetime stands where a
        // plain value belongs.
        (
            located,
            "expected a plain value (string, integer or array) here, found a table or date"
                .to_string(),
        )
    } else if let Some(reworded) = reword_invalid_type(raw_message) {
        (located, reworded)
    } else if index.is_none() {
        (located, format!("invalid TOML: {raw_message}"))
    } else {
        (located, raw_message.to_string())
    };
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::at(
        origin.to_path_buf(),
        text,
        span,
        field.unwrap_or_else(|| "(document)".to_string()),
        message,
    )
}

/// The text between `prefix` and the next backtick, if `message` starts
/// with `prefix`.
fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// serde's `invalid type: string "x", expected i64` in TOML's words:
/// `expected an integer, found string "x"` (and no internal struct names).
fn reword_invalid_type(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid type: ")?;
    let (found, expected) = rest.split_once(", expected ")?;
    let word = |s: &str| -> String {
        match s {
            "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" => {
                "an integer".to_string()
            }
            "a sequence" | "sequence" => "an array".to_string(),
            "map" | "a map" => "a table".to_string(),
            s if s.starts_with("struct ") => "a table".to_string(),
            s => s.to_string(),
        }
    };
    Some(format!(
        "expected {}, found {}",
        word(expected),
        word(found)
    ))
}
