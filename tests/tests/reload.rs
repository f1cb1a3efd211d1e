//! Hot reload of the configuration (issue 6), through a running SBC on loopback:
//!
//! - under a steady 20 calls/s with phones re-registering, two reloads (one through
//!   `POST /reload`, one through `Sbc::reload`) lose no call and no registration, keep the
//!   nodes' health, and a trunk added by the first one takes calls right after;
//! - a broken file leaves the running configuration in place (calls still work, generation
//!   unchanged) and the error names file:line, over the API (422) and the Rust call;
//! - a swapped certificate is served to new TLS connections while an established one goes
//!   on; a key that does not match its certificate is refused with file:line;
//! - a reload keeps a Down primary Down and the standby active;
//! - a change of the file (rename-replace and write in place) triggers a reload by itself,
//!   and the reload reading the file does not trigger another one;
//! - SIGHUP triggers a reload (safe in this process: the handler is installed before the
//!   signal is raised, and no other test of this binary relies on SIGHUP's default action).
//!
//! The calls: trunk `carrier-in` (127.0.0.20) calls `sip:9NNNN@pbx.test`; the active PBX node
//! routes it back through the SBC to `carrier.test`, trunk `carrier-out` (127.0.0.21), a
//! stateless callee answering at once; each call is hung up at once.

use sbc_tests::net::free_udp;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use sbc_health::NodeState;
use sbc_sip::Transport;
use sbc_tests::load::{self, AutoAnswer};
use sbc_tests::pbx::{Pbx, PbxConfig, PbxMode};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::pki::TestPki;
use sbc_tests::trunk::Trunk;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static RIGS: AtomicU32 = AtomicU32::new(0);

/// What the configuration file says; tests change a field and write the file again.
#[derive(Clone)]
struct Params {
    primary: SocketAddr,
    standby: SocketAddr,
    trunk: SocketAddr,
    callee: SocketAddr,
    interval_ms: u64,
    /// Trunk `carrier-extra`, sources 127.0.0.22, at this address.
    extra_trunk: Option<SocketAddr>,
    /// A third node `spare` in the pool.
    spare: Option<SocketAddr>,
    /// A TLS listener with `cert.pem` / `key.pem` of the rig's directory.
    tls: bool,
}

fn render(p: &Params, dir: &Path) -> String {
    let mut s = format!(
        r#"# written by tests/tests/reload.rs
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"

[[pool]]
name = "pbx"
branch_timeout_ms = 1000
[pool.probe]
interval_ms = {interval}
timeout_ms = 150
failures = 2
successes = 2
start_grace_secs = 10
[[pool.node]]
name = "primary"
address = "{primary}"
[[pool.node]]
name = "standby"
address = "{standby}"
"#,
        interval = p.interval_ms,
        primary = p.primary,
        standby = p.standby,
    );
    if let Some(spare) = p.spare {
        s.push_str(&format!(
            "[[pool.node]]\nname = \"spare\"\naddress = \"{spare}\"\n"
        ));
    }
    s.push_str(&format!(
        r#"
[[trunk]]
name = "carrier-in"
sources = ["127.0.0.20"]
address = "{trunk}"
pool = "pbx"

[[trunk]]
name = "carrier-out"
sources = ["127.0.0.21"]
address = "{callee}"
domains = ["carrier.test"]
"#,
        trunk = p.trunk,
        callee = p.callee,
    ));
    if let Some(extra) = p.extra_trunk {
        s.push_str(&format!(
            "\n[[trunk]]\nname = \"carrier-extra\"\nsources = [\"127.0.0.22\"]\naddress = \"{extra}\"\npool = \"pbx\"\n"
        ));
    }
    s.push_str("\n[phones]\nsources = [\"127.0.0.0/8\"]\npool = \"pbx\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    if p.tls {
        s.push_str(&format!(
            "\n[[listen]]\ntransport = \"tls\"\naddr = \"127.0.0.1:0\"\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n",
            d = dir.display()
        ));
    }
    s
}

