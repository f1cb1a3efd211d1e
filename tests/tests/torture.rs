//! RFC 4475 and RFC 5118 torture messages sent to a running SBC: each gets what the RFCs ask
//! of a proxy (forwarded, answered 400/416/420/483/505, or dropped), the SBC never panics,
//! and it still answers afterwards.
//!
//! Requests are sent from a configured trunk address so that valid ones are really
//! processed (routed to the PBX) rather than refused as coming from an unknown source.

use bytes::Bytes;
use sbc_sip::Message;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UdpSocket;

#[derive(Debug, PartialEq)]
enum Outcome {
    Forwarded,
    Answered(u16),
    Nothing,
}

/// What a proxy must do with each message.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Processed: forwarded, or answered with anything but 400/505.
    Processed,
    Status(u16),
    Dropped,
}

const CASES: &[(&str, Expect)] = &[
    ("rfc4475/wsinv.dat", Expect::Processed),
    ("rfc4475/intmeth.dat", Expect::Processed),
    ("rfc4475/esc01.dat", Expect::Processed),
    ("rfc4475/escnull.dat", Expect::Processed),
    ("rfc4475/esc02.dat", Expect::Processed),
    ("rfc4475/lwsdisp.dat", Expect::Processed),
    ("rfc4475/longreq.dat", Expect::Processed),
    ("rfc4475/dblreq.dat", Expect::Processed),
    ("rfc4475/semiuri.dat", Expect::Processed),
    ("rfc4475/transports.dat", Expect::Processed),
    ("rfc4475/mpart01.dat", Expect::Processed),
    // Responses matching no transaction of ours are dropped, never forwarded.
    ("rfc4475/unreason.dat", Expect::Dropped),
    ("rfc4475/noreason.dat", Expect::Dropped),
    ("rfc4475/badinv01.dat", Expect::Status(400)),
    ("rfc4475/clerr.dat", Expect::Status(400)),
    ("rfc4475/ncl.dat", Expect::Status(400)),
    ("rfc4475/scalar02.dat", Expect::Status(400)),
    ("rfc4475/scalarlg.dat", Expect::Dropped),
    ("rfc4475/quotbal.dat", Expect::Status(400)),
    ("rfc4475/ltgtruri.dat", Expect::Status(400)),
    ("rfc4475/lwsruri.dat", Expect::Status(400)),
    ("rfc4475/lwsstart.dat", Expect::Status(400)),
    ("rfc4475/trws.dat", Expect::Processed),
    ("rfc4475/escruri.dat", Expect::Status(400)),
    ("rfc4475/baddate.dat", Expect::Processed),
    ("rfc4475/regbadct.dat", Expect::Processed),
    ("rfc4475/badaspec.dat", Expect::Status(400)),
    ("rfc4475/baddn.dat", Expect::Status(400)),
    ("rfc4475/badvers.dat", Expect::Status(505)),
    ("rfc4475/mismatch01.dat", Expect::Status(400)),
    ("rfc4475/mismatch02.dat", Expect::Status(400)),
    ("rfc4475/bigcode.dat", Expect::Dropped),
    ("rfc4475/badbranch.dat", Expect::Processed),
    ("rfc4475/insuf.dat", Expect::Status(400)),
    ("rfc4475/unkscm.dat", Expect::Status(416)),
    ("rfc4475/novelsc.dat", Expect::Status(416)),
    ("rfc4475/unksm2.dat", Expect::Processed),
    ("rfc4475/bext01.dat", Expect::Status(420)),
    ("rfc4475/invut.dat", Expect::Processed),
    ("rfc4475/regaut01.dat", Expect::Processed),
    ("rfc4475/multi01.dat", Expect::Status(400)),
    ("rfc4475/mcl01.dat", Expect::Status(400)),
    // A 200 whose Via names the broadcast address: never sent there.
    ("rfc4475/bcast.dat", Expect::Dropped),
    ("rfc4475/zeromf.dat", Expect::Status(483)),
    ("rfc4475/cparam01.dat", Expect::Processed),
    ("rfc4475/cparam02.dat", Expect::Processed),
    ("rfc4475/regescrt.dat", Expect::Processed),
    ("rfc4475/sdp01.dat", Expect::Processed),
    ("rfc4475/inv2543.dat", Expect::Processed),
    // No header colon: nothing can be indexed to answer with; dropped (the RFC sets no
    // expectation for this extra archive file).
    ("rfc4475/test.dat", Expect::Dropped),
    ("rfc5118/crlf-ersip/ipv6-good.dat", Expect::Processed),
    ("rfc5118/crlf-ersip/ipv6-bad.dat", Expect::Status(400)),
    ("rfc5118/port-ambiguous.dat", Expect::Processed),
    ("rfc5118/port-unambiguous.dat", Expect::Processed),
    (
        "rfc5118/via-received-param-with-delim.dat",
        Expect::Processed,
    ),
    ("rfc5118/via-received-param-no-delim.dat", Expect::Processed),
    ("rfc5118/crlf-ersip/ipv6-in-sdp.dat", Expect::Processed),
    (
        "rfc5118/crlf-ersip/mult-ip-in-header.dat",
        Expect::Processed,
    ),
    ("rfc5118/crlf-ersip/mult-ip-in-sdp.dat", Expect::Processed),
    ("rfc5118/crlf-ersip/ipv4-mapped-ipv6.dat", Expect::Processed),
    (
        "rfc5118/crlf-ersip/ipv6-bug-abnf-3-colons.dat",
        Expect::Processed,
    ),
    (
        "rfc5118/crlf-ersip/ipv6-correct-abnf-2-colons.dat",
        Expect::Processed,
    ),
];

