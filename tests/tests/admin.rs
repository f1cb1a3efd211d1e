//! The admin endpoint of a running SBC, over real HTTP on loopback: the bearer token is
//! enforced everywhere, `/status` reports pools and nodes as the health monitor sees them,
//! manual failover / failback / maintenance move the active node, errors carry the right
//! codes, and `/metrics` is valid Prometheus text carrying the families operators rely on.
//!
//! All tests share one process, hence one metrics registry: each lab names its pool and
//! nodes uniquely, and metric assertions filter on those labels.

use sbc_sip::Transport;
use sbc_tests::net::{count_rtp, free_udp, send_rtp};
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const TOKEN: &str = "admin-token-0123456789";

static LABS: AtomicU32 = AtomicU32::new(0);

#[derive(Default)]
struct LabOpts {
    token: bool,
    tls: bool,
    webhook: Option<SocketAddr>,
}

struct Lab {
    sbc: sbc::Sbc,
    admin: SocketAddr,
    pool: String,
    primary: String,
    standby: String,
    _pbx: (Pbx, Pbx),
    dir: PathBuf,
    /// The TLS listener's certificate notAfter, Unix seconds.
    not_after: i64,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sbc.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An SBC with a two-node pool (both scripted PBXs answering probes every 200 ms), the admin
/// endpoint on a free loopback port, and optionally a token, a TLS listener and a webhook.
async fn lab(opts: LabOpts) -> Lab {
    sbc_tests::init_tracing();
    let n = LABS.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}-{n}", std::process::id());
    let (pool, primary, standby) = (
        format!("pool{n}"),
        format!("primary{n}"),
        format!("standby{n}"),
    );
    let dir = std::env::temp_dir().join(format!("sbc-admin-{id}"));
    std::fs::create_dir_all(&dir).expect("tmp");
    let mut params = rcgen::CertificateParams::new(vec!["sbc.test".to_string()]).expect("params");
    params.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key");
    let a = free_udp("127.0.0.2");
    let b = free_udp("127.0.0.3");
    let mut cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[listen]]
transport = "tcp"
addr = "127.0.0.1:0"
[[pool]]
name = "{pool}"
[pool.probe]
interval_ms = 200
[[pool.node]]
name = "{primary}"
address = "{a}"
[[pool.node]]
name = "{standby}"
address = "{b}"
[phones]
sources = ["127.0.0.0/8"]
[admin]
listen = "127.0.0.1:0"
"#
    );
    if opts.token {
        cfg.push_str(&format!("token = \"{TOKEN}\"\n"));
    }
    if let Some(hook) = opts.webhook {
        cfg.push_str(&format!(
            "[[pool.webhook]]\nurl = \"http://{hook}/hook\"\ntimeout_ms = 1000\nretries = 0\n"
        ));
    }
    if opts.tls {
        cfg.push_str(&format!(
            "[[listen]]\ntransport = \"tls\"\naddr = \"127.0.0.1:0\"\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n",
            d = dir.display()
        ));
    }
    let cfg = sbc_config::parse(&cfg, Path::new("admin.toml")).expect("config");
    let sbc = sbc::Sbc::start_with(&cfg, sbc::StartOptions { admin: true })
        .await
        .expect("sbc");
    let admin = sbc.admin_addr().expect("admin endpoint runs");
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{admin}");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let mk = |addr| {
        PbxConfig::new(addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .user("bob", "b-secret")
    };
    let pbx_a = Pbx::start(mk(a)).await.expect("primary");
    let pbx_b = Pbx::start(mk(b)).await.expect("standby");
    Lab {
        sbc,
        admin,
        pool,
        primary,
        standby,
        _pbx: (pbx_a, pbx_b),
        dir,
        not_after: 2_208_988_800, // 2040-01-01T00:00:00Z
    }
}

