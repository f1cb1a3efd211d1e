//! Failover drills through a running SBC (issue 4, "Tests"): with steady load — 20 calls/s
//! from a scripted trunk and phones re-registering — the primary PBX
//!
//! (a) exits (the scripted PBX shuts down its sockets),
//! (b) freezes (SIGSTOP of a real Kamailio acting as the primary PBX; SIGCONT at the end),
//! (c) answers 503 to everything,
//! (d) loses only its web server (the node has an `http_url` probe: SIP still answers, but a
//!     node is alive only when every configured probe passes, so it must go Down),
//!
//! and each drill counts failed calls and failed registrations from the fault on, asserts
//! that no new call and no registration failed (the standby is up), that the primary is
//! declared Down within interval x failures + probe timeout (+ slack for a loaded 2-core
//! machine), that the SBC fails over once, and that the failover webhooks arrive with the
//! right bodies. Then: a flapping primary causes exactly one switch under manual failback;
//! manual failback (the operator's call) and automatic failback after the hold-down.
//!
//! The calls: trunk `carrier-in` (127.0.0.20) calls `sip:9NNNN@pbx.test`; the SBC sends it
//! to the pool's active node; the PBX routes numbers starting with 9 to the carrier domain
//! `carrier.test` back through the SBC, which sends it to trunk `carrier-out` (127.0.0.21),
//! a stateless callee answering 200 at once. Each call is hung up at once (BYE through the
//! record-routed path). So a call needs the PBX, not the phones' registrations (the two
//! PBX nodes share no registration state, as separate PBXs would not). The phones register
//! without digest (the nonce of one node means nothing to the other, a PBX-pair matter
//! beyond the SBC).
//!
//! Probe settings are scaled down: 500 ms interval, 300 ms timeout, 2 failures, 2 successes;
//! branch timeout 1 s (the default). Each drill runs 12 s of load (240 calls).

use sbc_tests::net::free_udp;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbc_health::NodeState;
use sbc_sip::Transport;
use sbc_tests::http_stub::{HttpRequest, HttpStub};
use sbc_tests::kamailio::{free_port, kamailio_available, KamailioPbx, PathMode, PBX_CFG_TEMPLATE};
use sbc_tests::load::{self, AutoAnswer, OpRecord};
use sbc_tests::pbx::{Pbx, PbxConfig, PbxMode};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::trunk::Trunk;

const INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const FAILURES: u32 = 2;
const BRANCH_TIMEOUT: Duration = Duration::from_millis(1000);
/// Scheduling slack: two cores shared by parallel tests and other builds.
const SLACK: Duration = Duration::from_millis(700);
/// Calls per second of the steady load, and how many (12 s).
const RATE: f64 = 20.0;
const CALLS: usize = 240;
/// When the fault is injected, after the load started.
const FAULT_AT: Duration = Duration::from_secs(4);
/// Phones re-registering once per `REG_PERIOD`, `REG_ROUNDS` times (5 REGISTER/s).
const PHONES: usize = 5;
const REG_PERIOD: Duration = Duration::from_secs(1);
const REG_ROUNDS: usize = 12;

/// Detection bound of the issue: interval x failures + timeout, plus slack.
fn detection_bound() -> Duration {
    INTERVAL * FAILURES + PROBE_TIMEOUT + SLACK
}

/// The bound on the switch itself: detection, then the witness check (a fresh probe of the
/// standby, at most the probe timeout + 100 ms).
fn failover_bound() -> Duration {
    detection_bound() + PROBE_TIMEOUT + Duration::from_millis(100)
}

enum Primary {
    Fake(Pbx),
    Kamailio(KamailioPbx),
}

#[derive(Clone, Copy)]
struct Opts {
    /// `"manual"` or `"auto"`.
    failback: &'static str,
    failback_hold_secs: u64,
    /// The primary is a real Kamailio (else the scripted PBX).
    kamailio: bool,
    /// The primary also has an `http_url` probe on a stub the test controls.
    primary_http: bool,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            failback: "manual",
            failback_hold_secs: 300,
            kamailio: false,
            primary_http: false,
        }
    }
}

struct Rig {
    sbc: sbc::Sbc,
    primary: Primary,
    standby: Pbx,
    /// The primary's web server (its `http_url`), when configured.
    web: Option<HttpStub>,
    /// Receives every webhook.
    hook: HttpStub,
    _callee: AutoAnswer,
    trunk: Arc<Trunk>,
    phones: Vec<Arc<Phone>>,
    pool: usize,
    primary_idx: usize,
    standby_idx: usize,
}

