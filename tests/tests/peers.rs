//! The test peers (phone, trunk, PBX, endpoint) checked against each other WITHOUT the SBC:
//! phones use the PBX (or a raw scripted endpoint) as their next hop. If these pass, a
//! failure in an SBC end-to-end test points at the SBC, not at the peers.
//!
//! Covered: digest (RFC 2617 example); REGISTER with 401 challenge over UDP, TCP and TLS
//! (raw TLS server); registrations and unregistration; NAT-override Contact; a call between
//! two registered phones through the PBX (407, 180, 200, ACK, re-INVITE, callee BYE);
//! busy (486, hop-by-hop ACK reaches the callee); CANCEL -> 487; 404/480; trunk outbound and
//! inbound; UDP retransmission of INVITE (Timer A) and REGISTER (Timer E) when the first copy
//! is lost; a retransmitted 2xx re-ACKed; a retransmitted INVITE re-answered, not surfaced
//! as a new call; a TCP phone called from a UDP phone; endpoint backlog and garbage counting.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::{HeaderName, Message, Method, Transport};
use sbc_tests::digest::{compute_response, QopParams};
use sbc_tests::pbx::{Pbx, PbxConfig, PbxMode};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::pki::TestPki;
use sbc_tests::sip_io::Endpoint;
use sbc_tests::trunk::Trunk;
use sbc_tests::ua::branch_of;

const DOMAIN: &str = "example.test";
const T: Duration = Duration::from_secs(2);

fn lo(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Nothing listens there; the PBX only uses `sbc` for the trunk and non-IP hosts.
fn nowhere() -> SocketAddr {
    lo("127.0.0.1:9")
}

async fn pbx(auth: bool) -> anyhow::Result<Pbx> {
    sbc_tests::init_tracing();
    let mut cfg = PbxConfig::new(lo("127.0.0.1:0"), DOMAIN, nowhere())
        .user("alice", "alice-pw")
        .user("bob", "bob-pw")
        .user("dave", "dave-pw");
    cfg.auth = auth;
    Pbx::start(cfg).await
}

async fn phone(user: &str, pbx: &Pbx) -> anyhow::Result<Phone> {
    Phone::new(PhoneConfig::new(
        user,
        DOMAIN,
        &format!("{user}-pw"),
        pbx.addr(),
    ))
    .await
}

fn statuses(msgs: &[Message]) -> Vec<u16> {
    msgs.iter().filter_map(|m| m.status()).collect()
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.as_bytes()).into_owned()
}

#[test]
fn digest_rfc2617_example() {
    let r = compute_response(
        "Mufasa",
        "testrealm@host.com",
        "Circle Of Life",
        "GET",
        "/dir/index.html",
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        Some(QopParams {
            qop: "auth",
            nc: "00000001",
            cnonce: "0a4f113b",
        }),
    );
    assert_eq!(r, "6629fae49393a05397450978507c4ef1");
}

