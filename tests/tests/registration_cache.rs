//! Registrations survive failover (issue 5): the registration cache with split expiry, the
//! paced re-registration wave, shadow registration, and a PBX's call to a lapsed phone.
//!
//! The fleet tests register 200 phones (UDP, TCP and TLS) through the SBC, kill the primary
//! PBX, and measure for each phone the time from the kill until a trunk call to it rings
//! through the standby. Each phone behaves like a real one: it refreshes at half the lifetime
//! the SBC gave it, and registers again over a new connection as soon as its TCP/TLS flow
//! drops (RFC 5626 4.4).

use parking_lot::Mutex;
use sbc_sip::{HeaderName, Message, Transport};
use sbc_tests::net::free_udp;
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::pki::TestPki;
use sbc_tests::trunk::Trunk;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PHONES: usize = 200;
/// The lifetime the SBC gives phones in these tests (the shortest it accepts).
const PHONE_EXPIRES: u64 = 10;
const WAVE_RATE: u32 = 25;

struct Lab {
    sbc: sbc::Sbc,
    primary: Pbx,
    standby: Pbx,
    trunk: Trunk,
    pki: TestPki,
    _dir: PathBuf,
}

async fn lab(shadow: bool, users: usize) -> Lab {
    let pki = TestPki::new(&["sbc.test"]).expect("pki");
    let dir = std::env::temp_dir().join(format!(
        "sbc-regcache-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("tmp");
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem).expect("cert");
    std::fs::write(dir.join("key.pem"), &pki.key_pem).expect("key");
    let a = free_udp("127.0.0.2");
    let b = free_udp("127.0.0.3");
    let trunk_addr = free_udp("127.0.0.40");
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[listen]]
transport = "tcp"
addr = "127.0.0.1:0"
[[listen]]
transport = "tls"
addr = "127.0.0.1:0"
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
[[pool]]
name = "pbx"
shadow_registration = {shadow}
# Calls caught on the dead primary before detection retry on the standby after this.
branch_timeout_ms = 500
[pool.probe]
interval_ms = 200
timeout_ms = 150
failures = 2
[[pool.node]]
name = "primary"
address = "{a}"
[[pool.node]]
name = "standby"
address = "{b}"
[[trunk]]
name = "carrier"
sources = ["127.0.0.40"]
address = "{trunk_addr}"
domains = ["carrier.test"]
[phones]
sources = ["127.0.0.0/8"]
expires_secs = {PHONE_EXPIRES}
reregister_rate = {WAVE_RATE}
[media]
enabled = false
[ratelimit]
enabled = false
"#,
        dir = dir.display()
    );
    // From a file, so that a reload can re-read it.
    let file = dir.join("sbc.toml");
    std::fs::write(&file, &cfg).expect("config file");
    let cfg = sbc_config::load(&file).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let mk = |addr, auth| {
        let mut c = PbxConfig::new(addr, "pbx.test", udp).trunk("9", "carrier.test");
        for i in 0..users {
            c = c.user(&format!("u{i}"), &format!("pw{i}"));
        }
        c.auth = auth;
        c
    };
    let primary = Pbx::start(mk(a, true)).await.expect("primary");
    // A standby that takes shadow registrations trusts the SBC by its address: no digest.
    let standby = Pbx::start(mk(b, !shadow)).await.expect("standby");
    let trunk = Trunk::start(trunk_addr, udp).await.expect("trunk");
    Lab {
        sbc,
        primary,
        standby,
        trunk,
        pki,
        _dir: dir,
    }
}

fn phone_config(lab: &Lab, i: usize, transport: Transport) -> PhoneConfig {
    let mut c = PhoneConfig::new(
        &format!("u{i}"),
        "pbx.test",
        &format!("pw{i}"),
        lab.sbc.addr(transport).expect("listener"),
    );
    c.transport = transport;
    c.tls_ca = Some(lab.pki.ca_pem.clone().into_bytes());
    c.tls_server_name = "sbc.test".into();
    c.timeout = Duration::from_secs(3);
    c
}

/// The lifetime a 2xx to a REGISTER gives the phone's contact.
fn given_expires(ok: &Message) -> Option<u64> {
    let v = ok.header_value(HeaderName::Contact)?;
    let na = sbc_sip::addr::NameAddr::parse(v).ok()?;
    let e = na.param(b"expires").flatten()?;
    std::str::from_utf8(e).ok()?.parse().ok()
}

