//! Media anchoring end to end: calls through a running SBC (with the scripted PBX, which
//! proxies, so a phone-to-trunk call crosses the SBC twice) carry RTP through the relay; the
//! trunk and the PBX never see a phone's media address; a NATed phone is latched; a
//! re-INVITE keeps the relay ports; silence ends the media; a small port range runs out
//! cleanly (503) and recovers; SDP inside a multipart body (SIP-I) is anchored too.

use sbc_sip::Transport;
use sbc_tests::net::{count_rtp, free_udp, send_rtp};
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::trunk::Trunk;
use sbc_tests::ua::{call_and_answer, sdp_media_addr, Call, IncomingCall, InviteOpts};
use std::path::Path;
use std::time::Duration;
use tokio::net::UdpSocket;

struct Lab {
    sbc: sbc::Sbc,
    pbx: Pbx,
    trunk: Trunk,
}

/// An SBC whose relay uses `ports` (below the ephemeral range, a range per test so tests in
/// parallel do not take each other's ports) and `timeout` seconds of media silence.
async fn lab(trunk_ip: &str, ports: (u16, u16), timeout: u32) -> Lab {
    lab_with(trunk_ip, ports, timeout, "").await
}

/// [`lab`] with `trunk_extra` added to the trunk's table.
async fn lab_with(trunk_ip: &str, ports: (u16, u16), timeout: u32, trunk_extra: &str) -> Lab {
    let pbx_addr = free_udp("127.0.0.2");
    let trunk_addr = free_udp(trunk_ip);
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
[[pool.node]]
name = "pbx-a"
address = "{pbx_addr}"
[[trunk]]
name = "carrier"
sources = ["{trunk_ip}"]
address = "{trunk_addr}"
domains = ["carrier.test"]
{trunk_extra}
[phones]
sources = ["127.0.0.0/8"]
[media]
port_min = {min}
port_max = {max}
timeout_secs = {timeout}
"#,
        min = ports.0,
        max = ports.1,
    );
    let cfg = sbc_config::parse(&cfg, Path::new("media.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let pbx = Pbx::start(
        PbxConfig::new(pbx_addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .trunk("9", "carrier.test"),
    )
    .await
    .expect("pbx");
    let trunk = Trunk::start(trunk_addr, udp).await.expect("trunk");
    Lab { sbc, pbx, trunk }
}

async fn alice(lab: &Lab) -> Phone {
    let c = PhoneConfig::new(
        "alice",
        "pbx.test",
        "a-secret",
        lab.sbc.addr(Transport::Udp).expect("udp"),
    );
    let p = Phone::new(c).await.expect("phone");
    assert_eq!(p.register(300).await.expect("reg").status(), Some(200));
    p
}

/// `n` RTP packets from alice to `at_alice` (her relay address) and from the trunk to
/// `at_trunk`, at once; returns how many of each arrived at the other end.
async fn rtp_both_ways(
    alice: &Phone,
    at_alice: std::net::SocketAddr,
    trunk: &Trunk,
    at_trunk: std::net::SocketAddr,
    n: u16,
) -> (usize, usize) {
    tokio::join!(
        send_rtp(alice.media_socket(), at_alice, 0xa1, n),
        send_rtp(trunk.media_socket(), at_trunk, 0x7c, n)
    );
    tokio::join!(
        count_rtp(trunk.media_socket(), 0xa1),
        count_rtp(alice.media_socket(), 0x7c)
    )
}

/// alice calls `target` (a trunk number), with `opts`; the trunk answers 200. Returns
/// alice's call, the INVITE as the trunk saw it, and the trunk's side of the dialog.
async fn call_trunk(
    lab: &Lab,
    alice: &Phone,
    target: &str,
    opts: InviteOpts,
) -> (Call, IncomingCall, Call) {
    call_and_answer(alice, target, opts, &lab.trunk).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_to_trunk_call_relays_rtp_and_hides_the_phone() {
    let lab = lab("127.0.0.40", (20000, 20099), 60).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let (mut call, inc, tcall) =
        call_trunk(&lab, &alice, "sip:95551234@pbx.test", InviteOpts::default()).await;
    assert_eq!(call.final_status, 200);

    // Each end is offered the relay, never the other end.
    let alice_media = alice.media_addr();
    let trunk_media = trunk.media_addr();
    let at_trunk = sdp_media_addr(inc.invite.body()).expect("SDP at the trunk");
    let at_alice = call.remote_media().expect("SDP at alice");
    assert_ne!(at_trunk, alice_media);
    assert_ne!(at_alice, trunk_media);
    assert!((20000..=20099).contains(&at_trunk.port()), "{at_trunk}");
    assert!((20000..=20099).contains(&at_alice.port()), "{at_alice}");
    // Nor does the PBX ever see alice's media address in any SDP.
    let needle = format!(" {} ", alice_media.port());
    for m in lab.pbx.received() {
        let body = String::from_utf8_lossy(m.body()).to_string();
        assert!(
            !body.contains(&needle),
            "the PBX saw alice's media port in:\n{body}"
        );
    }
    // Nor, with topology hiding, alice's SIP address: no Via, Contact or other header the
    // PBX or the trunk got names her port (her Vias stay with the SBC, her Contact is an
    // alias on the SBC).
    let sip_needle = format!(":{}", alice.endpoint().local_addr().port());
    let at_trunk_text = String::from_utf8_lossy(inc.invite.as_bytes()).to_string();
    assert!(
        !at_trunk_text.contains(&sip_needle),
        "the trunk saw alice's SIP address in:\n{at_trunk_text}"
    );
    for m in lab.pbx.received() {
        let text = String::from_utf8_lossy(m.as_bytes()).to_string();
        assert!(
            !text.contains(&sip_needle),
            "the PBX saw alice's SIP address in:\n{text}"
        );
    }
    // Two passes (phone -> PBX, PBX -> trunk), each anchored.
    let media = lab.sbc.proxy.media().expect("media anchoring on");
    assert_eq!(media.sessions(), 2);

    // RTP both ways, every packet arrives.
    let (to_trunk, to_alice) = rtp_both_ways(&alice, at_alice, trunk, at_trunk, 100).await;
    assert_eq!(to_trunk, 100, "alice -> trunk");
    assert_eq!(to_alice, 100, "trunk -> alice");
    // The two passes are a hairpin the relay joined: each packet crossed it once, from one
    // pass's public socket straight out of the other's (the relay's own count agrees).
    // The io_uring relay counts a packet when the kernel reports its send done, which may
    // come a moment after the packet itself arrived.
    let totals = settled_totals(media.relay(), 200).await;
    assert_eq!(totals.packets, 200, "{totals:?}");
    assert_eq!(media.dialogs(), 2, "both passes established");

    // A re-INVITE (new SDP version, same socket) keeps the relay ports.
    let (r, got) = tokio::join!(
        alice.reinvite(&mut call),
        trunk.wait_request_and_answer(sbc_sip::Method::Invite, Duration::from_secs(3))
    );
    assert_eq!(r.expect("re-INVITE").status(), Some(200));
    let got = got.expect("the trunk sees the re-INVITE");
    assert_eq!(sdp_media_addr(got.body()), Some(at_trunk), "ports kept");
    assert_eq!(call.remote_media(), Some(at_alice), "ports kept");
    assert_eq!(media.sessions(), 2);

    // BYE releases both passes.
    let (bye, _) = tokio::join!(
        trunk.bye(&tcall),
        alice.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    assert_eq!(media.sessions(), 0);
    assert_eq!(media.tracked_calls(), 0);
    lab.sbc.shutdown();
}

/// When calls end, the SBC tells how their media went: three calls at once, one with RTP both
/// ways, one where only alice's reaches the trunk (the trunk sends nothing: one-way audio),
/// one with none. Each call crosses the SBC twice (a hairpin the relay joins) and is
/// judged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_and_silent_calls_are_told_apart_when_they_end() {
    let lab = lab("127.0.0.64", (20500, 20599), 60).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (call, inc, tcall) =
            call_trunk(&lab, &alice, "sip:95551234@pbx.test", Default::default()).await;
        let at_alice = call.remote_media().expect("SDP at alice");
        let at_trunk = sdp_media_addr(inc.invite.body()).expect("SDP at the trunk");
        calls.push((call, tcall, at_alice, at_trunk));
    }
    let media = lab.sbc.proxy.media().expect("media");
    // 50 packets a second for 2.5 s: calls shorter than 2 s are not judged.
    // What each end got, by SSRC, until its socket stays quiet (read after every burst, so
    // no socket buffer has to hold more than one).
    type Tally = std::collections::HashMap<u32, usize>;
    async fn tally(s: &UdpSocket, got: &mut Tally) {
        let mut buf = [0u8; 2048];
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
        {
            if len >= 12 {
                let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                *got.entry(ssrc).or_default() += 1;
            }
        }
    }
    let (mut at_trunk, mut at_alice) = (Tally::new(), Tally::new());
    for _ in 0..5 {
        let (_, _, a0, t0) = &calls[0];
        let (_, _, a1, _) = &calls[1];
        tokio::join!(
            send_rtp(alice.media_socket(), *a0, 0xa1, 25),
            send_rtp(trunk.media_socket(), *t0, 0x7c, 25),
            send_rtp(alice.media_socket(), *a1, 0xa2, 25),
        );
        tokio::join!(
            tally(trunk.media_socket(), &mut at_trunk),
            tally(alice.media_socket(), &mut at_alice)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(at_trunk, [(0xa1, 125), (0xa2, 125)].into_iter().collect());
    assert_eq!(at_alice, [(0x7c, 125)].into_iter().collect());
    assert_eq!(media.ended_calls(), [0, 0, 0]);
    for (call, _, _, _) in &calls {
        let (bye, _) = tokio::join!(
            alice.bye(call),
            trunk.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
        );
        assert_eq!(bye.expect("bye").status(), Some(200));
    }
    assert_eq!(media.sessions(), 0);
    assert_eq!(
        media.ended_calls(),
        [1, 1, 1],
        "[both ways, one way, none], each call once"
    );
    lab.sbc.shutdown();
}

/// `max_calls = 2` on the trunk: two calls up, a third one out is refused 503 before it
/// reaches the trunk (the PBX gets the 503 and passes it to alice), one in from the trunk
/// too; a call the trunk rejects frees its channel at once; a hang-up frees one for the next
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_at_its_call_limit_refuses_new_calls_both_ways() {
    let lab = lab_with("127.0.0.65", (20600, 20699), 60, "max_calls = 2").await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let proxy = &lab.sbc.proxy;
    let target = "sip:95551234@pbx.test";
    let (first, _, _) = call_trunk(&lab, &alice, target, Default::default()).await;
    assert_eq!(proxy.trunk_calls("carrier"), 1);

    // The trunk rejects one: its channel is free again at once.
    let (refused, _) = tokio::join!(alice.invite(target), async {
        let inc = trunk
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("INVITE");
        trunk.answer(&inc, 486).await.expect("486");
    });
    assert_eq!(refused.expect("answered").final_status, 486);
    assert_eq!(proxy.trunk_calls("carrier"), 1);

    let (second, _, _) = call_trunk(&lab, &alice, target, Default::default()).await;
    assert_eq!(proxy.trunk_calls("carrier"), 2);

    // Full: out (the SBC refuses the PBX's INVITE toward the trunk) and in.
    let out = alice.invite(target).await.expect("answered");
    assert_eq!(out.final_status, 503, "out to the trunk");
    assert!(
        trunk.wait_invite(Duration::from_millis(300)).await.is_err(),
        "the trunk never sees it"
    );
    let inbound = trunk.invite("sip:alice@pbx.test").await.expect("answered");
    assert_eq!(inbound.final_status, 503, "in from the trunk");
    assert_eq!(
        proxy.trunks(),
        vec![("carrier".to_string(), 2, Some(2))],
        "as /status shows it"
    );

    // A hang-up frees a channel: the next call goes through.
    let (bye, _) = tokio::join!(
        alice.bye(&first),
        trunk.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    assert_eq!(proxy.trunk_calls("carrier"), 1);
    let (third, _, _) = call_trunk(&lab, &alice, target, Default::default()).await;
    assert_eq!(proxy.trunk_calls("carrier"), 2);
    for call in [&second, &third] {
        let (bye, _) = tokio::join!(
            alice.bye(call),
            trunk.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
        );
        assert_eq!(bye.expect("bye").status(), Some(200));
    }
    assert_eq!(proxy.trunk_calls("carrier"), 0);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natted_phone_is_latched_to_where_its_rtp_comes_from() {
    let lab = lab("127.0.0.41", (20100, 20199), 60).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    // Alice's SDP names a port nothing listens on (her private address); her RTP really
    // leaves from her media socket (the NAT's public mapping).
    let private = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let private_port = private.local_addr().expect("addr").port();
    drop(private);
    let sdp = String::from_utf8(alice.sdp(1))
        .expect("utf8")
        .replace(
            &format!("m=audio {} ", alice.media_addr().port()),
            &format!("m=audio {private_port} "),
        )
        .into_bytes();
    let opts = InviteOpts {
        sdp: Some(sdp),
        ..Default::default()
    };
    let (call, inc, _) = call_trunk(&lab, &alice, "sip:95551234@pbx.test", opts).await;
    let at_alice = call.remote_media().expect("SDP");
    let at_trunk = sdp_media_addr(inc.invite.body()).expect("SDP");

    // Alice speaks first; the relay latches onto her real source.
    send_rtp(alice.media_socket(), at_alice, 0xa1, 10).await;
    assert_eq!(count_rtp(trunk.media_socket(), 0xa1).await, 10);
    send_rtp(trunk.media_socket(), at_trunk, 0x7c, 20).await;
    assert_eq!(
        count_rtp(alice.media_socket(), 0x7c).await,
        20,
        "the trunk's RTP reaches alice where her packets came from, not her SDP's port"
    );

    // A stray sender toward alice's relay port is ignored while alice is active.
    let stray = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    send_rtp(&stray, at_alice, 0x5, 10).await;
    send_rtp(alice.media_socket(), at_alice, 0xa1, 5).await;
    assert_eq!(count_rtp(trunk.media_socket(), 0x5).await, 0, "no hijack");
    send_rtp(trunk.media_socket(), at_trunk, 0x7c, 5).await;
    assert_eq!(count_rtp(alice.media_socket(), 0x7c).await, 5);
    assert_eq!(count_rtp(&stray, 0x7c).await, 0);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_call_times_out_and_frees_its_ports() {
    let lab = lab("127.0.0.42", (20200, 20299), 1).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let (call, _, _) =
        call_trunk(&lab, &alice, "sip:95551234@pbx.test", InviteOpts::default()).await;
    assert_eq!(call.final_status, 200);
    let media = lab.sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 2);
    assert_eq!(media.dialogs(), 2, "both passes' dialogs recorded");
    // Nobody sends RTP: after the 1 s media timeout the SBC hangs up both ends itself.
    let (at_alice, at_trunk) = tokio::join!(
        alice.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(5)),
        trunk.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(5))
    );
    for (who, bye) in [("alice", at_alice), ("trunk", at_trunk)] {
        let bye = bye.unwrap_or_else(|e| panic!("{who} gets a BYE: {e}"));
        let text = String::from_utf8_lossy(bye.as_bytes()).to_string();
        assert!(text.contains("media timeout"), "{who}: {text}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while media.sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(media.sessions(), 0, "media timeout released the call");
    assert_eq!(media.tracked_calls(), 0);
    assert_eq!(media.dialogs(), 0);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_port_range_answers_503_and_recovers() {
    // 8 ports: 4 RTP/RTCP pairs, exactly one call that crosses the SBC twice.
    let lab = lab("127.0.0.43", (20300, 20307), 60).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let (call, _, tcall) =
        call_trunk(&lab, &alice, "sip:95551234@pbx.test", InviteOpts::default()).await;
    assert_eq!(call.final_status, 200, "first call");

    // No ports left: the next call is refused with 503, nothing crashes, nothing leaks.
    let second = alice.invite("sip:95550000@pbx.test").await.expect("answer");
    assert_eq!(second.final_status, 503);
    let media = lab.sbc.proxy.media().expect("media");
    assert_eq!(media.sessions(), 2);

    let (bye, _) = tokio::join!(
        trunk.bye(&tcall),
        alice.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    assert_eq!(media.sessions(), 0);

    // Ports are back: a new call works.
    let (call, _, _) =
        call_trunk(&lab, &alice, "sip:95551111@pbx.test", InviteOpts::default()).await;
    assert_eq!(call.final_status, 200, "third call");
    lab.sbc.shutdown();
}

/// A SIP-I style INVITE: ISUP and SDP in a multipart/mixed body. The SDP part is anchored
/// like a whole-body SDP, everything else in the body arrives byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdp_inside_a_multipart_body_is_anchored() {
    let lab = lab("127.0.0.44", (20400, 20499), 60).await;
    let alice = alice(&lab).await;
    let trunk = &lab.trunk;
    let isup: &[u8] = b"\x01\x00\x49\x00\x00\x03\x02\x00\x07\x04\x10\x00\x33\x63\x21\x43\x00";
    let mut body = Vec::new();
    body.extend_from_slice(
        b"--sip-i-4711\r\nContent-Type: application/isup;version=itu-t92+\r\n\
          Content-Disposition: signal;handling=optional\r\n\r\n",
    );
    body.extend_from_slice(isup);
    body.extend_from_slice(b"\r\n--sip-i-4711\r\nContent-Type: application/sdp\r\n\r\n");
    body.extend_from_slice(&alice.sdp(1));
    body.extend_from_slice(b"\r\n--sip-i-4711--\r\n");
    let opts = InviteOpts {
        sdp: Some(body),
        content_type: Some("multipart/mixed;boundary=sip-i-4711".into()),
        ..Default::default()
    };
    let (call, inc, _) = call_trunk(&lab, &alice, "sip:95551234@pbx.test", opts).await;
    assert_eq!(call.final_status, 200);
    let got = inc.invite.body();
    // Still multipart, ISUP intact, the SDP part naming the relay and not alice.
    let ct = inc
        .invite
        .header_value(sbc_sip::message::HeaderName::ContentType)
        .map(|v| String::from_utf8_lossy(v).to_string());
    assert_eq!(ct.as_deref(), Some("multipart/mixed;boundary=sip-i-4711"));
    assert!(got.windows(isup.len()).any(|w| w == isup), "ISUP part kept");
    assert!(got.ends_with(b"\r\n--sip-i-4711--\r\n"));
    let at_trunk = sdp_media_addr(got).expect("SDP part at the trunk");
    assert!((20400..=20499).contains(&at_trunk.port()), "{at_trunk}");
    let needle = format!(" {} ", alice.media_addr().port());
    assert!(
        !String::from_utf8_lossy(got).contains(&needle),
        "the trunk saw alice's media port"
    );
    for m in lab.pbx.received() {
        assert!(
            !String::from_utf8_lossy(m.body()).contains(&needle),
            "the PBX saw alice's media port"
        );
    }
    // And media flows through the relay both ways.
    let at_alice = call.remote_media().expect("SDP at alice");
    assert!((20400..=20499).contains(&at_alice.port()), "{at_alice}");
    let counted = rtp_both_ways(&alice, at_alice, trunk, at_trunk, 50).await;
    assert_eq!(counted, (50, 50), "(alice -> trunk, trunk -> alice)");
    lab.sbc.shutdown();
}

/// The relay's totals once its packet count reaches `packets` (or after 2 s, for the caller's
/// assertion to report): counters follow the kernel's send completions.
async fn settled_totals(
    relay: &sbc_media_relay::Relay,
    packets: u64,
) -> sbc_media_relay::RelayTotals {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let t = relay.totals();
        if t.packets >= packets || tokio::time::Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
