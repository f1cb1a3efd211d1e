//! A new INVITE or REGISTER that the primary PBX does not answer (silent, 503, gone) is
//! retried on the standby at once: callers see no failure, only at most the branch timeout
//! of extra delay.

use sbc_sip::Transport;
use sbc_tests::net::free_udp;
use sbc_tests::pbx::{Pbx, PbxConfig, PbxMode};
use sbc_tests::phone::{Phone, PhoneConfig};
use std::path::Path;
use std::time::{Duration, Instant};

struct Pair {
    sbc: sbc::Sbc,
    primary: Pbx,
    standby: Pbx,
}

async fn pair() -> Pair {
    let a = free_udp("127.0.0.2");
    let b = free_udp("127.0.0.3");
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
[[pool.node]]
name = "primary"
address = "{a}"
[[pool.node]]
name = "standby"
address = "{b}"
[phones]
sources = ["127.0.0.0/8"]
# Every REGISTER forwarded: these tests are about where they go (split expiry would answer a
# phone's refresh from the cache while the node holding its binding is still active).
expires_secs = 0
"#
    );
    let cfg = sbc_config::parse(&cfg, Path::new("failover.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let mk = |addr| {
        PbxConfig::new(addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .user("bob", "b-secret")
    };
    let primary = Pbx::start(mk(a)).await.expect("primary");
    let standby = Pbx::start(mk(b)).await.expect("standby");
    Pair {
        sbc,
        primary,
        standby,
    }
}

/// Waits until the SBC's probes have seen every node answer (a node that never answered is
/// Starting, and its failures do not count yet).
async fn wait_all_up(p: &Pair) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = p.sbc.health.status();
        if st[0]
            .nodes
            .iter()
            .all(|n| n.state == sbc_health::state::NodeState::Up)
        {
            return;
        }
        assert!(Instant::now() < deadline, "nodes never came up: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn phone(p: &Pair, user: &str, pw: &str) -> Phone {
    let c = PhoneConfig::new(
        user,
        "pbx.test",
        pw,
        p.sbc.addr(Transport::Udp).expect("udp"),
    );
    Phone::new(c).await.expect("phone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_primary_register_and_call_go_to_standby() {
    let p = pair().await;
    let alice = phone(&p, "alice", "a-secret").await;
    let bob = phone(&p, "bob", "b-secret").await;
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    assert_eq!(
        p.primary.registrations().len(),
        1,
        "primary serves while healthy"
    );

    wait_all_up(&p).await;
    p.primary.set_mode(PbxMode::Silent);
    // The first REGISTER after the fault waits one branch timeout on the silent primary,
    // then the standby answers; the primary is now Suspect, so everything after goes to the
    // standby first without waiting. No failure reaches the phones.
    let t = Instant::now();
    assert_eq!(bob.register(300).await.expect("reg").status(), Some(200));
    let first = t.elapsed();
    let t = Instant::now();
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let second = t.elapsed();
    assert_eq!(
        p.standby.registrations().len(),
        2,
        "both on the standby now"
    );
    assert!(
        first >= Duration::from_millis(900) && first < Duration::from_secs(3),
        "{first:?}"
    );
    assert!(second < Duration::from_millis(500), "{second:?}");
    let active = p.sbc.health.status()[0].active.clone();
    assert_eq!(
        active.as_deref(),
        Some("primary"),
        "one failure is not a failover"
    );

    let (call, answered) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
        let inc = bob
            .wait_invite(Duration::from_secs(5))
            .await
            .expect("invite");
        bob.answer(&inc, 200).await.expect("answer")
    });
    let call = call.expect("call");
    assert_eq!(call.final_status, 200);
    assert!(p.standby.stats().requests_of("INVITE") >= 1);
    let (bye, _) = tokio::join!(
        alice.bye(&call),
        bob.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    drop(answered);
    p.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_503_is_retried_at_once() {
    let p = pair().await;
    let alice = phone(&p, "alice", "a-secret").await;
    p.primary.set_mode(PbxMode::Respond503);
    let t = Instant::now();
    let r = alice.register(300).await.expect("reg");
    assert_eq!(r.status(), Some(200), "the 503 never reaches the phone");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(p.standby.registrations().len(), 1);
    assert!(p.primary.stats().requests_of("REGISTER") >= 1);
    p.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_100_trying_is_suspect_before_the_branch_timeout() {
    let p = pair().await;
    let alice = phone(&p, "alice", "a-secret").await;
    let bob = phone(&p, "bob", "b-secret").await;
    wait_all_up(&p).await;
    p.primary.set_mode(PbxMode::Silent);
    // bob's REGISTER waits out the branch timeout on the silent primary. 250 ms into it
    // (suspect_after_ms default), with no 100 Trying or anything else seen, the primary is
    // Suspect: alice's REGISTER, sent 400 ms in, goes to the standby first and does not wait.
    let t = Instant::now();
    let (b, a) = tokio::join!(bob.register(300), async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let t = Instant::now();
        let r = alice.register(300).await;
        (r, t.elapsed())
    });
    assert_eq!(b.expect("bob").status(), Some(200));
    let bob_took = t.elapsed();
    let (a, alice_took) = a;
    assert_eq!(a.expect("alice").status(), Some(200));
    assert!(bob_took >= Duration::from_millis(900), "{bob_took:?}");
    assert!(
        alice_took < Duration::from_millis(300),
        "alice queued behind the silent primary: {alice_took:?}"
    );
    assert_eq!(p.standby.registrations().len(), 2);
    // A hint, not a failover.
    assert_eq!(p.sbc.health.status()[0].active.as_deref(), Some("primary"));
    p.sbc.shutdown();
}