fn data(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/torture")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Call-ID of a raw message (even one that does not parse), to tell this case's traffic
/// from retransmissions of earlier ones.
fn call_id(raw: &[u8]) -> Vec<u8> {
    sbc_sip::edit::header_lines(raw)
        .into_iter()
        .find(|(n, _)| *n == sbc_sip::HeaderName::CallId)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn drain(s: &UdpSocket) {
    let mut b = [0u8; 65535];
    while s.try_recv_from(&mut b).is_ok() {}
}

fn raw_status(raw: &[u8]) -> Option<u16> {
    let code = raw.strip_prefix(b"SIP/2.0 ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

async fn outcome(trunk: &UdpSocket, pbx: &UdpSocket, cid: &[u8]) -> Outcome {
    let mut a = vec![0u8; 65535];
    let mut b = vec![0u8; 65535];
    let wait = Duration::from_millis(400);
    let mut result = Outcome::Nothing;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            r = trunk.recv_from(&mut a) => {
                let Ok((n, _)) = r else { continue };
                // Our 400s echo the offending headers, so they may not parse: read raw.
                let raw = &a[..n];
                if call_id(raw) != cid { continue }
                if let Some(s) = raw_status(raw) {
                    if s >= 200 || result == Outcome::Nothing {
                        result = Outcome::Answered(s);
                    }
                    if s >= 200 { return result; }
                }
            }
            r = pbx.recv_from(&mut b) => {
                let Ok((n, from)) = r else { continue };
                // Play a PBX that refuses everything, so transactions end.
                if let Ok(m) = Message::parse(Bytes::copy_from_slice(&b[..n])) {
                    if m.is_request() && m.method() != Some(sbc_sip::Method::Ack) {
                        let r = sbc_sip::edit::response(&m, 404, "Not Found", &Default::default());
                        let _ = pbx.send_to(&r, from).await;
                    }
                }
                if call_id(&b[..n]) == cid { return Outcome::Forwarded; }
            }
            _ = tokio::time::sleep_until(deadline) => return result,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_messages_through_a_running_sbc() {
    let trunk = UdpSocket::bind("127.0.0.20:0").await.unwrap();
    let pbx = UdpSocket::bind("127.0.0.21:0").await.unwrap();
    let cfg = format!(
        r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:0"
[[pool]]
name = "pbx"
[[pool.node]]
name = "a"
address = "{}"
[[trunk]]
name = "torture"
sources = ["127.0.0.20"]
address = "{}"
[phones]
sources = ["127.0.0.0/8"]
# Several torture messages reuse one branch; short timers let each transaction end before
# the next message, so none is taken for a retransmission of another.
[timers]
t1_ms = 2
t2_ms = 40
t4_ms = 10
"#,
        pbx.local_addr().unwrap(),
        trunk.local_addr().unwrap()
    );
    let cfg = sbc_config::parse(&cfg, Path::new("torture.toml")).unwrap();
    let sbc = sbc::Sbc::start(&cfg).await.unwrap();
    let addr = sbc.addr(sbc_sip::Transport::Udp).unwrap();

    let mut wrong = Vec::new();
    for (file, expect) in CASES {
        let raw = data(file);
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain(&trunk);
        drain(&pbx);
        trunk.send_to(&raw, addr).await.unwrap();
        let got = outcome(&trunk, &pbx, &call_id(&raw)).await;
        let ok = match expect {
            Expect::Processed => {
                matches!(got, Outcome::Forwarded)
                    || matches!(got, Outcome::Answered(s) if s != 400 && s != 505 && s >= 200)
            }
            Expect::Status(s) => got == Outcome::Answered(*s),
            Expect::Dropped => got == Outcome::Nothing,
        };
        if !ok {
            wrong.push(format!("{file}: expected {expect:?}, got {got:?}"));
        }
    }
    // Still alive and answering.
    let opt = format!(
        "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20;branch=z9hG4bKalive\r\nFrom: <sip:t@x>;tag=1\r\nTo: <sip:{addr}>\r\nCall-ID: alive\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    trunk.send_to(opt.as_bytes(), addr).await.unwrap();
    assert_eq!(
        outcome(&trunk, &pbx, b"alive").await,
        Outcome::Answered(200)
    );
    sbc.shutdown();
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}
