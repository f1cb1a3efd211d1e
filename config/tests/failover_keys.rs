//! The failover keys of a pool (`failback`, `branch_timeout_ms`,
//! `[pool.probe]`, node probes, `[[pool.webhook]]`): defaults that work
//! when left out, and errors that name file, line and dotted key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sbc_config::{
    fill_template, parse, Config, ConfigError, Failback, HttpUrl, Probe, Webhook, WebhookEvent,
};

/// Lines 1-5 hold the listener and the pool header; tests insert pool keys
/// at `{POOL}`, node keys at `{NODE}` and further tables at the end.
const TEMPLATE: &str = r#"[[listen]]
transport = "udp"
addr = "127.0.0.1:5060"

[[pool]]
name = "pbx"
{POOL}
  [[pool.node]]
  name = "pbx-a"
  address = "127.0.0.1:5070"
{NODE}
  [[pool.node]]
  name = "pbx-b"
  address = "127.0.0.1:5071"
{TAIL}"#;

fn doc(pool: &str, node: &str, tail: &str) -> String {
    TEMPLATE
        .replace("{POOL}", pool)
        .replace("{NODE}", node)
        .replace("{TAIL}", tail)
}

fn origin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sbc.toml")
}

fn ok(text: &str) -> Config {
    parse(text, &origin()).unwrap_or_else(|e| panic!("expected success, got {e}"))
}

/// Expects an error whose field is `field`, on the line of the first
/// occurrence of `needle`, with `part` in the message.
fn err(text: &str, needle: &str, field: &str, part: &str) -> ConfigError {
    let e = match parse(text, &origin()) {
        Ok(_) => panic!("expected an error about {field}, but the config was accepted"),
        Err(e) => e,
    };
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    let line = text[..at].matches('\n').count() + 1;
    assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
    assert!(e.column >= 1, "{e}");
    assert!(e.message.contains(part), "{e}\nshould contain: {part}");
    let prefix = format!("{}:{line}:{}: {field}: ", origin().display(), e.column);
    assert!(e.to_string().starts_with(&prefix), "{e}");
    e
}

// ---------------------------------------------------------------- defaults

#[test]
fn defaults_when_nothing_is_set() {
    let c = ok(&doc("", "", ""));
    let pool = &c.pools[0];
    assert_eq!(pool.failback, Failback::Manual);
    assert_eq!(pool.failback_hold, Duration::from_secs(300));
    assert_eq!(pool.branch_timeout, Duration::from_millis(1000));
    assert_eq!(pool.probe, Probe::default());
    assert_eq!(pool.probe.interval, Duration::from_millis(1000));
    assert_eq!(pool.probe.timeout, Duration::from_millis(800));
    assert_eq!((pool.probe.failures, pool.probe.successes), (2, 2));
    assert_eq!(pool.probe.start_grace, Duration::from_secs(30));
    assert!(pool.probe.alive_codes.is_empty() && pool.probe.witnesses.is_empty());
    assert!(pool.webhooks.is_empty());
    for node in &pool.nodes {
        assert!(node.options);
        assert_eq!(node.http_url, None);
    }
}