/// The scripted PBX's routing of `9...` numbers, for Kamailio: to the carrier domain through
/// the SBC (record-routed, as every INVITE in the template).
fn kamailio_template(sbc: SocketAddr) -> String {
    let anchor = "\n\troute(LOCATION);\n}";
    assert!(
        PBX_CFG_TEMPLATE.contains(anchor),
        "tests/kamailio/pbx.cfg changed: the drill's hairpin route needs a new anchor"
    );
    let hairpin = format!(
        "\n\tif ($rU =~ \"^9\") {{\n\t\t$ru = \"sip:\" + $rU + \"@carrier.test\";\n\t\t$du = \"sip:{sbc}\";\n\t\troute(RELAY);\n\t}}{anchor}"
    );
    PBX_CFG_TEMPLATE.replacen(anchor, &hairpin, 1)
}

impl Rig {
    async fn start(opts: Opts) -> Rig {
        sbc_tests::init_tracing();
        let kam_port = opts
            .kamailio
            .then(|| free_port().expect("a free port for kamailio"));
        let primary_addr = match kam_port {
            Some(p) => SocketAddr::from(([127, 0, 0, 1], p)),
            None => free_udp("127.0.0.2"),
        };
        let standby_addr = free_udp("127.0.0.3");
        let trunk_addr = free_udp("127.0.0.20");
        let callee_addr = free_udp("127.0.0.21");
        let hook = HttpStub::start("127.0.0.1").await.expect("webhook stub");
        let web = if opts.primary_http {
            Some(HttpStub::start("127.0.0.2").await.expect("web stub"))
        } else {
            None
        };
        let http_key = web
            .as_ref()
            .map(|w| format!("http_url = \"{}\"", w.url("/status")))
            .unwrap_or_default();
        let cfg = format!(
            r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"

[[pool]]
name = "pbx"
failback = "{failback}"
failback_hold_secs = {hold}
branch_timeout_ms = {branch}
[pool.probe]
interval_ms = {interval}
timeout_ms = {timeout}
failures = {FAILURES}
successes = 2
start_grace_secs = 10
[[pool.node]]
name = "primary"
address = "{primary_addr}"
{http_key}
[[pool.node]]
name = "standby"
address = "{standby_addr}"
[[pool.webhook]]
url = "{hook_url}"
[[pool.webhook]]
on = ["failover"]
method = "PUT"
url = "{custom_url}"
headers = {{ X-Drill = "yes" }}
body = "pool={{pool}} from={{from}} to={{to}} reason={{reason}} event={{event}}"

[[trunk]]
name = "carrier-in"
sources = ["127.0.0.20"]
address = "{trunk_addr}"
pool = "pbx"

[[trunk]]
name = "carrier-out"
sources = ["127.0.0.21"]
address = "{callee_addr}"
domains = ["carrier.test"]

[phones]
sources = ["127.0.0.0/8"]
pool = "pbx"
"#,
            failback = opts.failback,
            hold = opts.failback_hold_secs,
            branch = BRANCH_TIMEOUT.as_millis(),
            interval = INTERVAL.as_millis(),
            timeout = PROBE_TIMEOUT.as_millis(),
            hook_url = hook.url("/hook"),
            custom_url = hook.url("/custom"),
        );
        let cfg = sbc_config::parse(&cfg, Path::new("drills.toml")).expect("config");
        let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
        let udp = sbc.addr(Transport::Udp).expect("udp");
        let pbx_cfg = |addr| {
            let mut c = PbxConfig::new(addr, "pbx.test", udp).trunk("9", "carrier.test");
            c.auth = false;
            c
        };
        let primary = match kam_port {
            Some(port) => Primary::Kamailio(
                KamailioPbx::start_template(port, &kamailio_template(udp), PathMode::Lazy)
                    .expect("kamailio starts"),
            ),
            None => Primary::Fake(Pbx::start(pbx_cfg(primary_addr)).await.expect("primary")),
        };
        let standby = Pbx::start(pbx_cfg(standby_addr)).await.expect("standby");
        let callee = AutoAnswer::start(callee_addr).await.expect("callee");
        let trunk = Arc::new(Trunk::start(trunk_addr, udp).await.expect("trunk"));
        let mut phones = Vec::new();
        for i in 0..PHONES {
            let c = PhoneConfig::new(&format!("ext{i}"), "pbx.test", "", udp);
            phones.push(Arc::new(Phone::new(c).await.expect("phone")));
        }
        let health = &sbc.health;
        Rig {
            pool: health.pool_index("pbx").expect("pool"),
            primary_idx: health.node_index("primary").expect("primary"),
            standby_idx: health.node_index("standby").expect("standby"),
            sbc,
            primary,
            standby,
            web,
            hook,
            _callee: callee,
            trunk,
            phones,
        }
    }

