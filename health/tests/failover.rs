//! The health monitor end to end on loopback: real probe tasks against
//! scripted PBX nodes, witness URLs and a webhook receiver.
//!
//! Probe settings are scaled down (200 ms interval, 100 ms timeout, 2
//! failures, 2 successes) so a fault is detected within
//! interval x failures + timeout = 500 ms.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sbc_health::{HealthError, HealthMonitor, NodeState, Outcome};
use support::{
    config, counter, eventually, gauge, histogram_samples, Dir, HttpPeer, Mode, SipPeer,
};

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);
const FAILURES: u32 = 2;
/// Scheduling slack on a loaded 2-core test machine.
const SLACK: Duration = Duration::from_millis(250);

fn detection_bound() -> Duration {
    INTERVAL * FAILURES + TIMEOUT + SLACK
}

struct Rig {
    _dir: Dir,
    name: String,
    primary: SipPeer,
    standby: SipPeer,
    hook: HttpPeer,
    cfg: sbc_config::Config,
    monitor: Arc<HealthMonitor>,
}

impl Rig {
    /// A pool `name` of two UDP nodes (`{name}-a` primary, `{name}-b`),
    /// with `pool_keys`, `probe_keys` and `primary_keys` added, and a
    /// webhook to `hook`.
    async fn start(name: &str, pool_keys: &str, probe_keys: &str, primary_keys: &str) -> Rig {
        // Install the recorder before anything is recorded.
        support::metrics();
        let dir = Dir::new(name);
        let primary = SipPeer::udp().await;
        let standby = SipPeer::udp().await;
        let hook = HttpPeer::start(200).await;
        let cfg = config(
            &dir.0,
            &format!(
                r#"[[pool]]
name = "{name}"
{pool_keys}
[pool.probe]
interval_ms = {interval}
timeout_ms = {timeout}
failures = {FAILURES}
successes = 2
start_grace_secs = 0
{probe_keys}

[[pool.node]]
name = "{name}-a"
address = "{a}"
{primary_keys}

[[pool.node]]
name = "{name}-b"
address = "{b}"

[[pool.webhook]]
url = "{hook}"
headers = {{ Authorization = "Bearer t0ken" }}
body = '{{"pool":"{{pool}}","from":"{{from}}","to":"{{to}}","reason":"{{reason}}","time":"{{time}}","event":"{{event}}"}}'
timeout_ms = 500
retries = 1
"#,
                interval = INTERVAL.as_millis(),
                timeout = TIMEOUT.as_millis(),
                a = primary.addr,
                b = standby.addr,
                hook = hook.url("/hook"),
            ),
        );
        let monitor = HealthMonitor::start(&cfg);
        let rig = Rig {
            _dir: dir,
            name: name.to_string(),
            primary,
            standby,
            hook,
            cfg,
            monitor,
        };
        assert!(
            rig.wait_state(0, NodeState::Up, Duration::from_secs(2))
                .await,
            "primary up"
        );
        assert!(
            rig.wait_state(1, NodeState::Up, Duration::from_secs(2))
                .await,
            "standby up"
        );
        rig
    }

    async fn wait_state(&self, node: usize, state: NodeState, within: Duration) -> bool {
        eventually(within, || self.monitor.node_state(node) == Some(state)).await
    }

    async fn wait_active(&self, node: usize, within: Duration) -> bool {
        eventually(within, || self.monitor.active(0) == Some(node)).await
    }