#[tokio::test(flavor = "multi_thread")]
async fn register_directly_with_auth() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let alice = phone("alice", &pbx).await?;
    let r = alice.register(300).await?;
    assert_eq!(r.status(), Some(200), "{}", text(&r));
    let got: Vec<u16> = alice
        .endpoint()
        .received_log()
        .iter()
        .filter_map(|(m, _)| m.status())
        .collect();
    assert_eq!(got, vec![401, 200]);
    // The 200 lists the binding with its expiry.
    let contact =
        String::from_utf8_lossy(r.header_value(HeaderName::Contact).unwrap_or(b"")).to_string();
    assert!(
        contact.contains(&alice.contact_uri()) && contact.contains("expires=300"),
        "{contact}"
    );

    let regs = pbx.registrations();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].aor, format!("sip:alice@{DOMAIN}"));
    assert_eq!(regs[0].contact, alice.contact_uri());
    assert_eq!(regs[0].received_from, alice.endpoint().local_addr());
    assert!(regs[0].path.is_empty());
    assert_eq!(regs[0].expires, 300);
    assert_eq!(pbx.stats().requests_of("REGISTER"), 2);
    assert_eq!(pbx.stats().local_of(401), 1);

    // A wrong password is refused after one retry.
    let mut cfg = PhoneConfig::new("bob", DOMAIN, "wrong", pbx.addr());
    cfg.timeout = T;
    let bad = Phone::new(cfg).await?;
    assert_eq!(bad.register(300).await?.status(), Some(401));

    let r = alice.unregister().await?;
    assert_eq!(r.status(), Some(200));
    assert!(pbx.registrations().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn register_over_tcp_and_nat_override() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let mut cfg = PhoneConfig::new("dave", DOMAIN, "dave-pw", pbx.addr());
    cfg.transport = Transport::Tcp;
    let dave = Phone::new(cfg).await?;
    assert_eq!(dave.register(60).await?.status(), Some(200));
    let reg = pbx
        .registrations()
        .into_iter()
        .find(|r| r.aor.contains("dave"))
        .context("dave registered")?;
    assert_eq!(reg.transport, Transport::Tcp);
    assert!(reg.contact.ends_with(";transport=tcp"), "{}", reg.contact);

    let mut cfg = PhoneConfig::new("alice", DOMAIN, "alice-pw", pbx.addr());
    cfg.contact_port_override = Some(40000);
    let alice = Phone::new(cfg).await?;
    let r = alice.register(60).await?;
    assert_eq!(r.status(), Some(200));
    // The PBX saw the real source port in received/rport, and the fake one in Contact.
    let via = r.top_via().context("via")?;
    assert_eq!(via.port, Some(40000));
    assert_eq!(via.rport, Some(Some(alice.endpoint().local_addr().port())));
    let reg = pbx
        .registrations()
        .into_iter()
        .find(|r| r.aor.contains("alice"))
        .context("alice registered")?;
    assert!(reg.contact.contains(":40000;"), "{}", reg.contact);
    assert_eq!(reg.received_from, alice.endpoint().local_addr());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn call_through_pbx_with_reinvite_and_callee_bye() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let alice = phone("alice", &pbx).await?;
    let bob = phone("bob", &pbx).await?;
    assert_eq!(alice.register(300).await?.status(), Some(200));
    assert_eq!(bob.register(300).await?.status(), Some(200));

    let target = format!("sip:bob@{DOMAIN}");
    let (mut acall, bcall) = tokio::try_join!(alice.invite(&target), async {
        let inc = bob.wait_invite(T).await?;
        // The PBX retargeted to the contact, record-routed, and added its Via.
        ensure!(
            inc.invite.uri_bytes() == bob.contact_uri().as_bytes(),
            "{}",
            text(&inc.invite)
        );
        ensure!(inc.invite.via_count() == 2, "{}", text(&inc.invite));
        ensure!(inc.invite.max_forwards() == Some(69));
        bob.answer(&inc, 200).await
    })?;
    assert_eq!(acall.final_status, 200);
    let st = statuses(&acall.responses);
    assert!(
        st.starts_with(&[407]) && st.contains(&180) && st.ends_with(&[200]),
        "{st:?}"
    );
    let rr = format!("<sip:{};lr>", pbx.addr());
    assert_eq!(acall.route_set, vec![rr.clone()]);
    assert_eq!(acall.remote_target, bob.contact_uri());
    assert_eq!(bcall.route_set, vec![rr]);
    assert_eq!(bcall.remote_target, alice.contact_uri());
    let ack = bcall.ack.as_ref().context("bob got the ACK")?;
    assert_eq!(ack.cseq(), acall.cseq);
    assert!(
        ack.header(HeaderName::Route).is_none(),
        "PBX popped its Route: {}",
        text(ack)
    );
    assert_eq!(acall.remote_media(), Some(bob.media_addr()));
    assert_eq!(bcall.remote_media(), Some(alice.media_addr()));

    // re-INVITE from the caller, answered by the callee.
    let (fin, req) = tokio::try_join!(
        alice.reinvite(&mut acall),
        bob.wait_request_and_answer(Method::Invite, T)
    )?;
    assert_eq!(fin.status(), Some(200));
    assert_eq!(req.cseq(), acall.cseq);
    assert!(req.has_body());

    // BYE from the callee (UAS-side dialog state: From/To swapped, route set in order).
    let (fin, req) = tokio::try_join!(
        bob.bye(&bcall),
        alice.wait_request_and_answer(Method::Bye, T)
    )?;
    assert_eq!(fin.status(), Some(200));
    assert_eq!(req.uri_bytes(), alice.contact_uri().as_bytes());
    assert_eq!(req.to_tag(), Some(acall.local_tag.as_bytes()));

    let s = pbx.stats();
    assert_eq!(s.requests_of("INVITE"), 3, "{s:?}");
    assert_eq!(s.requests_of("BYE"), 1);
    assert!(s.requests_of("ACK") >= 3, "{s:?}"); // 407 ACK, 2xx ACK, re-INVITE ACK
    assert_eq!(
        alice.endpoint().garbage_count() + bob.endpoint().garbage_count(),
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_callee_gets_hop_by_hop_ack() -> anyhow::Result<()> {
    let pbx = pbx(false).await?;
    let alice = phone("alice", &pbx).await?;
    let bob = phone("bob", &pbx).await?;
    bob.register(300).await?;
    let target = format!("sip:bob@{DOMAIN}");
    let (acall, bcall) = tokio::try_join!(alice.invite(&target), async {
        let inc = bob.wait_invite(T).await?;
        bob.answer(&inc, 486).await
    })?;
    assert_eq!(acall.final_status, 486);
    let ack = bcall.ack.context("ACK for 486")?;
    let inv = bcall.invite.context("invite")?;
    assert_eq!(branch_of(&ack)?, branch_of(&inv)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_ringing_call_gives_487() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let alice = phone("alice", &pbx).await?;
    let bob = phone("bob", &pbx).await?;
    alice.register(300).await?;
    bob.register(300).await?;
    let (fin, cancel) = tokio::try_join!(
        async {
            let call = alice
                .invite_until_ringing(&format!("sip:bob@{DOMAIN}"))
                .await?;
            ensure!(call.final_status == 0);
            ensure!(statuses(&call.responses).contains(&180));
            alice.cancel(&call).await
        },
        async {
            let inc = bob.wait_invite(T).await?;
            bob.wait_cancel(&inc, T).await
        }
    )?;
    assert_eq!(fin.status(), Some(487));
    assert_eq!(cancel.method(), Some(Method::Cancel));
    assert_eq!(pbx.stats().requests_of("CANCEL"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_user_404_unregistered_480() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let alice = phone("alice", &pbx).await?;
    let c = alice.invite(&format!("sip:nobody@{DOMAIN}")).await?;
    assert_eq!(c.final_status, 404);
    let c = alice.invite(&format!("sip:bob@{DOMAIN}")).await?;
    assert_eq!(c.final_status, 480);
    // OPTIONS to the PBX itself.
    let r = alice
        .request("OPTIONS", &format!("sip:{}", pbx.addr()), "", None)
        .await?;
    assert_eq!(r.status(), Some(200));
    // Failover modes.
    pbx.set_mode(PbxMode::Respond503);
    let r = alice
        .request("OPTIONS", &format!("sip:{}", pbx.addr()), "", None)
        .await?;
    assert_eq!(r.status(), Some(503));
    pbx.set_mode(PbxMode::Silent);
    assert!(alice
        .request("OPTIONS", &format!("sip:{}", pbx.addr()), "", None)
        .await
        .is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn trunk_outbound_and_inbound() -> anyhow::Result<()> {
    sbc_tests::init_tracing();
    // Without an SBC the trunk itself is the PBX's "sbc".
    let trunk_addr = std::net::UdpSocket::bind("127.0.0.20:0")?.local_addr()?;
    let mut cfg = PbxConfig::new(lo("127.0.0.1:0"), DOMAIN, trunk_addr)
        .user("alice", "alice-pw")
        .user("bob", "bob-pw")
        .trunk("9", "carrier.test");
    cfg.auth = true;
    let pbx = Pbx::start(cfg).await?;
    let trunk = Trunk::start(trunk_addr, pbx.addr()).await?;
    let alice = phone("alice", &pbx).await?;
    alice.register(300).await?;

    // Outbound: alice dials 9555 -> sip:9555@carrier.test at the trunk.
    let target = format!("sip:9555@{DOMAIN}");
    let (acall, tcall) = tokio::try_join!(alice.invite(&target), async {
        let inc = trunk.wait_invite(T).await?;
        ensure!(
            inc.invite.uri_bytes() == b"sip:9555@carrier.test",
            "{}",
            text(&inc.invite)
        );
        trunk.answer(&inc, 200).await
    })?;
    assert_eq!(acall.final_status, 200);
    let (fin, _) = tokio::try_join!(
        alice.bye(&acall),
        trunk.wait_request_and_answer(Method::Bye, T)
    )?;
    assert_eq!(fin.status(), Some(200));
    drop(tcall);

    // Inbound: no challenge for the carrier's domain.
    let target = format!("sip:alice@{DOMAIN}");
    let (tcall, acall) = tokio::try_join!(trunk.invite(&target), async {
        let inc = alice.wait_invite(T).await?;
        alice.answer(&inc, 200).await
    })?;
    assert_eq!(tcall.final_status, 200);
    assert!(!statuses(&tcall.responses).contains(&407));
    let (fin, _) = tokio::try_join!(
        trunk.bye(&tcall),
        alice.wait_request_and_answer(Method::Bye, T)
    )?;
    assert_eq!(fin.status(), Some(200));
    drop(acall);

    // Known but unregistered.
    let c = trunk.invite(&format!("sip:bob@{DOMAIN}")).await?;
    assert_eq!(c.final_status, 480);
    Ok(())
}

/// A 200 to `req` with a To tag and a Contact naming `me`.
fn ok_with_contact(req: &Message, me: SocketAddr) -> Vec<u8> {
    let extra = format!("Contact: <sip:peer@{me}>\r\n");
    edit::response(
        req,
        200,
        "OK",
        &ResponseOpts {
            to_tag: Some(b"peer1"),
            extra: extra.as_bytes(),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn invite_retransmitted_after_loss_and_2xx_reacked() -> anyhow::Result<()> {
    sbc_tests::init_tracing();
    let peer = Endpoint::udp(lo("127.0.0.1:0")).await?;
    let alice = Phone::new(PhoneConfig::new("alice", DOMAIN, "", peer.local_addr())).await?;
    let (call, acks) = tokio::try_join!(alice.invite("sip:bob@example.test"), async {
        let is_invite = |m: &Message| m.method() == Some(Method::Invite);
        let (first, _) = peer.recv_match(T, is_invite).await?;
        let t0 = Instant::now();
        // "Lose" the first copy: wait for the retransmission.
        let (second, src) = peer.recv_match(T, is_invite).await?;
        let gap = t0.elapsed();
        ensure!(
            gap >= Duration::from_millis(350) && gap <= Duration::from_millis(1200),
            "Timer A gap {gap:?}"
        );
        ensure!(
            first.as_bytes() == second.as_bytes(),
            "retransmission must be identical"
        );
        let ok = ok_with_contact(&second, peer.local_addr());
        peer.send(src, &ok).await?;
        let is_ack = |m: &Message| m.method() == Some(Method::Ack);
        let (ack1, _) = peer.recv_match(T, is_ack).await?;
        // A retransmitted 2xx must be ACKed again (RFC 3261 13.2.2.4).
        peer.send(src, &ok).await?;
        let (ack2, _) = peer.recv_match(T, is_ack).await?;
        Ok(vec![ack1, ack2])
    })?;
    assert_eq!(call.final_status, 200);
    assert_eq!(
        acks[0].uri_bytes(),
        format!("sip:peer@{}", peer.local_addr()).as_bytes()
    );
    assert_eq!(acks[0].as_bytes(), acks[1].as_bytes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn register_retransmitted_with_timer_e() -> anyhow::Result<()> {
    let peer = Endpoint::udp(lo("127.0.0.1:0")).await?;
    let alice = Phone::new(PhoneConfig::new("alice", DOMAIN, "", peer.local_addr())).await?;
    let (r, times) = tokio::try_join!(alice.register(60), async {
        let is_reg = |m: &Message| m.method() == Some(Method::Register);
        let t0 = Instant::now();
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let (m, src) = peer.recv_match(Duration::from_secs(3), is_reg).await?;
            times.push(t0.elapsed());
            last = Some((m, src));
        }
        let (m, src) = last.context("got REGISTERs")?;
        let ok = edit::response(
            &m,
            200,
            "OK",
            &ResponseOpts {
                to_tag: Some(b"r"),
                ..Default::default()
            },
        );
        peer.send(src, &ok).await?;
        Ok(times)
    })?;
    assert_eq!(r.status(), Some(200));
    // Sent at 0, T1, 3*T1 (intervals 500 ms then 1 s).
    let d1 = times[1] - times[0];
    let d2 = times[2] - times[1];
    assert!(
        d1 >= Duration::from_millis(350) && d1 <= Duration::from_millis(900),
        "{times:?}"
    );
    assert!(
        d2 >= Duration::from_millis(800) && d2 <= Duration::from_millis(1500),
        "{times:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn call_survives_invite_lost_at_pbx_and_retransmission_at_callee() -> anyhow::Result<()> {
    let pbx = pbx(false).await?;
    let alice = phone("alice", &pbx).await?;
    let bob = phone("bob", &pbx).await?;
    bob.register(300).await?;
    pbx.endpoint()
        .drop_incoming(1, |m| m.method() == Some(Method::Invite));
    let target = format!("sip:bob@{DOMAIN}");
    let (acall, bcall) = tokio::try_join!(alice.invite(&target), async {
        let inc = bob.wait_invite(T).await?;
        // A retransmitted INVITE reaching bob is re-answered (180), never a new call.
        bob.endpoint()
            .send(bob.endpoint().local_addr(), inc.invite.as_bytes())
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        ensure!(bob.wait_invite(Duration::from_millis(200)).await.is_err());
        bob.answer(&inc, 200).await
    })?;
    assert_eq!(acall.final_status, 200);
    assert!(bcall.ack.is_some());
    assert_eq!(pbx.endpoint().dropped_count(), 1);
    assert_eq!(pbx.stats().requests_of("INVITE"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_phone_calls_tcp_phone() -> anyhow::Result<()> {
    let pbx = pbx(true).await?;
    let alice = phone("alice", &pbx).await?;
    let mut cfg = PhoneConfig::new("dave", DOMAIN, "dave-pw", pbx.addr());
    cfg.transport = Transport::Tcp;
    let dave = Phone::new(cfg).await?;
    alice.register(300).await?;
    dave.register(300).await?;
    let target = format!("sip:dave@{DOMAIN}");
    let (acall, dcall) = tokio::try_join!(alice.invite(&target), async {
        let inc = dave.wait_invite(T).await?;
        dave.answer(&inc, 200).await
    })?;
    assert_eq!(acall.final_status, 200);
    let (fin, _) = tokio::try_join!(
        dave.bye(&dcall),
        alice.wait_request_and_answer(Method::Bye, T)
    )?;
    assert_eq!(fin.status(), Some(200));
    let tcp_msgs = pbx
        .received_with_source()
        .into_iter()
        .filter(|(_, _, t)| *t == Transport::Tcp)
        .count();
    assert!(
        tcp_msgs >= 5,
        "REGISTER x2, 100, 180, 200, BYE over TCP; got {tcp_msgs}"
    );
    // Closing the connection is seen by the phone's endpoint.
    dave.endpoint().close();
    assert!(dave.endpoint().is_closed());
    assert!(dave.register(60).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_phone_registers_to_tls_listener() -> anyhow::Result<()> {
    let pki = TestPki::new(&["localhost", "127.0.0.1"])?;
    let server = Endpoint::tls_listen(
        lo("127.0.0.1:0"),
        pki.cert_pem.as_bytes(),
        pki.key_pem.as_bytes(),
    )
    .await?;
    let mut cfg = PhoneConfig::new("carol", DOMAIN, "", server.local_addr());
    cfg.transport = Transport::Tls;
    cfg.tls_ca = Some(pki.ca_pem.clone().into_bytes());
    cfg.tls_server_name = "localhost".into();
    let carol = Phone::new(cfg).await?;
    let (r, req) = tokio::try_join!(carol.register(60), async {
        let (req, src) = server.recv(T).await?;
        let ok = edit::response(
            &req,
            200,
            "OK",
            &ResponseOpts {
                to_tag: Some(b"t"),
                ..Default::default()
            },
        );
        server.send(src, &ok).await?;
        Ok(req)
    })?;
    assert_eq!(r.status(), Some(200));
    assert_eq!(
        req.top_via().context("via")?.transport,
        Some(Transport::Tls)
    );
    assert!(text(&req).contains(";transport=tls>"), "{}", text(&req));
    assert_eq!(
        server.connected_peers(),
        vec![carol.endpoint().local_addr()]
    );

    // A wrong server name fails the handshake.
    let mut cfg = PhoneConfig::new("eve", DOMAIN, "", server.local_addr());
    cfg.transport = Transport::Tls;
    cfg.tls_ca = Some(pki.ca_pem.into_bytes());
    cfg.tls_server_name = "other.test".into();
    assert!(Phone::new(cfg).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_backlog_and_garbage() -> anyhow::Result<()> {
    let a = Endpoint::udp(lo("127.0.0.1:0")).await?;
    let b = Endpoint::udp(lo("127.0.0.1:0")).await?;
    let opt = |n: u32| {
        format!(
            "OPTIONS sip:x@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK{n};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:a@{DOMAIN}>;tag=1\r\nTo: <sip:x@{DOMAIN}>\r\n\
             Call-ID: c{n}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n",
            a.local_addr()
        )
    };
    for n in 1..=3 {
        a.send(b.local_addr(), opt(n).as_bytes()).await?;
    }
    a.send(b.local_addr(), b"this is not SIP\r\n\r\n").await?;
    a.send(b.local_addr(), b"\r\n\r\n").await?; // keep-alive: ignored, not garbage
                                                // Take the second one first; the others stay queued, in order.
    let (m, src) = b.recv_match(T, |m| m.cseq() == 2).await?;
    assert_eq!(src, a.local_addr());
    assert_eq!(m.call_id(), b"c2");
    assert_eq!(b.recv(T).await?.0.cseq(), 1);
    assert_eq!(b.recv(T).await?.0.cseq(), 3);
    let e = b.recv_match(Duration::from_millis(100), |_| true).await;
    assert!(e.is_err());
    assert_eq!(b.garbage_count(), 1);
    assert_eq!(b.received_log().len(), 3);
    // Parsed back through Bytes: everything we sent is a valid message.
    assert!(Message::parse(Bytes::from(opt(9))).is_ok());
    Ok(())
}

/// A raw request from `from` (a scripted "SBC") with the given extra header lines.
fn raw_request(method: &str, ruri: &str, from: SocketAddr, user: &str, extra: &str) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK{}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:{user}@{DOMAIN}>;tag=f1\r\nTo: <sip:{user}@{DOMAIN}>\r\n\
         Call-ID: {}@test\r\nCSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n",
        sbc_tests::ua::rand_hex(6),
        sbc_tests::ua::rand_hex(6),
    )
}

/// What the SBC relies on: a binding registered with a Path is reached through the Path
/// (Route = Path, sent to the Path URI's address, Request-URI = Contact); a pre-loaded Route
/// naming the PBX is popped; OPTIONS to a phone is answered automatically.
#[tokio::test(flavor = "multi_thread")]
async fn path_binding_and_preloaded_route() -> anyhow::Result<()> {
    let pbx = pbx(false).await?;
    let sbc = Endpoint::udp(lo("127.0.0.1:0")).await?;
    let sbc_addr = sbc.local_addr();
    let path = format!("<sip:flow42@{sbc_addr};lr>");
    let contact = "sip:bob@127.0.0.99:5999;transport=udp";
    let reg = raw_request(
        "REGISTER",
        &format!("sip:{DOMAIN}"),
        sbc_addr,
        "bob",
        &format!("Path: {path}\r\nContact: <{contact}>\r\nExpires: 120\r\nSupported: path\r\n"),
    );
    sbc.send(pbx.addr(), reg.as_bytes()).await?;
    let (ok, _) = sbc.recv(T).await?;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.header_value(HeaderName::Path), Some(path.as_bytes()));
    let b = pbx.registrations();
    assert_eq!(b[0].path, vec![path.clone()]);
    assert_eq!(b[0].contact, contact);

    let alice = phone("alice", &pbx).await?;
    alice.register(300).await?;
    let target = format!("sip:bob@{DOMAIN}");
    let (call, inv) = tokio::try_join!(alice.invite(&target), async {
        let (inv, src) = sbc
            .recv_match(T, |m| m.method() == Some(Method::Invite))
            .await?;
        ensure!(src == pbx.addr());
        let ok = ok_with_contact(&inv, sbc_addr);
        sbc.send(src, &ok).await?;
        sbc.recv_match(T, |m| m.method() == Some(Method::Ack))
            .await?;
        Ok(inv)
    })?;
    assert_eq!(call.final_status, 200);
    assert_eq!(inv.uri_bytes(), contact.as_bytes());
    let routes: Vec<&[u8]> = inv.values(HeaderName::Route).map(|(_, v)| v).collect();
    assert_eq!(routes, vec![path.as_bytes()]);
    let rr: Vec<&[u8]> = inv
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(rr, vec![format!("<sip:{};lr>", pbx.addr()).as_bytes()]);

    // An INVITE from the "SBC" with a Route pre-loaded to the PBX reaches alice.
    let inv = raw_request(
        "INVITE",
        &format!("sip:alice@{DOMAIN}"),
        sbc_addr,
        "carrier",
        &format!(
            "Route: <sip:{};lr>\r\nContact: <sip:c@{sbc_addr}>\r\n",
            pbx.addr()
        ),
    );
    let inv = inv.replace("To: <sip:carrier@", "To: <sip:alice@");
    sbc.send(pbx.addr(), inv.as_bytes()).await?;
    let inc = alice.wait_invite(T).await?;
    assert!(
        inc.invite.header(HeaderName::Route).is_none(),
        "{}",
        text(&inc.invite)
    );
    let (ringing, _) = sbc.recv_match(T, |m| m.status() == Some(180)).await?;
    assert_eq!(ringing.via_count(), 1);

    // OPTIONS from the "SBC" to the phone: answered by the phone's auto-reply.
    let opt = raw_request("OPTIONS", &alice.contact_uri(), sbc_addr, "alice", "");
    sbc.send(alice.endpoint().local_addr(), opt.as_bytes())
        .await?;
    let (r, _) = sbc
        .recv_match(T, |m| m.cseq_method() == Method::Options)
        .await?;
    assert_eq!(r.status(), Some(200));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pbx_restarts_on_same_address() -> anyhow::Result<()> {
    let first = pbx(false).await?;
    let addr = first.addr();
    first.stop().await;
    let mut cfg = PbxConfig::new(addr, DOMAIN, nowhere()).user("alice", "alice-pw");
    cfg.auth = false;
    let second = Pbx::start(cfg).await?;
    assert_eq!(second.addr(), addr);
    let alice = phone("alice", &second).await?;
    assert_eq!(alice.register(60).await?.status(), Some(200));
    Ok(())
}