#[test]
fn every_key_set() {
    let c = ok(&doc(
        "failback = \"AUTO\"\nfailback_hold_secs = 60\nbranch_timeout_ms = 400\n\
         [pool.probe]\ninterval_ms = 500\ntimeout_ms = 300\nfailures = 3\nsuccesses = 1\n\
         alive_codes = [200, 404]\nstart_grace_secs = 0\n\
         witnesses = [\"http://127.0.0.1:8080/ok\", \"https://[::1]/x?y=1\"]\n",
        "  options = false\n  http_url = \"http://127.0.0.1:8080/health\"\n",
        "[[pool.webhook]]\non = [\"Failover\"]\nmethod = \"put\"\nurl = \"http://127.0.0.1:9999/hook\"\n\
         headers = { Authorization = \"Bearer x\", X-Extra = \"1\" }\n\
         body = '{\"pool\":\"{pool}\",\"from\":\"{from}\",\"to\":\"{to}\",\"reason\":\"{reason}\",\"time\":\"{time}\"}'\n\
         timeout_ms = 500\nretries = 0\n\
         [[pool.webhook]]\nurl = \"https://hooks.example.com/x\"\n",
    ));
    let pool = &c.pools[0];
    assert_eq!(pool.failback, Failback::Auto);
    assert_eq!(pool.failback_hold, Duration::from_secs(60));
    assert_eq!(pool.branch_timeout, Duration::from_millis(400));
    let p = &pool.probe;
    assert_eq!(p.interval, Duration::from_millis(500));
    assert_eq!(p.timeout, Duration::from_millis(300));
    assert_eq!((p.failures, p.successes), (3, 1));
    assert_eq!(p.alive_codes, [200, 404]);
    assert_eq!(p.start_grace, Duration::ZERO);
    assert_eq!(p.witnesses.len(), 2);
    assert!(!pool.nodes[0].options);
    assert_eq!(
        pool.nodes[0].http_url.as_deref(),
        Some("http://127.0.0.1:8080/health")
    );
    assert!(pool.nodes[1].options && pool.nodes[1].http_url.is_none());

    assert_eq!(pool.webhooks.len(), 2);
    let w = &pool.webhooks[0];
    assert_eq!(w.on, [WebhookEvent::Failover]);
    assert!(w.fires_on(WebhookEvent::Failover) && !w.fires_on(WebhookEvent::Failback));
    assert_eq!(w.method, "PUT");
    assert_eq!(
        w.headers,
        [
            ("Authorization".to_string(), "Bearer x".to_string()),
            ("X-Extra".to_string(), "1".to_string())
        ]
    );
    assert_eq!(w.timeout, Duration::from_millis(500));
    assert_eq!(w.retries, 0);
    let d = &pool.webhooks[1];
    assert_eq!(d.on, [WebhookEvent::Failover, WebhookEvent::Failback]);
    assert_eq!(d.method, "POST");
    assert_eq!(d.body, Webhook::DEFAULT_BODY);
    assert_eq!((d.timeout, d.retries), (Duration::from_millis(2000), 2));
    // Header values are credentials: never in Debug output (logs).
    assert!(!format!("{c:?}").contains("Bearer x"));
}

#[test]
fn timeout_default_follows_a_short_interval() {
    let c = ok(&doc("[pool.probe]\ninterval_ms = 200\n", "", ""));
    assert_eq!(c.pools[0].probe.timeout, Duration::from_millis(160));
}

#[test]
fn alive_codes_default_is_any_final_but_503() {
    let mut p = Probe::default();
    assert!(p.is_alive_code(200) && p.is_alive_code(404) && p.is_alive_code(405));
    assert!(p.is_alive_code(500) && p.is_alive_code(603));
    assert!(!p.is_alive_code(503) && !p.is_alive_code(100) && !p.is_alive_code(183));
    p.alive_codes = vec![200];
    assert!(p.is_alive_code(200) && !p.is_alive_code(404));
}

#[test]
fn templates_fill_known_placeholders_and_keep_other_braces() {
    let out = fill_template(Webhook::DEFAULT_BODY, |name| match name {
        "pool" => Some("pbx"),
        "from" => Some("a"),
        "to" => Some("b"),
        "reason" => Some("node_down"),
        "time" => Some("2026-01-02T03:04:05Z"),
        "event" => Some("failover"),
        _ => None,
    });
    assert_eq!(
        out,
        r#"{"event":"failover","pool":"pbx","from":"a","to":"b","reason":"node_down","time":"2026-01-02T03:04:05Z"}"#
    );
    assert_eq!(
        fill_template("{x} {pool} {Pool} { pool} {", |n| (n == "pool")
            .then_some("P")),
        "{x} P {Pool} { pool} {"
    );
}

#[test]
fn http_url_is_public() {
    let u = HttpUrl::parse("https://pbx.example.com:8443/health?deep=1").expect("valid");
    assert!(u.tls);
    assert_eq!(u.port, 8443);
    assert_eq!(u.authority, "pbx.example.com:8443");
    assert_eq!(u.path, "/health?deep=1");
    assert!(HttpUrl::parse("pbx.example.com/health").is_err());
}

// ---------------------------------------------------------------- pool keys

#[test]
fn bad_failback() {
    let text = doc("failback = \"sometimes\"\n", "", "");
    err(
        &text,
        "failback =",
        "pool[0].failback",
        "expected \"manual\" or \"auto\"",
    );
}

