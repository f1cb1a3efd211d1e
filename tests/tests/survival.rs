//! Calls in progress outlive their PBX (issue 9).
//!
//! Proxied dialogs: the PBX record-routes between two passes through the SBC (phone -> SBC
//! -> PBX -> SBC -> trunk, one Call-ID). The PBX is killed mid-call; RTP keeps flowing both
//! ways (every packet counted), a re-INVITE refresh from either end is answered 200 by the
//! far end (the SBC skips the dead hop in the route set: first because the request to the
//! PBX timed out, then because health says Down), and a BYE reaches the other end. After
//! that no relay session, dialog, tracked Call-ID or relay port is left.
//!
//! Run with the scripted PBX (a stateless record-routing proxy) and with a real Kamailio
//! used as a proxying PBX (skipped when Kamailio is not installed, as in the other Kamailio
//! tests).

use sbc_sip::{Message, Method, Transport};
use sbc_tests::b2bua::{B2bua, B2buaConfig};
use sbc_tests::kamailio::{kamailio_available, KamailioPbx};
use sbc_tests::net::{count_rtp, free_udp, rtp, send_rtp};
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::trunk::Trunk;
use sbc_tests::ua::{call_and_answer, lossy, sdp_media_addr, Call, IncomingCall, Ua};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// SBC config: one pool with one node, probed every 200 ms (Down after 2 misses), branch
/// timeout 400 ms; a trunk when `trunk` is given; relay ports `ports`.
fn config(node: SocketAddr, trunk: Option<(&str, SocketAddr)>, ports: (u16, u16)) -> String {
    let trunk = trunk
        .map(|(ip, addr)| {
            format!(
                "[[trunk]]\nname = \"carrier\"\nsources = [\"{ip}\"]\naddress = \"{addr}\"\ndomains = [\"carrier.test\"]\n"
            )
        })
        .unwrap_or_default();
    format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
branch_timeout_ms = 400
[pool.probe]
interval_ms = 200
failures = 2
[[pool.node]]
name = "pbx-a"
address = "{node}"
{trunk}
[phones]
sources = ["127.0.0.0/8"]
[media]
port_min = {min}
port_max = {max}
timeout_secs = 60
"#,
        min = ports.0,
        max = ports.1,
    )
}

async fn start_sbc(cfg: &str) -> sbc::Sbc {
    let cfg = sbc_config::parse(cfg, Path::new("survival.toml")).expect("config");
    sbc::Sbc::start(&cfg).await.expect("sbc")
}

async fn phone(sbc: &sbc::Sbc, user: &str, password: &str) -> Phone {
    let c = PhoneConfig::new(
        user,
        "pbx.test",
        password,
        sbc.addr(Transport::Udp).expect("udp"),
    );
    let p = Phone::new(c).await.expect("phone");
    assert_eq!(p.register(300).await.expect("register").status(), Some(200));
    p
}

