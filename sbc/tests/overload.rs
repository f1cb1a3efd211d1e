//! Overload protection end to end (`[limits] overload_queue_ms`): a real `sbc run` child
//! process is stopped with SIGSTOP while INVITEs arrive, so that they wait in its socket
//! queue as they do behind a saturated CPU. The trunk sends over UDP, TCP or TLS (the kernel
//! stamps datagrams and TCP segments alike); a raw UDP socket stands in for the PBX; the
//! admin endpoint's /metrics is read over a plain TCP connection.

mod common;

use bytes::Bytes;
use common::{eventually, free_port, invite, metric, signal, start_sbc, stop, Pbx};
use sbc_sip::message::Message;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The trunk's end of its connection to the SBC.
enum Link {
    Udp(UdpSocket, SocketAddr),
    Stream(Box<dyn Stream>, Vec<u8>),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

impl Link {
    /// Connects from 127.0.0.8 (the trunk's source address) to the SBC's `sip` listener.
    fn open(transport: &str, sip: SocketAddr, ca_pem: &str) -> (Link, SocketAddr) {
        if transport == "udp" {
            let s = UdpSocket::bind("127.0.0.8:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let me = s.local_addr().expect("addr");
            return (Link::Udp(s, sip), me);
        }
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let from: SocketAddr = "127.0.0.8:0".parse().expect("addr");
        sock.bind(&from.into()).expect("bind");
        sock.connect(&sip.into()).expect("connect");
        let tcp: TcpStream = sock.into();
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tcp.set_nodelay(true).expect("nodelay");
        let me = tcp.local_addr().expect("addr");
        if transport == "tcp" {
            return (Link::Stream(Box::new(tcp), Vec::new()), me);
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("sbc.test").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("tls");
        (
            Link::Stream(Box::new(rustls::StreamOwned::new(conn, tcp)), Vec::new()),
            me,
        )
    }

    fn send(&mut self, bytes: &[u8]) {
        match self {
            Link::Udp(s, to) => {
                s.send_to(bytes, *to).expect("send");
            }
            Link::Stream(s, _) => {
                s.write_all(bytes).expect("write");
                s.flush().expect("flush");
            }
        }
    }

    /// The next message within ~50 ms, if one comes.
    fn recv(&mut self) -> Option<Message> {
        match self {
            Link::Udp(s, _) => {
                let mut buf = vec![0u8; 65535];
                let (n, _) = s.recv_from(&mut buf).ok()?;
                Some(Message::parse(Bytes::copy_from_slice(&buf[..n])).expect("parse"))
            }
            Link::Stream(s, pending) => loop {
                if let Some(m) = take_message(pending) {
                    return Some(m);
                }
                let mut buf = [0u8; 16384];
                match s.read(&mut buf) {
                    Ok(0) => panic!("the SBC closed the connection"),
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(_) => return None,
                }
            },
        }
    }
}

/// Frames one message off the front of `pending` by its Content-Length.
fn take_message(pending: &mut Vec<u8>) -> Option<Message> {
    while pending.starts_with(b"\r\n") {
        pending.drain(..2);
    }
    let end = pending.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            matches!(name.trim(), "content-length" | "l").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    if pending.len() < end + len {
        return None;
    }
    let bytes: Vec<u8> = pending.drain(..end + len).collect();
    Some(Message::parse(Bytes::from(bytes)).expect("parse"))
}

/// A CA and a certificate for sbc.test it issued: (CA PEM, certificate PEM, key PEM).
fn pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["sbc.test".to_string()])
        .expect("params")
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("cert");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// The drill over `transport`, with the SBC's listener on `sip_ip`.
fn drill(transport: &str, sip_ip: &str) {
    let pbx = Pbx::start("127.0.0.7", false);
    let (sip_port, admin_port) = (free_port(sip_ip), free_port(sip_ip));
    let sip: SocketAddr = format!("{sip_ip}:{sip_port}").parse().expect("addr");
    let admin: SocketAddr = format!("{sip_ip}:{admin_port}").parse().expect("addr");
    let dir = std::env::temp_dir().join(format!("sbc-overload-{transport}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ca_pem, cert_pem, key_pem) = pki();
    let tls = if transport == "tls" {
        std::fs::write(dir.join("cert.pem"), &cert_pem).expect("cert");
        std::fs::write(dir.join("key.pem"), &key_pem).expect("key");
        "cert = \"cert.pem\"\nkey = \"key.pem\"\n"
    } else {
        ""
    };
    // The PBX is on UDP: a stream listener needs a UDP one beside it to reach it.
    let udp = if transport == "udp" {
        String::new()
    } else {
        let port = free_port(sip_ip);
        format!("[[listen]]\ntransport = \"udp\"\naddr = \"{sip_ip}:{port}\"\n")
    };
    let cfg = dir.join("sbc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listen]]\ntransport = \"{transport}\"\naddr = \"{sip}\"\n{tls}{udp}\n[[pool]]\nname = \"pbx\"\n\
             [[pool.node]]\nname = \"pbx-a\"\naddress = \"{}\"\n\n[[trunk]]\n\
             name = \"carrier\"\nsources = [\"127.0.0.8\"]\naddress = \"127.0.0.8:5099\"\n\
             pool = \"pbx\"\n\n[media]\nenabled = false\n\n[admin]\n\
             listen = \"{admin}\"\n\n[limits]\noverload_queue_ms = 100\n",
            pbx.addr
        ),
    )
    .expect("config");
    let sbc = start_sbc(&cfg);

    // A carrier trunk's calls toward the PBX.
    let via = transport.to_ascii_uppercase();
    let (mut trunk, me) = Link::open(transport, sip, &ca_pem);
    let passes = |trunk: &mut Link, cid: &str| {
        trunk.send(invite(&via, me, cid).as_bytes());
        eventually(
            &format!("INVITE {cid} at the PBX"),
            Duration::from_secs(5),
            || pbx.saw(cid),
        );
    };
    // Not overloaded: the INVITE reaches the PBX (over TLS, after the handshake).
    passes(&mut trunk, "before");

    // Stopped, as a saturated SBC is: these INVITEs wait in its socket queue.
    stop(&sbc.0);
    let stalled: Vec<String> = (0..5).map(|i| format!("stalled-{i}")).collect();
    for cid in &stalled {
        trunk.send(invite(&via, me, cid).as_bytes());
    }
    std::thread::sleep(Duration::from_millis(400));
    signal(&sbc.0, libc::SIGCONT);

    // Each gets a 503 with Retry-After, straight from the SBC; none reaches the PBX.
    let mut refused = Vec::new();
    let mut to_tag = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.len() < stalled.len() && Instant::now() < deadline {
        let Some(m) = trunk.recv() else {
            continue;
        };
        if m.status() == Some(503) {
            let text = String::from_utf8_lossy(m.as_bytes()).to_string();
            assert!(text.contains("\r\nRetry-After: 2\r\n"), "{text}");
            refused.push(String::from_utf8_lossy(m.call_id()).to_string());
            to_tag = String::from_utf8_lossy(m.to_tag().unwrap_or_default()).to_string();
        }
    }
    refused.sort();
    // The caller ACKs each 503 (RFC 3261 17.1.1.3); those ACKs end at the SBC too.
    for cid in &stalled {
        let ack = format!(
            "ACK sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/{via} {me};branch=z9hG4bK-{cid};rport\r\n\
             From: <sip:alice@pbx.test>;tag=a-{cid}\r\nTo: <sip:bob@pbx.test>;tag={to_tag}\r\nCall-ID: {cid}\r\n\
             CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        trunk.send(ack.as_bytes());
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(refused, stalled, "over {transport}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        stalled.iter().all(|c| !pbx.saw(c)),
        "a refused INVITE was forwarded"
    );

    // Caught up: the next INVITE passes again, and the refusals are counted.
    passes(&mut trunk, "after");
    assert_eq!(metric(admin, "sbc_overload_rejected_total"), Some(5.0));
    drop(sbc);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invites_that_waited_past_the_overload_limit_get_503_and_the_rest_pass() {
    drill("udp", "127.0.0.6");
}

#[test]
fn over_tcp_too() {
    drill("tcp", "127.0.0.9");
}

#[test]
fn over_tls_too() {
    drill("tls", "127.0.0.10");
}