#[test]
fn failback_hold_and_branch_timeout_ranges() {
    let text = doc("failback_hold_secs = 0\n", "", "");
    err(
        &text,
        "failback_hold_secs",
        "pool[0].failback_hold_secs",
        "from 1 to 86400 seconds",
    );
    let text = doc("branch_timeout_ms = 40000\n", "", "");
    err(
        &text,
        "branch_timeout_ms",
        "pool[0].branch_timeout_ms",
        "from 50 to 32000",
    );
}

#[test]
fn unknown_key_in_probe() {
    let text = doc("[pool.probe]\ninterval = 5\n", "", "");
    let e = err(
        &text,
        "interval = 5",
        "pool[0].probe.interval",
        "unknown key `interval`",
    );
    assert!(e.message.contains("`interval_ms`"), "{e}");
}

// ---------------------------------------------------------------- probe keys

#[test]
fn timeout_must_be_below_interval() {
    let text = doc(
        "[pool.probe]\ninterval_ms = 500\ntimeout_ms = 500\n",
        "",
        "",
    );
    err(
        &text,
        "timeout_ms",
        "pool[0].probe.timeout_ms",
        "must be below interval_ms",
    );
}

#[test]
fn probe_ranges() {
    for (key, value, part) in [
        ("interval_ms", "50", "from 100 to 600000"),
        ("failures", "0", "from 1 to 100"),
        ("successes", "101", "from 1 to 100"),
        ("start_grace_secs", "-1", "from 0 to 3600"),
    ] {
        let text = doc(&format!("[pool.probe]\n{key} = {value}\n"), "", "");
        err(
            &text,
            &format!("{key} ="),
            &format!("pool[0].probe.{key}"),
            part,
        );
    }
}

#[test]
fn bad_alive_codes() {
    let text = doc("[pool.probe]\nalive_codes = [200, 180]\n", "", "");
    err(
        &text,
        "alive_codes",
        "pool[0].probe.alive_codes[1]",
        "from 200 to 699",
    );
    let text = doc("[pool.probe]\nalive_codes = [404, 404]\n", "", "");
    err(
        &text,
        "alive_codes",
        "pool[0].probe.alive_codes[1]",
        "already listed as alive_codes[0]",
    );
    let text = doc("[pool.probe]\nalive_codes = \"404\"\n", "", "");
    err(
        &text,
        "alive_codes",
        "pool[0].probe.alive_codes",
        "expected an array",
    );
}

#[test]
fn bad_witnesses() {
    let text = doc(
        "[pool.probe]\nwitnesses = [\"http://127.0.0.1/ok\", \"udp://127.0.0.1\"]\n",
        "",
        "",
    );
    err(
        &text,
        "witnesses",
        "pool[0].probe.witnesses[1]",
        "expected http or https",
    );
    let text = doc(
        "[pool.probe]\nwitnesses = [\"http://127.0.0.1/ok\", \"http://127.0.0.1/ok\"]\n",
        "",
        "",
    );
    err(
        &text,
        "witnesses",
        "pool[0].probe.witnesses[1]",
        "already listed as witnesses[0]",
    );
}

// ---------------------------------------------------------------- node probes

#[test]
fn bad_http_url() {
    for (url, part) in [
        ("127.0.0.1:8080/health", "not a URL"),
        ("http://admin:pw@127.0.0.1/", "credentials"),
        ("http://127.0.0.1:0/", "port"),
        ("http://pbx a/", "percent-encoded"),
    ] {
        let text = doc("", &format!("  http_url = \"{url}\"\n"), "");
        err(&text, "http_url", "pool[0].node[0].http_url", part);
    }
}

#[test]
fn node_needs_a_probe() {
    let text = doc("", "  options = false\n", "");
    err(
        &text,
        "options = false",
        "pool[0].node[0].options",
        "at least one probe",
    );
    let text = doc("", "  options = \"no\"\n", "");
    err(
        &text,
        "options =",
        "pool[0].node[0].options",
        "expected a boolean",
    );
}

// ---------------------------------------------------------------- webhooks