struct Rig {
    sbc: sbc::Sbc,
    dir: PathBuf,
    file: PathBuf,
    params: Params,
    primary: Pbx,
    _standby: Pbx,
    _callee: AutoAnswer,
    trunk: Arc<Trunk>,
    admin: SocketAddr,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.sbc.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An SBC started from a file, with the admin endpoint and `POST /reload` enabled; a
/// two-node pool of scripted PBXs (no digest: calls hairpin through them), the trunks and
/// the callee. With `tls`, the caller writes `cert.pem`/`key.pem` into `dir` first
/// (see [`Rig::dir_for`]).
async fn rig(tls: bool, dir: Option<PathBuf>) -> Rig {
    sbc_tests::init_tracing();
    let dir = dir.unwrap_or_else(Rig::dir_for);
    let params = Params {
        primary: free_udp("127.0.0.2"),
        standby: free_udp("127.0.0.3"),
        trunk: free_udp("127.0.0.20"),
        callee: free_udp("127.0.0.21"),
        interval_ms: 200,
        extra_trunk: None,
        spare: None,
        tls,
    };
    let file = dir.join("sbc.toml");
    std::fs::write(&file, render(&params, &dir)).expect("write config");
    let cfg = sbc_config::load(&file).expect("config");
    let sbc = sbc::Sbc::start_with(&cfg, sbc::StartOptions { admin: true })
        .await
        .expect("sbc");
    sbc.enable_reload_api();
    let admin = sbc.admin_addr().expect("admin endpoint");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let pbx = |addr| {
        let mut c = PbxConfig::new(addr, "pbx.test", udp).trunk("9", "carrier.test");
        c.auth = false;
        c
    };
    let primary = Pbx::start(pbx(params.primary)).await.expect("primary");
    let standby = Pbx::start(pbx(params.standby)).await.expect("standby");
    let callee = AutoAnswer::start(params.callee).await.expect("callee");
    let trunk = Arc::new(Trunk::start(params.trunk, udp).await.expect("trunk"));
    Rig {
        sbc,
        dir,
        file,
        params,
        primary,
        _standby: standby,
        _callee: callee,
        trunk,
        admin,
    }
}

impl Rig {
    /// A fresh temporary directory for one rig.
    fn dir_for() -> PathBuf {
        let n = RIGS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sbc-reload-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        dir
    }

    /// Writes the file for `params` (in place) and remembers them.
    fn write(&mut self, params: Params) {
        std::fs::write(&self.file, render(&params, &self.dir)).expect("write config");
        self.params = params;
    }

    fn state(&self, node: &str) -> Option<NodeState> {
        let i = self.sbc.health.node_index(node)?;
        self.sbc.health.node_state(i)
    }

    fn active(&self) -> Option<String> {
        self.sbc.health.status()[0].active.clone()
    }

    async fn wait_for(&self, what: &str, within: Duration, cond: impl Fn(&Rig) -> bool) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{what} within {within:?}: {:?}",
                self.sbc.health.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_all_up(&self) {
        self.wait_for("both nodes up", Duration::from_secs(10), |r| {
            r.state("primary") == Some(NodeState::Up) && r.state("standby") == Some(NodeState::Up)
        })
        .await;
    }

    /// One call from trunk `carrier-in` through the active PBX to the callee: the final
    /// status of the INVITE (the call is hung up when answered).
    async fn call(&self, n: usize) -> u16 {
        call_from(&self.trunk, n).await
    }

    async fn post_reload(&self) -> (u16, Value) {
        let (status, body) = http(self.admin, "POST", "/reload").await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (status, json)
    }
}

async fn call_from(trunk: &Trunk, n: usize) -> u16 {
    let call = trunk
        .invite(&format!("sip:9{n:04}@pbx.test"))
        .await
        .expect("an answer to the INVITE");
    if call.final_status == 200 {
        let bye = trunk.bye(&call).await.expect("BYE answered");
        assert_eq!(bye.status(), Some(200));
    }
    call.final_status
}

/// One HTTP/1.1 request on a fresh connection: status and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("admin answers within 10 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (status, body.to_string())
}