    fn node(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    fn hooks(&self) -> Vec<serde_json::Value> {
        self.hook
            .requests()
            .iter()
            .filter(|r| r.path == "/hook")
            .map(|r| serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body)))
            .collect()
    }

    /// Applies `fault` to the primary and checks detection time, failover,
    /// the webhook and the metrics.
    async fn fault_detected_and_failed_over(&self, fault: impl FnOnce()) {
        let start = Instant::now();
        fault();
        assert!(
            self.wait_state(0, NodeState::Down, Duration::from_secs(3))
                .await,
            "primary down"
        );
        let detected = start.elapsed();
        assert!(
            detected <= detection_bound(),
            "detected after {detected:?}, bound {:?}",
            detection_bound()
        );
        // The standby answers the witness check at once.
        assert!(
            self.wait_active(1, Duration::from_millis(500)).await,
            "failed over"
        );
        assert_eq!(self.monitor.candidates(0).as_slice(), [1, 0]);

        let hooks = self.hook.wait_for("/hook", 1, Duration::from_secs(2)).await;
        assert_eq!(hooks.len(), 1, "one webhook");
        assert_eq!(hooks[0].method, "POST");
        assert_eq!(hooks[0].header("authorization"), Some("Bearer t0ken"));
        assert_eq!(hooks[0].header("content-type"), Some("application/json"));
        let body = &self.hooks()[0];
        assert_eq!(body["pool"], self.name.as_str());
        assert_eq!(body["from"], self.node("a").as_str());
        assert_eq!(body["to"], self.node("b").as_str());
        assert_eq!(body["reason"], "node_down");
        assert_eq!(body["event"], "failover");
        let time = body["time"].as_str().unwrap_or_default();
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );

        let pool = self.name.as_str();
        let (a, b) = (self.node("a"), self.node("b"));
        assert_eq!(
            counter(
                "sbc_failovers_total",
                &[("pool", pool), ("reason", "node_down")]
            ),
            1
        );
        assert_eq!(
            gauge("sbc_active_node", &[("pool", pool), ("node", &b)]),
            Some(1.0)
        );
        assert_eq!(
            gauge("sbc_active_node", &[("pool", pool), ("node", &a)]),
            Some(0.0)
        );
        assert_eq!(
            gauge(
                "sbc_node_state",
                &[("pool", pool), ("node", &a), ("state", "down")]
            ),
            Some(1.0)
        );
        assert_eq!(
            gauge(
                "sbc_node_state",
                &[("pool", pool), ("node", &a), ("state", "up")]
            ),
            Some(0.0)
        );
        assert!(
            counter(
                "sbc_node_transitions_total",
                &[("pool", pool), ("node", &a), ("to", "down")]
            ) >= 1
        );
        let status = self.monitor.status();
        assert_eq!(status[0].active.as_deref(), Some(b.as_str()));
        assert_eq!(status[0].nodes[0].state, NodeState::Down);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exited_primary_fails_over_with_webhook() {
    let rig = Rig::start("exit", "", "", "").await;
    rig.fault_detected_and_failed_over(|| rig.primary.stop())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_fails_over_with_webhook() {
    let rig = Rig::start("freeze", "", "", "").await;
    rig.fault_detected_and_failed_over(|| rig.primary.set(Mode::Silent))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_answering_503_fails_over() {
    let rig = Rig::start("busy", "", "", "").await;
    rig.fault_detected_and_failed_over(|| rig.primary.set(Mode::Answer(503)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_losing_its_http_server_fails_over() {
    let web = HttpPeer::start(200).await;
    let rig = Rig::start(
        "web",
        "",
        "",
        &format!("http_url = \"{}\"", web.url("/health")),
    )
    .await;
    // SIP keeps answering; only the web application is gone.
    rig.fault_detected_and_failed_over(|| web.set_status(500))
        .await;
    assert!(rig.primary.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failover_when_no_witness_answers() {
    let witness = HttpPeer::start(500).await;
    let rig = Rig::start(
        "cutoff",
        "",
        &format!("witnesses = [\"{}\"]", witness.url("/ok")),
        "",
    )
    .await;
    let pool = rig.name.clone();
    // The SBC's own path is cut: nothing answers any more.
    rig.primary.set(Mode::Silent);
    rig.standby.set(Mode::Silent);
    assert!(
        rig.wait_state(0, NodeState::Down, Duration::from_secs(2))
            .await
    );
    assert!(
        eventually(Duration::from_secs(2), || counter(
            "sbc_failover_suppressed_total",
            &[("pool", &pool), ("reason", "no_witness")]
        ) == 1)
        .await,
        "suppression counted"
    );
    // Retried every interval, but neither switched nor reported again.
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(rig.monitor.active(0), Some(0));
    assert_eq!(
        counter(
            "sbc_failover_suppressed_total",
            &[("pool", &pool), ("reason", "no_witness")]
        ),
        1
    );
    assert!(
        witness.requests().len() >= 3,
        "the witness URL was asked on every retry"
    );
    assert_eq!(counter("sbc_failovers_total", &[("pool", &pool)]), 0);
    assert!(rig.hook.requests().is_empty(), "no webhook");

    // The path comes back, but the standby is still silent: still no move,
    // now for want of a standby.
    witness.set_status(200);
    assert!(
        eventually(Duration::from_secs(2), || counter(
            "sbc_failover_suppressed_total",
            &[("pool", &pool), ("reason", "no_standby")]
        ) == 1)
        .await
    );
    assert_eq!(rig.monitor.active(0), Some(0));

    // The standby answers again: failover.
    rig.standby.set(Mode::Answer(200));
    assert!(rig.wait_active(1, Duration::from_secs(2)).await);
    assert_eq!(
        rig.hook
            .wait_for("/hook", 1, Duration::from_secs(2))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_url_alone_lets_it_fail_over() {
    // Both nodes probed over UDP; the standby answers slowly when the primary
    // dies, so the witness URL is the first to vouch for the SBC's path.
    let witness = HttpPeer::start(200).await;
    let rig = Rig::start(
        "url-witness",
        "",
        &format!("witnesses = [\"{}\"]", witness.url("/ok")),
        "",
    )
    .await;
    // The check asks the URL and the standby at once and takes the first answer: a standby
    // that answers 40 ms late (still well inside the 100 ms probe timeout, so it stays Up)
    // leaves the answer to the URL, even on a busy machine.
    rig.standby.set(Mode::Slow(200, 40));
    rig.primary.stop();
    assert!(
        rig.wait_state(0, NodeState::Down, Duration::from_secs(2))
            .await
    );
    assert!(rig.wait_active(1, Duration::from_secs(1)).await);
    assert!(
        eventually(Duration::from_secs(1), || !witness.requests().is_empty()).await,
        "the witness URL was asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failback_after_the_hold_down() {
    let hold = Duration::from_secs(1);
    let rig = Rig::start(
        "auto",
        "failback = \"auto\"\nfailback_hold_secs = 1",
        "",
        "",
    )
    .await;
    rig.primary.set(Mode::Silent);
    assert!(rig.wait_active(1, Duration::from_secs(2)).await);
    let back = Instant::now();
    rig.primary.set(Mode::Answer(200));
    assert!(
        rig.wait_state(0, NodeState::Up, Duration::from_secs(2))
            .await
    );
    let up = Instant::now();
    assert!(
        rig.wait_active(0, hold + INTERVAL * 2 + SLACK).await,
        "failed back"
    );
    // `up` is when polling saw the node Up, up to one poll after it was.
    let after = up.elapsed();
    assert!(
        after + Duration::from_millis(10) >= hold,
        "failed back {after:?} after Up, hold {hold:?}"
    );
    assert!(back.elapsed() >= hold);

    let hooks = rig.hook.wait_for("/hook", 2, Duration::from_secs(2)).await;
    assert_eq!(hooks.len(), 2);
    let bodies = rig.hooks();
    assert_eq!(bodies[1]["event"], "failback");
    assert_eq!(bodies[1]["reason"], "auto_failback");
    assert_eq!(bodies[1]["from"], rig.node("b").as_str());
    assert_eq!(bodies[1]["to"], rig.node("a").as_str());
    assert_eq!(
        counter(
            "sbc_failbacks_total",
            &[("pool", &rig.name), ("reason", "auto_failback")]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failback_only_when_asked_even_with_a_flapping_primary() {
    let rig = Rig::start("manual", "", "", "").await;
    rig.primary.set(Mode::Silent);
    assert!(rig.wait_active(1, Duration::from_secs(2)).await);
    assert!(matches!(
        rig.monitor.failback(0),
        Err(HealthError::NothingToFailBackTo { .. })
    ));

    // The primary flaps for 3 s: the active node never moves.
    let mut changes = rig.monitor.subscribe();
    changes.borrow_and_update();
    let flap_until = Instant::now() + Duration::from_secs(3);
    let mut on = true;
    while Instant::now() < flap_until {
        rig.primary
            .set(if on { Mode::Answer(200) } else { Mode::Silent });
        on = !on;
        for _ in 0..30 {
            assert_eq!(rig.monitor.active(0), Some(1), "switched while flapping");
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    assert!(changes.has_changed().unwrap_or(false), "flaps were seen");
    assert_eq!(
        counter("sbc_failovers_total", &[("pool", &rig.name)]),
        1,
        "one failover, no more"
    );

    // Steady again; still on the standby until the operator says so.
    rig.primary.set(Mode::Answer(200));
    assert!(
        rig.wait_state(0, NodeState::Up, Duration::from_secs(2))
            .await
    );
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(rig.monitor.active(0), Some(1));
    rig.monitor.failback(0).expect("failback");
    assert_eq!(rig.monitor.active(0), Some(0));
    assert_eq!(rig.monitor.failback(0), Ok(()), "idempotent");
    let hooks = rig.hook.wait_for("/hook", 2, Duration::from_secs(2)).await;
    assert_eq!(hooks.len(), 2);
    assert_eq!(rig.hooks()[1]["reason"], "manual_failback");
    assert_eq!(rig.hooks()[1]["event"], "failback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_failures_count() {
    let rig = Rig::start("traffic", "", "", "").await;
    // Successes change nothing.
    rig.monitor.observe(0, Outcome::Answered(200));
    rig.monitor.observe(0, Outcome::Answered(486));
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Up));
    // One timeout: Suspect, and new transactions try the standby first.
    rig.monitor.observe(0, Outcome::Timeout);
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Suspect));
    assert_eq!(rig.monitor.candidates(0).as_slice(), [1, 0]);
    assert_eq!(rig.monitor.active(0), Some(0));
    // The next probe clears it.
    assert!(rig.wait_state(0, NodeState::Up, INTERVAL * 2 + SLACK).await);
    assert_eq!(rig.monitor.candidates(0).as_slice(), [0, 1]);
    // A 503 and a transport error in a row: Down, and a failover.
    rig.monitor.observe(0, Outcome::Answered(503));
    rig.monitor.observe(0, Outcome::TransportError);
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Down));
    assert!(rig.wait_active(1, Duration::from_secs(1)).await);
    assert!(
        counter(
            "sbc_node_transitions_total",
            &[("pool", &rig.name), ("reason", "traffic_failed")]
        ) >= 2
    );
    // Unknown nodes are ignored.
    rig.monitor.observe(99, Outcome::Timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_and_manual_failover() {
    let rig = Rig::start("maint", "", "", "").await;
    rig.monitor.set_maintenance(0, true).expect("maintenance");
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Maintenance));
    assert_eq!(rig.monitor.active(0), Some(1));
    assert_eq!(rig.monitor.candidates(0).as_slice(), [1]);
    // Probes go on without reporting anything.
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Maintenance));
    rig.monitor
        .set_maintenance(0, false)
        .expect("maintenance off");
    assert_eq!(rig.monitor.node_state(0), Some(NodeState::Up));
    assert_eq!(rig.monitor.active(0), Some(1), "manual failback policy");

    rig.monitor
        .failover(0, "move to \"a\" for the upgrade")
        .expect("failover");
    assert_eq!(rig.monitor.active(0), Some(0));
    let hooks = rig.hook.wait_for("/hook", 2, Duration::from_secs(2)).await;
    assert_eq!(hooks.len(), 2);
    let bodies = rig.hooks();
    assert_eq!(bodies[0]["reason"], "maintenance");
    assert_eq!(bodies[1]["reason"], "move to \"a\" for the upgrade");
    assert_eq!(
        counter(
            "sbc_failovers_total",
            &[("pool", &rig.name), ("reason", "manual")]
        ),
        1
    );

    assert_eq!(
        rig.monitor.failover(7, "x"),
        Err(HealthError::UnknownPool(7))
    );
    assert_eq!(rig.monitor.failback(7), Err(HealthError::UnknownPool(7)));
    assert_eq!(
        rig.monitor.set_maintenance(9, true),
        Err(HealthError::UnknownNode(9))
    );
    rig.standby.stop();
    assert!(
        rig.wait_state(1, NodeState::Down, Duration::from_secs(2))
            .await
    );
    assert!(matches!(
        rig.monitor.failover(0, ""),
        Err(HealthError::NoStandby { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_and_shutdown() {
    let rig = Rig::start("status", "", "", "").await;
    assert_eq!(rig.monitor.pool_index("status"), Some(0));
    assert_eq!(rig.monitor.node_index("status-b"), Some(1));
    assert_eq!(rig.monitor.node_index("nope"), None);
    let status = rig.monitor.status();
    let json = serde_json::to_value(&status).expect("serializes");
    assert_eq!(json[0]["name"], "status");
    assert_eq!(json[0]["active"], "status-a");
    assert_eq!(json[0]["failback"], "manual");
    assert_eq!(json[0]["nodes"][1]["name"], "status-b");
    assert_eq!(json[0]["nodes"][1]["state"], "up");
    assert_eq!(json[0]["nodes"][0]["active"], true);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let since = json[0]["nodes"][0]["since"].as_u64().unwrap_or(0);
    assert!(since <= now && since + 10 >= now, "{since} vs {now}");

    // Probe round-trip times are measured.
    let labels = [("pool", "status"), ("kind", "options")];
    assert!(
        eventually(Duration::from_secs(2), || histogram_samples(
            "sbc_probe_rtt_seconds",
            &labels
        ) > 0)
        .await
    );

    rig.monitor.shutdown();
    tokio::time::sleep(INTERVAL).await;
    let seen = rig.primary.requests();
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(rig.primary.requests(), seen, "no probes after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_grace_keeps_a_silent_node_starting() {
    let dir = Dir::new("grace");
    let node = SipPeer::udp().await;
    node.set(Mode::Silent);
    let cfg = config(
        &dir.0,
        &format!(
            "[[pool]]\nname = \"grace\"\n[pool.probe]\ninterval_ms = 100\ntimeout_ms = 50\nstart_grace_secs = 1\n\
             [[pool.node]]\nname = \"grace-a\"\naddress = \"{}\"\n",
            node.addr
        ),
    );
    let start = Instant::now();
    let monitor = HealthMonitor::start(&cfg);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(monitor.node_state(0), Some(NodeState::Starting));
    assert!(node.requests() >= 5, "probed all along");
    // A Starting node is still a candidate: traffic must flow before the
    // first answer.
    assert_eq!(monitor.candidates(0).as_slice(), [0]);
    assert!(
        eventually(Duration::from_secs(2), || monitor.node_state(0)
            == Some(NodeState::Down))
        .await
    );
    assert!(start.elapsed() >= Duration::from_secs(1));
    // A single-node pool: Down, still tried (nothing else), nothing to fail over to.
    assert_eq!(monitor.candidates(0).as_slice(), [0]);
    assert_eq!(monitor.active(0), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_health_and_the_active_node() {
    let rig = Rig::start("reload", "", "", "").await;
    rig.primary.set(Mode::Silent);
    assert!(rig.wait_active(1, Duration::from_secs(2)).await);
    let reloaded = HealthMonitor::start_from(&rig.cfg, Some(&rig.monitor));
    rig.monitor.shutdown();
    // The dead primary is not revived, and traffic does not move.
    assert_eq!(reloaded.node_state(0), Some(NodeState::Down));
    assert_eq!(reloaded.node_state(1), Some(NodeState::Up));
    assert_eq!(reloaded.active(0), Some(1));
    assert_eq!(reloaded.candidates(0).as_slice(), [1, 0]);
    // And the new monitor probes: the primary comes back Up, no failback
    // (manual policy).
    rig.primary.set(Mode::Answer(200));
    assert!(
        eventually(Duration::from_secs(2), || reloaded.node_state(0)
            == Some(NodeState::Up))
        .await
    );
    assert_eq!(reloaded.active(0), Some(1));
    // A fresh start knows nothing. The primary goes silent first: an
    // answering one could turn the fresh monitor's Starting into Up before
    // the assert reads it (seen in CI); a silent one stays Starting for at
    // least one probe timeout.
    reloaded.shutdown();
    rig.primary.set(Mode::Silent);
    let fresh = HealthMonitor::start(&rig.cfg);
    assert_eq!(fresh.node_state(0), Some(NodeState::Starting));
    assert_eq!(fresh.active(0), Some(0));
}