/// One phone that behaves like a real one (see the module doc).
struct Slot {
    user: String,
    transport: Transport,
    /// Registrations sent (every REGISTER the phone sent, challenges answered included).
    sent: AtomicU64,
    /// Reconnections after the SBC closed the flow, with when.
    reconnects: Mutex<Vec<Instant>>,
    /// When the phone last rang (an INVITE arrived).
    rang: Mutex<Option<Instant>>,
    stop: AtomicBool,
}

async fn run_phone(lab: Arc<Lab>, slot: Arc<Slot>, i: usize) {
    let cfg = phone_config(&lab, i, slot.transport);
    let mut phone: Option<Phone> = None;
    let mut next_refresh = Instant::now();
    while !slot.stop.load(Ordering::Relaxed) {
        let closed = phone.as_ref().is_some_and(|p| p.endpoint().is_closed());
        if closed {
            slot.reconnects.lock().push(Instant::now());
            phone = None;
        }
        if phone.is_none() {
            match Phone::new(cfg.clone()).await {
                Ok(p) => {
                    phone = Some(p);
                    next_refresh = Instant::now();
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(p) = phone.as_ref() else { continue };
        if Instant::now() >= next_refresh {
            slot.sent.fetch_add(1, Ordering::Relaxed);
            match p.register(3600).await {
                Ok(ok) if ok.status() == Some(200) => {
                    let e = given_expires(&ok).unwrap_or(PHONE_EXPIRES);
                    next_refresh = Instant::now() + Duration::from_millis(e * 500);
                }
                _ => next_refresh = Instant::now() + Duration::from_millis(500),
            }
            continue;
        }
        if let Ok(inc) = p.wait_invite(Duration::from_millis(100)).await {
            slot.rang.lock().get_or_insert(Instant::now());
            let _ = p.answer(&inc, 486).await;
        }
    }
}

struct Fleet {
    slots: Vec<Arc<Slot>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn fleet(lab: &Arc<Lab>, n: usize) -> Fleet {
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let transport = match i % 5 {
            0 | 1 => Transport::Udp,
            2 | 3 => Transport::Tcp,
            _ => Transport::Tls,
        };
        let slot = Arc::new(Slot {
            user: format!("u{i}"),
            transport,
            sent: AtomicU64::new(0),
            reconnects: Mutex::new(Vec::new()),
            rang: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        tasks.push(tokio::task::spawn_local(run_phone(
            lab.clone(),
            slot.clone(),
            i,
        )));
        slots.push(slot);
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Fleet { slots, tasks }
}

impl Fleet {
    async fn stop(self) {
        for s in &self.slots {
            s.stop.store(true, Ordering::Relaxed);
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn registered_users(pbx: &Pbx) -> std::collections::HashSet<String> {
    let now = Instant::now();
    pbx.registrations()
        .into_iter()
        .filter(|r| now < r.registered_at + Duration::from_secs(u64::from(r.expires)))
        .map(|r| {
            r.aor
                .trim_start_matches("sip:")
                .split('@')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Calls every phone from the trunk, again and again, until each has rung through the
/// standby. Returns each phone's first ring after `t0`, in seconds.
async fn ring_all(lab: &Arc<Lab>, fleet: &Fleet, t0: Instant, limit: Duration) -> Vec<f64> {
    for s in &fleet.slots {
        *s.rang.lock() = None;
    }
    let deadline = t0 + limit;
    loop {
        let pending: Vec<&Arc<Slot>> = fleet
            .slots
            .iter()
            .filter(|s| s.rang.lock().is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} phones never rang through the standby: {:?}",
            pending.len(),
            pending
                .iter()
                .take(10)
                .map(|s| (&s.user, s.transport))
                .collect::<Vec<_>>()
        );
        // Calls in batches of 20, each a full INVITE transaction (the phone answers 486
        // after ringing).
        for chunk in pending.chunks(20) {
            let calls: Vec<_> = chunk
                .iter()
                .map(|s| {
                    let lab = lab.clone();
                    let target = format!("sip:{}@pbx.test", s.user);
                    tokio::task::spawn_local(async move { lab.trunk.invite(&target).await })
                })
                .collect();
            for c in calls {
                let _ = c.await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet
        .slots
        .iter()
        .filter_map(|s| *s.rang.lock())
        .map(|t| t.saturating_duration_since(t0).as_secs_f64())
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// When the SBC made the standby active, after `t0`.
async fn detection(lab: &Lab, t0: Instant) -> f64 {
    wait_for("the failover", Duration::from_secs(10), || {
        lab.sbc.health.status()[0].active.as_deref() == Some("standby")
    })
    .await;
    t0.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_are_answered_from_the_cache_and_changes_forwarded() {
    let lab = lab(false, 2).await;
    let udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let alice = Phone::new(PhoneConfig::new("u0", "pbx.test", "pw0", udp))
        .await
        .expect("phone");
    let ok = alice.register(3600).await.expect("register");
    assert_eq!(ok.status(), Some(200));
    let given = given_expires(&ok).expect("expires in the 2xx");
    assert!(
        (9..=11).contains(&given),
        "the phone gets the short lifetime, not 3600: {given}"
    );
    let forwarded = lab.primary.stats().requests_of("REGISTER");
    assert_eq!(forwarded, 2, "challenge and authenticated REGISTER");
    for _ in 0..5 {
        let ok = alice.register(3600).await.expect("refresh");
        assert_eq!(ok.status(), Some(200));
        let e = given_expires(&ok).expect("expires");
        assert!((9..=11).contains(&e), "{e}");
    }
    assert_eq!(
        lab.primary.stats().requests_of("REGISTER"),
        forwarded,
        "refreshes were answered by the SBC"
    );
    // The cache survives a reload (here one that changes a pool setting).
    let file = lab._dir.join("sbc.toml");
    let text = std::fs::read_to_string(&file).expect("read config");
    std::fs::write(&file, text.replace("failures = 2", "failures = 3")).expect("write config");
    lab.sbc.reload().await.expect("reload");
    let ok = alice.register(3600).await.expect("refresh after reload");
    assert_eq!(ok.status(), Some(200));
    assert_eq!(
        lab.primary.stats().requests_of("REGISTER"),
        forwarded,
        "the refresh after the reload was answered from the cache"
    );
    // The PBX still holds the binding for the 3600 s it granted.
    let regs = lab.primary.registrations();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].expires, 3600);
    // A new contact (another phone for the same user) goes through.
    let alice2 = Phone::new(PhoneConfig::new("u0", "pbx.test", "pw0", udp))
        .await
        .expect("phone");
    assert_eq!(
        alice2.register(3600).await.expect("reg").status(),
        Some(200)
    );
    assert!(lab.primary.stats().requests_of("REGISTER") > forwarded);
    assert_eq!(lab.primary.registrations().len(), 2);
    // De-registration always goes through.
    let before = lab.primary.stats().requests_of("REGISTER");
    assert_eq!(alice.unregister().await.expect("unreg").status(), Some(200));
    assert!(lab.primary.stats().requests_of("REGISTER") > before);
    assert_eq!(lab.primary.registrations().len(), 1);

    // The metrics say what happened.
    let text = sbc_metrics_text();
    assert!(
        metric_at_least(&text, "sbc_register_absorbed_total", 5.0),
        "{text}"
    );
    lab.sbc.shutdown();
}

/// The Prometheus text of the process-wide recorder (every SBC in this process shares it).
fn sbc_metrics_text() -> String {
    sbc::metrics::install()
        .map(|h| h.render())
        .unwrap_or_default()
}

fn metric_at_least(text: &str, name: &str, min: f64) -> bool {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .any(|v| v >= min)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pbx_call_to_a_phone_that_stopped_refreshing_gets_480_at_once() {
    let lab = lab(false, 2).await;
    let udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let alice = Phone::new(PhoneConfig::new("u0", "pbx.test", "pw0", udp))
        .await
        .expect("phone");
    assert_eq!(alice.register(3600).await.expect("reg").status(), Some(200));
    // The phone goes quiet; its short lifetime (10 s +- 10%) passes, the PBX's 3600 s does
    // not.
    tokio::time::sleep(Duration::from_secs(PHONE_EXPIRES + 2)).await;
    let t = Instant::now();
    let call = lab.trunk.invite("sip:u0@pbx.test").await.expect("call");
    assert_eq!(call.final_status, 480);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_expiry_moves_200_phones_to_the_standby_within_their_lifetime() {
    // The scripted UAs' futures are not Send: phones and calls run on a LocalSet.
    tokio::task::LocalSet::new()
        .run_until(split_expiry_moves_200_phones_to_the_standby_within_their_lifetime_body())
        .await;
}

async fn split_expiry_moves_200_phones_to_the_standby_within_their_lifetime_body() {
    let lab = Arc::new(lab(false, PHONES).await);
    let fleet = fleet(&lab, PHONES).await;
    wait_for("200 phones on the primary", Duration::from_secs(30), || {
        registered_users(&lab.primary).len() == PHONES
    })
    .await;
    // Let a few refresh rounds pass: they are absorbed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let sent: u64 = fleet
        .slots
        .iter()
        .map(|s| s.sent.load(Ordering::Relaxed))
        .sum();
    let reached = lab.primary.stats().requests_of("REGISTER");
    eprintln!("before the failover: phones made {sent} registrations (each a challenge and a REGISTER when forwarded), the primary saw {reached} REGISTERs");

    let t0 = Instant::now();
    lab.primary.stop().await;
    let detected = detection(&lab, t0).await;
    let limit = detected + PHONE_EXPIRES as f64 * 1.1 + 1.0;
    let mut rang = ring_all(&lab, &fleet, t0, Duration::from_secs_f64(limit + 10.0)).await;
    let (p50, p95, max) = (
        percentile(&mut rang, 0.5),
        percentile(&mut rang, 0.95),
        percentile(&mut rang, 1.0),
    );
    eprintln!(
        "split expiry: detection {detected:.2} s; first ring through the standby p50 {p50:.2} s, p95 {p95:.2} s, max {max:.2} s (limit {limit:.2} s)"
    );
    assert!(
        max <= limit,
        "max {max:.2} s > detection + phone expiry {limit:.2} s"
    );

    // The wave never closed more than its rate allows in any one second (as the SBC closed
    // them; the phones notice a close a moment later, each at its own pace).
    let mut closes = lab.sbc.proxy.rereg.wave_closes();
    closes.sort();
    let reconnected: usize = fleet.slots.iter().map(|s| s.reconnects.lock().len()).sum();
    assert!(
        reconnected >= closes.len() / 2,
        "{reconnected} phones reconnected"
    );
    let tcp_tls = fleet
        .slots
        .iter()
        .filter(|s| s.transport != Transport::Udp)
        .count();
    assert!(
        closes.len() >= tcp_tls / 2,
        "the wave closed only {} of {tcp_tls} TCP/TLS flows",
        closes.len()
    );
    let worst = closes
        .iter()
        .map(|t| {
            closes
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "wave: {} flows closed, at most {worst} in any second (rate {WAVE_RATE}/s)",
        closes.len()
    );
    assert!(
        worst <= WAVE_RATE as usize + 1,
        "{worst} closes in one second"
    );

    let progress = lab.sbc.proxy.rereg.progress();
    eprintln!("status: {progress:?}");
    assert_eq!(progress.active.as_deref(), Some("standby"));
    assert!(progress.to_50_secs.is_some(), "{progress:?}");
    fleet.stop().await;
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_registration_makes_200_phones_reachable_on_the_standby_at_once() {
    // The scripted UAs' futures are not Send: phones and calls run on a LocalSet.
    tokio::task::LocalSet::new()
        .run_until(shadow_registration_makes_200_phones_reachable_on_the_standby_at_once_body())
        .await;
}

async fn shadow_registration_makes_200_phones_reachable_on_the_standby_at_once_body() {
    let lab = Arc::new(lab(true, PHONES).await);
    let fleet = fleet(&lab, PHONES).await;
    wait_for("200 phones on the primary", Duration::from_secs(30), || {
        registered_users(&lab.primary).len() == PHONES
    })
    .await;
    wait_for(
        "200 phones shadowed on the standby",
        Duration::from_secs(30),
        || registered_users(&lab.standby).len() == PHONES,
    )
    .await;
    // The standby's bindings carry the SBC's Path, so its calls come back through us.
    let regs = lab.standby.registrations();
    assert!(regs.iter().all(|r| r.path.len() == 1), "{:?}", regs.first());

    let t0 = Instant::now();
    lab.primary.stop().await;
    let detected = detection(&lab, t0).await;
    let limit = detected + 1.0;
    let mut rang = ring_all(&lab, &fleet, t0, Duration::from_secs_f64(limit + 10.0)).await;
    let (p50, max) = (percentile(&mut rang, 0.5), percentile(&mut rang, 1.0));
    eprintln!(
        "shadow registration: detection {detected:.2} s; first ring through the standby p50 {p50:.2} s, max {max:.2} s (limit {limit:.2} s)"
    );
    assert!(
        max <= limit,
        "max {max:.2} s > detection + 1 s = {limit:.2} s"
    );
    fleet.stop().await;
    lab.sbc.shutdown();
}
