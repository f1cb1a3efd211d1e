//! The relay end to end on loopback: real UDP sockets on 127.0.0.1 and ::1, real worker
//! threads, short timers. Each test has its own relay and port ranges, so tests run in
//! parallel without touching each other.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbc_media_relay::sdp::Sdp;
use sbc_media_relay::{
    CallKey, IoBackend, MediaError, MediaEvent, Relay, RelayConfig, Side, SideConfig, StreamStats,
};
use tokio::sync::mpsc::UnboundedReceiver;

fn config(base: u16, public_ip: &str, internal_ip: &str) -> RelayConfig {
    let mut c = RelayConfig::new(
        SideConfig::new(public_ip.parse().unwrap(), base..=base + 49),
        SideConfig::new(internal_ip.parse().unwrap(), base + 50..=base + 99),
    );
    c.workers = 1;
    c.io = backend();
    c
}

/// The I/O backend under test: relay_uring.rs runs this file again as its module `on_uring`.
fn backend() -> IoBackend {
    if module_path!().ends_with("on_uring") {
        IoBackend::Uring
    } else {
        IoBackend::Epoll
    }
}

fn start(c: RelayConfig) -> (Arc<Relay>, UnboundedReceiver<MediaEvent>) {
    Relay::start(c).expect("relay starts")
}

/// A SIP endpoint's media side: an RTP and an RTCP socket.
struct Peer {
    ip: String,
    rtp: UdpSocket,
    rtcp: UdpSocket,
}

impl Peer {
    fn new(ip: &str) -> Peer {
        let bind = |ip: &str| {
            let s = UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        };
        Peer {
            ip: ip.to_owned(),
            rtp: bind(ip),
            rtcp: bind(ip),
        }
    }

    fn rtp_addr(&self) -> SocketAddr {
        self.rtp.local_addr().unwrap()
    }

    fn rtcp_addr(&self) -> SocketAddr {
        self.rtcp.local_addr().unwrap()
    }

    fn sdp(&self, version: u64, direction: &str) -> String {
        sdp_for(
            &self.ip,
            self.rtp_addr().port(),
            self.rtcp_addr().port(),
            version,
            direction,
        )
    }
}

fn sdp_for(ip: &str, rtp: u16, rtcp: u16, version: u64, direction: &str) -> String {
    let fam = if ip.contains(':') { "IP6" } else { "IP4" };
    format!(
        "v=0\r\no=peer 4711 {version} IN {fam} {ip}\r\ns=-\r\nc=IN {fam} {ip}\r\nt=0 0\r\n\
         m=audio {rtp} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=rtcp:{rtcp}\r\na={direction}\r\n"
    )
}

/// The relay's RTP and RTCP addresses named in rewritten SDP (first m= line).
fn relay_addrs(sdp: &[u8]) -> (SocketAddr, SocketAddr) {
    let s = Sdp::parse(sdp).expect("relay output parses");
    (
        s.rtp_addr(0).expect("rtp addr"),
        s.rtcp_addr(0).expect("rtcp addr"),
    )
}

fn rtp(seq: u16, ts: u32, ssrc: u32, marker: u8) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[marker; 160]);
    p
}

fn rtcp_sr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 200, 0x00, 0x06];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0u8; 20]);
    p
}

/// Receives until `n` datagrams arrived or `wait` passed; returns (payload, source).
fn recv_n(s: &UdpSocket, n: usize, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < n && Instant::now() < deadline {
        if let Ok((len, from)) = s.recv_from(&mut buf) {
            out.push((buf[..len].to_vec(), from));
        }
    }
    out
}

/// Drains whatever arrives within `wait`.
fn drain(s: &UdpSocket, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    recv_n(s, usize::MAX, wait)
}

fn stream(relay: &Relay, call: &CallKey, leg: usize, rtcp: bool) -> StreamStats {
    let st = relay.stats(call).expect("call known");
    let m = &st.legs[leg].media[0];
    if rtcp {
        m.rtcp
    } else {
        m.rtp
    }
}

/// Polls until `f` holds (the workers publish counters after each batch).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting for: {what}");
}