/// Waits until health has node 0 in `state`.
async fn wait_node(sbc: &sbc::Sbc, state: sbc_health::state::NodeState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = sbc.health.status();
        if st[0].nodes[0].state == state {
            return;
        }
        assert!(Instant::now() < deadline, "node never {state:?}: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every call is marked as having outlived its node (the SBC looks once a
/// second), and checks each names its node and its peer.
async fn wait_outlived(sbc: &sbc::Sbc) {
    let media = sbc.proxy.media().expect("media");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let calls = media.calls();
        if !calls.is_empty() && calls.iter().all(|c| c.outlived) {
            assert!(
                calls
                    .iter()
                    .all(|c| c.node == Some(0) && c.peer.is_some() && c.saveable == Some(true)),
                "{calls:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "calls not marked outlived: {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Free relay port pairs on each side.
fn free_ports(sbc: &sbc::Sbc) -> [usize; 2] {
    let relay = sbc.proxy.media().expect("media").relay();
    // A delete's ports come back at the media worker's next pass; wait for it.
    relay.flush();
    let t = relay.totals();
    [t.free_pairs[0], t.free_pairs[1]]
}

/// RTP both ways between two UAs through the relay addresses each was given; every packet
/// must arrive.
async fn rtp_both_ways(a: &Ua, a_to: SocketAddr, b: &Ua, b_to: SocketAddr, n: u16, what: &str) {
    tokio::join!(
        send_rtp(a.media_socket(), a_to, 0xa1, n),
        send_rtp(b.media_socket(), b_to, 0xb2, n)
    );
    let (at_b, at_a) = tokio::join!(
        count_rtp(b.media_socket(), 0xa1),
        count_rtp(a.media_socket(), 0xb2)
    );
    assert_eq!(at_b, usize::from(n), "{what}: a -> b");
    assert_eq!(at_a, usize::from(n), "{what}: b -> a");
}

/// The lab of the B2BUA tests (see [`b2bua_lab`]).
struct B2buaLab {
    sbc: sbc::Sbc,
    pbx: B2bua,
    alice: Phone,
    trunk: Trunk,
    /// Free relay port pairs before any call.
    ports_before: [usize; 2],
}

/// An SBC on [`config`] with a trunk at `trunk_ip` and relay `ports` (the config text passed
/// through `edit`), a scripted B2BUA in front of the carrier (number prefix 9; with `anchor`
/// it anchors media itself) that health has Up, alice registered, the trunk listening.
async fn b2bua_lab(
    trunk_ip: &str,
    ports: (u16, u16),
    edit: impl FnOnce(String) -> String,
    anchor: bool,
) -> B2buaLab {
    let pbx_addr = free_udp("127.0.0.2");
    let trunk_addr = free_udp(trunk_ip);
    let sbc = start_sbc(&edit(config(pbx_addr, Some((trunk_ip, trunk_addr)), ports))).await;
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let b2bua = B2buaConfig::new(pbx_addr, "pbx.test", udp)
        .trunk("9", "carrier.test")
        .anchor_media(anchor);
    let pbx = B2bua::start(b2bua).await.expect("b2bua");
    wait_node(&sbc, sbc_health::state::NodeState::Up).await;
    let ports_before = free_ports(&sbc);
    let alice = phone(&sbc, "alice", "").await;
    let trunk = Trunk::start(trunk_addr, udp).await.expect("trunk");
    B2buaLab {
        sbc,
        pbx,
        alice,
        trunk,
        ports_before,
    }
}

/// Alice calls the carrier's number and the trunk answers 200: alice's dialog, the INVITE
/// the trunk got, and the trunk's dialog.
async fn call_the_trunk(alice: &Ua, trunk: &Trunk) -> (Call, IncomingCall, Call) {
    call_and_answer(alice, "sip:95551234@pbx.test", Default::default(), trunk).await
}

/// A re-INVITE from `from` (its dialog `call`) answered 200 by `to`; returns the SDP
/// address `from` now has for the far end.
async fn refresh(from: &Ua, call: &mut Call, to: &Ua, what: &str) -> SocketAddr {
    let t0 = Instant::now();
    let (r, got) = tokio::join!(
        from.reinvite(call),
        to.wait_request_and_answer(Method::Invite, Duration::from_secs(4))
    );
    let r = r.unwrap_or_else(|e| panic!("{what}: re-INVITE: {e:#}"));
    assert_eq!(r.status(), Some(200), "{what}: re-INVITE answered");
    got.unwrap_or_else(|e| panic!("{what}: the far end sees the re-INVITE: {e:#}"));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "{what}: took {:?}",
        t0.elapsed()
    );
    sdp_media_addr(r.body()).expect("SDP in the 200")
}

/// The drill after the PBX died: RTP, a refresh from the caller (its PBX hop times out and
/// is skipped), RTP, a refresh from the callee once health says Down, RTP, a BYE from the
/// callee that reaches the caller; then nothing is left over.
#[allow(clippy::too_many_arguments)]
async fn outlive(
    sbc: &sbc::Sbc,
    caller: &Ua,
    mut ccall: Call,
    callee: &Ua,
    mut ecall: Call,
    at_caller: SocketAddr,
    at_callee: SocketAddr,
    ports_before: [usize; 2],
) {
    let media = sbc.proxy.media().expect("media");
    rtp_both_ways(
        caller,
        at_caller,
        callee,
        at_callee,
        50,
        "right after the kill",
    )
    .await;

    // The caller refreshes the session at once: the SBC sends it to the dead PBX, hears
    // nothing within the branch timeout and goes around it.
    let got = refresh(caller, &mut ccall, callee, "caller refresh").await;
    assert_eq!(got, at_caller, "the relay ports stay");
    rtp_both_ways(
        caller,
        at_caller,
        callee,
        at_callee,
        100,
        "after the caller's refresh",
    )
    .await;

    // Health calls the node Down; the callee refreshes too and is skipped around at once.
    wait_node(sbc, sbc_health::state::NodeState::Down).await;
    let t0 = Instant::now();
    let got = refresh(callee, &mut ecall, caller, "callee refresh").await;
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "no branch timeout once Down: {:?}",
        t0.elapsed()
    );
    assert_eq!(got, at_callee, "the relay ports stay");
    rtp_both_ways(
        caller,
        at_caller,
        callee,
        at_callee,
        100,
        "after the callee's refresh",
    )
    .await;
    assert_eq!(media.dialogs(), 2, "both passes still established");
    wait_outlived(sbc).await;

    // The callee hangs up; the caller gets the BYE; both 200.
    let (bye, got) = tokio::join!(
        callee.bye(&ecall),
        caller.wait_request_and_answer(Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("BYE answered").status(), Some(200));
    got.expect("the caller gets the BYE");

    // Nothing left: no relay session, dialog, Call-ID, transaction-held port.
    assert_eq!(media.sessions(), 0, "relay sessions");
    assert_eq!(media.dialogs(), 0, "dialogs");
    assert_eq!(media.tracked_calls(), 0, "tracked Call-IDs");
    assert_eq!(
        free_ports(sbc),
        ports_before,
        "relay ports back in the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_outlives_the_scripted_pbx() {
    let pbx_addr = free_udp("127.0.0.2");
    let trunk_addr = free_udp("127.0.0.60");
    let cfg = config(pbx_addr, Some(("127.0.0.60", trunk_addr)), (21000, 21099));
    let sbc = start_sbc(&cfg).await;
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let pbx = Pbx::start(
        PbxConfig::new(pbx_addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .trunk("9", "carrier.test"),
    )
    .await
    .expect("pbx");
    wait_node(&sbc, sbc_health::state::NodeState::Up).await;
    let ports_before = free_ports(&sbc);
    let alice = phone(&sbc, "alice", "a-secret").await;
    let trunk = Trunk::start(trunk_addr, udp).await.expect("trunk");

    let (call, inc, tcall) = call_the_trunk(&alice, &trunk).await;
    assert_eq!(call.final_status, 200);
    let at_alice = call.remote_media().expect("SDP at alice");
    let at_trunk = sdp_media_addr(inc.invite.body()).expect("SDP at the trunk");
    let media = sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 2, "two passes anchored");
    rtp_both_ways(&alice, at_alice, &trunk, at_trunk, 50, "before the kill").await;

    // The PBX dies: its port closes.
    pbx.stop().await;
    outlive(
        &sbc,
        &alice,
        call,
        &trunk,
        tcall,
        at_alice,
        at_trunk,
        ports_before,
    )
    .await;
    sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_outlives_kamailio() {
    if !kamailio_available() {
        if std::env::var_os("CI").is_some() {
            panic!("kamailio is not installed; scripts/install-deps.sh installs it");
        }
        eprintln!("SKIP: kamailio not installed (run scripts/install-deps.sh)");
        return;
    }
    let kam = KamailioPbx::start_any().expect("kamailio starts");
    let cfg = config(kam.addr(), None, (21100, 21199));
    let sbc = start_sbc(&cfg).await;
    wait_node(&sbc, sbc_health::state::NodeState::Up).await;
    let ports_before = free_ports(&sbc);
    let alice = phone(&sbc, "alice", "").await;
    let bob = phone(&sbc, "bob", "").await;

    let (call, answered) = tokio::join!(bob.invite("sip:alice@pbx.test"), async {
        let inc = alice
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("alice gets INVITE");
        let c = alice.answer(&inc, 200).await.expect("answer");
        (inc, c)
    });
    let call = call.unwrap_or_else(|e| panic!("call: {e:#}\n{}", kam.log()));
    let (inc, acall) = answered;
    assert_eq!(call.final_status, 200);
    let at_bob = call.remote_media().expect("SDP at bob");
    let at_alice = sdp_media_addr(inc.invite.body()).expect("SDP at alice");
    let media = sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 2, "two passes anchored");
    rtp_both_ways(&bob, at_bob, &alice, at_alice, 50, "before the kill").await;

    // Kamailio dies (TERM to its process group, waited for).
    drop(kam);
    outlive(
        &sbc,
        &bob,
        call,
        &alice,
        acall,
        at_bob,
        at_alice,
        ports_before,
    )
    .await;
    sbc.shutdown();
}

/// A phone-to-trunk call through a scripted B2BUA that leaves media end to end: the SBC
/// pairs the two dialogs (the b-leg's SDP names the relay port of the a-leg); when the
/// B2BUA dies, media keeps flowing, refreshes on either leg are answered 200 by the SBC with
/// the SDP that side already has, an in-dialog INFO gets a clear 503, and a BYE on one leg
/// is answered and carried to the other leg in its own terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_call_outlives_the_b2bua() {
    let B2buaLab {
        sbc,
        pbx,
        alice,
        trunk,
        ports_before,
    } = b2bua_lab("127.0.0.61", (21200, 21299), |c| c, false).await;

    let (mut call, inc, mut tcall) = call_the_trunk(&alice, &trunk).await;
    assert_eq!(call.final_status, 200);
    assert_ne!(call.call_id, tcall.call_id, "two dialogs");
    assert_eq!(pbx.bridged(), 1);
    let at_alice = call.remote_media().expect("SDP at alice");
    let at_trunk = sdp_media_addr(inc.invite.body()).expect("SDP at the trunk");
    let media = sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 2, "both legs anchored");
    // The SBC saw the hairpin: the two dialogs are one call, saveable.
    let calls = media.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.peer.is_some() && c.saveable == Some(true) && c.node == Some(0)),
        "{calls:?}"
    );
    // The relay joined the two legs: each packet crosses it once.
    let before = media.relay().totals().packets;
    rtp_both_ways(&alice, at_alice, &trunk, at_trunk, 50, "before the kill").await;
    // Counted on the kernel's send completions (io_uring): give the last ones a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while media.relay().totals().packets - before < 100 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        media.relay().totals().packets - before,
        100,
        "one relay hop per packet"
    );

    pbx.stop().await;
    rtp_both_ways(
        &alice,
        at_alice,
        &trunk,
        at_trunk,
        100,
        "right after the kill",
    )
    .await;

    // Alice refreshes at once: the B2BUA does not answer within the branch timeout; the
    // SBC answers for it with the SDP alice already has. The trunk hears nothing.
    let t0 = Instant::now();
    let r = alice.reinvite(&mut call).await.expect("re-INVITE");
    assert_eq!(r.status(), Some(200), "alice's refresh answered");
    assert_eq!(sdp_media_addr(r.body()), Some(at_alice), "the current SDP");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        trunk
            .wait_request(Method::Invite, Duration::from_millis(200))
            .await
            .is_err(),
        "the trunk got no re-INVITE"
    );

    // Once health says Down, the trunk's refresh is answered at once.
    wait_node(&sbc, sbc_health::state::NodeState::Down).await;
    let t0 = Instant::now();
    let r = trunk.reinvite(&mut tcall).await.expect("trunk re-INVITE");
    assert_eq!(r.status(), Some(200), "the trunk's refresh answered");
    assert_eq!(sdp_media_addr(r.body()), Some(at_trunk), "the current SDP");
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    rtp_both_ways(
        &alice,
        at_alice,
        &trunk,
        at_trunk,
        100,
        "after the refreshes",
    )
    .await;

    // Anything else in the dialog gets a clear answer, not a hang.
    let info = alice
        .request_in_dialog(&mut call, "INFO", "", None)
        .await
        .expect("INFO answered");
    assert_eq!(info.status(), Some(503));
    wait_outlived(&sbc).await;
    let ended = counter("sbc_calls_ended_locally_total");

    // The trunk hangs up: 200 from the SBC, and alice gets a BYE in her dialog's terms.
    let (bye, got) = tokio::join!(
        trunk.bye(&tcall),
        alice.wait_request_and_answer(Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("BYE answered").status(), Some(200));
    let got = got.expect("alice gets the BYE");
    assert_eq!(lossy(got.call_id()), call.call_id, "in alice's dialog");
    assert_eq!(got.to_tag().map(lossy), Some(call.local_tag.clone()));
    assert!(got.cseq() > 1, "CSeq above the B2BUA's last");
    assert!(counter("sbc_calls_ended_locally_total") > ended);
    assert!(counter("sbc_calls_saved_total") >= 1.0);

    assert_eq!(media.sessions(), 0, "relay sessions");
    assert_eq!(media.dialogs(), 0, "dialogs");
    assert_eq!(media.tracked_calls(), 0, "tracked Call-IDs");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        free_ports(&sbc),
        ports_before,
        "relay ports back in the pool"
    );
    sbc.shutdown();
}