/// The value of a sample in the admin endpoint's /metrics, by its exact text before the value.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_call_and_no_registration() {
    const RATE: f64 = 20.0;
    const CALLS: usize = 160; // 8 s
    const PHONES: usize = 5;
    let mut rig = rig(false, None).await;
    let udp = rig.sbc.addr(Transport::Udp).expect("udp");
    let mut phones = Vec::new();
    for i in 0..PHONES {
        let c = PhoneConfig::new(&format!("ext{i}"), "pbx.test", "", udp);
        phones.push(Arc::new(Phone::new(c).await.expect("phone")));
    }
    rig.wait_all_up().await;
    for p in &phones {
        assert_eq!(p.register(60).await.expect("register").status(), Some(200));
    }
    // Before the reload the extra trunk's address is nobody the SBC knows: refused.
    let extra = Trunk::start(free_udp("127.0.0.22"), udp)
        .await
        .expect("extra trunk");
    assert_eq!(call_from(&extra, 9000).await, 403);

    let calls = tokio::spawn(load::run_calls(rig.trunk.clone(), RATE, CALLS, |n| {
        format!("sip:9{n:04}@pbx.test")
    }));
    let regs = load::run_registrations(phones.clone(), Duration::from_secs(1), 8, 60);
    let reloads = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // 1: add a trunk and change the probe interval, through the admin API.
        let mut p = rig.params.clone();
        p.extra_trunk = Some(extra.addr());
        p.interval_ms = 300;
        rig.write(p);
        let (status, report) = rig.post_reload().await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["generation"], 2, "{report}");
        assert_eq!(strings(&report["trunks_added"]), ["carrier-extra"]);
        assert_eq!(strings(&report["pools_changed"]), ["pbx"]);
        assert!(strings(&report["nodes_added"]).is_empty(), "{report}");
        assert!(strings(&report["restart_required"]).is_empty(), "{report}");
        // Unchanged nodes kept their health: no restart of their grace, no move.
        assert_eq!(rig.state("primary"), Some(NodeState::Up));
        assert_eq!(rig.state("standby"), Some(NodeState::Up));
        assert_eq!(rig.active().as_deref(), Some("primary"));
        // The new trunk is routed at once.
        assert_eq!(call_from(&extra, 9001).await, 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // 2: the probe interval back, through the Rust call.
        let mut p = rig.params.clone();
        p.interval_ms = 200;
        rig.write(p);
        let report = rig.sbc.reload().await.expect("second reload");
        assert_eq!(report.generation, 3);
        assert_eq!(report.pools_changed, ["pbx"]);
        assert!(report.trunks_added.is_empty() && report.trunks_removed.is_empty());
    };
    let (regs, ()) = tokio::join!(regs, reloads);
    let calls = calls.await.expect("load task");
    let failed: Vec<_> = calls.iter().filter(|c| !c.is_ok()).collect();
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert_eq!(calls.len(), CALLS);
    let failed: Vec<_> = regs.iter().filter(|r| !r.is_ok()).collect();
    assert!(failed.is_empty(), "registrations failed: {failed:?}");
    assert_eq!(regs.len(), PHONES * 8);
    assert_eq!(rig.sbc.proxy.registrations.len(), PHONES);
    assert_eq!(rig.sbc.generation(), 3);
    // (sbc_config_generation is one gauge for the whole test process: not asserted here.)
    assert!(metric(rig.admin, "sbc_reloads_total{result=\"ok\"}").await >= 2.0);
    assert_eq!(rig.active().as_deref(), Some("primary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_leaves_the_running_config_and_names_file_and_line() {
    let mut rig = rig(false, None).await;
    rig.wait_all_up().await;
    assert_eq!(rig.call(1).await, 200);
    let errors_before = metric(rig.admin, "sbc_reloads_total{result=\"error\"}").await;

    // A bad value: the error names the file, the line and the key.
    let good = render(&rig.params, &rig.dir);
    let broken = good.replacen("interval_ms = 200", "interval_ms = \"soon\"", 1);
    assert_ne!(good, broken);
    let line = broken
        .lines()
        .position(|l| l.contains("\"soon\""))
        .expect("the broken line")
        + 1;
    std::fs::write(&rig.file, &broken).expect("write");
    let err = rig
        .sbc
        .reload()
        .await
        .expect_err("a broken file is refused");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{}:{line}:", rig.file.display())),
        "{text}"
    );
    assert!(text.contains("interval_ms"), "{text}");
    assert_eq!(rig.sbc.generation(), 1);

    // A reference to a pool that does not exist, through the API: 422 with file:line.
    let broken = good.replacen("pool = \"pbx\"\n", "pool = \"nope\"\n", 1);
    let line = broken
        .lines()
        .position(|l| l.contains("\"nope\""))
        .expect("the broken line")
        + 1;
    std::fs::write(&rig.file, &broken).expect("write");
    let (status, body) = rig.post_reload().await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().expect("error text");
    assert!(
        error.contains(&format!("{}:{line}:", rig.file.display())),
        "{error}"
    );
    assert!(error.contains("nope"), "{error}");
    assert_eq!(rig.sbc.generation(), 1);
    assert!(metric(rig.admin, "sbc_reloads_total{result=\"error\"}").await >= errors_before + 2.0);

    // A missing file: refused the same way.
    std::fs::remove_file(&rig.file).expect("remove");
    let err = rig.sbc.reload().await.expect_err("no file");
    assert!(
        err.to_string().contains(&rig.file.display().to_string()),
        "{err}"
    );

    // The old configuration still routes calls and still knows its nodes.
    assert_eq!(rig.call(2).await, 200);
    assert_eq!(rig.state("primary"), Some(NodeState::Up));
    assert_eq!(rig.active().as_deref(), Some("primary"));

    // Fixed, the file reloads.
    let p = rig.params.clone();
    rig.write(p);
    let report = rig.sbc.reload().await.expect("fixed file reloads");
    assert_eq!(report.generation, 2);
    assert_eq!(rig.call(3).await, 200);
}

