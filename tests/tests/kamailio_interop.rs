//! Interop with a real Kamailio as the PBX: two phones register THROUGH the SBC (which adds a
//! Path with its flow token), one calls the other through Kamailio and the SBC, and the call is
//! set up, acknowledged and torn down. Phones here are raw UDP sockets writing SIP by hand, so
//! that the only SIP stacks in the path are the SBC's and Kamailio's.

use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::message::{HeaderName, Message, Method};
use sbc_tests::kamailio::{kamailio_available, KamailioPbx};
use sbc_tests::net::{count_rtp, rtp};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::UdpSocket;

async fn recv(s: &UdpSocket, what: &str, log: &dyn Fn() -> String) -> Message {
    let mut buf = vec![0u8; 65535];
    loop {
        let r = tokio::time::timeout(Duration::from_secs(3), s.recv_from(&mut buf)).await;
        let Ok(Ok((n, _))) = r else {
            panic!("timed out waiting for {what}\nkamailio log:\n{}", log());
        };
        if let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) {
            // Skip provisional responses unless asked for.
            if what != "provisional" && m.status().is_some_and(|s| s < 200) {
                continue;
            }
            return m;
        }
    }
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
    body: &str,
) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call}{cseq}{method};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn register(user: &str, port: u16) -> String {
    request(
        "REGISTER",
        "sip:pbx.test",
        port,
        &format!("reg-{user}"),
        &format!("<sip:{user}@pbx.test>;tag={user}r"),
        &format!("<sip:{user}@pbx.test>"),
        1,
        &format!("Contact: <sip:{user}@127.0.0.1:{port}>\r\nExpires: 300\r\n"),
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_between_phones_through_sbc_and_kamailio() {
    if !kamailio_available() {
        if std::env::var_os("CI").is_some() {
            panic!("kamailio is not installed; scripts/install-deps.sh installs it");
        }
        eprintln!("SKIP: kamailio not installed (run scripts/install-deps.sh)");
        return;
    }
    let kam = KamailioPbx::start_any().expect("kamailio starts");
    let log = || kam.log();
    let cfg = format!(
        "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n[[pool]]\nname = \"pbx\"\n[[pool.node]]\nname = \"kamailio\"\naddress = \"{}\"\n[phones]\nsources = [\"127.0.0.0/8\"]\n",
        kam.addr()
    );
    let cfg = sbc_config::parse(&cfg, Path::new("interop.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc starts");
    let sbc_addr: SocketAddr = sbc.addr(sbc_sip::Transport::Udp).expect("udp listener");

    let alice = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bob = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ap = alice.local_addr().unwrap().port();
    let bp = bob.local_addr().unwrap().port();

    for (sock, user, port) in [(&alice, "alice", ap), (&bob, "bob", bp)] {
        sock.send_to(register(user, port).as_bytes(), sbc_addr)
            .await
            .unwrap();
        let r = recv(sock, "REGISTER answer", &log).await;
        assert_eq!(
            r.status(),
            Some(200),
            "{user} registers via the SBC\n{}",
            log()
        );
        assert!(
            r.header(HeaderName::Path).is_some(),
            "Kamailio echoes the SBC's Path"
        );
    }
    assert_eq!(sbc.proxy.registrations.len(), 2);

    // Bob calls alice through the SBC and Kamailio. Each has a real RTP socket.
    let bob_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let alice_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp_for = |port: u16| {
        format!("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
    };
    let sdp = sdp_for(bob_rtp.local_addr().unwrap().port());
    let sdp = sdp.as_str();
    let inv = request(
        "INVITE",
        "sip:alice@pbx.test",
        bp,
        "call1",
        "<sip:bob@pbx.test>;tag=bobtag",
        "<sip:alice@pbx.test>",
        1,
        &format!("Contact: <sip:bob@127.0.0.1:{bp}>\r\nContent-Type: application/sdp\r\n"),
        sdp,
    );
    bob.send_to(inv.as_bytes(), sbc_addr).await.unwrap();
    let inv_in = recv(&alice, "INVITE at alice", &log).await;
    assert_eq!(inv_in.method(), Some(Method::Invite));
    // The SBC anchored the media: alice is offered a relay port, not bob's.
    let offered = sdp_target(inv_in.body()).expect("SDP in the INVITE at alice");
    assert_ne!(
        offered.port(),
        bob_rtp.local_addr().unwrap().port(),
        "media anchored"
    );
    assert!(
        inv_in.header(HeaderName::Route).is_none(),
        "SBC popped its Path route"
    );
    let rr: Vec<String> = inv_in
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    assert!(rr.len() >= 3, "SBC, Kamailio, SBC record-routed: {rr:?}");

    // Alice answers 200 with her Contact and the Record-Route copied.
    let mut extra =
        format!("Contact: <sip:alice@127.0.0.1:{ap}>\r\nContent-Type: application/sdp\r\n");
    for r in &rr {
        extra.push_str(&format!("Record-Route: {r}\r\n"));
    }
    let alice_sdp = sdp_for(alice_rtp.local_addr().unwrap().port());
    let ok = sbc_sip::edit::response(
        &inv_in,
        200,
        "OK",
        &sbc_sip::edit::ResponseOpts {
            to_tag: Some(b"alicetag"),
            extra: extra.as_bytes(),
            body: Some(("application/sdp", alice_sdp.as_bytes())),
            ..Default::default()
        },
    );
    // response() adds its own Content-Type with the body; drop the duplicate we put in extra.
    let ok = String::from_utf8(ok)
        .unwrap()
        .replacen("Content-Type: application/sdp\r\n", "", 1);
    alice.send_to(ok.as_bytes(), sbc_addr).await.unwrap();
    let ok_in = recv(&bob, "200 at bob", &log).await;
    assert_eq!(ok_in.status(), Some(200), "{}", log());
    assert_eq!(ok_in.to_tag(), Some(&b"alicetag"[..]));

    // Bob's route set is the Record-Route reversed; its first hop is the SBC.
    let mut routes: Vec<String> = ok_in
        .values(HeaderName::RecordRoute)
        .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        .collect();
    routes.reverse();
    let first = NameAddr::parse(routes[0].as_bytes()).unwrap();
    assert_eq!(
        first.uri.port,
        Some(sbc_addr.port()),
        "first hop is the SBC"
    );
    let route_hdr: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
    let target = format!("sip:alice@127.0.0.1:{ap}");
    let to = "<sip:alice@pbx.test>;tag=alicetag";
    let ack = request(
        "ACK",
        &target,
        bp,
        "call1",
        "<sip:bob@pbx.test>;tag=bobtag",
        to,
        1,
        &route_hdr,
        "",
    );
    bob.send_to(ack.as_bytes(), sbc_addr).await.unwrap();
    let ack_in = recv(&alice, "ACK at alice", &log).await;
    assert_eq!(ack_in.method(), Some(Method::Ack));

    // Media both ways through the relay: the call crosses the SBC twice (Kamailio proxies),
    // so the packets cross the relay twice too; every packet arrives.
    let answered = sdp_target(ok_in.body()).expect("SDP in the 200 at bob");
    assert_ne!(
        answered.port(),
        alice_rtp.local_addr().unwrap().port(),
        "media anchored"
    );
    for seq in 0..20u16 {
        bob_rtp.send_to(&rtp(seq, 0xb0b), answered).await.unwrap();
        alice_rtp
            .send_to(&rtp(seq, 0xa11ce), offered)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_alice = count_rtp(&alice_rtp, 0xb0b).await;
    let at_bob = count_rtp(&bob_rtp, 0xa11ce).await;
    // The first packet each way may arrive before the far side's source is latched.
    assert!(at_alice >= 19, "bob -> alice: {at_alice}/20 packets");
    assert!(at_bob >= 19, "alice -> bob: {at_bob}/20 packets");

    // Bob hangs up.
    let bye = request(
        "BYE",
        &target,
        bp,
        "call1",
        "<sip:bob@pbx.test>;tag=bobtag",
        to,
        2,
        &route_hdr,
        "",
    );
    bob.send_to(bye.as_bytes(), sbc_addr).await.unwrap();
    let bye_in = recv(&alice, "BYE at alice", &log).await;
    assert_eq!(bye_in.method(), Some(Method::Bye));
    let bye_ok = sbc_sip::edit::response(&bye_in, 200, "OK", &Default::default());
    alice.send_to(&bye_ok, sbc_addr).await.unwrap();
    let r = recv(&bob, "200 to BYE", &log).await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.cseq_method(), Method::Bye);
    sbc.shutdown();
}

/// The address the first m= line of an SDP body sends media to.
fn sdp_target(body: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(body).ok()?;
    let ip = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))?;
    let port = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))?
        .split(' ')
        .next()?;
    format!("{ip}:{port}").parse().ok()
}