/// The SBC's own 200 to a refresh is retransmitted until the ACK. A re-INVITE sent before
/// health calls the B2BUA Down gets the SBC's 100 Trying, waits out the branch timeout and
/// is then answered 200 by the SBC, so its sender no longer retransmits: were that 200 lost
/// and not repeated, the sender's re-INVITE would time out and end the call (RFC 3261 14.1).
/// Here the first copy is lost; the second arrives T1 later; the ACK stops the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_200_to_a_refresh_for_a_dead_b2bua_is_retransmitted() {
    // Health never calls the node Down in this test: every refresh meets a live-looking
    // PBX first, and the SBC answers it only after the branch timeout.
    let B2buaLab {
        sbc,
        pbx,
        alice,
        trunk,
        ..
    } = b2bua_lab(
        "127.0.0.67",
        (21400, 21499),
        |c| c.replace("failures = 2", "failures = 100"),
        false,
    )
    .await;
    let (mut call, _, _tcall) = call_the_trunk(&alice, &trunk).await;
    let at_alice = call.remote_media().expect("SDP at alice");
    pbx.stop().await;

    let is_refresh_200 = |m: &Message| m.status() == Some(200) && m.cseq_method() == Method::Invite;
    alice.endpoint().drop_incoming(1, is_refresh_200);
    let t0 = Instant::now();
    let r = alice.reinvite(&mut call).await.expect("re-INVITE");
    let took = t0.elapsed();
    assert_eq!(r.status(), Some(200), "alice's refresh answered");
    assert_eq!(sdp_media_addr(r.body()), Some(at_alice), "the current SDP");
    assert_eq!(
        alice.endpoint().dropped_count(),
        1,
        "the first 200 was lost"
    );
    // Branch timeout (400 ms), then T1 (500 ms) until the copy.
    assert!(took >= Duration::from_millis(850), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let got = |status: u16| {
        alice
            .endpoint()
            .received_log()
            .iter()
            .filter(|(m, _)| m.status() == Some(status) && m.cseq() == call.cseq)
            .count()
    };
    assert_eq!(got(100), 1, "the SBC's 100 Trying came first");
    // Alice's ACK stops the copies: without it the next would come 2*T1 after hers.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(got(200), 1, "no 200 after the ACK");
    assert!(
        trunk
            .wait_request(Method::Ack, Duration::from_millis(100))
            .await
            .is_err(),
        "the ACK ends at the SBC"
    );
    sbc.shutdown();
}