    fn fake_primary(&self) -> &Pbx {
        match &self.primary {
            Primary::Fake(p) => p,
            Primary::Kamailio(_) => panic!("the primary is Kamailio"),
        }
    }

    fn state(&self, node: usize) -> Option<NodeState> {
        self.sbc.health.node_state(node)
    }

    fn active(&self) -> Option<usize> {
        self.sbc.health.active(self.pool)
    }

    /// Waits until the probes have seen both nodes answer.
    async fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.state(self.primary_idx) == Some(NodeState::Up)
            && self.state(self.standby_idx) == Some(NodeState::Up))
        {
            assert!(
                Instant::now() < deadline,
                "nodes never came up: {:?}",
                self.sbc.health.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.active(), Some(self.primary_idx));
    }

    /// Waits until `cond` holds (polling every 5 ms), up to `within`; the time it took.
    async fn wait_until(&self, within: Duration, cond: impl Fn(&Rig) -> bool) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if cond(self) {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn log(&self) -> String {
        match &self.primary {
            Primary::Kamailio(k) => format!("\n--- kamailio log ---\n{}", k.log()),
            Primary::Fake(_) => String::new(),
        }
    }
}

/// What a drill measured.
struct Drill {
    calls: Vec<OpRecord>,
    regs: Vec<OpRecord>,
    fault: Instant,
    /// From the fault to the primary being Down / the standby active.
    down: Option<Duration>,
    failover: Option<Duration>,
}