/// A call set up phone (public) -> PBX (internal): returns the relay addresses each side got.
fn setup(
    relay: &Relay,
    call: &CallKey,
    a: &Peer,
    b: &Peer,
) -> ((SocketAddr, SocketAddr), (SocketAddr, SocketAddr)) {
    let to_b = relay
        .offer(
            call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let to_a = relay
        .answer(call, "tag-a", "tag-b", b.sdp(1, "sendrecv").as_bytes())
        .unwrap();
    (relay_addrs(&to_a), relay_addrs(&to_b))
}

fn count_marker(got: &[(Vec<u8>, SocketAddr)], marker: u8) -> usize {
    got.iter()
        .filter(|(p, _)| p.len() > 12 && p[12] == marker)
        .count()
}

#[test]
fn offer_answer_relays_rtp_and_rtcp_both_ways() {
    let (relay, _ev) = start(config(21000, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("call-both-ways@test");
    let to_b = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let to_b_text = String::from_utf8(to_b.clone()).unwrap();
    assert!(
        !to_b_text.contains(&a.rtp_addr().port().to_string()),
        "phone port leaked: {to_b_text}"
    );
    assert!(
        to_b_text.contains("a=sendrecv\r\n")
            && to_b_text.contains("a=rtpmap:101 telephone-event/8000\r\n")
    );
    let to_a = relay
        .answer(&call, "tag-a", "tag-b", b.sdp(1, "sendrecv").as_bytes())
        .unwrap();
    let (relay_for_a, relay_for_a_rtcp) = relay_addrs(&to_a);
    let (relay_for_b, relay_for_b_rtcp) = relay_addrs(&to_b);
    for p in [relay_for_a.port(), relay_for_b.port()] {
        assert_eq!(p % 2, 0, "RTP on even port");
    }
    assert!(
        (21000..21050).contains(&relay_for_a.port()),
        "A faces the public range"
    );
    assert!(
        (21050..21100).contains(&relay_for_b.port()),
        "B faces the internal range"
    );
    assert_eq!(relay_for_a_rtcp.port(), relay_for_a.port() + 1);
    assert_eq!(relay_for_b_rtcp.port(), relay_for_b.port() + 1);

    const N: u16 = 200;
    for i in 0..N {
        a.rtp
            .send_to(&rtp(i, u32::from(i) * 160, 0xa, 1), relay_for_a)
            .unwrap();
        b.rtp
            .send_to(&rtp(i, u32::from(i) * 160, 0xb, 2), relay_for_b)
            .unwrap();
        if i % 40 == 0 {
            a.rtcp.send_to(&rtcp_sr(0xa), relay_for_a_rtcp).unwrap();
            b.rtcp.send_to(&rtcp_sr(0xb), relay_for_b_rtcp).unwrap();
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let at_b = recv_n(&b.rtp, N as usize, Duration::from_secs(3));
    let at_a = recv_n(&a.rtp, N as usize, Duration::from_secs(3));
    assert_eq!(
        count_marker(&at_b, 1),
        N as usize,
        "every RTP packet A sent reached B"
    );
    assert_eq!(
        count_marker(&at_a, 2),
        N as usize,
        "every RTP packet B sent reached A"
    );
    // Sources are the relay's sockets facing each receiver (symmetric RTP).
    assert!(at_b.iter().all(|(_, from)| *from == relay_for_b));
    assert!(at_a.iter().all(|(_, from)| *from == relay_for_a));
    // In order, bytes untouched.
    assert_eq!(at_b[7].0, rtp(7, 7 * 160, 0xa, 1));
    let rtcp_b = recv_n(&b.rtcp, 5, Duration::from_secs(2));
    let rtcp_a = recv_n(&a.rtcp, 5, Duration::from_secs(2));
    assert_eq!(rtcp_b.len(), 5);
    assert_eq!(rtcp_a.len(), 5);
    assert_eq!(rtcp_b[0], (rtcp_sr(0xa), relay_for_b_rtcp));

    eventually("counters published", || {
        stream(&relay, &call, 0, false).packets == u64::from(N)
            && stream(&relay, &call, 1, false).packets == u64::from(N)
            && stream(&relay, &call, 0, true).packets == 5
            && stream(&relay, &call, 1, true).packets == 5
    });
    let s = stream(&relay, &call, 0, false);
    assert_eq!(s.bytes, u64::from(N) * 172);
    assert_eq!((s.lost, s.dropped()), (0, 0));
    assert_eq!(s.learned, Some(a.rtp_addr()));
    assert_eq!(s.advertised, Some(a.rtp_addr()));
    let t = relay.totals();
    assert_eq!(t.packets, 2 * u64::from(N) + 10);
    assert_eq!(t.sessions, 1);
    assert!(relay.delete(&call));
    assert!(!relay.delete(&call), "delete is idempotent");
    assert_eq!(relay.sessions(), 0);
    // The ports go back when the worker takes the delete; flush waits for that.
    relay.flush();
    assert_eq!(relay.totals().free_pairs, relay.totals().total_pairs);
}

#[test]
fn ipv4_phone_to_ipv6_pbx() {
    let (relay, _ev) = start(config(21100, "127.0.0.1", "::1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("::1"));
    let call = CallKey::new("v4-v6@test");
    let to_b = relay
        .offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let text = String::from_utf8(to_b.clone()).unwrap();
    assert!(text.contains("c=IN IP6 ::1\r\n"), "{text}");
    assert!(text.contains("o=peer 4711 1 IN IP6 ::1\r\n"), "{text}");
    let to_a = relay
        .answer(&call, "a", "b", b.sdp(1, "sendrecv").as_bytes())
        .unwrap();
    assert!(String::from_utf8(to_a.clone())
        .unwrap()
        .contains("c=IN IP4 127.0.0.1\r\n"));
    let (ra, _) = relay_addrs(&to_a);
    let (rb, _) = relay_addrs(&to_b);
    for i in 0..20u16 {
        a.rtp.send_to(&rtp(i, 0, 1, 1), ra).unwrap();
        b.rtp.send_to(&rtp(i, 0, 2, 2), rb).unwrap();
    }
    assert_eq!(
        count_marker(&recv_n(&b.rtp, 20, Duration::from_secs(2)), 1),
        20
    );
    assert_eq!(
        count_marker(&recv_n(&a.rtp, 20, Duration::from_secs(2)), 2),
        20
    );
    // An IPv6 endpoint on the IPv4 side cannot be served.
    let err = relay
        .offer(
            &CallKey::new("x"),
            "a",
            Side::Public,
            Side::Internal,
            Peer::new("::1").sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::AddressFamily {
                side: Side::Public,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.sip_status(), 488);
}

#[test]
fn latches_to_the_real_source_port_behind_nat() {
    let (relay, _ev) = start(config(21200, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    // The phone's NAT: SDP names a.rtp, packets really come from `nat`.
    let nat = UdpSocket::bind("127.0.0.1:0").unwrap();
    nat.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let call = CallKey::new("nat@test");
    let (ra, rb) = setup(&relay, &call, &a, &b);
    // Before the phone sends anything, media goes where its SDP says.
    b.rtp.send_to(&rtp(1, 0, 2, 2), rb.0).unwrap();
    assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
    for i in 0..5u16 {
        nat.send_to(&rtp(i, 0, 1, 1), ra.0).unwrap();
    }
    assert_eq!(
        count_marker(&recv_n(&b.rtp, 5, Duration::from_secs(2)), 1),
        5
    );
    eventually("latched", || {
        stream(&relay, &call, 0, false).learned == Some(nat.local_addr().unwrap())
    });
    for i in 2..12u16 {
        b.rtp.send_to(&rtp(i, 0, 2, 2), rb.0).unwrap();
    }
    assert_eq!(
        count_marker(&recv_n(&nat, 10, Duration::from_secs(2)), 2),
        10,
        "learned address wins"
    );
    assert!(
        drain(&a.rtp, Duration::from_millis(100)).is_empty(),
        "SDP address no longer used"
    );
    let s = stream(&relay, &call, 0, false);
    assert_eq!(s.advertised, Some(a.rtp_addr()));
}

#[test]
fn stray_sender_is_ignored_until_the_source_goes_quiet() {
    let mut c = config(21300, "127.0.0.1", "127.0.0.1");
    c.relatch_after = Duration::from_millis(300);
    let (relay, _ev) = start(c);
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let stray = UdpSocket::bind("127.0.0.1:0").unwrap();
    stray
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let call = CallKey::new("hijack@test");
    let (ra, rb) = setup(&relay, &call, &a, &b);
    // Legit source active; the stray sends valid RTP in between.
    for i in 0..20u16 {
        a.rtp.send_to(&rtp(i, 0, 1, 1), ra.0).unwrap();
        stray.send_to(&rtp(i, 0, 66, 9), ra.0).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    // Garbage from a third party is invalid, not a latch candidate either.
    stray.send_to(b"not rtp at all", ra.0).unwrap();
    let got = recv_n(&b.rtp, 20, Duration::from_secs(2));
    assert_eq!(count_marker(&got, 1), 20);
    assert!(
        drain(&b.rtp, Duration::from_millis(100)).is_empty(),
        "stray packets never reach B"
    );
    assert_eq!(count_marker(&got, 9), 0);
    eventually("drops counted", || {
        stream(&relay, &call, 0, false).dropped_foreign == 21
    });
    // B's media still goes to the legit source.
    b.rtp.send_to(&rtp(0, 0, 2, 2), rb.0).unwrap();
    assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
    assert!(drain(&stray, Duration::from_millis(50)).is_empty());
    // The legit source goes quiet; after the guard time the new source takes over.
    std::thread::sleep(Duration::from_millis(400));
    for i in 100..105u16 {
        stray.send_to(&rtp(i, 0, 66, 9), ra.0).unwrap();
    }
    assert_eq!(
        count_marker(&recv_n(&b.rtp, 5, Duration::from_secs(2)), 9),
        5
    );
    b.rtp.send_to(&rtp(1, 0, 2, 2), rb.0).unwrap();
    assert_eq!(
        recv_n(&stray, 1, Duration::from_secs(2)).len(),
        1,
        "re-latched"
    );
    assert_eq!(
        stream(&relay, &call, 0, false).learned,
        Some(stray.local_addr().unwrap())
    );
}

#[test]
fn hold_and_resume_keep_ports_and_versions_grow() {
    let (relay, _ev) = start(config(21400, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("hold@test");
    let (ra, rb) = setup(&relay, &call, &a, &b);
    let version = |sdp: &[u8]| -> u64 {
        let t = String::from_utf8(sdp.to_vec()).unwrap();
        t.lines()
            .nth(1)
            .unwrap()
            .split(' ')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    // Hold (RFC 3264 style) from the phone.
    let to_b = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(2, "sendonly").as_bytes(),
        )
        .unwrap();
    assert_eq!(relay_addrs(&to_b), rb, "re-INVITE keeps the ports");
    assert!(String::from_utf8(to_b.clone())
        .unwrap()
        .contains("a=sendonly\r\n"));
    assert_eq!(version(&to_b), 2);
    let to_a = relay
        .answer(&call, "tag-a", "tag-b", b.sdp(2, "recvonly").as_bytes())
        .unwrap();
    assert_eq!(relay_addrs(&to_a), ra);
    assert!(relay.stats(&call).unwrap().on_hold);
    // Hold the RFC 2543 way: c=0.0.0.0. The hold address is kept, and nothing is sent to it.
    let zero = a
        .sdp(3, "sendrecv")
        .replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
    let to_b = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            zero.as_bytes(),
        )
        .unwrap();
    let text = String::from_utf8(to_b.clone()).unwrap();
    assert!(text.contains("c=IN IP4 0.0.0.0\r\n"), "{text}");
    assert!(text.contains(&format!("m=audio {} ", rb.0.port())));
    assert_eq!(version(&to_b), 3);
    relay
        .answer(&call, "tag-a", "tag-b", b.sdp(3, "sendrecv").as_bytes())
        .unwrap();
    b.rtp.send_to(&rtp(1, 0, 2, 2), rb.0).unwrap();
    eventually("dropped toward a held phone", || {
        stream(&relay, &call, 1, false).dropped_no_peer == 1
    });
    assert!(drain(&a.rtp, Duration::from_millis(50)).is_empty());
    // Resume: same ports, media flows again.
    let to_b = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(4, "sendrecv").as_bytes(),
        )
        .unwrap();
    assert_eq!(relay_addrs(&to_b), rb);
    let to_a = relay
        .answer(&call, "tag-a", "tag-b", b.sdp(4, "sendrecv").as_bytes())
        .unwrap();
    assert_eq!(relay_addrs(&to_a), ra);
    assert!(!relay.stats(&call).unwrap().on_hold);
    b.rtp.send_to(&rtp(2, 0, 2, 2), rb.0).unwrap();
    a.rtp.send_to(&rtp(2, 0, 1, 1), ra.0).unwrap();
    assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
    assert_eq!(recv_n(&b.rtp, 1, Duration::from_secs(2)).len(), 1);
    // A session refresh with identical SDP keeps the version.
    let again = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(4, "sendrecv").as_bytes(),
        )
        .unwrap();
    assert_eq!(again, to_b);
    assert_eq!(relay.totals().free_pairs[0], 25 - 1);
}

#[test]
fn offer_from_the_callee_uses_the_same_ports() {
    let (relay, _ev) = start(config(21500, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("callee-reinvite@test");
    let (ra, rb) = setup(&relay, &call, &a, &b);
    // The PBX side re-INVITEs (e.g. after a transfer) with a new media address.
    let b2 = Peer::new("127.0.0.1");
    let to_a = relay
        .offer(
            &call,
            "tag-b",
            Side::Internal,
            Side::Public,
            b2.sdp(2, "sendrecv").as_bytes(),
        )
        .unwrap();
    assert_eq!(
        relay_addrs(&to_a),
        ra,
        "the phone sees no change of address"
    );
    let to_b = relay
        .answer(&call, "tag-b", "tag-a", a.sdp(2, "sendrecv").as_bytes())
        .unwrap();
    assert_eq!(relay_addrs(&to_b), rb);
    a.rtp.send_to(&rtp(5, 0, 1, 1), ra.0).unwrap();
    assert_eq!(
        recv_n(&b2.rtp, 1, Duration::from_secs(2)).len(),
        1,
        "media follows the new SDP"
    );
    b2.rtp.send_to(&rtp(5, 0, 2, 2), rb.0).unwrap();
    assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
    assert_eq!(
        relay.stats(&call).unwrap().legs[1].tag.as_deref(),
        Some("tag-b")
    );
}

#[test]
fn late_offer_in_the_200_and_answer_in_the_ack() {
    let (relay, _ev) = start(config(21550, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("late-offer@test");
    // INVITE without SDP; the PBX's 200 carries the offer (To tag = offerer).
    let to_a = relay
        .offer(
            &call,
            "tag-b",
            Side::Internal,
            Side::Public,
            b.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let (ra, _) = relay_addrs(&to_a);
    assert!((21550..21600).contains(&ra.port()));
    let to_b = relay
        .answer(&call, "tag-b", "tag-a", a.sdp(1, "sendrecv").as_bytes())
        .unwrap();
    let (rb, _) = relay_addrs(&to_b);
    assert!((21600..21650).contains(&rb.port()));
    a.rtp.send_to(&rtp(1, 0, 1, 1), ra).unwrap();
    assert_eq!(recv_n(&b.rtp, 1, Duration::from_secs(2)).len(), 1);
}

#[test]
fn early_media_then_a_200_from_another_fork() {
    let (relay, _ev) = start(config(21600, "127.0.0.1", "127.0.0.1"));
    let a = Peer::new("127.0.0.1");
    let (fork1, fork2) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("forked@test");
    let to_forks = relay
        .offer(
            &call,
            "tag-a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let (rb, _) = relay_addrs(&to_forks);
    // 183 with SDP from fork 1: early media both ways.
    let early = relay
        .answer(
            &call,
            "tag-a",
            "fork-1",
            fork1.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let (ra, _) = relay_addrs(&early);
    assert!(!relay.stats(&call).unwrap().on_hold);
    for i in 0..5u16 {
        fork1.rtp.send_to(&rtp(i, 0, 3, 3), rb).unwrap();
    }
    assert_eq!(
        count_marker(&recv_n(&a.rtp, 5, Duration::from_secs(2)), 3),
        5,
        "ringback heard"
    );
    a.rtp.send_to(&rtp(0, 0, 1, 1), ra).unwrap();
    assert_eq!(recv_n(&fork1.rtp, 1, Duration::from_secs(2)).len(), 1);
    // The same 183 again (retransmission or PRACKed copy): identical output.
    let again = relay
        .answer(
            &call,
            "tag-a",
            "fork-1",
            fork1.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    assert_eq!(again, early);
    // Fork 2 answers with 200 and its own SDP: the phone keeps the relay address, media moves.
    let final_ = relay
        .answer(
            &call,
            "tag-a",
            "fork-2",
            fork2.sdp(7, "sendrecv").as_bytes(),
        )
        .unwrap();
    assert_eq!(relay_addrs(&final_).0, ra);
    assert!(relay.stats(&call).unwrap().answered);
    for i in 1..4u16 {
        a.rtp.send_to(&rtp(i, 0, 1, 1), ra).unwrap();
    }
    assert_eq!(
        recv_n(&fork2.rtp, 3, Duration::from_secs(2)).len(),
        3,
        "media goes to the fork that answered"
    );
    assert!(drain(&fork1.rtp, Duration::from_millis(50)).is_empty());
    fork2.rtp.send_to(&rtp(9, 0, 4, 4), rb).unwrap();
    assert_eq!(
        count_marker(&recv_n(&a.rtp, 1, Duration::from_secs(2)), 4),
        1
    );
    assert_eq!(
        relay.stats(&call).unwrap().legs[1].tag.as_deref(),
        Some("fork-2")
    );
}

fn wait_event(ev: &mut UnboundedReceiver<MediaEvent>, wait: Duration) -> Option<MediaEvent> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(e) = ev.try_recv() {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn media_timeout_frees_ports_and_tells_the_sip_side() {
    let mut c = config(21700, "127.0.0.1", "127.0.0.1");
    c.timeout = Duration::from_millis(300);
    c.setup_timeout = Duration::from_millis(300);
    c.hold_timeout = Duration::from_secs(30);
    let (relay, mut ev) = start(c);
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let (h1, h2) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("timeout@test");
    let held = CallKey::new("held@test");
    let (ra, _) = setup(&relay, &call, &a, &b);
    relay
        .offer(
            &held,
            "h1",
            Side::Public,
            Side::Internal,
            h1.sdp(1, "inactive").as_bytes(),
        )
        .unwrap();
    relay
        .answer(&held, "h1", "h2", h2.sdp(1, "inactive").as_bytes())
        .unwrap();
    assert_eq!(relay.totals().free_pairs, [23, 23]);
    // Media keeps the call alive past its timeout...
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        a.rtp.send_to(&rtp(1, 0, 1, 1), ra.0).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(relay.sessions(), 2);
    assert!(ev.try_recv().is_err());
    // ...then silence ends it.
    let silent = Instant::now();
    let e = wait_event(&mut ev, Duration::from_secs(3)).expect("timeout event");
    let MediaEvent::Timeout { call: key, idle } = e;
    assert_eq!(key, call);
    assert!(idle >= Duration::from_millis(300));
    assert!(
        silent.elapsed() < Duration::from_millis(1000),
        "fired late: {:?}",
        silent.elapsed()
    );
    assert!(relay.stats(&call).is_none());
    assert!(
        relay.stats(&held).is_some(),
        "a held call gets the hold timeout"
    );
    assert_eq!(relay.totals().free_pairs, [24, 24], "ports are back");
    assert_eq!(relay.totals().timeouts, 1);
    // The ports are really closed: nothing comes back from the relay, a new call can bind them.
    drain(&b.rtp, Duration::from_millis(20));
    a.rtp.send_to(&rtp(2, 0, 1, 1), ra.0).unwrap();
    assert!(drain(&b.rtp, Duration::from_millis(100)).is_empty());
    assert!(matches!(
        relay.answer(&call, "tag-a", "tag-b", b.sdp(2, "sendrecv").as_bytes()),
        Err(MediaError::UnknownCall)
    ));
    // Deleting a held call frees its ports as soon as the worker takes it.
    assert!(relay.delete(&held));
    relay.flush();
    assert_eq!(relay.totals().free_pairs, [25, 25]);
}

#[test]
fn unanswered_call_uses_the_setup_timeout() {
    let mut c = config(21750, "127.0.0.1", "127.0.0.1");
    c.timeout = Duration::from_millis(100);
    c.setup_timeout = Duration::from_millis(600);
    let (relay, mut ev) = start(c);
    let a = Peer::new("127.0.0.1");
    let call = CallKey::new("ringing@test");
    relay
        .offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        relay.sessions(),
        1,
        "ringing without media is not a dead call"
    );
    assert!(wait_event(&mut ev, Duration::from_secs(2)).is_some());
    assert_eq!(relay.sessions(), 0);
}

#[test]
fn port_exhaustion_is_an_error_and_recovers_after_delete() {
    let mut c = config(21800, "127.0.0.1", "127.0.0.1");
    c.public.ports = 21800..=21803; // two pairs
    let (relay, _ev) = start(c);
    let a = Peer::new("127.0.0.1");
    let offer = |id: &str| {
        relay.offer(
            &CallKey::new(id),
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
    };
    offer("c1").unwrap();
    offer("c2").unwrap();
    let before = relay.totals().free_pairs;
    let err = offer("c3").unwrap_err();
    assert!(
        matches!(err, MediaError::PortsExhausted { side: Side::Public }),
        "{err}"
    );
    assert_eq!(err.sip_status(), 503);
    assert!(err.is_transient());
    assert_eq!(
        relay.totals().free_pairs,
        before,
        "a failed offer leaks nothing"
    );
    assert_eq!(relay.sessions(), 2);
    // A delete gives its ports back when the worker takes it, without waiting for that; an
    // offer that finds the pool empty meanwhile waits for the deletes in flight instead of
    // answering 503. Many rounds, so that some offers do come before their worker.
    let mut last = "c1".to_string();
    for i in 0..50 {
        assert!(relay.delete(&CallKey::new(&last)));
        last = format!("r{i}");
        offer(&last).expect("ports freed by a delete are usable at once");
    }
    assert_eq!(relay.sessions(), 2);
    // Two m= lines with one pair left: all or nothing.
    assert!(relay.delete(&CallKey::new(&last)));
    relay.flush();
    let two = a.sdp(1, "sendrecv") + "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n";
    let before = relay.totals().free_pairs;
    assert!(relay
        .offer(
            &CallKey::new("c4"),
            "a",
            Side::Public,
            Side::Internal,
            two.as_bytes()
        )
        .is_err());
    assert_eq!(relay.totals().free_pairs, before);
    offer("c3").expect("ports freed by delete are usable at once");
    // Under load: many offers against a full pool fail cleanly, the relay keeps working.
    for i in 0..200 {
        assert!(offer(&format!("flood-{i}")).is_err());
    }
    assert_eq!(relay.sessions(), 2);
}

#[test]
fn malformed_and_inconsistent_sdp_are_errors() {
    let (relay, _ev) = start(config(21900, "127.0.0.1", "127.0.0.1"));
    let a = Peer::new("127.0.0.1");
    let call = CallKey::new("bad@test");
    for body in [
        &b""[..],
        b"hello",
        b"v=0\r\nm=audio x RTP/AVP 0\r\n",
        b"v=0\r\nc=IN IP4 example.com\r\n",
    ] {
        let e = relay
            .offer(&call, "a", Side::Public, Side::Internal, body)
            .unwrap_err();
        assert!(matches!(e, MediaError::Sdp(_)), "{e}");
        assert_eq!(e.sip_status(), 488);
    }
    assert_eq!(relay.sessions(), 0);
    assert!(matches!(
        relay.answer(&call, "a", "b", a.sdp(1, "sendrecv").as_bytes()),
        Err(MediaError::UnknownCall)
    ));
    relay
        .offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let two = a.sdp(1, "sendrecv") + "m=video 5000 RTP/AVP 96\r\n";
    assert!(matches!(
        relay.answer(&call, "a", "b", two.as_bytes()),
        Err(MediaError::MediaCountMismatch {
            offer: 1,
            answer: 2
        })
    ));
    assert!(
        relay.stats(&call).is_some(),
        "a bad answer does not kill the call"
    );
}

#[test]
fn loss_and_jitter_are_measured() {
    let (relay, _ev) = start(config(22000, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("stats@test");
    let (ra, _) = setup(&relay, &call, &a, &b);
    // 5 ms of audio per packet (40 ticks at 8 kHz), sent alternately 1 ms and 9 ms apart:
    // |D| = 4 ms each; packets 10, 20, ... never sent.
    let mut sent = 0;
    for i in 0..120u16 {
        if i % 10 == 0 && i > 0 {
            continue;
        }
        a.rtp
            .send_to(&rtp(i, u32::from(i) * 40, 0x5eed, 1), ra.0)
            .unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_millis(if i % 2 == 0 { 1 } else { 9 }));
    }
    eventually("all counted", || {
        stream(&relay, &call, 0, false).packets == sent
    });
    let s = stream(&relay, &call, 0, false);
    assert_eq!(s.lost, 11);
    assert!(
        (2_000..=8_000).contains(&s.jitter_us),
        "jitter {} us",
        s.jitter_us
    );
}

#[test]
fn rtcp_mux_and_udptl_are_relayed() {
    let mut c = config(22100, "127.0.0.1", "127.0.0.1");
    c.relatch_after = Duration::from_millis(200);
    let (relay, _ev) = start(c);
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("mux@test");
    let mux = |p: &Peer| p.sdp(1, "sendrecv") + "a=rtcp-mux\r\n";
    let to_b = relay
        .offer(&call, "a", Side::Public, Side::Internal, mux(&a).as_bytes())
        .unwrap();
    assert!(String::from_utf8(to_b.clone())
        .unwrap()
        .contains("a=rtcp-mux\r\n"));
    let to_a = relay.answer(&call, "a", "b", mux(&b).as_bytes()).unwrap();
    let ((ra, _), (rb, _)) = (relay_addrs(&to_a), relay_addrs(&to_b));
    a.rtp.send_to(&rtp(1, 0, 1, 1), ra).unwrap();
    a.rtp.send_to(&rtcp_sr(1), ra).unwrap();
    let got = recv_n(&b.rtp, 2, Duration::from_secs(2));
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1].0,
        rtcp_sr(1),
        "RTCP stays on the RTP port when both mux"
    );
    eventually("counted", || stream(&relay, &call, 0, false).packets == 2);
    assert_eq!(stream(&relay, &call, 0, false).lost, 0);
    // T.38 re-INVITE: udptl datagrams have no RTP header and still latch and flow.
    let fax = |p: &Peer, v| {
        format!(
            "v=0\r\no=peer 4711 {v} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=image {} udptl t38\r\na=T38FaxVersion:0\r\n",
            p.rtp_addr().port()
        )
    };
    let to_b = relay
        .offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            fax(&a, 2).as_bytes(),
        )
        .unwrap();
    let to_a = relay
        .answer(&call, "a", "b", fax(&b, 2).as_bytes())
        .unwrap();
    assert_eq!(relay_addrs(&to_b).0, rb);
    assert_eq!(relay_addrs(&to_a).0, ra);
    let nat = UdpSocket::bind("127.0.0.1:0").unwrap();
    nat.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the RTP source goes quiet (re-latch guard)
    nat.send_to(b"\x00\x01udptl", ra).unwrap();
    assert_eq!(
        recv_n(&b.rtp, 1, Duration::from_secs(2))[0].0,
        b"\x00\x01udptl"
    );
    b.rtp.send_to(b"\x00\x02ack", rb).unwrap();
    assert_eq!(recv_n(&nat, 1, Duration::from_secs(2)).len(), 1);
}

#[test]
fn shutdown_refuses_new_calls_and_closes_ports() {
    let (relay, _ev) = start(config(22200, "127.0.0.1", "127.0.0.1"));
    let a = Peer::new("127.0.0.1");
    let call = CallKey::new("shut@test");
    let to_b = relay
        .offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let (rb, _) = relay_addrs(&to_b);
    relay.shutdown();
    assert!(matches!(
        relay.offer(
            &call,
            "a",
            Side::Public,
            Side::Internal,
            a.sdp(1, "sendrecv").as_bytes()
        ),
        Err(MediaError::ShutDown)
    ));
    assert_eq!(relay.sessions(), 0);
    UdpSocket::bind(rb).expect("port closed by shutdown");
}

/// A PBX bridged two calls through the relay and left media end to end (the SDP it sent on
/// one call names our internal port of the other): the second call is placed on the first
/// one's worker, and once joined every packet crosses the relay once, leaving through the
/// other call's public socket. Ending one call undoes the join cleanly.
#[test]
fn hairpin_calls_are_joined_into_one_hop() {
    let mut c = config(26600, "127.0.0.1", "127.0.0.1");
    c.workers = 2;
    let (relay, _events) = start(c);
    let phone = Peer::new("127.0.0.1");
    let trunk = Peer::new("127.0.0.1");
    let (a, b) = (CallKey::new("leg-a"), CallKey::new("leg-b"));
    // Leg A: phone -> PBX; leg B: PBX -> trunk with leg A's SDP passed through.
    let to_pbx_a = relay
        .offer(
            &a,
            "phone",
            Side::Public,
            Side::Internal,
            phone.sdp(1, "sendrecv").as_bytes(),
        )
        .unwrap();
    let to_trunk = relay
        .offer(&b, "pbx-b", Side::Internal, Side::Public, &to_pbx_a)
        .unwrap();
    let to_pbx_b = relay
        .answer(&b, "pbx-b", "trunk", trunk.sdp(1, "sendrecv").as_bytes())
        .unwrap();
    let to_phone = relay.answer(&a, "phone", "pbx-a", &to_pbx_b).unwrap();
    assert!(
        relay.join(&a, &b),
        "same worker, one public and one internal leg each"
    );
    let (a_pub, _) = relay_addrs(&to_phone);
    let (b_pub, _) = relay_addrs(&to_trunk);

    for i in 0..20u16 {
        phone
            .rtp
            .send_to(&rtp(i, 160 * u32::from(i), 0xa, 1), a_pub)
            .unwrap();
        trunk
            .rtp
            .send_to(&rtp(i, 160 * u32::from(i), 0xb, 2), b_pub)
            .unwrap();
    }
    let at_trunk = recv_n(&trunk.rtp, 20, Duration::from_secs(2));
    let at_phone = recv_n(&phone.rtp, 20, Duration::from_secs(2));
    assert_eq!(count_marker(&at_trunk, 1), 20);
    assert_eq!(count_marker(&at_phone, 2), 20);
    // Symmetric: each end sees the socket it sends to as the source.
    assert!(at_trunk.iter().all(|(_, from)| *from == b_pub));
    assert!(at_phone.iter().all(|(_, from)| *from == a_pub));
    eventually("one hop per packet", || relay.totals().packets == 40);

    // Leg A ends: leg B's trunk packets go nowhere near A's closed sockets.
    assert!(relay.delete(&a));
    for i in 20..30u16 {
        trunk
            .rtp
            .send_to(&rtp(i, 160 * u32::from(i), 0xb, 3), b_pub)
            .unwrap();
    }
    assert_eq!(
        count_marker(&drain(&phone.rtp, Duration::from_millis(200)), 3),
        0
    );
    assert!(relay.delete(&b));
    assert_eq!(relay.sessions(), 0);
}

/// The backend asked for is the one that runs (io_uring where the kernel allows it), and a
/// dense stream (bursts that switch the worker to coalesced waits) arrives whole and in order
/// with every packet counted.
#[test]
fn configured_backend_runs_and_relays_bursts_in_order() {
    let (relay, _ev) = start(config(22300, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("bursts@test");
    let ((ra, _), (rb, _)) = setup(&relay, &call, &a, &b);
    let uring_allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|s| s.trim() == "0");
    let want = usize::from(backend() == IoBackend::Uring && uring_allowed);
    assert_eq!(
        relay.totals().uring_workers,
        want,
        "backend {:?}",
        backend()
    );
    // Latch both ends first.
    a.rtp.send_to(&rtp(0, 0, 0xa, 0), ra).unwrap();
    b.rtp.send_to(&rtp(0, 0, 0xb, 0), rb).unwrap();
    assert_eq!(recv_n(&b.rtp, 1, Duration::from_secs(2)).len(), 1);
    assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
    let mut seq = 1u16;
    for _ in 0..10 {
        for _ in 0..50 {
            a.rtp
                .send_to(&rtp(seq, u32::from(seq) * 160, 0xa, 0), ra)
                .unwrap();
            seq += 1;
        }
        let got = recv_n(&b.rtp, 50, Duration::from_secs(2));
        assert_eq!(got.len(), 50);
        for (i, (p, from)) in got.iter().enumerate() {
            assert_eq!(*from, rb);
            let s = u16::from_be_bytes([p[2], p[3]]);
            assert_eq!(s, seq - 50 + i as u16, "order kept");
        }
    }
    eventually("every packet counted", || {
        let s = stream(&relay, &call, 0, false);
        s.packets == 501 && s.lost == 0
    });
    assert_eq!(relay.totals().dropped, 0);
}

#[test]
fn latched_rtp_leaves_through_a_connected_socket() {
    for connect in [true, false] {
        let mut c = config(22400, "127.0.0.1", "127.0.0.1");
        c.connect_latched = connect;
        let (relay, _ev) = start(c);
        let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
        let stray = UdpSocket::bind("127.0.0.1:0").unwrap();
        let call = CallKey::new(&format!("connected-{connect}@test"));
        let ((ra, _), (rb, _)) = setup(&relay, &call, &a, &b);
        // Nobody else gets the RTP port, not even with SO_REUSEPORT.
        let intruder = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        intruder.set_reuse_port(true).unwrap();
        assert!(
            intruder.bind(&ra.into()).is_err(),
            "RTP port {ra} open to a third socket (connect_latched {connect})"
        );
        assert!(
            !stream(&relay, &call, 0, false).connected,
            "nothing latched yet"
        );
        a.rtp.send_to(&rtp(0, 0, 0xa, 1), ra).unwrap();
        b.rtp.send_to(&rtp(0, 0, 0xb, 2), rb).unwrap();
        assert_eq!(recv_n(&b.rtp, 1, Duration::from_secs(2)).len(), 1);
        assert_eq!(recv_n(&a.rtp, 1, Duration::from_secs(2)).len(), 1);
        eventually("latched", || {
            let s = stream(&relay, &call, 0, false);
            s.learned == Some(a.rtp_addr()) && s.connected == connect
        });
        assert_eq!(stream(&relay, &call, 1, false).connected, connect);
        // Both ways, every packet, from the relay's port, the stray judged as before.
        for i in 1..=20u16 {
            a.rtp.send_to(&rtp(i, 0, 0xa, 1), ra).unwrap();
            b.rtp.send_to(&rtp(i, 0, 0xb, 2), rb).unwrap();
            stray.send_to(&rtp(i, 0, 0x66, 9), ra).unwrap();
        }
        let to_b = recv_n(&b.rtp, 20, Duration::from_secs(2));
        let to_a = recv_n(&a.rtp, 20, Duration::from_secs(2));
        assert_eq!(count_marker(&to_b, 1), 20);
        assert_eq!(count_marker(&to_a, 2), 20);
        assert!(to_b.iter().all(|(_, from)| *from == rb));
        assert!(to_a.iter().all(|(_, from)| *from == ra));
        eventually("stray counted", || {
            stream(&relay, &call, 0, false).dropped_foreign == 20
        });
        // A new address in SDP: unconnected toward it until its source latches.
        let moved = Peer::new("127.0.0.1");
        relay
            .offer(
                &call,
                "tag-a",
                Side::Public,
                Side::Internal,
                moved.sdp(2, "sendrecv").as_bytes(),
            )
            .unwrap();
        relay
            .answer(&call, "tag-a", "tag-b", b.sdp(2, "sendrecv").as_bytes())
            .unwrap();
        eventually("latch reset", || {
            let s = stream(&relay, &call, 0, false);
            s.learned.is_none() && !s.connected
        });
        b.rtp.send_to(&rtp(21, 0, 0xb, 2), rb).unwrap();
        assert_eq!(
            count_marker(&recv_n(&moved.rtp, 1, Duration::from_secs(2)), 2),
            1
        );
        moved.rtp.send_to(&rtp(21, 0, 0xa, 1), ra).unwrap();
        assert_eq!(
            count_marker(&recv_n(&b.rtp, 1, Duration::from_secs(2)), 1),
            1
        );
        eventually("latched again", || {
            let s = stream(&relay, &call, 0, false);
            s.learned == Some(moved.rtp_addr()) && s.connected == connect
        });
        b.rtp.send_to(&rtp(22, 0, 0xb, 2), rb).unwrap();
        assert_eq!(
            count_marker(&recv_n(&moved.rtp, 1, Duration::from_secs(2)), 2),
            1
        );
        assert!(drain(&a.rtp, Duration::from_millis(50)).is_empty());
        relay.delete(&call);
        relay.shutdown();
    }
}

#[test]
fn a_delete_closes_its_sockets_by_the_next_pass_without_traffic() {
    // Deletes and answers do not wake the worker; with no packet and no other command, the
    // sweep timer's pass (at most a second away) applies them.
    let (relay, _ev) = start(config(22500, "127.0.0.1", "127.0.0.1"));
    let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
    let call = CallKey::new("lazy@test");
    let ((ra, _), (rb, _)) = setup(&relay, &call, &a, &b);
    let total = relay.totals().total_pairs;
    assert!(relay.delete(&call));
    let t0 = Instant::now();
    while relay.totals().free_pairs != total {
        assert!(t0.elapsed() < Duration::from_secs(3), "ports not back");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Closed for real: both ports can be bound again.
    std::net::UdpSocket::bind(ra).expect("public port closed");
    std::net::UdpSocket::bind(rb).expect("internal port closed");
}

#[test]
fn an_answer_governs_the_next_packet_without_waiting_for_the_worker() {
    // The answer only queues its command; the packet the caller sends right after must still
    // go to the address that answer names, because the worker applies commands before packets.
    let (relay, _ev) = start(config(22600, "127.0.0.1", "127.0.0.1"));
    for i in 0..20u16 {
        let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
        let call = CallKey::new(&format!("order-{i}@test"));
        let ((ra, _), _) = setup(&relay, &call, &a, &b);
        a.rtp
            .send_to(&rtp(i + 1, u32::from(i) * 160, 7, 1), ra)
            .unwrap();
        let got = drain(&b.rtp, Duration::from_millis(100));
        assert_eq!(
            got.len(),
            1,
            "round {i}: the first packet after the answer reaches B"
        );
        assert!(relay.delete(&call));
    }
}

/// A worker that the OS did not run for a while (CPU contention, a VM's stolen time) finds
/// more packets queued than it has buffers (io_uring: 512 per worker). Every packet still
/// arrives, in order, and the receives that ran out of buffers resume as the buffers come
/// back, a few at a time: re-armed all at once on every pass, most of them failed again at
/// once, and an overloaded relay spent its time on failed receives.
#[test]
fn a_backlog_larger_than_the_buffers_is_relayed_whole() {
    const CALLS: usize = 60;
    const PER_STREAM: u16 = 40; // 2,400 packets: over four times the buffers.
    let mut c = config(23000, "127.0.0.1", "127.0.0.1");
    c.public.ports = 23000..=23199;
    c.internal.ports = 23200..=23399;
    let (relay, _ev) = start(c);
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let (a, b) = (Peer::new("127.0.0.1"), Peer::new("127.0.0.1"));
        let call = CallKey::new(&format!("backlog-{i}@test"));
        let ((ra, _), _) = setup(&relay, &call, &a, &b);
        // Latch the phone's source.
        a.rtp.send_to(&rtp(0, 0, 0xa, 1), ra).unwrap();
        assert_eq!(recv_n(&b.rtp, 1, Duration::from_secs(2)).len(), 1);
        calls.push((call, a, b, ra));
    }
    relay.stall_workers(Duration::from_millis(500));
    for seq in 1..=PER_STREAM {
        for (_, a, _, ra) in &calls {
            a.rtp
                .send_to(&rtp(seq, u32::from(seq) * 160, 0xa, 2), *ra)
                .unwrap();
        }
    }
    for (call, _, b, _) in &calls {
        let got = recv_n(&b.rtp, usize::from(PER_STREAM), Duration::from_secs(5));
        assert_eq!(got.len(), usize::from(PER_STREAM), "{call:?}");
        for (i, (p, _)) in got.iter().enumerate() {
            assert_eq!(u16::from_be_bytes([p[2], p[3]]), i as u16 + 1, "order kept");
        }
    }
    let t = relay.totals();
    assert_eq!(t.dropped, 0);
    if relay.totals().uring_workers == 1 {
        // The backlog did outrun the buffers, and a starved receive was re-armed a few times,
        // not on every pass: here ~130 buffer waits, ~400 when every pass re-armed them all.
        assert!(t.buffer_waits > 0, "{t:?}");
        assert!(t.buffer_waits <= 4 * CALLS as u64, "{t:?}");
    } else {
        assert_eq!(t.buffer_waits, 0);
    }
}
