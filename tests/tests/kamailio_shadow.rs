//! Shadow registration and split expiry against a REAL Kamailio pair (issue 5 interop).
//!
//! Two Kamailio instances (tests/kamailio/pbx.cfg plus a control socket for `kamcmd` and a
//! log line per REGISTER the registrar sees) are the pool's primary and standby. Two phones,
//! raw UDP sockets writing SIP by hand, register through the SBC. The test asserts, from
//! Kamailio's own view (`kamcmd ul.dump`, its log) rather than the SBC's:
//!
//! 1. the primary holds both bindings, and the phones got the SBC's short lifetime (<= 11 s);
//! 2. a refresh (same Call-ID, CSeq + 1) is answered by the SBC: the primary never sees it
//!    (its log and its binding's CSeq), and `sbc_register_absorbed_total` counts it;
//! 3. the standby holds a shadow binding for each phone that the SBC registered itself
//!    (Call-ID `sbc-shadow-...`), with the same contact and the very Path the primary holds;
//! 4. after the primary is killed (SIGKILL) and the SBC made the standby active, a call from
//!    phone A to phone B rings B within 1 s, routed by the standby through the shadow
//!    binding's Path back through the SBC to B's flow, B never having registered again; the
//!    call is answered, acknowledged and hung up.

use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::message::{HeaderName, Message, Method};
use sbc_tests::kamailio::{kamailio_available, KamailioPbx, PathMode, PBX_CFG_TEMPLATE};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// The lifetime the SBC gives phones (split expiry), and the most a phone may get (+10%).
const PHONE_EXPIRES: u64 = 10;
const MAX_GIVEN: u64 = 11;
/// The lifetime the phones ask for (Kamailio grants it: max_expires is 3600).
const ASKED: u64 = 300;
/// Control socket of each Kamailio, relative to its working directory (its temp dir).
const CTL: &str = "ctl.sock";
/// Marker of the log line the registrar route writes per REGISTER.
const REG_LOG: &str = "registrar-saw:";

/// pbx.cfg with the ctl module (for `kamcmd`) and a log line per REGISTER naming its
/// Call-ID, CSeq and Path.
fn template() -> String {
    let modules = "loadmodule \"sanity.so\"\n";
    let registrar = "route[REGISTRAR] {\n";
    assert!(
        PBX_CFG_TEMPLATE.contains(modules) && PBX_CFG_TEMPLATE.contains(registrar),
        "tests/kamailio/pbx.cfg changed: kamailio_shadow.rs needs new anchors"
    );
    PBX_CFG_TEMPLATE
        .replacen(
            modules,
            &format!("{modules}loadmodule \"ctl.so\"\nmodparam(\"ctl\", \"binrpc\", \"unix:{CTL}\")\n"),
            1,
        )
        .replacen(
            registrar,
            &format!(
                "{registrar}\txlog(\"L_INFO\", \"{REG_LOG} ci=$ci cseq=$cs to=$tu src=$si:$sp path=$hdr(Path)\\n\");\n"
            ),
            1,
        )
}

/// `kamcmd` from the Kamailio package, if installed.
fn kamcmd() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join("kamcmd"))
        .find(|p| p.is_file())
}

/// One contact of Kamailio's location table, as `ul.dump` prints it.
#[derive(Debug, Clone, Default)]
struct UlContact {
    aor: String,
    address: String,
    call_id: String,
    cseq: String,
    path: String,
}

/// Kamailio's location table, read with `kamcmd ul.dump` over its control socket.
fn ul_dump(kamcmd: &Path, kam: &KamailioPbx) -> anyhow::Result<Vec<UlContact>> {
    let sock = kam.dir().join(CTL);
    let out = Command::new(kamcmd)
        .arg("-s")
        .arg(format!("unix:{}", sock.display()))
        .arg("ul.dump")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "kamcmd ul.dump failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut aor = String::new();
    let mut contacts: Vec<UlContact> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(": ") else {
            continue;
        };
        let v = v.trim().to_string();
        match k {
            "AoR" => aor = v,
            "Address" => contacts.push(UlContact {
                aor: aor.clone(),
                address: v,
                ..UlContact::default()
            }),
            "Call-ID" => {
                if let Some(c) = contacts.last_mut() {
                    c.call_id = v;
                }
            }
            "CSeq" => {
                if let Some(c) = contacts.last_mut() {
                    c.cseq = v;
                }
            }
            "Path" => {
                if let Some(c) = contacts.last_mut() {
                    c.path = v;
                }
            }
            _ => {}
        }
    }
    Ok(contacts)
}

