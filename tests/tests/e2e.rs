//! End to end through a running SBC with the scripted peers: phones over UDP, TCP and TLS
//! register with digest auth to the scripted PBX; calls phone -> trunk and trunk -> phone
//! (including a phone behind a simulated NAT); CANCEL; 486 and 404.

use sbc_sip::Transport;
use sbc_tests::net::free_udp;
use sbc_tests::pbx::{Pbx, PbxConfig};
use sbc_tests::phone::{Phone, PhoneConfig};
use sbc_tests::pki::TestPki;
use sbc_tests::trunk::Trunk;
use sbc_tests::ua::call_and_answer;
use std::path::Path;
use std::time::Duration;

struct Lab {
    sbc: sbc::Sbc,
    pbx: Pbx,
    trunk: Trunk,
    pki: TestPki,
    _dir: std::path::PathBuf,
}

async fn lab(trunk_ip: &str) -> Lab {
    let pki = TestPki::new(&["sbc.test"]).expect("pki");
    let dir = std::env::temp_dir().join(format!(
        "sbc-e2e-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("tmp");
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem).expect("cert");
    std::fs::write(dir.join("key.pem"), &pki.key_pem).expect("key");
    let pbx_addr = free_udp("127.0.0.2");
    let trunk_addr = free_udp(trunk_ip);
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
[[pool.node]]
name = "pbx-a"
address = "{pbx_addr}"
[[trunk]]
name = "carrier"
sources = ["{trunk_ip}"]
address = "{trunk_addr}"
domains = ["carrier.test"]
[phones]
sources = ["127.0.0.0/8"]
"#,
        dir = dir.display()
    );
    let cfg = sbc_config::parse(&cfg, Path::new("e2e.toml")).expect("config");
    let sbc = sbc::Sbc::start(&cfg).await.expect("sbc");
    let udp = sbc.addr(Transport::Udp).expect("udp");
    let pbx = Pbx::start(
        PbxConfig::new(pbx_addr, "pbx.test", udp)
            .user("alice", "a-secret")
            .user("bob", "b-secret")
            .user("carol", "c-secret")
            .trunk("9", "carrier.test"),
    )
    .await
    .expect("pbx");
    let trunk = Trunk::start(trunk_addr, udp).await.expect("trunk");
    Lab {
        sbc,
        pbx,
        trunk,
        pki,
        _dir: dir,
    }
}

