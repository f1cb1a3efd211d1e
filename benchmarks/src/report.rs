//! The result of one generator run: the human summary and the JSON file other scripts read.
//!
//! JSON is written by hand: the schema is flat numbers and a few short ASCII strings, and a
//! serializer dependency would buy nothing.

use crate::cpu::PidCpu;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Exact latency percentiles from every sample (microseconds). A run holds at most a few
/// million samples, so sorting them once at the end is cheaper and more honest than a
/// bucketed histogram.
#[derive(Default)]
pub struct Latencies {
    samples: Vec<u32>,
    sorted: bool,
}

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Latencies {
            samples: Vec::with_capacity(n),
            sorted: false,
        }
    }
    pub fn record_us(&mut self, us: u64) {
        self.samples.push(us.min(u32::MAX as u64) as u32);
        self.sorted = false;
    }
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
    /// Nearest-rank percentile in milliseconds; `None` without samples.
    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let n = self.samples.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        Some(self.samples[idx] as f64 / 1000.0)
    }
    pub fn max_ms(&mut self) -> Option<f64> {
        self.percentile_ms(100.0)
    }
}

/// Everything a run measured.
#[derive(Default, Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub rate: f64,
    pub duration_s: f64,
    /// Operations (calls or REGISTERs) started.
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Operations the schedule called for but that were not started because the generator
    /// fell more than its grace period behind (it is saturated: the run is not valid).
    pub not_started: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    /// Failures by cause: "timeout_invite", "timeout_bye", "timeout_register", "status_486",
    /// "bad_2xx", "abandoned".
    pub failures: BTreeMap<String, u64>,
    /// Calls that received a 100 / a 180 or 183 before their 200.
    pub calls_with_100: u64,
    pub calls_with_180: u64,
    pub sent: u64,
    pub retransmissions: u64,
    pub send_errors: u64,
    pub received: u64,
    pub parse_errors: u64,
    /// Responses that match no transaction of this run (or requests sent to the generator).
    pub unmatched: u64,
    /// Responses to a transaction already finished (late or retransmitted responses).
    pub stale: u64,
    /// Extra responses to a live transaction that change nothing (duplicate 1xx, ...).
    pub duplicates: u64,
    /// Worst lateness of a scheduled send: how far the open-loop schedule slipped.
    pub send_lag_max_ms: f64,
    /// Time from the first scheduled send to the last completion.
    pub elapsed_s: f64,
    pub loadgen_cpu_seconds: f64,
    pub cpu: Vec<PidCpu>,
}

impl Report {
    pub fn failure_ratio(&self) -> f64 {
        if self.attempted == 0 {
            0.0
        } else {
            self.failed as f64 / self.attempted as f64
        }
    }

    /// Sum over the watched pids (the whole system under test); `None` when nothing was
    /// watched or a pid could not be read.
    pub fn cpu_seconds(&self) -> Option<f64> {
        if self.cpu.is_empty() {
            return None;
        }
        self.cpu.iter().map(|c| c.cpu_seconds).sum()
    }

    fn per_op_us(&self, secs: Option<f64>) -> Option<f64> {
        match secs {
            Some(s) if self.succeeded > 0 => Some(s * 1e6 / self.succeeded as f64),
            _ => None,
        }
    }

    pub fn cpu_us_per_op(&self) -> Option<f64> {
        self.per_op_us(self.cpu_seconds())
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let _ = writeln!(
            s,
            "scenario {} -> {}: rate {}/s for {} s",
            self.scenario, self.target, self.rate, self.duration_s
        );
        let _ = writeln!(
            s,
            "  attempted {}  succeeded {}  failed {}  failure ratio {:.6}{}",
            self.attempted,
            self.succeeded,
            self.failed,
            self.failure_ratio(),
            if self.not_started > 0 {
                format!("  NOT STARTED {} (generator saturated)", self.not_started)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "  latency ms: p50 {}  p90 {}  p99 {}  max {}",
            ms(self.latency_p50_ms),
            ms(self.latency_p90_ms),
            ms(self.latency_p99_ms),
            ms(self.latency_max_ms)
        );
        if !self.failures.is_empty() {
            let f: Vec<String> = self
                .failures
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "  failures: {}", f.join(" "));
        }
        if self.scenario == "call" {
            let _ = writeln!(
                s,
                "  calls with 100: {}  with 180/183: {}",
                self.calls_with_100, self.calls_with_180
            );
        }
        let _ = writeln!(
            s,
            "  datagrams sent {} (retransmissions {}, send errors {})  received {} (unparseable {}, unmatched {}, stale {}, duplicate {})",
            self.sent,
            self.retransmissions,
            self.send_errors,
            self.received,
            self.parse_errors,
            self.unmatched,
            self.stale,
            self.duplicates
        );
        let _ = writeln!(
            s,
            "  schedule lag max {:.3} ms  elapsed {:.3} s  loadgen cpu {:.3} s ({:.1} us/op)",
            self.send_lag_max_ms,
            self.elapsed_s,
            self.loadgen_cpu_seconds,
            self.per_op_us(Some(self.loadgen_cpu_seconds))
                .unwrap_or(0.0)
        );
        for c in &self.cpu {
            match c.cpu_seconds {
                Some(sec) => {
                    let _ = writeln!(
                        s,
                        "  pid {}: cpu {:.3} s, {} us/op",
                        c.pid,
                        sec,
                        self.per_op_us(Some(sec))
                            .map_or("-".to_string(), |v| format!("{v:.1}"))
                    );
                }
                None => {
                    let _ = writeln!(s, "  pid {}: cpu unreadable", c.pid);
                }
            }
        }
        if self.cpu.len() > 1 {
            let _ = writeln!(
                s,
                "  all pids: cpu {} s, {} us/op",
                self.cpu_seconds()
                    .map_or("-".to_string(), |v| format!("{v:.3}")),
                self.cpu_us_per_op()
                    .map_or("-".to_string(), |v| format!("{v:.1}"))
            );
        }
        s
    }