/// [`ul_dump`] off the runtime's worker threads.
async fn ul(kamcmd: &Path, kam: &KamailioPbx) -> Vec<UlContact> {
    let r = tokio::task::block_in_place(|| ul_dump(kamcmd, kam));
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n--- kamailio log ---\n{}", kam.log()),
    }
}

/// The REGISTERs Kamailio's registrar saw, one log line each.
fn registers_seen(kam: &KamailioPbx) -> Vec<String> {
    kam.log()
        .lines()
        .filter(|l| l.contains(REG_LOG))
        .map(str::to_string)
        .collect()
}

/// Waits for a message on `s` that `pred` accepts, up to `within`; other messages
/// (provisional responses, retransmissions) are skipped.
async fn recv_until(
    s: &UdpSocket,
    what: &str,
    within: Duration,
    pred: impl Fn(&Message) -> bool,
    logs: &dyn Fn() -> String,
) -> (Message, SocketAddr) {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 65535];
    loop {
        let r = tokio::time::timeout_at(deadline, s.recv_from(&mut buf)).await;
        let Ok(Ok((n, from))) = r else {
            panic!("no {what} within {within:?}\n{}", logs());
        };
        if let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) {
            if pred(&m) {
                return (m, from);
            }
        }
    }
}

fn is_final(m: &Message, method: Method) -> bool {
    m.status().is_some_and(|s| s >= 200) && m.cseq_method() == method
}

#[allow(clippy::too_many_arguments)]
fn request(
    method: &str,
    ruri: &str,
    port: u16,
    call: &str,
    from: &str,
    to: &str,
    cseq: u32,
    extra: &str,
) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call}-{cseq}-{method};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

fn register(user: &str, port: u16, cseq: u32) -> String {
    request(
        "REGISTER",
        "sip:pbx.test",
        port,
        &format!("reg-{user}"),
        &format!("<sip:{user}@pbx.test>;tag={user}r"),
        &format!("<sip:{user}@pbx.test>"),
        cseq,
        &format!("Contact: <sip:{user}@127.0.0.1:{port}>\r\nExpires: {ASKED}\r\n"),
    )
}