/// The leaf certificate a new TLS connection to `addr` is served, and the connection.
async fn tls_connect(
    addr: SocketAddr,
    cas: &[&str],
) -> (
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let ca: String = cas.concat();
    let cfg = sbc_tests::sip_io::client_config(ca.as_bytes(), None).expect("client config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("sbc.test").expect("name");
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a peer certificate")
        .clone()
        .into_owned();
    (leaf, tls)
}

fn der(pem: &str) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
}

/// An OPTIONS to the SBC itself over `tls`; the status line of the answer.
async fn options_over(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, n: u32) -> String {
    let local = tls.get_ref().0.local_addr().expect("local");
    let sbc = tls.get_ref().0.peer_addr().expect("peer");
    let req = format!(
        "OPTIONS sip:{sbc};transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch=z9hG4bK-reload-{n}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@test>;tag=r{n}\r\nTo: <sip:{sbc}>\r\nCall-ID: reload-options-{n}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tls.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "the connection was closed");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_certificate_is_served_to_new_tls_connections() {
    let first = TestPki::new(&["sbc.test"]).expect("pki");
    let second = TestPki::new(&["sbc.test"]).expect("pki");
    let dir = Rig::dir_for();
    std::fs::write(dir.join("cert.pem"), &first.cert_pem).expect("cert");
    std::fs::write(dir.join("key.pem"), &first.key_pem).expect("key");
    let rig = rig(true, Some(dir)).await;
    let addr = rig.sbc.addr(Transport::Tls).expect("tls listener");
    let cas = [first.ca_pem.as_str(), second.ca_pem.as_str()];

    let (leaf, mut old_conn) = tls_connect(addr, &cas).await;
    assert_eq!(leaf, der(&first.cert_pem));
    assert_eq!(options_over(&mut old_conn, 1).await, "SIP/2.0 200 OK");

    // Renewal: new files at the same paths, then a reload.
    std::fs::write(rig.dir.join("cert.pem"), &second.cert_pem).expect("cert");
    std::fs::write(rig.dir.join("key.pem"), &second.key_pem).expect("key");
    let report = rig.sbc.reload().await.expect("reload");
    assert_eq!(report.certificates, [addr.to_string()]);
    let (leaf, _) = tls_connect(addr, &cas).await;
    assert_eq!(
        leaf,
        der(&second.cert_pem),
        "new connections get the new one"
    );
    // The connection made before goes on.
    assert_eq!(options_over(&mut old_conn, 2).await, "SIP/2.0 200 OK");

    // A key that does not match its certificate: refused, with file:line of the cert key;
    // the certificate in service stays.
    std::fs::write(rig.dir.join("key.pem"), &first.key_pem).expect("key");
    let err = rig.sbc.reload().await.expect_err("mismatched key");
    let text = err.to_string();
    let line = render(&rig.params, &rig.dir)
        .lines()
        .position(|l| l.starts_with("cert = "))
        .expect("cert line")
        + 1;
    assert!(
        text.starts_with(&format!("{}:{line}: listen[1]", rig.file.display())),
        "{text}"
    );
    assert_eq!(rig.sbc.generation(), 2);
    let (leaf, _) = tls_connect(addr, &cas).await;
    assert_eq!(leaf, der(&second.cert_pem));
    let expiry = metric(
        rig.admin,
        &format!("sbc_tls_certificate_expiry_seconds{{listener=\"{addr}\"}}"),
    )
    .await;
    assert!(expiry > 0.0, "{expiry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_down_primary_down_and_the_standby_active() {
    let mut rig = rig(false, None).await;
    rig.wait_all_up().await;
    rig.primary.set_mode(PbxMode::Silent);
    rig.wait_for(
        "the primary down and the standby active",
        Duration::from_secs(10),
        |r| r.state("primary") == Some(NodeState::Down) && r.active().as_deref() == Some("standby"),
    )
    .await;

    // Probe settings change and a node is added: the unchanged nodes keep their state.
    let mut p = rig.params.clone();
    p.interval_ms = 250;
    p.spare = Some(free_udp("127.0.0.4"));
    rig.write(p);
    let report = rig.sbc.reload().await.expect("reload");
    assert_eq!(report.nodes_added, ["pbx/spare"]);
    assert!(report.nodes_removed.is_empty(), "{report:?}");
    assert_eq!(rig.state("primary"), Some(NodeState::Down));
    assert_eq!(rig.state("standby"), Some(NodeState::Up));
    assert_eq!(rig.state("spare"), Some(NodeState::Starting));
    assert_eq!(rig.active().as_deref(), Some("standby"));
    // And it stays so while the primary is silent; calls go to the standby.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rig.state("primary"), Some(NodeState::Down));
    assert_eq!(rig.active().as_deref(), Some("standby"));
    assert_eq!(rig.call(1).await, 200);
    let (status, body) = http(rig.admin, "GET", "/status").await;
    assert_eq!(status, 200);
    let st: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(st["generation"], 2);
    assert_eq!(st["pools"][0]["active"], "standby");
    assert_eq!(st["pools"][0]["nodes"][0]["state"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_the_file_triggers_a_reload() {
    let mut rig = rig(false, None).await;
    rig.sbc
        .reload_on_file_change(Duration::from_millis(200))
        .expect("watch");
    // Settle: nothing happened yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.sbc.generation(), 1);

    // An editor's way: write a temporary file, rename it over the config.
    let mut p = rig.params.clone();
    p.extra_trunk = Some(free_udp("127.0.0.22"));
    let tmp = rig.dir.join(".sbc.toml.swp");
    std::fs::write(&tmp, render(&p, &rig.dir)).expect("write");
    std::fs::rename(&tmp, &rig.file).expect("rename");
    rig.params = p;
    rig.wait_for("the rename reloaded", Duration::from_secs(20), |r| {
        r.sbc.generation() == 2
    })
    .await;

    // Written in place.
    let mut p = rig.params.clone();
    p.extra_trunk = None;
    rig.write(p);
    rig.wait_for("the write reloaded", Duration::from_secs(20), |r| {
        r.sbc.generation() == 3
    })
    .await;
    // Reading the file (the reload itself, a scrape of it) is no change.
    let _ = std::fs::read_to_string(&rig.file).expect("read");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rig.sbc.generation(), 3, "no reload without a change");

    // A broken write is refused and the next good one applies.
    std::fs::write(&rig.file, "[[listen]\n").expect("write");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rig.sbc.generation(), 3);
    let p = rig.params.clone();
    rig.write(p);
    rig.wait_for("the fixed file reloaded", Duration::from_secs(20), |r| {
        r.sbc.generation() == 4
    })
    .await;
    assert_eq!(rig.call(1).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_triggers_a_reload() {
    let rig = rig(false, None).await;
    // Installs the handler now: from here SIGHUP no longer terminates this test process.
    rig.sbc.reload_on_sighup().expect("SIGHUP handler");
    // SAFETY: raise(3) with a valid signal number has no memory-safety preconditions.
    let rc = unsafe { libc::raise(libc::SIGHUP) };
    assert_eq!(rc, 0);
    rig.wait_for("SIGHUP reloaded", Duration::from_secs(10), |r| {
        r.sbc.generation() == 2
    })
    .await;
}