/// Runs the steady load, injects `fault` at `FAULT_AT`, and watches detection and the switch.
async fn drill<F, Fut>(rig: &Rig, fault: F) -> Drill
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    rig.wait_all_up().await;
    for p in &rig.phones {
        let r = p.register(60).await.expect("register");
        assert_eq!(r.status(), Some(200), "phones register before the drill");
    }
    let calls = tokio::spawn(load::run_calls(rig.trunk.clone(), RATE, CALLS, |n| {
        format!("sip:9{n:04}@pbx.test")
    }));
    let regs = load::run_registrations(rig.phones.clone(), REG_PERIOD, REG_ROUNDS, 60);
    let inject = async {
        tokio::time::sleep(FAULT_AT).await;
        fault().await;
        let at = Instant::now();
        let (p, s) = (rig.primary_idx, rig.standby_idx);
        let mut down = None;
        let mut failover = None;
        while at.elapsed() < Duration::from_secs(8) && (down.is_none() || failover.is_none()) {
            if down.is_none() && rig.state(p) == Some(NodeState::Down) {
                down = Some(at.elapsed());
            }
            if failover.is_none() && rig.active() == Some(s) {
                failover = Some(at.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (at, down, failover)
    };
    let (regs, (at, down, failover)) = tokio::join!(regs, inject);
    Drill {
        calls: calls.await.expect("call load"),
        regs,
        fault: at,
        down,
        failover,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Prints the drill's figures and asserts what every drill must show.
fn check_drill(name: &str, rig: &Rig, d: &Drill) {
    let calls = load::tally(&d.calls, d.fault);
    let regs = load::tally(&d.regs, d.fault);
    let new_lat = load::latencies(&d.calls, d.fault, d.fault + Duration::from_secs(3600));
    let slow = new_lat.iter().filter(|l| **l >= BRANCH_TIMEOUT / 2).count();
    let max_new = new_lat.last().copied().unwrap_or_default();
    eprintln!(
        "drill {name}: primary down after {:?}, standby active after {:?} (bound {}); \
         calls: {} before the fault ({} failed), {} after ({} failed, {} set up in >= {}, max setup {}); \
         registrations: {} after the fault ({} failed)",
        d.down.map(ms),
        d.failover.map(ms),
        ms(detection_bound()),
        calls.before,
        calls.failed_before,
        calls.after,
        calls.failed_after,
        slow,
        ms(BRANCH_TIMEOUT / 2),
        ms(max_new),
        regs.after,
        regs.failed_after,
    );
    assert_eq!(
        d.calls.len(),
        CALLS,
        "every call of the load ran{}",
        rig.log()
    );
    // Calls well before the fault prove the path works at all.
    let early: Vec<&OpRecord> = d
        .calls
        .iter()
        .filter(|r| r.started + Duration::from_secs(1) < d.fault)
        .collect();
    assert!(early.len() >= 40, "{} early calls", early.len());
    let early_failed: Vec<_> = early.iter().filter(|r| !r.is_ok()).collect();
    assert!(
        early_failed.is_empty(),
        "calls before the fault failed: {early_failed:?}{}",
        rig.log()
    );
    assert!(calls.after >= 100, "{} calls after the fault", calls.after);
    assert_eq!(
        calls.failed_after,
        0,
        "new calls failed although the standby is up: {:?}{}",
        calls.examples,
        rig.log()
    );
    assert!(
        regs.after >= 30,
        "{} registrations after the fault",
        regs.after
    );
    assert_eq!(
        regs.failed_after, 0,
        "registrations failed although the standby is up: {:?}",
        regs.examples
    );
    // A new call waits at most one branch timeout for the failed primary.
    assert!(
        max_new < BRANCH_TIMEOUT + SLACK,
        "a new call took {max_new:?} to set up"
    );
    let down = d.down.expect("the primary was never declared Down");
    assert!(
        down <= detection_bound(),
        "detection took {down:?} (bound {:?})",
        detection_bound()
    );
    let failover = d.failover.expect("the SBC never failed over");
    assert!(
        failover <= failover_bound(),
        "failover took {failover:?} (bound {:?})",
        failover_bound()
    );
    assert_eq!(rig.active(), Some(rig.standby_idx), "still on the standby");
    // Steady state: after the switch no new call waits on the primary.
    let settled = d.fault + failover + Duration::from_millis(200);
    let after_switch = load::latencies(&d.calls, settled, settled + Duration::from_secs(3600));
    let waited = after_switch
        .iter()
        .filter(|l| **l >= BRANCH_TIMEOUT * 9 / 10)
        .count();
    assert_eq!(
        waited, 0,
        "calls after the switch still waited for the primary: {after_switch:?}"
    );
    assert!(
        rig.standby.stats().requests_of("INVITE") >= 100,
        "the standby carried the calls"
    );
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("webhook body {body:?}: {e}"))
}

/// The failover webhooks: exactly one of each kind, with the right body.
async fn check_failover_webhooks(rig: &Rig) {
    rig.hook.wait_for("/hook", 1, Duration::from_secs(5)).await;
    rig.hook
        .wait_for("/custom", 1, Duration::from_secs(5))
        .await;
    // Give a duplicate the chance to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hooks: Vec<HttpRequest> = rig.hook.requests_to("/hook");
    assert_eq!(hooks.len(), 1, "one default webhook: {hooks:?}");
    let h = &hooks[0];
    assert_eq!(h.method, "POST");
    assert_eq!(h.header("content-type"), Some("application/json"));
    let v = json(&h.body);
    assert_eq!(v["event"], "failover", "{v}");
    assert_eq!(v["pool"], "pbx", "{v}");
    assert_eq!(v["from"], "primary", "{v}");
    assert_eq!(v["to"], "standby", "{v}");
    assert_eq!(v["reason"], "node_down", "{v}");
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    let custom = rig.hook.requests_to("/custom");
    assert_eq!(custom.len(), 1, "one custom webhook: {custom:?}");
    let c = &custom[0];
    assert_eq!(c.method, "PUT");
    assert_eq!(c.header("x-drill"), Some("yes"));
    assert_eq!(
        c.body,
        "pool=pbx from=primary to=standby reason=node_down event=failover"
    );
}

// ------------------------------------------------------------------ the four faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_primary_exits() {
    let rig = Rig::start(Opts::default()).await;
    let d = drill(&rig, || rig.fake_primary().stop()).await;
    check_drill("exit", &rig, &d);
    check_failover_webhooks(&rig).await;
    rig.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_primary_freezes() {
    if !kamailio_available() {
        if std::env::var_os("CI").is_some() {
            panic!("kamailio is not installed; scripts/install-deps.sh installs it");
        }
        eprintln!(
            "SKIP drill_primary_freezes: kamailio is not installed (scripts/install-deps.sh)"
        );
        return;
    }
    let rig = Rig::start(Opts {
        kamailio: true,
        ..Opts::default()
    })
    .await;
    let Primary::Kamailio(kam) = &rig.primary else {
        unreachable!()
    };
    let d = drill(&rig, || async { kam.signal("STOP") }).await;
    kam.signal("CONT");
    check_drill("freeze (SIGSTOP of Kamailio)", &rig, &d);
    check_failover_webhooks(&rig).await;
    // Kamailio carried the calls before the fault (the log names them).
    assert!(kam.log().contains("INVITE sip:9"), "{}", rig.log());
    rig.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_primary_answers_503() {
    let rig = Rig::start(Opts::default()).await;
    let d = drill(&rig, || async {
        rig.fake_primary().set_mode(PbxMode::Respond503)
    })
    .await;
    check_drill("503", &rig, &d);
    check_failover_webhooks(&rig).await;
    // A 503 is retried at once: no new call waited.
    let new = load::latencies(&d.calls, d.fault, d.fault + Duration::from_secs(3600));
    let max = new.last().copied().unwrap_or_default();
    assert!(max < Duration::from_millis(500), "a new call took {max:?}");
    // Once switched, the 503-answering primary sees no more new calls.
    let invites = rig.fake_primary().stats().requests_of("INVITE");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.fake_primary().stats().requests_of("INVITE"), invites);
    rig.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_primary_loses_its_web_server() {
    let rig = Rig::start(Opts {
        primary_http: true,
        ..Opts::default()
    })
    .await;
    let web = rig.web.as_ref().expect("web stub");
    let d = drill(&rig, || web.stop()).await;
    check_drill("web server gone", &rig, &d);
    check_failover_webhooks(&rig).await;
    // SIP kept answering: the primary carried calls until the switch, and none failed.
    let primary_invites = rig.fake_primary().stats().requests_of("INVITE");
    assert!(
        primary_invites >= 60,
        "{primary_invites} INVITEs on the primary"
    );
    assert!(
        !web.requests_to("/status").is_empty(),
        "the web server was probed before it went away"
    );
    rig.sbc.shutdown();
}

// ------------------------------------------------------------------ flapping and failback

/// Records every change of the primary's state and of the active node until `stop`.
async fn watch(rig: &Rig, until: Instant) -> (Vec<NodeState>, Vec<Option<usize>>) {
    let mut states = vec![];
    let mut actives = vec![];
    while Instant::now() < until {
        let s = rig.state(rig.primary_idx).expect("state");
        if states.last() != Some(&s) {
            states.push(s);
        }
        let a = rig.active();
        if actives.last() != Some(&a) {
            actives.push(a);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (states, actives)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_primary_switches_once_under_manual_failback() {
    let rig = Rig::start(Opts::default()).await;
    rig.wait_all_up().await;
    let calls = tokio::spawn(load::run_calls(rig.trunk.clone(), RATE, CALLS, |n| {
        format!("sip:9{n:04}@pbx.test")
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault = Instant::now();
    // Silent and back every 3 intervals: long enough to go Down and to come back Up.
    let flap = async {
        for _ in 0..4 {
            rig.fake_primary().set_mode(PbxMode::Silent);
            tokio::time::sleep(INTERVAL * 3).await;
            rig.fake_primary().set_mode(PbxMode::Normal);
            tokio::time::sleep(INTERVAL * 3).await;
        }
    };
    let ((states, actives), ()) = tokio::join!(watch(&rig, fault + INTERVAL * 24), flap);
    let calls = calls.await.expect("calls");
    let t = load::tally(&calls, fault);
    eprintln!(
        "flapping: primary states {states:?}, active {actives:?}; {} calls after the first fault, {} failed",
        t.after, t.failed_after
    );
    let downs = states.iter().filter(|s| **s == NodeState::Down).count();
    let ups = states
        .iter()
        .skip(1)
        .filter(|s| **s == NodeState::Up)
        .count();
    assert!(
        downs >= 3 && ups >= 3,
        "the primary did not flap: {states:?}"
    );
    assert_eq!(
        actives,
        vec![Some(rig.primary_idx), Some(rig.standby_idx)],
        "exactly one switch"
    );
    assert_eq!(t.failed_after, 0, "failed calls: {:?}", t.examples);
    check_failover_webhooks(&rig).await;
    rig.sbc.shutdown();
}

/// Fails over with a 503-answering primary under load, then heals it and waits until it is
/// Up again; returns when the heal happened.
async fn fail_over_and_heal(rig: &Rig) -> Instant {
    rig.fake_primary().set_mode(PbxMode::Respond503);
    let t = rig
        .wait_until(failover_bound(), |r| r.active() == Some(r.standby_idx))
        .await;
    assert!(t.is_some(), "no failover: {:?}", rig.sbc.health.status());
    rig.fake_primary().set_mode(PbxMode::Normal);
    let healed = Instant::now();
    let up = rig
        .wait_until(INTERVAL * 4 + SLACK, |r| {
            r.state(r.primary_idx) == Some(NodeState::Up)
        })
        .await;
    assert!(
        up.is_some(),
        "primary not Up again: {:?}",
        rig.sbc.health.status()
    );
    healed
}

fn failback_hooks(rig: &Rig) -> Vec<serde_json::Value> {
    rig.hook
        .requests_to("/hook")
        .iter()
        .map(|h| json(&h.body))
        .filter(|v| v["event"] == "failback")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failback_on_the_operators_call() {
    let rig = Rig::start(Opts::default()).await;
    rig.wait_all_up().await;
    let calls = tokio::spawn(load::run_calls(rig.trunk.clone(), RATE, 160, |n| {
        format!("sip:9{n:04}@pbx.test")
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault = Instant::now();
    fail_over_and_heal(&rig).await;
    // Manual: a healthy primary gets nothing back by itself.
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(rig.active(), Some(rig.standby_idx), "no failback by itself");
    assert!(failback_hooks(&rig).is_empty());
    let before = rig.fake_primary().stats().requests_of("INVITE");
    rig.sbc.health.failback(rig.pool).expect("failback");
    assert_eq!(
        rig.active(),
        Some(rig.primary_idx),
        "the operator's failback"
    );
    let status = &rig.sbc.health.status()[rig.pool];
    assert!(!status.pinned);
    let calls = calls.await.expect("calls");
    let t = load::tally(&calls, fault);
    assert_eq!(t.failed_after, 0, "failed calls: {:?}", t.examples);
    assert!(
        rig.fake_primary().stats().requests_of("INVITE") >= before + 20,
        "new calls go to the primary again"
    );
    let hooks = rig.hook.wait_for("/hook", 2, Duration::from_secs(5)).await;
    assert_eq!(hooks.len(), 2, "failover and failback webhooks: {hooks:?}");
    let back = failback_hooks(&rig);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["from"], "standby");
    assert_eq!(back[0]["to"], "primary");
    assert_eq!(back[0]["reason"], "manual_failback");
    assert_eq!(back[0]["pool"], "pbx");
    // The custom webhook is for failovers only.
    assert_eq!(rig.hook.requests_to("/custom").len(), 1);
    rig.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_failback_after_hold_down() {
    const HOLD: Duration = Duration::from_secs(2);
    let rig = Rig::start(Opts {
        failback: "auto",
        failback_hold_secs: HOLD.as_secs(),
        ..Opts::default()
    })
    .await;
    rig.wait_all_up().await;
    let calls = tokio::spawn(load::run_calls(rig.trunk.clone(), RATE, 160, |n| {
        format!("sip:9{n:04}@pbx.test")
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault = Instant::now();
    fail_over_and_heal(&rig).await;
    let back = rig
        .wait_until(HOLD + INTERVAL * 2 + SLACK, |r| {
            r.active() == Some(r.primary_idx)
        })
        .await
        .expect("automatic failback");
    // The hold-down counts from the primary's Up transition, which this loop saw at most
    // one poll (5 ms) late.
    assert!(
        back + Duration::from_millis(50) >= HOLD,
        "failed back {back:?} after the primary came Up (hold-down {HOLD:?})"
    );
    eprintln!(
        "auto failback {} after the primary came up (hold-down {})",
        ms(back),
        ms(HOLD)
    );
    let calls = calls.await.expect("calls");
    let t = load::tally(&calls, fault);
    assert_eq!(t.failed_after, 0, "failed calls: {:?}", t.examples);
    let hooks = rig.hook.wait_for("/hook", 2, Duration::from_secs(5)).await;
    assert_eq!(hooks.len(), 2, "failover and failback webhooks: {hooks:?}");
    let back = failback_hooks(&rig);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["from"], "standby");
    assert_eq!(back[0]["to"], "primary");
    assert_eq!(back[0]["reason"], "auto_failback");
    rig.sbc.shutdown();
}