/// The lifetime a 2xx to a REGISTER gives the contact (its `expires` parameter, else the
/// Expires header).
fn given_expires(ok: &Message) -> Option<u64> {
    let param = ok
        .values(HeaderName::Contact)
        .filter_map(|(_, v)| NameAddr::parse(sbc_sip::scan::trim(v)).ok())
        .find_map(|na| {
            let e = na.param(b"expires").flatten()?;
            std::str::from_utf8(e).ok()?.parse().ok()
        });
    param.or_else(|| {
        let e = ok.header_value(HeaderName::Expires)?;
        std::str::from_utf8(sbc_sip::scan::trim(e))
            .ok()?
            .parse()
            .ok()
    })
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn absorbed() -> f64 {
    let text = sbc::metrics::install()
        .map(|h| h.render())
        .unwrap_or_default();
    metric(&text, "sbc_register_absorbed_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_bindings_on_a_real_kamailio_standby_ring_the_phone_after_failover() {
    let kamcmd = match kamcmd() {
        Some(k) if kamailio_available() => k,
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("kamailio/kamcmd is not installed; scripts/install-deps.sh installs it");
            }
            eprintln!("SKIP: kamailio (with kamcmd) not installed (run scripts/install-deps.sh)");
            return;
        }
    };
    sbc_tests::init_tracing();
    let t_start = Instant::now();
    let tpl = template();
    let primary = KamailioPbx::start_any_template(&tpl, PathMode::Lazy).expect("primary starts");
    let standby = KamailioPbx::start_any_template(&tpl, PathMode::Lazy).expect("standby starts");
    let logs = || {
        format!(
            "--- primary kamailio log ---\n{}\n--- standby kamailio log ---\n{}",
            primary.log(),
            standby.log()
        )
    };
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
shadow_registration = true
[pool.probe]
interval_ms = 200
timeout_ms = 150
failures = 2
[[pool.node]]
name = "primary"
address = "{}"
[[pool.node]]
name = "standby"
address = "{}"
[phones]
sources = ["127.0.0.0/8"]
expires_secs = {PHONE_EXPIRES}
[media]
enabled = false
[ratelimit]
enabled = false
"#,
        primary.addr(),
        standby.addr()
    );
    let cfg = sbc_config::parse(&cfg, Path::new("kamailio_shadow.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc starts");
    let sbc_addr: SocketAddr = sbc.addr(sbc_sip::Transport::Udp).expect("udp listener");
    let health = sbc.health.clone();
    let (p_idx, s_idx) = (
        health.node_index("primary").expect("primary"),
        health.node_index("standby").expect("standby"),
    );
    let active = || health.status().first().and_then(|p| p.active.clone());

    // Both nodes answer the probes before anything registers (shadows go to ready nodes).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(health.node_state(p_idx) == Some(sbc_health::NodeState::Up)
        && health.node_state(s_idx) == Some(sbc_health::NodeState::Up))
    {
        assert!(
            Instant::now() < deadline,
            "nodes never came up: {:?}",
            health.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active().as_deref(), Some("primary"));

    let alice = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let bob = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let ap = alice.local_addr().expect("addr").port();
    let bp = bob.local_addr().expect("addr").port();
    let phones = [(&alice, "alice", ap), (&bob, "bob", bp)];

    // (1) Both register through the SBC on the primary and get the short lifetime.
    for (sock, user, port) in phones {
        sock.send_to(register(user, port, 1).as_bytes(), sbc_addr)
            .await
            .expect("send");
        let (r, _) = recv_until(
            sock,
            "200 to REGISTER",
            Duration::from_secs(3),
            |m| is_final(m, Method::Register),
            &logs,
        )
        .await;
        assert_eq!(r.status(), Some(200), "{user} registers\n{}", logs());
        let given = given_expires(&r).expect("a lifetime in the 200");
        assert!(
            (1..=MAX_GIVEN).contains(&given),
            "{user} got {given} s, not the SBC's short lifetime (asked {ASKED})"
        );
        eprintln!("{user}: registered, lifetime given {given} s");
    }
    let on_primary = ul(&kamcmd, &primary).await;
    let mut primary_paths = Vec::new();
    for (_, user, port) in phones {
        let c = on_primary
            .iter()
            .find(|c| c.aor == user)
            .unwrap_or_else(|| panic!("primary holds no binding for {user}: {on_primary:?}"));
        // Topology hiding: Kamailio stores the phone's alias on the SBC, never its address.
        assert!(
            c.address
                .starts_with(&format!("sip:{user}@127.0.0.1:{};sbcc=", sbc_addr.port()))
                && !c.address.contains(&format!(":{port}")),
            "the binding names the SBC's alias of the phone: {c:?}"
        );
        assert_eq!(c.call_id, format!("reg-{user}"));
        assert!(
            c.path.contains(&format!("@127.0.0.1:{};", sbc_addr.port())) && c.path.contains(";lr"),
            "the binding carries the SBC's Path: {c:?}"
        );
        primary_paths.push((c.path.clone(), c.address.clone()));
    }
    let seen_before = registers_seen(&primary);
    assert_eq!(
        seen_before.len(),
        2,
        "the primary saw one REGISTER per phone: {seen_before:#?}"
    );

    // (2) A refresh (same Call-ID, CSeq 2) is answered by the SBC from its cache.
    let absorbed_before = absorbed();
    for (sock, user, port) in phones {
        sock.send_to(register(user, port, 2).as_bytes(), sbc_addr)
            .await
            .expect("send");
        let (r, _) = recv_until(
            sock,
            "200 to the refresh",
            Duration::from_secs(3),
            |m| is_final(m, Method::Register),
            &logs,
        )
        .await;
        assert_eq!(r.status(), Some(200), "{user}'s refresh\n{}", logs());
        assert_eq!(r.cseq(), 2, "the 200 answers the refresh");
        let given = given_expires(&r).expect("a lifetime in the 200");
        assert!((1..=MAX_GIVEN).contains(&given), "refresh: {given} s");
    }
    // Were either refresh forwarded, the primary would have logged it by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen_after = registers_seen(&primary);
    assert_eq!(
        seen_after, seen_before,
        "no refresh reached the primary Kamailio"
    );
    let on_primary = ul(&kamcmd, &primary).await;
    for (_, user, _) in phones {
        let c = on_primary.iter().find(|c| c.aor == user).expect("binding");
        assert_eq!(
            c.cseq, "1",
            "the primary's binding was not refreshed: {c:?}"
        );
    }
    let absorbed_now = absorbed();
    assert!(
        absorbed_now - absorbed_before >= 2.0,
        "sbc_register_absorbed_total went {absorbed_before} -> {absorbed_now}"
    );

    // (3) The SBC registered both phones on the standby itself, with their Path.
    let t_reg = Instant::now();
    let shadows = loop {
        let on_standby = ul(&kamcmd, &standby).await;
        let found: Vec<UlContact> = phones
            .iter()
            .filter_map(|(_, user, _)| on_standby.iter().find(|c| c.aor == *user).cloned())
            .collect();
        if found.len() == 2 {
            break found;
        }
        assert!(
            t_reg.elapsed() < Duration::from_secs(5),
            "no shadow bindings on the standby: {on_standby:?}\nSBC view: {:?}\n{}",
            sbc.proxy.registrations.view(10, Instant::now()),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (c, (_, (path, address))) in shadows.iter().zip(phones.iter().zip(&primary_paths)) {
        assert_eq!(
            &c.address, address,
            "the shadow names the same alias: {c:?}"
        );
        assert!(
            c.call_id.starts_with("sbc-shadow-"),
            "registered by the SBC itself: {c:?}"
        );
        assert_eq!(&c.path, path, "the shadow carries the SBC's Path");
    }
    // The SBC read Kamailio's 200s: each shadow is live (a lifetime parsed from the 200).
    let t_view = Instant::now();
    loop {
        let view = sbc.proxy.registrations.view(10, Instant::now());
        let live = |user: &str| {
            view.iter().any(|b| {
                b.node.as_deref() == Some("primary")
                    && b.contact.starts_with(&format!("sip:{user}@"))
                    && b.shadows.iter().any(|(n, until, status)| {
                        n == "standby" && *status == 200 && until.is_some_and(|u| u > 0)
                    })
            })
        };
        if live("alice") && live("bob") {
            break;
        }
        assert!(
            t_view.elapsed() < Duration::from_secs(3),
            "the SBC does not count its shadows live: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let standby_saw = registers_seen(&standby);
    assert!(
        standby_saw.iter().all(
            |l| l.contains(&format!("src=127.0.0.1:{}", sbc_addr.port()))
                && l.contains("ci=sbc-shadow-")
        ),
        "the standby saw only the SBC's shadow REGISTERs: {standby_saw:#?}"
    );
    eprintln!(
        "shadows on the standby: {} REGISTER(s), e.g. {}",
        standby_saw.len(),
        standby_saw.first().map_or("", |l| l.as_str())
    );

    // (4) Kill the primary; once the standby is active, alice calls bob.
    primary.signal("KILL");
    let t_kill = Instant::now();
    while active().as_deref() != Some("standby") {
        assert!(
            t_kill.elapsed() < Duration::from_secs(5),
            "no failover: {:?}",
            health.status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t_failover = Instant::now();
    let invite = request(
        "INVITE",
        "sip:bob@pbx.test",
        ap,
        "shadow-call",
        "<sip:alice@pbx.test>;tag=alicetag",
        "<sip:bob@pbx.test>",
        1,
        &format!("Contact: <sip:alice@127.0.0.1:{ap}>\r\n"),
    );
    alice
        .send_to(invite.as_bytes(), sbc_addr)
        .await
        .expect("send");
    let (inv_in, inv_src) = recv_until(
        &bob,
        "INVITE at bob within 1 s of the failover",
        Duration::from_secs(1),
        |m| m.method() == Some(Method::Invite),
        &logs,
    )
    .await;
    let t_ring = Instant::now();
    eprintln!(
        "kill -> standby active {:?}; active -> bob's INVITE {:?}; kill -> bob's INVITE {:?}",
        t_failover - t_kill,
        t_ring - t_failover,
        t_ring - t_kill
    );
    assert!(
        t_ring - t_failover <= Duration::from_secs(1),
        "bob rang {:?} after the failover",
        t_ring - t_failover
    );
    assert_eq!(inv_src, sbc_addr, "bob's INVITE comes over his flow");
    assert_eq!(
        String::from_utf8_lossy(inv_in.uri_bytes()),
        format!("sip:bob@127.0.0.1:{bp}"),
        "the standby looked up the shadow contact"
    );
    let rr: Vec<String> = inv_in
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    assert!(
        rr.iter()
            .any(|r| r.contains(&format!("127.0.0.1:{}", standby.addr().port()))),
        "the standby Kamailio routed the call: {rr:?}"
    );
    assert!(
        inv_in.header(HeaderName::Route).is_none(),
        "the SBC consumed its Path route"
    );

    // Bob answers; alice acknowledges along the route set; alice hangs up.
    let mut extra = format!("Contact: <sip:bob@127.0.0.1:{bp}>\r\n");
    for r in &rr {
        extra.push_str(&format!("Record-Route: {r}\r\n"));
    }
    let ok = sbc_sip::edit::response(
        &inv_in,
        200,
        "OK",
        &sbc_sip::edit::ResponseOpts {
            to_tag: Some(b"bobtag"),
            extra: extra.as_bytes(),
            ..Default::default()
        },
    );
    bob.send_to(&ok, sbc_addr).await.expect("send");
    let (ok_in, _) = recv_until(
        &alice,
        "200 to the INVITE",
        Duration::from_secs(3),
        |m| is_final(m, Method::Invite),
        &logs,
    )
    .await;
    assert_eq!(ok_in.status(), Some(200), "{}", logs());
    assert_eq!(ok_in.to_tag(), Some(&b"bobtag"[..]));
    let mut routes: Vec<String> = ok_in
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    routes.reverse();
    let route_hdr: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
    let target = format!("sip:bob@127.0.0.1:{bp}");
    let to = "<sip:bob@pbx.test>;tag=bobtag";
    let from = "<sip:alice@pbx.test>;tag=alicetag";
    let ack = request("ACK", &target, ap, "shadow-call", from, to, 1, &route_hdr);
    alice.send_to(ack.as_bytes(), sbc_addr).await.expect("send");
    recv_until(
        &bob,
        "ACK at bob",
        Duration::from_secs(3),
        |m| m.method() == Some(Method::Ack),
        &logs,
    )
    .await;
    let bye = request("BYE", &target, ap, "shadow-call", from, to, 2, &route_hdr);
    alice.send_to(bye.as_bytes(), sbc_addr).await.expect("send");
    let (bye_in, _) = recv_until(
        &bob,
        "BYE at bob",
        Duration::from_secs(3),
        |m| m.method() == Some(Method::Bye),
        &logs,
    )
    .await;
    let bye_ok = sbc_sip::edit::response(&bye_in, 200, "OK", &Default::default());
    bob.send_to(&bye_ok, sbc_addr).await.expect("send");
    let (r, _) = recv_until(
        &alice,
        "200 to the BYE",
        Duration::from_secs(3),
        |m| is_final(m, Method::Bye),
        &logs,
    )
    .await;
    assert_eq!(r.status(), Some(200));

    // Bob never registered again: the standby still holds only the SBC's shadow for him.
    let on_standby = ul(&kamcmd, &standby).await;
    let bobs: Vec<&UlContact> = on_standby.iter().filter(|c| c.aor == "bob").collect();
    assert!(
        !bobs.is_empty() && bobs.iter().all(|c| c.call_id.starts_with("sbc-shadow-")),
        "bob's only binding on the standby is the shadow: {bobs:?}"
    );
    eprintln!("whole test took {:?}", t_start.elapsed());
    sbc.shutdown();
}
