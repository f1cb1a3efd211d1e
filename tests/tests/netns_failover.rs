//! "No failover when the SBC's own path to everything is cut" (issue 4, "Tests").
//!
//! The test builds its own network namespace and a veth pair: the SBC runs in-process but in
//! the namespace (a thread calls setns(CLONE_NEWNET) before building its tokio runtime, so
//! every socket the SBC, its probes, witness checks and webhooks create lives there), with
//! its end of the veth at 198.18.X.2; both PBX nodes, the witness URL and the webhook
//! receiver run in the test's own namespace on the other end, 198.18.X.1 (198.18.0.0/15 is
//! the benchmarking range, RFC 2544: nothing on a real network uses it; X is derived from
//! the process id so parallel runs do not clash). No packet leaves the two namespaces.
//!
//! Then the SBC's link goes down (`ip link set ... down` inside its namespace). Every probe
//! fails, the primary goes Down — and the SBC must not fail over: the witness check reaches
//! nothing (neither the standby nor the witness URL), so the fault is its own. It must say so
//! (log line with reason `no_witness`), fire no webhook, and keep the primary active when the
//! link comes back.
//!
//! Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and `ip` (iproute2, installed by
//! scripts/install-deps.sh). Without them the test prints why and passes as skipped, unless
//! `CI` is set and we are root (CI machines are expected to support it: then it fails).
//! The namespace and the veth pair are removed by a Drop guard, also when the test fails.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sbc_health::{HealthMonitor, NodeState};
use sbc_tests::http_stub::HttpStub;
use sbc_tests::pbx::{Pbx, PbxConfig};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const FAILURES: u32 = 2;
const SLACK: Duration = Duration::from_millis(700);

// ------------------------------------------------------------------ log capture

/// Every WARN-or-above event of the process, rendered as `message k=v k=v`.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

struct Render(String);

impl Visit for Render {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?} "));
        } else {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        let mut r = Render(String::new());
        event.record(&mut r);
        self.0.lock().push(r.0);
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        self.0.lock().clone()
    }
}

/// The process-wide capture (installed once; every test shares it).
fn install_capture() -> Captured {
    static CAPTURE: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let c = Captured::default();
            let fmt = tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::filter::LevelFilter::WARN);
            let _ = tracing_subscriber::registry()
                .with(c.clone())
                .with(fmt)
                .try_init();
            c
        })
        .clone()
}

// ------------------------------------------------------------------ namespace plumbing

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with one end of a veth pair in it; both removed on drop.
struct NetNs {
    name: String,
    /// The veth end in our (the test's) namespace.
    outer: String,
    /// The veth end in the SBC's namespace.
    inner: String,
    /// Our address / the SBC's, on a /30.
    outer_ip: Ipv4Addr,
    inner_ip: Ipv4Addr,
}

impl NetNs {
    /// `tag` (0-9) tells apart the namespaces of tests running at once in this process.
    fn create(tag: u32) -> Result<NetNs, String> {
        let pid = std::process::id();
        let n = (pid * 10 + tag) % 16384;
        let base = Ipv4Addr::new(198, 18, (n / 64) as u8, ((n % 64) * 4) as u8);
        let [a, b, c, d] = base.octets();
        let ns = NetNs {
            name: format!("sbc-drill-{pid}-{tag}"),
            outer: format!("sbcd{pid}{tag}o"),
            inner: format!("sbcd{pid}{tag}i"),
            outer_ip: Ipv4Addr::new(a, b, c, d + 1),
            inner_ip: Ipv4Addr::new(a, b, c, d + 2),
        };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link", "add", &ns.outer, "type", "veth", "peer", "name", &ns.inner,
        ])?;
        ip(&["link", "set", &ns.inner, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.outer_ip),
            "dev",
            &ns.outer,
        ])?;
        ip(&["link", "set", &ns.outer, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.inner_ip),
            "dev",
            &ns.inner,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &ns.inner, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes the SBC's end of the link down (or up again).
    fn set_inner(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.name, "link", "set", &self.inner, state]).expect("ip link set");
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; deleting the namespace deletes its end too.
        let _ = ip(&["link", "del", &self.outer]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Why namespaces cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    match Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`ip netns list` failed ({s})")),
        Err(e) => Some(format!(
            "`ip` not found ({e}); scripts/install-deps.sh installs iproute2"
        )),
    }
}

// ------------------------------------------------------------------ the SBC in the namespace