    pub fn json(&self) -> String {
        let mut j = Json::default();
        j.str("scenario", &self.scenario);
        j.str("target", &self.target);
        j.num("rate", Some(self.rate));
        j.num("duration", Some(self.duration_s));
        j.int("attempted", self.attempted);
        j.int("succeeded", self.succeeded);
        j.int("failed", self.failed);
        j.num("failure_ratio", Some(self.failure_ratio()));
        j.num("latency_p50_ms", self.latency_p50_ms);
        j.num("latency_p90_ms", self.latency_p90_ms);
        j.num("latency_p99_ms", self.latency_p99_ms);
        j.num("latency_max_ms", self.latency_max_ms);
        j.int("not_started", self.not_started);
        j.raw(
            "failures",
            &format!(
                "{{{}}}",
                self.failures
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", quote(k)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        j.int("calls_with_100", self.calls_with_100);
        j.int("calls_with_180", self.calls_with_180);
        j.int("sent", self.sent);
        j.int("retransmissions", self.retransmissions);
        j.int("send_errors", self.send_errors);
        j.int("received", self.received);
        j.int("parse_errors", self.parse_errors);
        j.int("unmatched", self.unmatched);
        j.int("stale", self.stale);
        j.int("duplicates", self.duplicates);
        j.num("send_lag_max_ms", Some(self.send_lag_max_ms));
        j.num("elapsed_s", Some(self.elapsed_s));
        j.num("loadgen_cpu_seconds", Some(self.loadgen_cpu_seconds));
        j.num(
            "loadgen_cpu_us_per_op",
            self.per_op_us(Some(self.loadgen_cpu_seconds)),
        );
        j.num("cpu_seconds", self.cpu_seconds());
        j.num("cpu_us_per_op", self.cpu_us_per_op());
        let pids: Vec<String> = self
            .cpu
            .iter()
            .map(|c| {
                format!(
                    "{{\"pid\":{},\"cpu_seconds\":{},\"cpu_us_per_op\":{}}}",
                    c.pid,
                    fmt_num(c.cpu_seconds),
                    fmt_num(self.per_op_us(c.cpu_seconds))
                )
            })
            .collect();
        j.raw("pids", &format!("[{}]", pids.join(",")));
        j.finish()
    }
}

#[derive(Default)]
struct Json {
    fields: Vec<String>,
}

impl Json {
    fn raw(&mut self, k: &str, v: &str) {
        self.fields.push(format!("{}:{v}", quote(k)));
    }
    fn str(&mut self, k: &str, v: &str) {
        self.raw(k, &quote(v));
    }
    fn int(&mut self, k: &str, v: u64) {
        self.raw(k, &v.to_string());
    }
    fn num(&mut self, k: &str, v: Option<f64>) {
        self.raw(k, &fmt_num(v));
    }
    fn finish(self) -> String {
        format!("{{\n  {}\n}}\n", self.fields.join(",\n  "))
    }
}

/// JSON has no NaN/inf; missing or non-finite values are null.
fn fmt_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => {
            let s = format!("{v:.6}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s.is_empty() || s == "-" {
                "0".to_string()
            } else {
                s.to_string()
            }
        }
        _ => "null".to_string(),
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut l = Latencies::default();
        assert_eq!(l.percentile_ms(50.0), None);
        for us in (1..=100).rev() {
            l.record_us(us * 1000);
        }
        assert_eq!(l.percentile_ms(50.0), Some(50.0));
        assert_eq!(l.percentile_ms(99.0), Some(99.0));
        assert_eq!(l.max_ms(), Some(100.0));
    }

    #[test]
    fn json_shape() {
        let mut r = Report {
            scenario: "call".into(),
            attempted: 10,
            succeeded: 9,
            failed: 1,
            ..Default::default()
        };
        r.failures.insert("status_486".into(), 1);
        r.cpu.push(PidCpu {
            pid: 7,
            cpu_seconds: Some(0.09),
        });
        let j = r.json();
        assert!(j.contains("\"failure_ratio\":0.1"), "{j}");
        assert!(j.contains("\"latency_p50_ms\":null"), "{j}");
        assert!(j.contains("\"failures\":{\"status_486\":1}"), "{j}");
        assert!(j.contains("\"cpu_us_per_op\":10000"), "{j}");
        assert_eq!(fmt_num(Some(2.5)), "2.5");
        assert_eq!(fmt_num(Some(f64::NAN)), "null");
    }
}