impl Lab {
    async fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = self.sbc.health.status();
            if st[0]
                .nodes
                .iter()
                .all(|n| n.state == sbc_health::NodeState::Up)
            {
                return;
            }
            assert!(Instant::now() < deadline, "nodes never came up: {st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn active(&self) -> String {
        let node = self.sbc.health.active(0).expect("pool 0");
        self.sbc.health.status()[0]
            .nodes
            .iter()
            .find(|n| n.index == node)
            .map(|n| n.name.clone())
            .expect("active node listed")
    }

    async fn get(&self, path: &str) -> HttpResponse {
        http(self.admin, "GET", path, Some(TOKEN), None).await
    }

    async fn post(&self, path: &str) -> HttpResponse {
        http(self.admin, "POST", path, Some(TOKEN), None).await
    }

    async fn status(&self) -> Value {
        let r = self.get("/status").await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }
}

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", self.body))
            .to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection, read to the end (`Connection: close`).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("admin answers within 5 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_on_every_endpoint() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    lab.wait_all_up().await;
    let failover = format!("/pools/{}/failover", lab.pool);
    let maintenance = format!("/nodes/{}/maintenance?state=on", lab.primary);
    let endpoints = [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("POST", "/reload"),
        ("POST", failover.as_str()),
        ("POST", maintenance.as_str()),
        ("GET", "/no-such-thing"),
    ];
    for (method, path) in endpoints {
        for token in [None, Some("wrong-token-0123456789"), Some("")] {
            let r = http(lab.admin, method, path, token, None).await;
            assert_eq!(r.status, 401, "{method} {path} with {token:?}: {}", r.body);
            assert_eq!(
                r.headers.get("www-authenticate").map(String::as_str),
                Some("Bearer")
            );
            assert!(r.error().contains("token"), "{}", r.body);
        }
    }
    // Another scheme with the right secret is still refused.
    let mut s = TcpStream::connect(lab.admin).await.expect("connect");
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {TOKEN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    // Refused commands did nothing.
    assert_eq!(lab.active(), lab.primary);
    assert_eq!(
        lab.sbc.health.node_state(0),
        Some(sbc_health::NodeState::Up)
    );
    // The right token opens everything, the scheme name in any case.
    assert_eq!(lab.get("/status").await.status, 200);
    assert_eq!(lab.get("/metrics").await.status, 200);
    let r = http(lab.admin, "GET", "/status", None, None).await;
    assert_eq!(r.status, 401);
    let mut s = TcpStream::connect(lab.admin).await.expect("connect");
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {TOKEN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_loopback_is_open() {
    let lab = lab(LabOpts::default()).await;
    let r = http(lab.admin, "GET", "/status", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A token sent anyway does no harm.
    let r = http(lab.admin, "GET", "/status", Some("whatever"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_pools_nodes_and_counters() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    lab.wait_all_up().await;
    let before = unix_now();
    let st = lab.status().await;
    assert_eq!(st["name"], "sbc");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["generation"], 1);
    assert_eq!(lab.sbc.generation(), 1);
    assert!(st["uptime_seconds"].as_u64().expect("uptime") < 60);
    for key in [
        "registrations",
        "transactions",
        "connections",
        "calls",
        "media_sessions",
    ] {
        assert!(st[key].is_u64(), "{key} missing: {st}");
    }
    assert_eq!(st["calls"], 0);
    assert_eq!(st["media_sessions"], 0);
    assert_eq!(st["registrations"], 0);
    let pools = st["pools"].as_array().expect("pools");
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p["name"], lab.pool.as_str());
    assert_eq!(p["active"], lab.primary.as_str());
    assert_eq!(p["failback"], "manual");
    assert_eq!(p["pinned"], false);
    let nodes = p["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    for (node, name, active) in [
        (&nodes[0], &lab.primary, true),
        (&nodes[1], &lab.standby, false),
    ] {
        assert_eq!(node["name"], name.as_str());
        assert_eq!(node["state"], "up");
        assert_eq!(node["active"], active);
        assert!(node["address"]
            .as_str()
            .expect("address")
            .starts_with("127.0.0."));
        let since = node["since"].as_i64().expect("since");
        assert!(
            since <= before + 1 && since > before - 30,
            "since {since}, now {before}"
        );
        let ago = node["since_seconds_ago"].as_i64().expect("ago");
        assert!((unix_now() - since - ago).abs() <= 1, "{node}");
    }

    // A registration through the SBC shows up.
    let udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let alice = Phone::new(PhoneConfig::new("alice", "pbx.test", "a-secret", udp))
        .await
        .expect("phone");
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let st = lab.status().await;
    assert_eq!(st["registrations"], 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_and_failback_move_the_active_node() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    lab.wait_all_up().await;
    assert_eq!(lab.active(), lab.primary);

    let r = lab
        .post(&format!("/pools/{}/failover?reason=planned+work", lab.pool))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["pool"], lab.pool.as_str());
    assert_eq!(j["previous"], lab.primary.as_str());
    assert_eq!(j["active"], lab.standby.as_str());
    assert_eq!(j["changed"], true);
    assert_eq!(lab.active(), lab.standby, "the health monitor moved");
    let st = lab.status().await;
    let p = &st["pools"][0];
    assert_eq!(p["active"], lab.standby.as_str());
    assert_eq!(p["pinned"], true);
    assert_eq!(p["nodes"][0]["active"], false);
    assert_eq!(p["nodes"][1]["active"], true);

    let r = lab.post(&format!("/pools/{}/failback", lab.pool)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["previous"], lab.standby.as_str());
    assert_eq!(j["active"], lab.primary.as_str());
    assert_eq!(j["changed"], true);
    assert_eq!(lab.active(), lab.primary);
    let st = lab.status().await;
    assert_eq!(st["pools"][0]["active"], lab.primary.as_str());
    assert_eq!(st["pools"][0]["pinned"], false);

    // Failback with the primary active: nothing to do, and said so.
    let r = lab.post(&format!("/pools/{}/failback", lab.pool)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"], false);
    assert_eq!(lab.active(), lab.primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_moves_traffic_and_blocks_failover_to_the_node() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    lab.wait_all_up().await;

    // The standby into maintenance: a failover now has nowhere to go.
    let r = lab
        .post(&format!("/nodes/{}/maintenance?state=on", lab.standby))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["node"], lab.standby.as_str());
    assert_eq!(j["pool"], lab.pool.as_str());
    assert_eq!(j["state"], "maintenance");
    assert_eq!(j["active"], lab.primary.as_str());
    let r = lab.post(&format!("/pools/{}/failover", lab.pool)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("no other node"), "{}", r.body);
    assert_eq!(
        lab.active(),
        lab.primary,
        "a refused failover moves nothing"
    );

    // Out of maintenance with a JSON body instead of the query.
    let r = http(
        lab.admin,
        "POST",
        &format!("/nodes/{}/maintenance", lab.standby),
        Some(TOKEN),
        Some(r#"{"on": false}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(r.json()["state"], "maintenance");
    lab.wait_all_up().await;

    // Maintenance of the active node moves the role at once.
    let r = lab
        .post(&format!("/nodes/{}/maintenance?state=on", lab.primary))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["active"], lab.standby.as_str());
    assert_eq!(lab.active(), lab.standby);
    let st = lab.status().await;
    assert_eq!(st["pools"][0]["nodes"][0]["state"], "maintenance");
    assert_eq!(st["pools"][0]["active"], lab.standby.as_str());
    // Nothing of higher priority is up: failback refused.
    let r = lab.post(&format!("/pools/{}/failback", lab.pool)).await;
    assert_eq!(r.status, 409, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_codes() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    for (method, path, code, needle) in [
        ("POST", "/pools/nope/failover", 404, "no pool named nope"),
        ("POST", "/pools/nope/failback", 404, "no pool named nope"),
        (
            "POST",
            "/nodes/nope/maintenance?state=on",
            404,
            "no node named nope",
        ),
        ("GET", "/nowhere", 404, "no such endpoint"),
        ("GET", "/pools/x/failover/extra", 404, "no such endpoint"),
        ("GET", "/reload", 405, "use POST"),
        ("POST", "/status", 405, "use GET"),
        ("DELETE", "/metrics", 405, "use GET"),
        ("POST", "/reload", 501, "restart the SBC"),
    ] {
        let r = http(lab.admin, method, path, Some(TOKEN), None).await;
        assert_eq!(r.status, code, "{method} {path}: {}", r.body);
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(
            r.error().contains(needle),
            "{method} {path}: {} lacks {needle}",
            r.body
        );
        if code == 405 {
            assert!(r.headers.contains_key("allow"), "{method} {path}");
        }
    }
    // Maintenance needs to be told on or off.
    let node = format!("/nodes/{}/maintenance", lab.primary);
    for (path, body) in [
        (node.clone(), None),
        (format!("{node}?state=maybe"), None),
        (node.clone(), Some("{\"on\": \"yes\"}")),
    ] {
        let r = http(lab.admin, "POST", &path, Some(TOKEN), body).await;
        assert_eq!(r.status, 400, "{path} {body:?}: {}", r.body);
        assert!(r.error().contains("state=on"), "{}", r.body);
    }
    assert_ne!(
        lab.sbc.health.node_state(0),
        Some(sbc_health::NodeState::Maintenance)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_admin_endpoint() {
    let lab = lab(LabOpts::default()).await;
    assert_eq!(
        http(lab.admin, "GET", "/status", None, None).await.status,
        200
    );
    lab.sbc.shutdown();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect(lab.admin).await {
            Err(_) => break,
            Ok(_) => {
                assert!(Instant::now() < deadline, "admin still accepting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A webhook receiver: answers every request 200 and counts them.
/// Draining (`POST /drain`): a new call gets 503 with Retry-After, and so does an OPTIONS
/// keep-alive to the SBC, while registrations and the call in progress go on (RTP both
/// ways, a re-INVITE); `/status` shows the drain and the calls left. Called off, new calls
/// pass again. Started again, it ends by itself when the last call hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_calls_keeps_the_ones_in_progress_and_ends_with_the_last() {
    let lab = lab(LabOpts {
        token: true,
        ..Default::default()
    })
    .await;
    lab.wait_all_up().await;
    let udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let phone =
        |user: &str, password: &str| Phone::new(PhoneConfig::new(user, "pbx.test", password, udp));
    let alice = phone("alice", "a-secret").await.expect("alice");
    let bob = phone("bob", "b-secret").await.expect("bob");
    for p in [&alice, &bob] {
        assert_eq!(p.register(300).await.expect("reg").status(), Some(200));
    }
    let (c, b) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
        let inc = bob.wait_invite(Duration::from_secs(3)).await?;
        bob.answer(&inc, 200).await
    });
    let (mut ccall, bcall) = (c.expect("call"), b.expect("answer"));
    assert_eq!(ccall.final_status, 200);

    let r = lab.post("/drain?timeout_secs=120").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = r.json();
    // One call, two dialogs: phone -> SBC -> PBX and PBX -> SBC -> phone.
    assert_eq!(d["calls"], 2, "{d}");
    assert_eq!(d["shutdown"], false, "{d}");
    let st = lab.status().await;
    assert_eq!(st["drain"]["calls"], 2, "{st}");
    assert!(
        st["drain"]["deadline_unix"].as_u64().unwrap_or(0)
            >= st["drain"]["since_unix"].as_u64().unwrap_or(u64::MAX) + 119,
        "{st}"
    );

    // A new call: 503, Retry-After 30, from the SBC (the PBX never sees it).
    let refused = bob.invite("sip:alice@pbx.test").await.expect("answered");
    assert_eq!(refused.final_status, 503);
    let fin = refused.responses.last().expect("final");
    assert_eq!(
        fin.header_value_by_name(b"Retry-After"),
        Some(&b"30"[..]),
        "{}",
        String::from_utf8_lossy(fin.as_bytes())
    );
    // A keep-alive to the SBC itself: 503 too, so a pinging trunk takes it out of rotation.
    let ping = alice
        .request("OPTIONS", &format!("sip:{udp}"), "", None)
        .await
        .expect("OPTIONS answered");
    assert_eq!(ping.status(), Some(503));
    // Registrations and the call in progress go on.
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let (at_alice, at_bob) = (
        ccall.remote_media().expect("SDP at alice"),
        bcall.remote_media().expect("SDP at bob"),
    );
    tokio::join!(
        send_rtp(alice.media_socket(), at_alice, 0xa1, 20),
        send_rtp(bob.media_socket(), at_bob, 0xb2, 20)
    );
    let got = tokio::join!(
        count_rtp(bob.media_socket(), 0xa1),
        count_rtp(alice.media_socket(), 0xb2)
    );
    assert_eq!(got, (20, 20), "RTP both ways while draining");
    let (re, got) = tokio::join!(
        alice.reinvite(&mut ccall),
        bob.wait_request_and_answer(sbc_sip::Method::Invite, Duration::from_secs(3))
    );
    got.expect("bob gets the re-INVITE");
    assert_eq!(
        re.expect("re-INVITE").status(),
        Some(200),
        "a re-INVITE in the call passes"
    );

    // Called off: new calls pass again.
    let r = lab.post("/drain?state=off").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(lab.status().await["drain"].is_null());
    assert_eq!(
        lab.post("/drain?state=off").await.status,
        409,
        "nothing to call off"
    );
    let ping = alice
        .request("OPTIONS", &format!("sip:{udp}"), "", None)
        .await
        .expect("OPTIONS answered");
    assert_eq!(ping.status(), Some(200));

    // Drained again: the last BYE ends it.
    assert_eq!(lab.post("/drain").await.status, 200);
    let finished = lab.sbc.drain.finished();
    tokio::pin!(finished);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut finished)
            .await
            .is_err(),
        "not finished while the call goes on"
    );
    let (bye, got) = tokio::join!(
        alice.bye(&ccall),
        bob.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("BYE").status(), Some(200));
    got.expect("bob gets the BYE");
    tokio::time::timeout(Duration::from_secs(2), finished)
        .await
        .expect("the drain ends with the last call");
    assert_eq!(lab.status().await["drain"]["calls"], 0);
}

async fn webhook_stub() -> (SocketAddr, std::sync::Arc<AtomicU32>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = std::sync::Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // Headers, then Content-Length bytes of body.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                h.fetch_add(1, Ordering::Relaxed);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Checks every line against the text exposition format, strictly (prometheus-parse skips
/// lines it does not understand, so it alone would not catch a malformed one).
fn check_exposition_syntax(text: &str) {
    fn is_name(s: &str) -> bool {
        let mut b = s.bytes();
        matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
            && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
    }
    fn value_ok(v: &str) -> bool {
        matches!(v, "+Inf" | "-Inf" | "NaN") || v.parse::<f64>().is_ok()
    }
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(is_name(name) && !help.is_empty(), "bad HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(is_name(name), "bad TYPE: {line}");
            assert!(
                matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "bad TYPE: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        assert!(value_ok(value), "bad value: {line}");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, Some(l.strip_suffix('}').expect("closing brace"))),
            None => (series, None),
        };
        assert!(is_name(name), "bad name: {line}");
        if let Some(mut l) = labels {
            while !l.is_empty() {
                let (k, rest) = l.split_once("=\"").expect("label =\"");
                assert!(is_name(k), "bad label name: {line}");
                // Find the closing quote, honouring backslash escapes.
                let mut end = None;
                let mut esc = false;
                for (i, c) in rest.char_indices() {
                    match (esc, c) {
                        (true, _) => esc = false,
                        (false, '\\') => esc = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
                l = rest[end + 1..]
                    .strip_prefix(',')
                    .unwrap_or(&rest[end + 1..]);
            }
        }
    }
}

fn sample<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn scalar(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{} is not a scalar: {other:?}", s.metric),
    }
}

async fn scrape(lab: &Lab) -> (String, prometheus_parse::Scrape) {
    let r = lab.get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    let parsed = prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
        .expect("exposition format parses");
    (r.body, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_carry_the_required_families() {
    let (hook, hook_hits) = webhook_stub().await;
    let lab = lab(LabOpts {
        token: true,
        tls: true,
        webhook: Some(hook),
    })
    .await;
    lab.wait_all_up().await;
    let udp = lab.sbc.addr(Transport::Udp).expect("udp");

    // Traffic: a registration, a garbage datagram, a request from an unregistered source,
    // an open TCP connection, a manual failover (which fires the webhook).
    let alice = Phone::new(PhoneConfig::new("alice", "pbx.test", "a-secret", udp))
        .await
        .expect("phone");
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let raw = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    raw.send_to(b"THIS IS NOT SIP\r\n\r\n", udp)
        .await
        .expect("send");
    let p = raw.local_addr().expect("addr").port();
    let msg = format!("MESSAGE sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKadm1;rport\r\nFrom: <sip:mallory@pbx.test>;tag=m1\r\nTo: <sip:bob@pbx.test>\r\nCall-ID: adm-msg-1\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    raw.send_to(msg.as_bytes(), udp).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), raw.recv(&mut buf))
            .await
            .expect("the SBC answers the garbage or the MESSAGE")
            .expect("recv");
        if String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 403") {
            break;
        }
    }
    let _tcp = TcpStream::connect(lab.sbc.addr(Transport::Tcp).expect("tcp"))
        .await
        .expect("tcp connect");
    let r = lab.post(&format!("/pools/{}/failover", lab.pool)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook_hits.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "webhook never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The webhook's counter is bumped after the answer is read: poll for it.
    let pool = lab.pool.as_str();
    let (text, m) = loop {
        let (text, m) = scrape(&lab).await;
        if sample(&m, "sbc_webhooks_total", &[("pool", pool)]).is_some() {
            break (text, m);
        }
        assert!(Instant::now() < deadline, "no webhook result counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    check_exposition_syntax(&text);

    let required = [
        "sbc_sip_requests_total",
        "sbc_sip_responses_total",
        "sbc_transactions",
        "sbc_transactions_total",
        "sbc_connections",
        "sbc_connections_opened_total",
        "sbc_registrations",
        "sbc_calls",
        "sbc_media_sessions",
        "sbc_parse_errors_total",
        "sbc_rejected_total",
        "sbc_node_state",
        "sbc_active_node",
        "sbc_node_transitions_total",
        "sbc_failovers_total",
        "sbc_probe_rtt_seconds",
        "sbc_probes_total",
        "sbc_webhooks_total",
        "sbc_reloads_total",
        "sbc_tls_certificate_expiry_seconds",
        "sbc_config_generation",
        "sbc_build_info",
    ];
    for name in required {
        assert!(
            m.samples.iter().any(|s| s.metric == name),
            "{name} missing from /metrics:\n{text}"
        );
        assert!(
            m.docs.get(name).is_some_and(|h| !h.is_empty()),
            "{name} has no HELP"
        );
        assert!(
            sbc::metrics::CATALOGUE.iter().any(|d| d.name == name),
            "{name} not in the catalogue"
        );
    }
    for s in &m.samples {
        assert!(s.metric.starts_with("sbc_"), "{}", s.metric);
    }
    let types: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    for def in sbc::metrics::CATALOGUE {
        if let Some(t) = types.get(def.name) {
            let want = match def.kind {
                sbc::metrics::Kind::Counter => "counter",
                sbc::metrics::Kind::Gauge => "gauge",
                sbc::metrics::Kind::Histogram => "histogram",
            };
            assert_eq!(*t, want, "{}", def.name);
        }
    }

    // Values that reflect what happened.
    let v = |name: &str, labels: &[(&str, &str)]| {
        scalar(
            sample(&m, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}")),
        )
    };
    assert_eq!(
        v(
            "sbc_node_state",
            &[("pool", pool), ("node", &lab.primary), ("state", "up")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "sbc_node_state",
            &[("pool", pool), ("node", &lab.primary), ("state", "down")]
        ),
        0.0
    );
    assert_eq!(
        v("sbc_active_node", &[("pool", pool), ("node", &lab.standby)]),
        1.0
    );
    assert_eq!(
        v("sbc_active_node", &[("pool", pool), ("node", &lab.primary)]),
        0.0
    );
    assert_eq!(
        v(
            "sbc_failovers_total",
            &[("pool", pool), ("reason", "manual")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "sbc_webhooks_total",
            &[("pool", pool), ("event", "failover"), ("result", "ok")]
        ),
        1.0
    );
    assert!(v("sbc_sip_requests_total", &[("method", "REGISTER")]) >= 2.0);
    assert!(
        v(
            "sbc_sip_responses_total",
            &[("method", "REGISTER"), ("code", "200")]
        ) >= 1.0
    );
    assert!(v("sbc_rejected_total", &[("reason", "unknown_source")]) >= 1.0);
    assert!(m
        .samples
        .iter()
        .any(|s| s.metric == "sbc_parse_errors_total" && scalar(s) >= 1.0));
    assert!(v("sbc_connections", &[("transport", "tcp")]) >= 1.0);
    assert!(v("sbc_registrations", &[]) >= 0.0);
    assert_eq!(v("sbc_calls", &[]), 0.0);
    assert_eq!(v("sbc_media_sessions", &[]), 0.0);
    assert_eq!(v("sbc_reloads_total", &[("result", "ok")]), 0.0);
    assert_eq!(v("sbc_reloads_total", &[("result", "error")]), 0.0);
    assert_eq!(v("sbc_config_generation", &[]), 1.0);
    assert_eq!(
        v("sbc_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(
        v(
            "sbc_probes_total",
            &[("pool", pool), ("node", &lab.primary), ("result", "ok")]
        ) >= 1.0
    );
    let tls = lab.sbc.addr(Transport::Tls).expect("tls").to_string();
    let left = v("sbc_tls_certificate_expiry_seconds", &[("listener", &tls)]);
    let expected = (lab.not_after - unix_now()) as f64;
    assert!((left - expected).abs() < 120.0, "{left} vs {expected}");

    // The probe histogram has ms-to-s buckets and counted the probes.
    let h = sample(
        &m,
        "sbc_probe_rtt_seconds",
        &[("pool", pool), ("node", &lab.primary), ("kind", "options")],
    )
    .unwrap_or_else(|| panic!("no probe histogram for {pool}:\n{text}"));
    let prometheus_parse::Value::Histogram(buckets) = &h.value else {
        panic!("sbc_probe_rtt_seconds is not a histogram: {:?}", h.value);
    };
    let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    assert!(
        bounds.contains(&0.001) && bounds.contains(&1.0),
        "{bounds:?}"
    );
    assert!(bounds.iter().any(|b| b.is_infinite()), "{bounds:?}");
    let all = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .map(|b| b.count)
        .unwrap_or_default();
    assert!(all >= 1.0, "{buckets:?}");
    // Loopback probes answer in well under a second.
    let under_1s = buckets
        .iter()
        .find(|b| b.less_than == 1.0)
        .map(|b| b.count)
        .unwrap_or_default();
    assert_eq!(under_1s, all, "{buckets:?}");

    // Debian's promtool, where installed, agrees (its lint checks naming conventions too).
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(text.as_bytes()).expect("promtool stdin");
        }
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_fails_the_start_with_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("addr");
    let cfg = format!(
        "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n[[pool]]\nname = \"taken\"\n[[pool.node]]\nname = \"taken-a\"\naddress = \"127.0.0.2:5060\"\n[admin]\nlisten = \"{addr}\"\n"
    );
    let cfg = sbc_config::parse(&cfg, Path::new("taken.toml")).expect("config");
    let err = match sbc::Sbc::start_with(&cfg, sbc::StartOptions { admin: true }).await {
        Ok(_) => panic!("started although {addr} is taken"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("binding the admin listener") && err.contains(&addr.to_string()),
        "{err}"
    );
    // Without the admin endpoint the same config starts.
    let sbc = sbc::Sbc::start(&cfg).await.expect("starts without admin");
    assert_eq!(sbc.admin_addr(), None);
    sbc.shutdown();
}
