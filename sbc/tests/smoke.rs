//! Quick proxy checks with raw UDP sockets standing in for a phone and a PBX.

use bytes::Bytes;
use sbc_sip::message::{HeaderName, Message};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::UdpSocket;

async fn recv(s: &UdpSocket) -> (Message, SocketAddr) {
    let mut buf = vec![0u8; 65535];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
        .await
        .expect("timeout")
        .expect("recv");
    buf.truncate(n);
    let m = Message::parse(Bytes::from(buf)).expect("parse");
    if m.method() == Some(sbc_sip::Method::Options) {
        // A health probe of the SBC's; not part of this script.
        return Box::pin(recv(s)).await;
    }
    (m, from)
}

fn reply(req: &Message, status: u16, extra: &str) -> Vec<u8> {
    sbc_sip::edit::response(
        req,
        status,
        "X",
        &sbc_sip::edit::ResponseOpts {
            to_tag: Some(b"t1"),
            extra: extra.as_bytes(),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_pbx_calls_phone_over_the_flow() {
    let pbx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = format!(
        "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n[[pool.node]]\nname = \"a\"\naddress = \"{}\"\n[phones]\nsources = [\"127.0.0.0/8\"]\n",
        pbx.local_addr().unwrap()
    );
    let cfg = sbc_config::parse(&cfg, Path::new("smoke.toml")).unwrap();
    let sbc = sbc::Sbc::start(&cfg).await.unwrap();
    let sbc_addr = sbc.addr(sbc_sip::Transport::Udp).unwrap();
    let p = phone.local_addr().unwrap().port();
    let reg = format!("REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKr1;rport\r\nFrom: <sip:alice@pbx.test>;tag=f1\r\nTo: <sip:alice@pbx.test>\r\nCall-ID: reg1\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.1.1.1:5060>\r\nExpires: 300\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    phone.send_to(reg.as_bytes(), sbc_addr).await.unwrap();
    let (fwd, from) = recv(&pbx).await;
    assert_eq!(from, sbc_addr);
    let path = String::from_utf8_lossy(fwd.header_value(HeaderName::Path).unwrap()).to_string();
    assert!(path.contains(";lr"), "{path}");
    // Topology hiding: the PBX sees the SBC's Via only, and an alias of the phone's Contact.
    assert_eq!(fwd.via_count(), 1);
    let contact = String::from_utf8_lossy(fwd.header_value(HeaderName::Contact).unwrap());
    assert!(
        contact.contains(";sbcc=") && !contact.contains("10.1.1.1"),
        "{contact}"
    );
    assert_eq!(fwd.max_forwards(), Some(69));
    let ok = reply(
        &fwd,
        200,
        "Contact: <sip:alice@10.1.1.1:5060>;expires=300\r\n",
    );
    pbx.send_to(&ok, sbc_addr).await.unwrap();
    let (r, _) = recv(&phone).await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.via_count(), 1);

    // The PBX calls alice through the Path.
    let route = path.trim().to_string();
    let pp = pbx.local_addr().unwrap().port();
    let inv = format!("INVITE sip:alice@10.1.1.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{pp};branch=z9hG4bKi1\r\nRoute: {route}\r\nFrom: <sip:bob@pbx.test>;tag=b1\r\nTo: <sip:alice@pbx.test>\r\nCall-ID: call1\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@127.0.0.1:{pp}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    pbx.send_to(inv.as_bytes(), sbc_addr).await.unwrap();
    let (t, _) = recv(&pbx).await;
    assert_eq!(t.status(), Some(100));
    let (inv_in, from) = recv(&phone).await;
    assert_eq!(from, sbc_addr);
    assert!(
        inv_in.header(HeaderName::Route).is_none(),
        "our Route popped"
    );
    assert!(inv_in.header(HeaderName::RecordRoute).is_some());
    phone
        .send_to(&reply(&inv_in, 486, ""), sbc_addr)
        .await
        .unwrap();
    let (busy, _) = recv(&pbx).await;
    assert_eq!(busy.status(), Some(486));
    // The SBC ACKs the 486 hop by hop.
    let (ack, _) = recv(&phone).await;
    assert_eq!(ack.method(), Some(sbc_sip::Method::Ack));

    // Unknown source other than REGISTER gets 403.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sp = stranger.local_addr().unwrap().port();
    let opt = format!("INVITE sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{sp};branch=z9hG4bKs1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:bob@pbx.test>\r\nCall-ID: s1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    stranger.send_to(opt.as_bytes(), sbc_addr).await.unwrap();
    let (r, _) = recv(&stranger).await;
    assert_eq!(r.status(), Some(403));
    sbc.shutdown();
}
