//! Hostile traffic against a running SBC on loopback: a REGISTER flood, a connection flood,
//! attempts to use the SBC as an open relay, and SIP scanners. Legitimate phones must keep
//! working through all of it, and the SBC must stay within bounded memory.
//!
//! Every load here is bounded in count and time and aimed only at loopback addresses. The
//! tests run one at a time (see [`SERIAL`]): the memory check reads the whole process's RSS,
//! which a parallel test opening thousands of sockets would disturb.
//!
//! Parser robustness against the RFC 4475/5118 corpora is `tests/torture.rs`; fuzzing is
//! `fuzz/` (not run by the test command).

use bytes::Bytes;
use sbc_sip::message::{HeaderName, Message};
use sbc_sip::Transport;
use sbc_tests::net::free_udp;
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// One test at a time: see the module documentation.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Lab {
    sbc: sbc::Sbc,
    pbx: Pbx,
}

/// An SBC (UDP and TCP on 127.0.0.1) in front of one scripted PBX on 127.0.0.2, with
/// `extra` appended to its config.
async fn lab(extra: &str) -> Lab {
    let pbx_addr = free_udp("127.0.0.2");
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[listen]]
transport = "tcp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
[[pool.node]]
name = "pbx-a"
address = "{pbx_addr}"
[phones]
sources = ["127.0.0.0/8"]
[media]
enabled = false
{extra}
"#
    );
    let cfg = sbc_config::parse(&cfg, Path::new("hostile.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let pbx = Pbx::start(
        PbxConfig::new(pbx_addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .user("bob", "b-secret"),
    )
    .await
    .expect("pbx");
    Lab { sbc, pbx }
}

async fn phone(lab: &Lab, user: &str, pw: &str) -> Phone {
    let c = PhoneConfig::new(
        user,
        "pbx.test",
        pw,
        lab.sbc.addr(Transport::Udp).expect("udp"),
    );
    Phone::new(c).await.expect("phone")
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A request from `from`, with a fresh branch and Call-ID per `n`.
fn request(method: &str, uri: &str, from: SocketAddr, n: u64, extra: &str) -> Vec<u8> {
    format!(
        "{method} {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK-h{n}-{r:x};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@pbx.test>;tag=t{n}\r\n\
         To: <sip:probe@pbx.test>\r\n\
         Call-ID: hostile-{n}-{r:x}@{from}\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:probe@{from}>\r\n\
         {extra}\
         Content-Length: 0\r\n\r\n",
        r = rand::random::<u32>()
    )
    .into_bytes()
}

/// Every SIP message that reaches `sock` within `wait`.
async fn collect(sock: &UdpSocket, wait: Duration) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
        if let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) {
            got.push(m);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_flood_is_blocked_while_a_phone_registers_and_calls() {
    let _serial = SERIAL.lock().await;
    let lab = lab(
        "[ratelimit]\nregister_rate = 20\nregister_burst = 40\nblock_after = 50\nblock_secs = 60\n",
    )
    .await;
    let sbc_udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let rss_before = rss();

    // The flooder: 127.0.0.66, 50 REGISTERs every 10 ms for 3 s (15,000 in all).
    let flooder = Arc::new(UdpSocket::bind("127.0.0.66:0").await.expect("bind flooder"));
    let from = flooder.local_addr().expect("addr");
    let start = Instant::now();
    let answers = tokio::spawn({
        let sock = flooder.clone();
        async move {
            let mut got: Vec<(Duration, u16, bool)> = Vec::new();
            let mut buf = vec![0u8; 65536];
            let stop = tokio::time::Instant::now() + Duration::from_secs(5);
            while let Ok(Ok((n, _))) = tokio::time::timeout_at(stop, sock.recv_from(&mut buf)).await
            {
                if let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) {
                    let retry = m.header_value(HeaderName::RetryAfter).is_some();
                    got.push((start.elapsed(), m.status().unwrap_or(0), retry));
                }
            }
            got
        }
    });
    let flood = tokio::spawn({
        let sock = flooder.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0u64;
            for _ in 0..300 {
                tick.tick().await;
                for _ in 0..50 {
                    let msg = request("REGISTER", "sip:pbx.test", from, sent, "");
                    if sock.send_to(&msg, sbc_udp).await.is_ok() {
                        sent += 1;
                    }
                }
            }
            sent
        }
    });

    // Meanwhile, real phones on 127.0.0.1 register and call each other.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alice = phone(&lab, "alice", "a-secret").await;
    let bob = phone(&lab, "bob", "b-secret").await;
    assert_eq!(
        alice.register(300).await.expect("alice").status(),
        Some(200)
    );
    assert_eq!(bob.register(300).await.expect("bob").status(), Some(200));
    let (call, answered) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
        let inc = bob
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("bob rings");
        bob.answer(&inc, 200).await.expect("answer")
    });
    let call = call.expect("call");
    assert_eq!(
        call.final_status, 200,
        "the call goes through during the flood"
    );
    let (bye, _) = tokio::join!(
        alice.bye(&call),
        bob.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    drop(answered);
    let during_flood = start.elapsed();

    let sent = flood.await.expect("flood task");
    let flood_time = start.elapsed();
    let answers = answers.await.expect("answer task");
    let rss_after = rss();

    assert!(sent >= 10_000, "the flood sent only {sent}");
    assert!(
        during_flood < flood_time,
        "the phones finished while the flood was still running ({during_flood:?} vs {flood_time:?})"
    );
    let busy: Vec<_> = answers.iter().filter(|(_, s, _)| *s == 503).collect();
    assert!(!busy.is_empty(), "the flooder never got a 503: {answers:?}");
    assert!(
        busy.iter().all(|(_, _, retry)| *retry),
        "a 503 without Retry-After"
    );
    // Burst (40) forwarded to the PBX and answered 401 there, at most block_after (50) 503s,
    // then silence: a few dozen answers to 15,000 requests.
    assert!(
        answers.len() <= 40 + 50 + 20,
        "{} answers to the flooder",
        answers.len()
    );
    let last = answers.iter().map(|(t, _, _)| *t).max().unwrap_or_default();
    assert!(
        last < Duration::from_secs(1),
        "the flooder still got answers {last:?} into a {flood_time:?} flood"
    );
    let limiter = lab.sbc.proxy.limiter().expect("limiter installed");
    assert_eq!(limiter.blocked_sources(), 1, "the flooder is blocked");
    assert!(
        lab.pbx.stats().requests_of("REGISTER") < 100,
        "the flood reached the PBX: {} REGISTERs",
        lab.pbx.stats().requests_of("REGISTER")
    );
    let metrics = sbc::metrics::install().expect("recorder").render();
    for series in [
        r#"sbc_ratelimited_total{method="REGISTER",action="503"}"#,
        r#"sbc_ratelimited_total{method="REGISTER",action="block"}"#,
        r#"sbc_ratelimited_total{method="REGISTER",action="drop"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 50 << 20,
        "RSS grew by {} MB during the flood",
        grown >> 20
    );
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_per_source_limit_are_refused() {
    let _serial = SERIAL.lock().await;
    let lab = lab("[limits]\nmax_connections = 20000\nmax_connections_per_source = 100\n").await;
    let sbc_tcp = lab.sbc.addr(Transport::Tcp).expect("tcp");

    // 10,000 connections, or fewer if this process may not open that many descriptors.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        4096
    };
    let wanted = 10_000u64.min(soft.saturating_sub(1_500)).max(300);
    let started = Instant::now();
    let mut conns: Vec<std::net::TcpStream> = Vec::with_capacity(wanted as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < wanted || !tasks.is_empty() {
        while next < wanted && tasks.len() < 64 {
            next += 1;
            tasks.spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(SocketAddr::new(ip("127.0.0.77"), 0))?;
                let stream =
                    tokio::time::timeout(Duration::from_secs(5), sock.connect(sbc_tcp)).await??;
                stream.into_std()
            });
        }
        if let Some(done) = tasks.join_next().await {
            conns.push(done.expect("connect task").expect("connect"));
        }
    }
    assert_eq!(conns.len() as u64, wanted);

    // The SBC accepts each connection and closes those over the limit at once; the others
    // stay open and idle. Count until the picture is stable.
    let open = |conns: &mut Vec<std::net::TcpStream>| -> usize {
        use std::io::Read;
        let mut buf = [0u8; 64];
        conns.retain_mut(|c| match c.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        conns.len()
    };
    let mut still_open = open(&mut conns);
    let deadline = Instant::now() + Duration::from_secs(10);
    while still_open > 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        still_open = open(&mut conns);
    }
    assert_eq!(
        still_open, 100,
        "of {wanted} connections from one source, {still_open} stayed open"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(open(&mut conns), 100, "accepted connections must stay open");

    // Another source is still served over TCP.
    let other = sbc_tests::sip_io::Endpoint::tcp_from(Some(ip("127.0.0.78")), sbc_tcp)
        .await
        .expect("another source connects");
    let local = other.local_addr();
    let options = String::from_utf8(request(
        "OPTIONS",
        &format!("sip:{sbc_tcp};transport=tcp"),
        local,
        1,
        "",
    ))
    .expect("utf8")
    .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
    .replace("Max-Forwards: 70", "Max-Forwards: 0");
    other.send(sbc_tcp, options.as_bytes()).await.expect("send");
    let (resp, _) = other
        .recv(Duration::from_secs(3))
        .await
        .expect("an answer on the new connection");
    assert_eq!(resp.status(), Some(200));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the connection flood took {:?}",
        started.elapsed()
    );
    drop(conns);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sbc_is_not_an_open_relay() {
    let _serial = SERIAL.lock().await;
    let lab = lab("").await;
    let sbc_udp = lab.sbc.addr(Transport::Udp).expect("udp");
    // A SIP server the config does not know: nothing may ever reach it through the SBC.
    let victim = UdpSocket::bind("127.0.0.99:0").await.expect("bind victim");
    let victim_addr = victim.local_addr().expect("addr");

    // An unregistered public source names the victim in the Request-URI, or routes to it.
    let stranger = UdpSocket::bind("127.0.0.88:0")
        .await
        .expect("bind stranger");
    let from = stranger.local_addr().expect("addr");
    let target = format!("sip:victim@{victim_addr}");
    let attempts = [
        request("INVITE", &target, from, 1, ""),
        request("MESSAGE", &target, from, 2, ""),
        request("OPTIONS", &target, from, 3, ""),
        request(
            "INVITE",
            "sip:bob@pbx.test",
            from,
            4,
            &format!("Route: <sip:{victim_addr};lr>\r\n"),
        ),
    ];
    for (k, msg) in attempts.iter().enumerate() {
        stranger.send_to(msg, sbc_udp).await.expect("send");
        let answers = collect(&stranger, Duration::from_millis(700)).await;
        let finals: Vec<u16> = answers
            .iter()
            .filter_map(Message::status)
            .filter(|s| *s >= 200)
            .collect();
        assert!(
            matches!(finals.first(), Some(403 | 404)),
            "attempt {k}: expected 403/404, got {finals:?}"
        );
    }

    // A registered phone asking for the same address goes to its PBX, never to the victim.
    let alice = phone(&lab, "alice", "a-secret").await;
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let call = alice.invite(&target).await.expect("call attempt");
    assert!(
        call.final_status >= 300,
        "a call to an unconfigured address was answered {}",
        call.final_status
    );

    let leaked = collect(&victim, Duration::from_millis(500)).await;
    assert!(
        leaked.is_empty(),
        "the SBC relayed to an address outside its config: {:?}",
        leaked
            .iter()
            .map(sbc_tests::sip_io::summary)
            .collect::<Vec<_>>()
    );
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanner_user_agents_get_no_answer_at_all() {
    let _serial = SERIAL.lock().await;
    let lab = lab("").await;
    let sbc_udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let scanner = UdpSocket::bind("127.0.0.89:0").await.expect("bind");
    let from = scanner.local_addr().expect("addr");
    let local_uri = format!("sip:{sbc_udp}");
    for (k, (method, agent)) in [
        ("OPTIONS", "friendly-scanner"),
        ("REGISTER", "sipvicious"),
        ("INVITE", "VaxSIPUserAgent/3.1"),
        ("OPTIONS", "sipcli/v1.8"),
    ]
    .into_iter()
    .enumerate()
    {
        let msg = request(
            method,
            &local_uri,
            from,
            10 + k as u64,
            &format!("User-Agent: {agent}\r\n"),
        );
        scanner.send_to(&msg, sbc_udp).await.expect("send");
    }
    let answers = collect(&scanner, Duration::from_secs(1)).await;
    assert!(
        answers.is_empty(),
        "scanners got answers: {:?}",
        answers
            .iter()
            .map(sbc_tests::sip_io::summary)
            .collect::<Vec<_>>()
    );
    assert!(
        lab.pbx.stats().requests_of("REGISTER") == 0,
        "a scanner's REGISTER reached the PBX"
    );

    // The same source with an ordinary User-Agent is answered: the silence was the filter.
    let msg = request(
        "OPTIONS",
        &local_uri,
        from,
        99,
        "User-Agent: Yealink SIP-T46S\r\n",
    );
    let msg = String::from_utf8(msg)
        .expect("utf8")
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    scanner
        .send_to(msg.as_bytes(), sbc_udp)
        .await
        .expect("send");
    let answers = collect(&scanner, Duration::from_secs(1)).await;
    assert_eq!(
        answers.first().and_then(Message::status),
        Some(200),
        "an ordinary OPTIONS is answered"
    );
    lab.sbc.shutdown();
}