/// An SBC running on its own thread and runtime inside a network namespace.
struct NsSbc {
    health: Arc<HealthMonitor>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsSbc {
    fn start(ns_path: String, cfg: sbc_config::Config) -> NsSbc {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&ns_path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd; it only changes this thread's network
            // namespace (threads spawned from here on, the runtime's workers, inherit it).
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let sbc = sbc::Sbc::start(&cfg)
                    .await
                    .expect("sbc starts in the namespace");
                let addr = sbc.addr(sbc_sip::Transport::Udp).expect("udp");
                ready_tx.send((sbc.health.clone(), addr)).expect("ready");
                let _ = stop_rx.await;
                sbc.shutdown();
            });
        });
        let (health, addr) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the SBC started in the namespace");
        NsSbc {
            health,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for NsSbc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ the lab

struct Lab {
    // Field order is drop order: the SBC first, the namespace last.
    sbc: NsSbc,
    _primary: Pbx,
    _standby: Pbx,
    witness: HttpStub,
    hook: HttpStub,
    logs: Captured,
    ns: NetNs,
    /// The primary's node name (unique per test: the log capture is process-wide).
    name: String,
    pool: usize,
    p: usize,
    s: usize,
}

/// The namespace, the peers and the SBC, with both nodes Up; `None` when namespaces are
/// unavailable here (the reason is printed).
async fn lab(test: &str, tag: u32) -> Option<Lab> {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    let logs = install_capture();
    let ns = match NetNs::create(tag) {
        Ok(ns) => ns,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("cannot create a network namespace as root: {e}");
            }
            eprintln!("SKIP {test}: {e}");
            return None;
        }
    };
    let outer = ns.outer_ip.to_string();
    let witness = HttpStub::start(&outer).await.expect("witness");
    let hook = HttpStub::start(&outer).await.expect("webhook receiver");
    // The PBX nodes only answer the SBC's OPTIONS here (nothing is forwarded), so the SBC
    // address they are given does not matter.
    let peer = |port| SocketAddr::from((ns.outer_ip, port));
    let sbc_guess = SocketAddr::from((ns.inner_ip, 5060));
    let primary = Pbx::start(PbxConfig::new(peer(0), "pbx.test", sbc_guess))
        .await
        .expect("primary");
    let standby = Pbx::start(PbxConfig::new(peer(0), "pbx.test", sbc_guess))
        .await
        .expect("standby");
    let name = format!("primary{tag}");
    let text = format!(
        r#"
[[listen]]
transport = "udp"
addr = "{inner}:0"
[[pool]]
name = "pbx{tag}"
[pool.probe]
interval_ms = {interval}
timeout_ms = {timeout}
failures = {FAILURES}
successes = 2
start_grace_secs = 10
witnesses = ["{witness}"]
[[pool.node]]
name = "{name}"
address = "{primary}"
[[pool.node]]
name = "standby{tag}"
address = "{standby}"
[[pool.webhook]]
url = "{hook}"
"#,
        inner = ns.inner_ip,
        interval = INTERVAL.as_millis(),
        timeout = PROBE_TIMEOUT.as_millis(),
        witness = witness.url("/alive"),
        primary = primary.addr(),
        standby = standby.addr(),
        hook = hook.url("/hook"),
    );
    let config = sbc_config::parse(&text, Path::new("netns.toml")).expect("config");
    let sbc = NsSbc::start(ns.path(), config);
    assert_eq!(
        sbc.addr.ip(),
        ns.inner_ip,
        "the SBC listens in its namespace"
    );
    let lab = Lab {
        pool: sbc.health.pool_index(&format!("pbx{tag}")).expect("pool"),
        p: sbc.health.node_index(&name).expect("primary"),
        s: sbc
            .health
            .node_index(&format!("standby{tag}"))
            .expect("standby"),
        sbc,
        _primary: primary,
        _standby: standby,
        witness,
        hook,
        logs,
        ns,
        name,
    };
    // Healthy first: both nodes answer the SBC's probes across the veth.
    let t0 = Instant::now();
    while !(lab.state(lab.p) == Some(NodeState::Up) && lab.state(lab.s) == Some(NodeState::Up)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nodes never came up across the veth: {:?}",
            lab.sbc.health.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(lab)
}

impl Lab {
    fn state(&self, node: usize) -> Option<NodeState> {
        self.sbc.health.node_state(node)
    }

    fn active(&self) -> Option<usize> {
        self.sbc.health.active(self.pool)
    }

