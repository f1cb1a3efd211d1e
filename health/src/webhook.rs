//! Webhooks fired when a pool's active node moves.
//!
//! Operators use them to repoint DNS or wake a passive standby, so they
//! must arrive, but they must never slow the failover itself: each one is
//! delivered from a task of its own, with a timeout per attempt and a few
//! retries with growing pauses. A webhook that still fails is logged (one
//! line) and counted in `sbc_webhooks_total{pool,event,result="failed"}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sbc_config::{fill_template, HttpUrl, Webhook, WebhookEvent};

use crate::error::ProbeError;
use crate::http;
use crate::tls::Tls;

/// Pause before the first retry; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// The values of a webhook's placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookVars {
    /// Failover or failback.
    pub event: WebhookEvent,
    /// The pool's name.
    pub pool: String,
    /// The node that was active.
    pub from: String,
    /// The node that is active now.
    pub to: String,
    /// Why: `node_down`, `maintenance`, `auto_failback`, `manual_failback`,
    /// or an operator's reason for a manual failover.
    pub reason: String,
    /// When the switch happened.
    pub time: SystemTime,
}

/// Fills `template` with `vars`, each value escaped as inside a JSON
/// string (`"`, `\` and control characters), so the default JSON body stays
/// valid JSON whatever an operator's reason says.
pub fn render(template: &str, vars: &WebhookVars) -> String {
    let values = [
        ("pool", json_escape(&vars.pool)),
        ("from", json_escape(&vars.from)),
        ("to", json_escape(&vars.to)),
        ("reason", json_escape(&vars.reason)),
        ("time", rfc3339(vars.time)),
        ("event", vars.event.as_str().to_string()),
    ];
    fill_template(template, |name| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    })
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `time` in RFC 3339, UTC, whole seconds: `2026-11-22T00:47:55Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// Delivers `hook` once, retrying per its settings; returns the final
/// status (2xx) or the last error.
pub async fn deliver(hook: &Webhook, vars: &WebhookVars) -> Result<u16, ProbeError> {
    deliver_with(hook, vars, &Tls::new(None)).await
}

pub(crate) async fn deliver_with(
    hook: &Webhook,
    vars: &WebhookVars,
    tls: &Tls,
) -> Result<u16, ProbeError> {
    let url = HttpUrl::parse(&hook.url).map_err(ProbeError::Protocol)?;
    let body = Bytes::from(render(&hook.body, vars));
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        let send = http::send(&url, &hook.method, &hook.headers, body.clone(), tls.get());
        let result = match tokio::time::timeout(hook.timeout, send).await {
            Err(_) => Err(ProbeError::Timeout),
            Ok(Ok(code)) if (200..300).contains(&code) => return Ok(code),
            Ok(Ok(code)) => Err(ProbeError::Status(code)),
            Ok(Err(e)) => Err(e),
        };
        if attempt >= hook.retries {
            return result;
        }
        if let Err(e) = &result {
            tracing::debug!(pool = %vars.pool, url = %url.authority, attempt, error = %e, "webhook attempt failed; retrying");
        }
        attempt += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Fires every webhook of `hooks` that listens to `vars.event`, each from
/// a task of its own on `runtime`.
pub(crate) fn fire(
    runtime: &tokio::runtime::Handle,
    hooks: &[Webhook],
    vars: &WebhookVars,
    tls: &Tls,
) {
    for hook in hooks.iter().filter(|h| h.fires_on(vars.event)) {
        let hook = hook.clone();
        let vars = vars.clone();
        let tls = tls.clone();
        runtime.spawn(async move {
            let authority = HttpUrl::parse(&hook.url)
                .map(|u| u.authority)
                .unwrap_or_default();
            match deliver_with(&hook, &vars, &tls).await {
                Ok(code) => {
                    tracing::debug!(pool = %vars.pool, event = %vars.event, url = %authority, code, "webhook delivered");
                    metrics::counter!(
                        "sbc_webhooks_total",
                        "pool" => vars.pool.clone(),
                        "event" => vars.event.as_str(),
                        "result" => "ok",
                    )
                    .increment(1);
                }
                Err(e) => {
                    tracing::warn!(
                        pool = %vars.pool,
                        event = %vars.event,
                        url = %authority,
                        attempts = hook.retries + 1,
                        error = %e,
                        "webhook failed"
                    );
                    metrics::counter!(
                        "sbc_webhooks_total",
                        "pool" => vars.pool.clone(),
                        "event" => vars.event.as_str(),
                        "result" => "failed",
                    )
                    .increment(1);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_308_475);
        assert_eq!(rfc3339(t), "2026-11-22T00:47:55Z");
        // Leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn bodies_are_filled_and_escaped() {
        let vars = WebhookVars {
            event: WebhookEvent::Failover,
            pool: "pbx".into(),
            from: "pbx-a".into(),
            to: "pbx-b".into(),
            reason: "operator said \"go\"\\\n".into(),
            time: UNIX_EPOCH,
        };
        assert_eq!(
            render(Webhook::DEFAULT_BODY, &vars),
            r#"{"event":"failover","pool":"pbx","from":"pbx-a","to":"pbx-b","reason":"operator said \"go\"\\\n","time":"1970-01-01T00:00:00Z"}"#
        );
        assert_eq!(render("{x}-{to}\u{1}", &vars), "{x}-pbx-b\u{1}");
        assert_eq!(json_escape("a\u{1}b\tc"), "a\\u0001b\\tc");
    }
}
