//! `[ratelimit]` and `limits.max_transactions_per_source`: safe defaults when
//! left out, every key read when set, and errors that point at the key.

use std::path::Path;
use std::time::Duration;

use sbc_config::{parse, Config, ConfigError, Rate, RateLimit, DEFAULT_SCANNER_AGENTS};

const BASE: &str = r#"[[listen]]
transport = "udp"
addr = "127.0.0.1:5060"

[[pool]]
name = "pbx"

  [[pool.node]]
  name = "pbx-a"
  address = "127.0.0.1:5070"
"#;

fn origin() -> &'static Path {
    Path::new("/nonexistent-dir/sbc.toml")
}

fn ok(extra: &str) -> Config {
    let text = format!("{BASE}{extra}");
    parse(&text, origin()).unwrap_or_else(|e| panic!("expected success, got {e}"))
}

fn err(extra: &str) -> (ConfigError, String) {
    let text = format!("{BASE}{extra}");
    match parse(&text, origin()) {
        Ok(_) => panic!("expected an error for {extra:?}"),
        Err(e) => (e, text),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).expect("needle in text");
    text[..at].matches('\n').count() + 1
}

#[test]
fn defaults_limit_phones_and_drop_scanners() {
    let c = ok("");
    let r = &c.ratelimit;
    assert_eq!(*r, RateLimit::default());
    assert!(r.enabled && r.drop_scanners && r.exempt_trunks && r.exempt_nodes);
    assert_eq!(
        r.register,
        Rate {
            per_second: 20,
            burst: 100
        }
    );
    assert_eq!(r.block_after, 10);
    assert_eq!(r.block_time, Duration::from_secs(300));
    assert_eq!(r.max_sources, 65536);
    for agent in [
        "friendly-scanner",
        "sipvicious",
        "sipcli",
        "vaxsipuseragent",
    ] {
        assert!(r.scanner_agents.iter().any(|a| a == agent), "{agent}");
    }
    assert_eq!(r.scanner_agents.len(), DEFAULT_SCANNER_AGENTS.len());
    // Lower case, so the matcher can compare without folding the patterns.
    assert!(r
        .scanner_agents
        .iter()
        .all(|a| *a == a.to_ascii_lowercase() && !a.is_empty()));
    assert_eq!(c.limits.max_transactions_per_source, 1000);
}

#[test]
fn every_key_is_read() {
    let c = ok(r#"
[limits]
max_transactions_per_source = 50

[ratelimit]
enabled = false
register_rate = 5
register_burst = 7
invite_rate = 2
invite_burst = 3
options_rate = 1
options_burst = 4
block_after = 25
block_secs = 9
max_sources = 2048
exempt_trunks = false
exempt_nodes = false
drop_scanners = false
scanner_agents = ["EvilScan", "  bot/1.0 "]
"#);
    let r = &c.ratelimit;
    assert!(!r.enabled && !r.exempt_trunks && !r.exempt_nodes && !r.drop_scanners);
    assert_eq!(
        (r.register, r.invite, r.options),
        (
            Rate {
                per_second: 5,
                burst: 7
            },
            Rate {
                per_second: 2,
                burst: 3
            },
            Rate {
                per_second: 1,
                burst: 4
            }
        )
    );
    assert_eq!(r.block_after, 25);
    assert_eq!(r.block_time, Duration::from_secs(9));
    assert_eq!(r.max_sources, 2048);
    assert_eq!(r.scanner_agents, vec!["evilscan", "bot/1.0"]);
    assert_eq!(c.limits.max_transactions_per_source, 50);
}

#[test]
fn out_of_range_values_name_the_key_and_line() {
    for (key, value, part) in [
        (
            "register_rate",
            "0",
            "from 1 to 100000 requests per second, got 0",
        ),
        ("invite_burst", "100001", "from 1 to 100000 requests"),
        ("block_after", "0", "from 1 to 100000"),
        ("block_secs", "86401", "from 1 to 86400 seconds"),
        ("max_sources", "10", "from 1024 to 10000000"),
    ] {
        let (e, text) = err(&format!("[ratelimit]\n{key} = {value}\n"));
        assert_eq!(e.field, format!("ratelimit.{key}"), "{e}");
        assert_eq!(e.line, line_of(&text, key), "{e}");
        assert!(e.message.contains(part), "{e}");
    }
    let (e, text) = err("[limits]\nmax_transactions_per_source = 0\n");
    assert_eq!(e.field, "limits.max_transactions_per_source", "{e}");
    assert_eq!(e.line, line_of(&text, "max_transactions_per_source"));
}

#[test]
fn scanner_agents_must_be_real_patterns() {
    let (e, text) = err("[ratelimit]\nscanner_agents = [\"sipvicious\", \"\"]\n");
    assert_eq!(e.field, "ratelimit.scanner_agents[1]", "{e}");
    assert_eq!(e.line, line_of(&text, "scanner_agents"));
    assert!(e.message.contains("would match every User-Agent"), "{e}");

    let (e, _) = err("[ratelimit]\nscanner_agents = [\"SIPVicious\", \"sipvicious\"]\n");
    assert_eq!(e.field, "ratelimit.scanner_agents[1]", "{e}");
    assert!(e.message.contains("already listed"), "{e}");

    // An empty list is allowed: it turns the filter off pattern by pattern.
    assert!(ok("[ratelimit]\nscanner_agents = []\n")
        .ratelimit
        .scanner_agents
        .is_empty());
}

#[test]
fn unknown_and_mistyped_keys_are_errors() {
    let (e, text) = err("[ratelimit]\nregister_per_sec = 5\n");
    assert_eq!(e.field, "ratelimit.register_per_sec", "{e}");
    assert_eq!(e.line, line_of(&text, "register_per_sec"));
    assert!(e.message.contains("unknown key"), "{e}");

    let (e, _) = err("[ratelimit]\nenabled = \"yes\"\n");
    assert_eq!(e.field, "ratelimit.enabled", "{e}");
}

/// Found by the `config` fuzz target: a value holding a newline (a `\n` escape in a TOML
/// string) was quoted raw into the message, so one error printed as two lines.
#[test]
fn errors_quoting_a_value_stay_on_one_line() {
    let text = BASE.replace(
        "addr = \"127.0.0.1:5060\"",
        "addr = \"0.0.0.0:5060\"\nadvertise = \"sbc.example.com:5 =adro\\\\\\n060\"",
    );
    let e = parse(&text, origin()).expect_err("bad advertise port");
    assert_eq!(e.field, "listen[0].advertise", "{e}");
    assert!(!e.to_string().contains('\n'), "{e:?}");
    assert!(e.message.contains("\\n060"), "{e:?}");
}