    /// Captured WARN lines about this lab's primary.
    fn lines(&self) -> Vec<String> {
        let me = format!("node=\"{}\"", self.name);
        self.logs
            .lines()
            .into_iter()
            .filter(|l| l.contains(&me))
            .collect()
    }

    /// Cuts the SBC's link and watches detection and several witness retries: the primary
    /// must go Down in time, the SBC must not move, and one line must say why.
    async fn cut(&self) {
        let lines_before = self.lines().len();
        let witness_before = self.witness.requests().len();
        self.ns.set_inner(false);
        let cut = Instant::now();
        let mut down = None;
        let mut active_seen = vec![];
        let bound = INTERVAL * FAILURES + PROBE_TIMEOUT + SLACK;
        // Long enough for detection and four witness retries (one per interval).
        while cut.elapsed() < bound + INTERVAL * 4 {
            if down.is_none() && self.state(self.p) == Some(NodeState::Down) {
                down = Some(cut.elapsed());
            }
            let a = self.active();
            if active_seen.last() != Some(&a) {
                active_seen.push(a);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let down = down.expect("the primary was never declared Down: the cut was not seen");
        assert!(down <= bound, "detection took {down:?} (bound {bound:?})");
        assert_eq!(
            active_seen,
            vec![Some(self.p)],
            "the SBC must not fail over"
        );
        let lines = self.lines();
        let new = lines.get(lines_before..).unwrap_or_default();
        let suppressed: Vec<&String> = new
            .iter()
            .filter(|l| l.contains("no witness answered") && l.contains("reason=\"no_witness\""))
            .collect();
        assert_eq!(
            suppressed.len(),
            1,
            "one log line says why (no witness), not one per retry: {new:#?}"
        );
        assert!(!new.iter().any(|l| l.contains("failed over")), "{new:#?}");
        assert_eq!(
            self.witness.requests().len(),
            witness_before,
            "nothing reached the witness while cut"
        );
        eprintln!(
            "netns: primary Down {:.0} ms after the cut; no failover; {}",
            down.as_secs_f64() * 1000.0,
            suppressed[0]
        );
    }

    /// Brings the link back and waits until the primary is Up again; the active nodes seen
    /// meanwhile.
    async fn restore(&self) -> Vec<Option<usize>> {
        self.ns.set_inner(true);
        let back = Instant::now();
        let mut active_seen = vec![];
        loop {
            let a = self.active();
            if active_seen.last() != Some(&a) {
                active_seen.push(a);
            }
            if self.state(self.p) == Some(NodeState::Up)
                && self.state(self.s) == Some(NodeState::Up)
            {
                break;
            }
            assert!(
                back.elapsed() < INTERVAL * 4 + SLACK * 2,
                "the nodes did not come back: {:?}",
                self.sbc.health.status()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A switch decided on the last probe would show up now.
        tokio::time::sleep(INTERVAL).await;
        let a = self.active();
        if active_seen.last() != Some(&a) {
            active_seen.push(a);
        }
        active_seen
    }
}

// ------------------------------------------------------------------ the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failover_when_the_sbcs_own_path_is_cut() {
    let Some(lab) = lab("no_failover_when_the_sbcs_own_path_is_cut", 0).await else {
        return;
    };
    lab.cut().await;
    // The link comes back and both nodes recover (whether the SBC then stays on the primary
    // is the next test's subject).
    lab.restore().await;
    assert!(
        !lab.hook
            .requests()
            .iter()
            .any(|r| r.body.contains(&lab.name) && r.body.contains("no_witness")),
        "no webhook speaks of a witness failure"
    );
}

/// After the cut heals, both nodes recover from Down with `successes` fresh probes each; the
/// probe tasks of the two nodes are not aligned, so about one time in three the standby's
/// second success lands before the primary's: the primary (still Down from probes taken
/// while the SBC itself was cut off) is then failed away from by the witness retry, though
/// it never failed. Three cut/heal cycles make that show up most runs. See the report of the
/// failover drills for the diagnosis and the proposed fix in health/src/pool.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failover_after_the_sbcs_own_path_comes_back() {
    let Some(lab) = lab("no_failover_after_the_sbcs_own_path_comes_back", 1).await else {
        return;
    };
    for cycle in 0..3 {
        lab.cut().await;
        let seen = lab.restore().await;
        assert_eq!(
            seen,
            vec![Some(lab.p)],
            "cycle {cycle}: the SBC failed over after its own link came back: {:#?}",
            lab.lines()
        );
    }
    assert!(
        lab.hook.requests().is_empty(),
        "no webhook: {:?}",
        lab.hook.requests()
    );
}