async fn phone(lab: &Lab, user: &str, pw: &str, transport: Transport, nat: Option<u16>) -> Phone {
    let mut c = PhoneConfig::new(
        user,
        "pbx.test",
        pw,
        lab.sbc.addr(transport).expect("listener"),
    );
    c.transport = transport;
    c.tls_ca = Some(lab.pki.ca_pem.clone().into_bytes());
    c.tls_server_name = "sbc.test".into();
    c.contact_port_override = nat;
    Phone::new(c).await.expect("phone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_register_over_every_transport_with_digest() {
    let lab = lab("127.0.0.30").await;
    // Phones stay alive: a TCP/TLS phone's registration ends with its connection (RFC 5626).
    let mut phones = Vec::new();
    for (user, pw, t) in [
        ("alice", "a-secret", Transport::Udp),
        ("bob", "b-secret", Transport::Tcp),
        ("carol", "c-secret", Transport::Tls),
    ] {
        let p = phone(&lab, user, pw, t, None).await;
        let r = p.register(300).await.expect("register");
        assert_eq!(r.status(), Some(200), "{user} over {t}");
        phones.push(p);
    }
    let regs = lab.pbx.registrations();
    assert_eq!(regs.len(), 3);
    for r in &regs {
        assert_eq!(r.path.len(), 1, "one Path from the SBC: {r:?}");
        assert!(r.path[0].contains(";lr"), "{:?}", r.path);
        assert_eq!(r.received_from.ip().to_string(), "127.0.0.1");
    }
    assert_eq!(lab.sbc.proxy.registrations.len(), 3);
    // Closing the TCP phone's connection drops its flow.
    phones[1].endpoint().close_wait().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lab.sbc.proxy.registrations.len(), 2);
    // The PBX challenged each once (digest passes through untouched).
    assert_eq!(lab.pbx.stats().local_of(401), 3);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_calls_trunk_and_trunk_calls_natted_phone() {
    let lab = lab("127.0.0.31").await;
    // alice sits behind a NAT: her Contact names a port she does not send from.
    let alice = phone(&lab, "alice", "a-secret", Transport::Udp, Some(1)).await;
    assert_eq!(alice.register(300).await.expect("reg").status(), Some(200));
    let bob = phone(&lab, "bob", "b-secret", Transport::Tcp, None).await;
    assert_eq!(bob.register(300).await.expect("reg").status(), Some(200));

    // bob -> trunk number 95551234.
    let trunk = &lab.trunk;
    let (call, inc, tcall) =
        call_and_answer(&bob, "sip:95551234@pbx.test", Default::default(), trunk).await;
    assert_eq!(call.final_status, 200);
    assert_eq!(
        inc.from,
        lab.sbc.addr(Transport::Udp).expect("udp"),
        "the trunk hears the SBC"
    );
    let (bye, _) = tokio::join!(
        trunk.bye(&tcall),
        bob.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));

    // trunk -> alice: arrives on alice's own flow despite her NAT'd Contact.
    let (call, answered) = tokio::join!(trunk.invite("sip:alice@pbx.test"), async {
        let inc = alice
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("alice gets INVITE");
        alice.answer(&inc, 200).await.expect("answer")
    });
    let call = call.expect("trunk call");
    assert_eq!(call.final_status, 200);
    let (bye, _) = tokio::join!(
        alice.bye(&answered),
        trunk.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_busy_and_not_found() {
    let lab = lab("127.0.0.32").await;
    let alice = phone(&lab, "alice", "a-secret", Transport::Udp, None).await;
    let bob = phone(&lab, "bob", "b-secret", Transport::Udp, None).await;
    alice.register(300).await.expect("reg");
    bob.register(300).await.expect("reg");

    // CANCEL of a ringing call.
    let (call, inc) = tokio::join!(
        alice.invite_until_ringing("sip:bob@pbx.test"),
        bob.wait_invite(Duration::from_secs(3))
    );
    let call = call.expect("ringing");
    let inc = inc.expect("bob rings");
    let (fin, cancelled) = tokio::join!(
        alice.cancel(&call),
        bob.wait_cancel(&inc, Duration::from_secs(3))
    );
    cancelled.expect("bob sees the CANCEL");
    assert_eq!(fin.expect("487").status(), Some(487));

    // 486 from bob.
    let (call, _) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
        let inc = bob
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("invite");
        bob.answer(&inc, 486).await
    });
    assert_eq!(call.expect("call").final_status, 486);

    // 404 for an unknown user.
    let call = alice.invite("sip:nobody@pbx.test").await.expect("call");
    assert_eq!(call.final_status, 404);
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinvite_and_bye_from_either_side() {
    let lab = lab("127.0.0.33").await;
    let alice = phone(&lab, "alice", "a-secret", Transport::Udp, None).await;
    let bob = phone(&lab, "bob", "b-secret", Transport::Tls, None).await;
    alice.register(300).await.expect("reg");
    bob.register(300).await.expect("reg");

    for callee_hangs_up in [false, true] {
        let (call, answered) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
            let inc = bob
                .wait_invite(Duration::from_secs(3))
                .await
                .expect("invite");
            bob.answer(&inc, 200).await.expect("answer")
        });
        let mut call = call.expect("call");
        assert_eq!(call.final_status, 200);
        let mut answered = answered;

        // Re-INVITE from the caller, then from the callee: both reach the other end.
        let (r, got) = tokio::join!(
            alice.reinvite(&mut call),
            bob.wait_request_and_answer(sbc_sip::Method::Invite, Duration::from_secs(3))
        );
        assert_eq!(r.expect("re-INVITE").status(), Some(200));
        assert!(got.expect("bob sees it").has_body(), "SDP carried");
        let (r, _) = tokio::join!(
            bob.reinvite(&mut answered),
            alice.wait_request_and_answer(sbc_sip::Method::Invite, Duration::from_secs(3))
        );
        assert_eq!(r.expect("re-INVITE from callee").status(), Some(200));

        let bye = if callee_hangs_up {
            let (bye, _) = tokio::join!(
                bob.bye(&answered),
                alice.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
            );
            bye
        } else {
            let (bye, _) = tokio::join!(
                alice.bye(&call),
                bob.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
            );
            bye
        };
        assert_eq!(bye.expect("bye").status(), Some(200));
    }
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_are_retransmitted_over_udp() {
    let lab = lab("127.0.0.34").await;
    let alice = phone(&lab, "alice", "a-secret", Transport::Udp, None).await;
    let bob = phone(&lab, "bob", "b-secret", Transport::Udp, None).await;

    // The first 200 to REGISTER is lost on its way to alice: she retransmits the REGISTER and
    // the SBC's server transaction answers again (the PBX sees the request once more at most).
    alice.endpoint().drop_incoming(1, |m| {
        m.status() == Some(200) && m.cseq_method() == sbc_sip::Method::Register
    });
    let r = alice
        .register(300)
        .await
        .expect("register despite a lost 200");
    assert_eq!(r.status(), Some(200));
    assert_eq!(alice.endpoint().dropped_count(), 1);
    bob.register(300).await.expect("reg");

    // The 200 to an INVITE is lost on its way to the caller: the callee retransmits it
    // (RFC 3261 13.3.1.4) and the SBC forwards the retransmission (2xx are end to end).
    alice.endpoint().drop_incoming(1, |m| {
        m.status() == Some(200) && m.cseq_method() == sbc_sip::Method::Invite
    });
    let (call, answered) = tokio::join!(alice.invite("sip:bob@pbx.test"), async {
        let inc = bob
            .wait_invite(Duration::from_secs(3))
            .await
            .expect("invite");
        bob.answer(&inc, 200).await
    });
    let call = call.expect("call survives a lost 200");
    assert_eq!(call.final_status, 200);
    assert_eq!(alice.endpoint().dropped_count(), 2);
    let answered = answered.expect("bob got his ACK after retransmitting");
    let (bye, _) = tokio::join!(
        bob.bye(&answered),
        alice.wait_request_and_answer(sbc_sip::Method::Bye, Duration::from_secs(3))
    );
    assert_eq!(bye.expect("bye").status(), Some(200));
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_phone_whose_tcp_flow_closed_fails_at_once_with_430() {
    let lab = lab("127.0.0.35").await;
    let alice = phone(&lab, "alice", "a-secret", Transport::Udp, None).await;
    let bob = phone(&lab, "bob", "b-secret", Transport::Tcp, None).await;
    alice.register(300).await.expect("reg");
    bob.register(300).await.expect("reg");
    // bob's connection drops; the PBX still holds his binding (with the SBC's Path).
    bob.endpoint().close_wait().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    let call = alice.invite("sip:bob@pbx.test").await.expect("answer");
    assert_eq!(call.final_status, 430, "RFC 5626 5.3: Flow Failed");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered at once, not after a timeout: {:?}",
        t.elapsed()
    );
    lab.sbc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_transaction_lingers_small_and_still_answers_retransmissions() {
    let lab = lab("127.0.0.37").await;
    let sbc_udp = lab.sbc.addr(Transport::Udp).expect("udp");
    let sock = tokio::net::UdpSocket::bind("127.0.0.38:0")
        .await
        .expect("bind");
    let me = sock.local_addr().expect("addr");
    let register = format!(
        "REGISTER sip:pbx.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bK-linger-1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@pbx.test>;tag=l1\r\n\
         To: <sip:alice@pbx.test>\r\n\
         Call-ID: linger-1@{ip}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:alice@{me}>\r\n\
         Expires: 300\r\n\
         Content-Length: 0\r\n\r\n",
        ip = me.ip()
    );
    let mut buf = vec![0u8; 4096];
    let mut answer = async |what: &str| -> Vec<u8> {
        sock.send_to(register.as_bytes(), sbc_udp)
            .await
            .expect("send");
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer to the {what} REGISTER"))
            .expect("recv");
        buf[..n].to_vec()
    };
    // The PBX challenges: the transaction is finished and only lingers (Timer J).
    let first = answer("first").await;
    assert!(
        first.starts_with(b"SIP/2.0 401"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    let (live, lingering) = lab.sbc.proxy.transaction_counts();
    assert_eq!(
        (live, lingering),
        (0, 1),
        "the finished REGISTER moved to the linger table"
    );
    // A retransmission of the same request gets the same answer from the SBC; the PBX never
    // sees it again.
    let again = answer("retransmitted").await;
    assert_eq!(
        again, first,
        "the lingering transaction repeats its last response"
    );
    assert_eq!(lab.pbx.stats().requests_of("REGISTER"), 1);
    assert_eq!(lab.sbc.proxy.transaction_counts(), (0, 1));
    lab.sbc.shutdown();
}