fn hook(keys: &str) -> String {
    doc(
        "",
        "",
        &format!("[[pool.webhook]]\nurl = \"http://127.0.0.1:9999/hook\"\n{keys}"),
    )
}

#[test]
fn webhook_needs_a_url() {
    let text = doc("", "", "[[pool.webhook]]\nmethod = \"POST\"\n");
    err(
        &text,
        "[[pool.webhook]]",
        "pool[0].webhook[0].url",
        "required key is missing",
    );
    let text = doc("", "", "[[pool.webhook]]\nurl = \"http//x\"\n");
    err(&text, "url =", "pool[0].webhook[0].url", "not a URL");
}

#[test]
fn bad_webhook_events() {
    err(
        &hook("on = [\"failover\", \"reboot\"]\n"),
        "on =",
        "pool[0].webhook[0].on[1]",
        "\"reboot\" is not an event",
    );
    err(
        &hook("on = [\"failover\", \"FAILOVER\"]\n"),
        "on =",
        "pool[0].webhook[0].on[1]",
        "listed twice",
    );
    err(
        &hook("on = []\n"),
        "on =",
        "pool[0].webhook[0].on",
        "at least one event",
    );
}

#[test]
fn bad_webhook_method() {
    err(
        &hook("method = \"FETCH\"\n"),
        "method",
        "pool[0].webhook[0].method",
        "GET, POST, PUT, PATCH or DELETE",
    );
}

#[test]
fn bad_webhook_headers() {
    err(
        &hook("headers = { \"Bad Name\" = \"x\" }\n"),
        "headers",
        "pool[0].webhook[0].headers.Bad Name",
        "not a valid HTTP header name",
    );
    err(
        &hook("headers = { Content-Length = \"3\" }\n"),
        "headers",
        "pool[0].webhook[0].headers.Content-Length",
        "set by the SBC itself",
    );
    err(
        &hook("headers = { X-A = \"a\\r\\nX-B: b\" }\n"),
        "headers",
        "pool[0].webhook[0].headers.X-A",
        "line breaks",
    );
    err(
        &hook("headers = { X-A = 1 }\n"),
        "headers",
        "pool[0].webhook[0].headers.X-A",
        "expected a string",
    );
}

#[test]
fn unknown_template_placeholder() {
    let e = err(
        &hook("body = '{\"node\":\"{node}\"}'\n"),
        "body",
        "pool[0].webhook[0].body",
        "unknown placeholder {node}",
    );
    assert!(e.message.contains("{reason}"), "lists the known ones: {e}");
    // Literal braces and every known placeholder are fine.
    ok(&hook(
        "body = '{ \"a\": {\"b\": 1}, \"t\": \"{time}\", \"e\": \"{event}\" }'\n",
    ));
}

#[test]
fn webhook_ranges() {
    err(
        &hook("timeout_ms = 50\n"),
        "timeout_ms",
        "pool[0].webhook[0].timeout_ms",
        "from 100 to 60000",
    );
    err(
        &hook("retries = 11\n"),
        "retries",
        "pool[0].webhook[0].retries",
        "from 0 to 10",
    );
}

#[test]
fn second_pool_errors_name_their_index() {
    let text = format!(
        "{}\n[[pool]]\nname = \"other\"\n[pool.probe]\nfailures = 0\n[[pool.node]]\nname = \"c\"\naddress = \"127.0.0.1:5072\"\n",
        doc("", "", "")
    );
    err(
        &text,
        "failures = 0",
        "pool[1].probe.failures",
        "from 1 to 100",
    );
}

#[test]
fn suspect_after_defaults_turns_off_and_stays_below_the_branch_timeout() {
    let pool = |text: &str| ok(text).pools[0].suspect_after;
    assert_eq!(pool(&doc("", "", "")), Some(Duration::from_millis(250)));
    assert_eq!(pool(&doc("suspect_after_ms = 0\n", "", "")), None);
    assert_eq!(
        pool(&doc("branch_timeout_ms = 200\n", "", "")),
        Some(Duration::from_millis(199)),
        "the default follows a short branch timeout down"
    );
    let text = doc("branch_timeout_ms = 500\nsuspect_after_ms = 500\n", "", "");
    err(
        &text,
        "suspect_after_ms",
        "pool[0].suspect_after_ms",
        "below branch_timeout_ms",
    );
}