/// A counter's value in the process-wide registry (tests in this binary share it, so
/// callers compare before and after).
fn counter(name: &str) -> f64 {
    let text = sbc::metrics::install().expect("recorder").render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A call through a B2BUA that anchors the media itself (the SDP it sends names its own
/// address) cannot outlive it: the SBC recognises it, and once the PBX is Down and its side
/// stays silent for `unsaveable_timeout_secs`, it hangs up both ends with BYE and counts
/// the call apart. Nothing is left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_whose_pbx_anchors_media_is_ended_cleanly() {
    let B2buaLab {
        sbc,
        pbx,
        alice,
        trunk,
        ports_before,
    } = b2bua_lab(
        "127.0.0.62",
        (21300, 21399),
        |c| {
            c.replace(
                "timeout_secs = 60",
                "timeout_secs = 60\nunsaveable_timeout_secs = 1",
            )
        },
        true,
    )
    .await;
    let (call, _, tcall) = call_the_trunk(&alice, &trunk).await;
    assert_eq!(call.final_status, 200);
    let media = sbc.proxy.media().expect("media");
    let calls = media.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.saveable == Some(false) && c.peer.is_none()),
        "the PBX anchors the media: {calls:?}"
    );
    let unsaveable = counter("sbc_calls_unsaveable_total");
    let ended = counter("sbc_calls_ended_locally_total");

    pbx.stop().await;
    let t0 = Instant::now();
    let (a, t) = tokio::join!(
        alice.wait_request_and_answer(Method::Bye, Duration::from_secs(6)),
        trunk.wait_request_and_answer(Method::Bye, Duration::from_secs(6))
    );
    let a = a.expect("alice gets a BYE");
    let t = t.expect("the trunk gets a BYE");
    assert_eq!(lossy(a.call_id()), call.call_id);
    assert_eq!(lossy(t.call_id()), tcall.call_id);
    let reason = a
        .header_value_by_name(b"Reason")
        .map(lossy)
        .unwrap_or_default();
    assert!(reason.contains("PBX unavailable"), "Reason: {reason}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "not before the timeout: {:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(counter("sbc_calls_unsaveable_total") >= unsaveable + 2.0);
    assert!(counter("sbc_calls_ended_locally_total") >= ended + 2.0);
    assert_eq!(media.sessions(), 0, "relay sessions");
    assert_eq!(media.dialogs(), 0, "dialogs");
    assert_eq!(media.tracked_calls(), 0, "tracked Call-IDs");
    assert_eq!(
        free_ports(&sbc),
        ports_before,
        "relay ports back in the pool"
    );
    sbc.shutdown();
}

// ---------------------------------------------------------------------------------------
// The scale drill of issue 9: many calls, the PBX killed mid-call, RTP counted packet by
// packet for SURVIVAL_RTP_SECS seconds (default 5 in the suite; the issue's drill is 30:
// `SURVIVAL_RTP_SECS=30 cargo test -p sbc-tests --test survival scale`), a refresh of every
// call meanwhile, then every call hung up from the callee's end.
// ---------------------------------------------------------------------------------------

/// One established call of the drill: each end's dialog and where each end sends RTP.
struct Established {
    caller: Call,
    callee: Call,
    caller_to: SocketAddr,
    callee_to: SocketAddr,
}

fn rtp_secs() -> u64 {
    std::env::var("SURVIVAL_RTP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .clamp(1, 120)
}

/// Counts RTP packets per SSRC on `s` until `done` is set and the socket stayed quiet for
/// 500 ms (bounded by `limit`).
async fn count_by_ssrc(
    s: Arc<tokio::net::UdpSocket>,
    done: Arc<AtomicBool>,
    limit: Duration,
) -> HashMap<u32, u32> {
    let mut counts = HashMap::new();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) if len >= 12 => {
                let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                *counts.entry(ssrc).or_insert(0) += 1;
            }
            Ok(_) => {}
            Err(_) if done.load(Ordering::SeqCst) => break,
            Err(_) => {}
        }
    }
    counts
}

/// After the kill: RTP both ways on every call for `rtp_secs()` (10 packets a second each
/// way), a re-INVITE of every call from its caller meanwhile (answered by the far end when
/// `proxied`, by the SBC otherwise), every packet counted; then every callee hangs up and
/// every caller must get the BYE. Returns the number of hung legs (must be 0).
async fn drill(sbc: &sbc::Sbc, caller: &Ua, callee: &Ua, calls: &mut [Established], proxied: bool) {
    let secs = rtp_secs();
    let ticks = secs * 10;
    let done = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(secs + 30);
    let at_callee = tokio::spawn(count_by_ssrc(
        callee.media_socket().clone(),
        done.clone(),
        limit,
    ));
    let at_caller = tokio::spawn(count_by_ssrc(
        caller.media_socket().clone(),
        done.clone(),
        limit,
    ));
    let targets: Vec<(SocketAddr, SocketAddr)> =
        calls.iter().map(|c| (c.caller_to, c.callee_to)).collect();
    let (cs, es) = (caller.media_socket().clone(), callee.media_socket().clone());
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for seq in 0..ticks as u16 {
            tick.tick().await;
            for (i, (to_a, to_b)) in targets.iter().enumerate() {
                let i = i as u32;
                cs.send_to(&rtp(seq, 0x1000 + i), to_a).await.expect("send");
                es.send_to(&rtp(seq, 0x2000 + i), to_b).await.expect("send");
            }
        }
    });
    // Every call's session refresh, while the media flows.
    let t0 = Instant::now();
    for (n, c) in calls.iter_mut().enumerate() {
        let r = if proxied {
            let (r, got) = tokio::join!(
                caller.reinvite(&mut c.caller),
                callee.wait_request_and_answer(Method::Invite, Duration::from_secs(4))
            );
            got.unwrap_or_else(|e| panic!("call {n}: the callee sees the refresh: {e:#}"));
            r
        } else {
            caller.reinvite(&mut c.caller).await
        };
        let r = r.unwrap_or_else(|e| panic!("call {n}: refresh: {e:#}"));
        assert_eq!(r.status(), Some(200), "call {n}: refresh answered");
        assert_eq!(
            sdp_media_addr(r.body()),
            Some(c.caller_to),
            "call {n}: same media"
        );
    }
    eprintln!("{} refreshes answered in {:?}", calls.len(), t0.elapsed());
    sender.await.expect("sender");
    done.store(true, Ordering::SeqCst);
    let (at_callee, at_caller) = (
        at_callee.await.expect("count"),
        at_caller.await.expect("count"),
    );
    let mut short = Vec::new();
    for i in 0..calls.len() as u32 {
        let (b, a) = (
            at_callee.get(&(0x1000 + i)).copied().unwrap_or(0),
            at_caller.get(&(0x2000 + i)).copied().unwrap_or(0),
        );
        if u64::from(b) != ticks || u64::from(a) != ticks {
            short.push((i, b, a));
        }
    }
    assert!(
        short.is_empty(),
        "{} of {} calls lost RTP (call, to callee, to caller; {ticks} sent each way): {short:?}",
        short.len(),
        calls.len()
    );
    eprintln!(
        "{} calls x {ticks} packets each way ({secs} s) all delivered after the PBX died",
        calls.len()
    );

    // Hang-ups from the callee's end reach the caller.
    let mut hung = 0;
    for c in calls.iter() {
        let (bye, got) = tokio::join!(
            callee.bye(&c.callee),
            caller.wait_request_and_answer(Method::Bye, Duration::from_secs(4))
        );
        let ok = bye.is_ok_and(|r| r.status() == Some(200))
            && got.is_ok_and(|m| lossy(m.call_id()) == c.caller.call_id);
        if !ok {
            hung += 1;
        }
    }
    assert_eq!(hung, 0, "hung legs");
    let media = sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 0, "relay sessions left");
    assert_eq!(media.dialogs(), 0, "dialogs left");
    assert_eq!(media.tracked_calls(), 0, "Call-IDs left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_100_bridged_calls_outlive_the_b2bua() {
    // One phone places every call: no per-source INVITE limit for this drill.
    let B2buaLab {
        sbc,
        pbx,
        alice,
        trunk,
        ports_before,
    } = b2bua_lab(
        "127.0.0.63",
        (22000, 23999),
        |c| c + "[ratelimit]\nenabled = false\n",
        false,
    )
    .await;
    let mut calls = Vec::new();
    for n in 0..100 {
        let target = format!("sip:9555{n:04}@pbx.test");
        let (call, answered) = tokio::join!(alice.invite(&target), async {
            let inc = trunk
                .wait_invite(Duration::from_secs(3))
                .await
                .unwrap_or_else(|e| panic!("call {n}: trunk gets no INVITE: {e:#}"));
            let c = trunk.answer(&inc, 200).await.expect("answer");
            (inc, c)
        });
        let call = call.unwrap_or_else(|e| panic!("call {n}: {e:#}"));
        let (inc, tcall) = answered;
        calls.push(Established {
            caller_to: call.remote_media().expect("SDP at alice"),
            callee_to: sdp_media_addr(inc.invite.body()).expect("SDP at the trunk"),
            caller: call,
            callee: tcall,
        });
    }
    let media = sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 200);
    assert!(media
        .calls()
        .iter()
        .all(|c| c.saveable == Some(true) && c.peer.is_some()));

    pbx.stop().await;
    drill(&sbc, &alice, &trunk, &mut calls, false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(free_ports(&sbc), ports_before, "ports leaked");
    sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_50_proxied_calls_outlive_kamailio() {
    if !kamailio_available() {
        if std::env::var_os("CI").is_some() {
            panic!("kamailio is not installed; scripts/install-deps.sh installs it");
        }
        eprintln!("SKIP: kamailio not installed (run scripts/install-deps.sh)");
        return;
    }
    let kam = KamailioPbx::start_any().expect("kamailio starts");
    let cfg = config(kam.addr(), None, (24000, 24999)) + "[ratelimit]\nenabled = false\n";
    let sbc = start_sbc(&cfg).await;
    wait_node(&sbc, sbc_health::state::NodeState::Up).await;
    let ports_before = free_ports(&sbc);
    let alice = phone(&sbc, "alice", "").await;
    let bob = phone(&sbc, "bob", "").await;
    let mut calls = Vec::new();
    for n in 0..50 {
        let (call, answered) = tokio::join!(bob.invite("sip:alice@pbx.test"), async {
            let inc = alice
                .wait_invite(Duration::from_secs(3))
                .await
                .expect("alice gets INVITE");
            let c = alice.answer(&inc, 200).await.expect("answer");
            (inc, c)
        });
        let call = call.unwrap_or_else(|e| panic!("call {n}: {e:#}\n{}", kam.log()));
        let (inc, acall) = answered;
        calls.push(Established {
            caller_to: call.remote_media().expect("SDP at bob"),
            callee_to: sdp_media_addr(inc.invite.body()).expect("SDP at alice"),
            caller: call,
            callee: acall,
        });
    }
    assert_eq!(sbc.proxy.media().expect("media").sessions(), 100);

    drop(kam);
    drill(&sbc, &bob, &alice, &mut calls, true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(free_ports(&sbc), ports_before, "ports leaked");
    sbc.shutdown();
}
