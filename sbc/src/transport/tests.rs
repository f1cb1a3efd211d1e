//! Transport tests over real sockets on loopback (port 0 everywhere).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sbc_sip::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::*;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Ev {
    Msg(Inbound),
    Closed(Flow),
    SendErr(Dest, Bytes, String),
}

struct TestHandler(mpsc::UnboundedSender<Ev>);

impl Handler for TestHandler {
    fn on_message(&self, msg: Inbound) {
        let _ = self.0.send(Ev::Msg(msg));
    }
    fn on_flow_closed(&self, flow: &Flow) {
        let _ = self.0.send(Ev::Closed(*flow));
    }
    fn on_send_error(&self, dest: &Dest, data: &Bytes, err: &SendError) {
        let _ = self
            .0
            .send(Ev::SendErr(dest.clone(), data.clone(), err.to_string()));
    }
}

struct Events(mpsc::UnboundedReceiver<Ev>);

impl Events {
    async fn next(&mut self) -> Ev {
        tokio::time::timeout(WAIT, self.0.recv())
            .await
            .expect("timed out waiting for a transport event")
            .expect("handler dropped")
    }

    async fn msg(&mut self) -> Inbound {
        match self.next().await {
            Ev::Msg(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn closed(&mut self) -> Flow {
        match self.next().await {
            Ev::Closed(f) => f,
            other => panic!("expected flow closed, got {other:?}"),
        }
    }

    fn none_pending(&mut self) {
        if let Ok(ev) = self.0.try_recv() {
            panic!("unexpected event {ev:?}");
        }
    }
}

fn cfg() -> TransportConfig {
    TransportConfig {
        max_message_size: 4096,
        idle_timeout: Duration::from_secs(30),
        message_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        tls_handshake_timeout: Duration::from_secs(2),
        max_connections: 100,
        max_connections_per_source: 10,
        tls_client: client_tls(&[]).expect("client tls"),
    }
}

fn spec(transport: Transport, addr: &str) -> ListenerSpec {
    ListenerSpec {
        transport,
        addr: addr.parse().expect("addr"),
        tls: None,
    }
}

async fn start(specs: Vec<ListenerSpec>, cfg: TransportConfig) -> (Arc<Transports>, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let t = Transports::start(specs, cfg, Arc::new(TestHandler(tx)))
        .await
        .expect("start");
    (t, Events(rx))
}

fn addr_of(t: &Transports, transport: Transport) -> SocketAddr {
    t.local_addrs()
        .into_iter()
        .find(|(tr, _)| *tr == transport)
        .map(|(_, a)| a)
        .expect("listener")
}

fn sip(method: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK{}\r\nContent-Length: {}\r\n\r\n{body}",
        method.len(),
        body.len()
    )
    .into_bytes()
}

/// Reads until the peer closes; true if it did within the wait (EOF or reset).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "sbc-transport-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn transport_udp_round_trip_both_ways() {
    let (t, mut ev) = start(vec![spec(Transport::Udp, "127.0.0.1:0")], cfg()).await;
    let local = addr_of(&t, Transport::Udp);
    assert_ne!(local.port(), 0);
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let peer_addr = peer.local_addr().expect("addr");

    let req = sip("OPTIONS", "");
    peer.send_to(&req, local).await.expect("send");
    let m = ev.msg().await;
    assert_eq!(&m.data[..], &req[..]);
    assert_eq!(
        m.flow,
        Flow {
            transport: Transport::Udp,
            local,
            remote: peer_addr,
            conn: None
        }
    );

    // Reply over the flow.
    let flow = t
        .send(
            &Dest::Flow(m.flow),
            Bytes::from_static(b"SIP/2.0 200 OK\r\n\r\n"),
        )
        .expect("send");
    assert_eq!(flow, m.flow);
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .expect("timeout")
        .expect("recv");
    assert_eq!(from, local);
    assert_eq!(&buf[..n], b"SIP/2.0 200 OK\r\n\r\n");

    // A new request by address.
    let dest = Dest::Addr {
        transport: Transport::Udp,
        remote: peer_addr,
        server_name: None,
    };
    let flow = t
        .send(&dest, Bytes::from(sip("INVITE", "x")))
        .expect("send");
    assert_eq!(flow.local, local);
    let (n, _) = tokio::time::timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .expect("timeout")
        .expect("recv");
    assert_eq!(&buf[..n], &sip("INVITE", "x")[..]);

    // No IPv6 UDP socket to send from.
    let v6 = Dest::Addr {
        transport: Transport::Udp,
        remote: "[::1]:5060".parse().expect("addr"),
        server_name: None,
    };
    assert!(matches!(
        t.send(&v6, Bytes::from_static(b"x")),
        Err(SendError::NoListener(Transport::Udp))
    ));
    t.shutdown();
}

#[tokio::test]
async fn transport_udp_keepalives_and_oversize_are_dropped() {
    let mut c = cfg();
    c.max_message_size = 200;
    let (t, mut ev) = start(vec![spec(Transport::Udp, "127.0.0.1:0")], c).await;
    let local = addr_of(&t, Transport::Udp);
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    peer.send_to(b"\r\n\r\n", local).await.expect("send");
    peer.send_to(&[b'x'; 300], local).await.expect("send");
    let small = sip("OPTIONS", "");
    peer.send_to(&small, local).await.expect("send");
    let m = ev.msg().await;
    assert_eq!(&m.data[..], &small[..]);
    ev.none_pending();
}

#[tokio::test]
async fn transport_udp_ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let (t, mut ev) = start(
        vec![
            spec(Transport::Udp, "127.0.0.1:0"),
            spec(Transport::Udp, "[::1]:0"),
        ],
        cfg(),
    )
    .await;
    let local6 = t
        .local_addrs()
        .into_iter()
        .find(|(_, a)| a.is_ipv6())
        .map(|(_, a)| a)
        .expect("v6 listener");
    let peer = UdpSocket::bind("[::1]:0").await.expect("bind");
    let req = sip("OPTIONS", "");
    peer.send_to(&req, local6).await.expect("send");
    let m = ev.msg().await;
    assert_eq!(m.flow.local, local6);
    assert_eq!(m.flow.remote, peer.local_addr().expect("addr"));

    let dest = Dest::Addr {
        transport: Transport::Udp,
        remote: m.flow.remote,
        server_name: None,
    };
    let flow = t.send(&dest, Bytes::from_static(b"hello")).expect("send");
    assert_eq!(flow.local, local6, "picked the IPv6 socket");
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(WAIT, peer.recv_from(&mut buf))
        .await
        .expect("timeout")
        .expect("recv");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from, local6);
}

#[tokio::test]
async fn transport_tcp_split_pipelined_and_reply() {
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], cfg()).await;
    let addr = addr_of(&t, Transport::Tcp);
    let mut c = TcpStream::connect(addr).await.expect("connect");

    let invite = sip("INVITE", "v=0\r\n\r\nbody");
    for chunk in invite.chunks(7) {
        c.write_all(chunk).await.expect("write");
        c.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let m = ev.msg().await;
    assert_eq!(&m.data[..], &invite[..]);
    assert_eq!(m.flow.transport, Transport::Tcp);
    assert_eq!(m.flow.local, addr);
    assert_eq!(m.flow.remote, c.local_addr().expect("addr"));
    let conn = m.flow.conn.expect("conn id");

    let (a, b) = (sip("ACK", ""), sip("BYE", ""));
    let mut both = a.clone();
    both.extend_from_slice(&b);
    c.write_all(&both).await.expect("write");
    let m1 = ev.msg().await;
    let m2 = ev.msg().await;
    assert_eq!(&m1.data[..], &a[..]);
    assert_eq!(&m2.data[..], &b[..]);
    assert_eq!(m1.flow, m.flow);
    assert_eq!(m2.flow.conn, Some(conn));

    let reply = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n";
    let flow = t
        .send(&Dest::Flow(m.flow), Bytes::from_static(reply))
        .expect("send");
    assert_eq!(flow, m.flow);
    assert_eq!(read_exact_timeout(&mut c, reply.len()).await, reply);
    assert_eq!(t.connection_count(), 1);

    drop(c);
    assert_eq!(ev.closed().await, m.flow);
    assert_eq!(t.connection_count(), 0);
    assert!(matches!(
        t.send(&Dest::Flow(m.flow), Bytes::from_static(reply)),
        Err(SendError::FlowGone)
    ));
}

#[tokio::test]
async fn transport_tcp_crlf_ping_answered() {
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], cfg()).await;
    let mut c = TcpStream::connect(addr_of(&t, Transport::Tcp))
        .await
        .expect("connect");
    c.write_all(b"\r\n\r\n").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 2).await, b"\r\n");
    // Still usable after the keep-alive.
    let req = sip("OPTIONS", "");
    c.write_all(&req).await.expect("write");
    assert_eq!(&ev.msg().await.data[..], &req[..]);
}

#[tokio::test]
async fn transport_tcp_oversize_message_closes_connection() {
    let mut c = cfg();
    c.max_message_size = 512;
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], c).await;
    let mut s = TcpStream::connect(addr_of(&t, Transport::Tcp))
        .await
        .expect("connect");
    let mut big = b"INVITE sip:a@b SIP/2.0\r\n".to_vec();
    while big.len() < 600 {
        big.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    s.write_all(&big).await.expect("write");
    assert!(closed_by_peer(&mut s).await);
    ev.closed().await;
    assert_eq!(t.connection_count(), 0);

    // A message without Content-Length is a framing error too.
    let mut s = TcpStream::connect(addr_of(&t, Transport::Tcp))
        .await
        .expect("connect");
    s.write_all(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n")
        .await
        .expect("write");
    assert!(closed_by_peer(&mut s).await);
    ev.closed().await;
    ev.none_pending();
}

#[tokio::test]
async fn transport_tcp_idle_timeout_closes() {
    let mut c = cfg();
    c.idle_timeout = Duration::from_millis(300);
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], c).await;
    let mut s = TcpStream::connect(addr_of(&t, Transport::Tcp))
        .await
        .expect("connect");
    let req = sip("OPTIONS", "");
    s.write_all(&req).await.expect("write");
    let m = ev.msg().await;
    let started = tokio::time::Instant::now();
    assert!(closed_by_peer(&mut s).await);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(ev.closed().await, m.flow);
    assert_eq!(t.connection_count(), 0);
}

/// A slow sender trickling a message a byte at a time, each byte well inside the idle
/// timeout, is cut off at the message timeout; a fast one on another connection is not.
#[tokio::test]
async fn transport_tcp_slow_sender_is_cut_off() {
    let mut c = cfg();
    c.idle_timeout = Duration::from_secs(30);
    c.message_timeout = Duration::from_millis(1000);
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], c).await;
    let addr = addr_of(&t, Transport::Tcp);
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let req = sip("OPTIONS", "");
    let started = tokio::time::Instant::now();
    let mut cut = false;
    for b in &req {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    assert!(
        cut || closed_by_peer(&mut slow).await,
        "slow sender still connected"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // The whole message never arrived.
    let _ = ev.closed().await;
    let mut fast = TcpStream::connect(addr).await.expect("connect");
    fast.write_all(&req).await.expect("write");
    let m = ev.msg().await;
    assert_eq!(m.data.as_ref(), &req[..]);
}

#[tokio::test]
async fn transport_dest_addr_reuses_inbound_connection() {
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], cfg()).await;
    let mut c = TcpStream::connect(addr_of(&t, Transport::Tcp))
        .await
        .expect("connect");
    c.write_all(&sip("REGISTER", "")).await.expect("write");
    let m = ev.msg().await;

    let dest = Dest::Addr {
        transport: Transport::Tcp,
        remote: c.local_addr().expect("addr"),
        server_name: None,
    };
    let req = sip("INVITE", "");
    let flow = t.send(&dest, Bytes::from(req.clone())).expect("send");
    assert_eq!(flow, m.flow);
    assert_eq!(t.connection_count(), 1);
    assert_eq!(read_exact_timeout(&mut c, req.len()).await, req);
}

#[tokio::test]
async fn transport_outbound_tcp_between_two_instances() {
    let (server, mut sev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], cfg()).await;
    let (client, mut cev) = start(vec![], cfg()).await;
    let dest = Dest::Addr {
        transport: Transport::Tcp,
        remote: addr_of(&server, Transport::Tcp),
        server_name: None,
    };
    // Two sends before the connect can have finished share one connection.
    let f1 = client
        .send(&dest, Bytes::from(sip("INVITE", "1")))
        .expect("send");
    let f2 = client
        .send(&dest, Bytes::from(sip("INVITE", "22")))
        .expect("send");
    assert_eq!(f1, f2);
    assert!(f1.local.ip().is_unspecified());
    assert_eq!(client.connection_count(), 1);

    let m1 = sev.msg().await;
    let m2 = sev.msg().await;
    assert_eq!(&m1.data[..], &sip("INVITE", "1")[..]);
    assert_eq!(&m2.data[..], &sip("INVITE", "22")[..]);

    let resp = b"SIP/2.0 100 Trying\r\nl: 0\r\n\r\n";
    server
        .send(&Dest::Flow(m1.flow), Bytes::from_static(resp))
        .expect("reply");
    let r = cev.msg().await;
    assert_eq!(&r.data[..], resp);
    assert_eq!(r.flow, f1, "flow stays equal for the connection's life");

    server.shutdown();
    assert_eq!(sev.closed().await, m1.flow);
    assert_eq!(cev.closed().await, f1);
    assert!(matches!(
        server.send(&Dest::Flow(m1.flow), Bytes::from_static(resp)),
        Err(SendError::Shutdown)
    ));
}

#[tokio::test]
async fn transport_outbound_connect_refused_reports_send_error() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (t, mut ev) = start(vec![], cfg()).await;
    let dest = Dest::Addr {
        transport: Transport::Tcp,
        remote: closed_port,
        server_name: None,
    };
    let flow = t.send(&dest, Bytes::from_static(b"one")).expect("send");
    // Queued behind the first while connecting: reported too.
    let flow2 = t.send(&dest, Bytes::from_static(b"two")).expect("send");
    assert_eq!(flow, flow2);
    for expected in [&b"one"[..], &b"two"[..]] {
        match ev.next().await {
            Ev::SendErr(d, data, _err) => {
                assert_eq!(&data[..], expected);
                assert!(matches!(d, Dest::Addr { remote, .. } if remote == closed_port));
            }
            other => panic!("expected send error, got {other:?}"),
        }
    }
    assert_eq!(ev.closed().await, flow);
    assert_eq!(t.connection_count(), 0);
}

#[tokio::test]
async fn transport_per_source_limit_refuses_extra_connection() {
    let mut c = cfg();
    c.max_connections_per_source = 2;
    let (t, mut ev) = start(vec![spec(Transport::Tcp, "127.0.0.1:0")], c).await;
    let addr = addr_of(&t, Transport::Tcp);
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&sip("OPTIONS", "")).await.expect("write");
        ev.msg().await;
        kept.push(s);
    }
    assert_eq!(t.connection_count(), 2);
    let mut third = TcpStream::connect(addr).await.expect("connect");
    assert!(closed_by_peer(&mut third).await);
    assert_eq!(t.connection_count(), 2);
    ev.none_pending();

    // Freed slots are reusable.
    drop(kept.pop());
    ev.closed().await;
    let mut again = TcpStream::connect(addr).await.expect("connect");
    again.write_all(&sip("OPTIONS", "")).await.expect("write");
    ev.msg().await;
    assert_eq!(t.connection_count(), 2);
}

struct TlsFiles {
    _dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn self_signed(tag: &str) -> TlsFiles {
    let dir = TempDir::new(tag);
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let cert_path = dir.0.join("cert.pem");
    let key_path = dir.0.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    TlsFiles {
        _dir: dir,
        cert: cert_path,
        key: key_path,
    }
}

#[tokio::test]
async fn transport_tls_round_trip() {
    let files = self_signed("tls");
    let server_tls = load_server_tls(&files.cert, &files.key).expect("server tls");
    let (server, mut sev) = start(
        vec![ListenerSpec {
            transport: Transport::Tls,
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls: Some(server_tls),
        }],
        cfg(),
    )
    .await;
    let mut ccfg = cfg();
    ccfg.tls_client = client_tls(std::slice::from_ref(&files.cert)).expect("client tls");
    let (client, mut cev) = start(vec![], ccfg).await;
    let remote = addr_of(&server, Transport::Tls);

    // By name, then by IP (a separate connection: a TLS connection is only reused for the
    // name it was verified against, and the IP-addressed one is verified against the IP SAN).
    let by_name = Dest::Addr {
        transport: Transport::Tls,
        remote,
        server_name: Some(Arc::from("localhost")),
    };
    let req = sip("OPTIONS", "tls");
    let flow = client
        .send(&by_name, Bytes::from(req.clone()))
        .expect("send");
    assert_eq!(flow.transport, Transport::Tls);
    let m = sev.msg().await;
    assert_eq!(&m.data[..], &req[..]);
    assert_eq!(m.flow.transport, Transport::Tls);

    let resp = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n";
    server
        .send(&Dest::Flow(m.flow), Bytes::from_static(resp))
        .expect("reply");
    let r = cev.msg().await;
    assert_eq!(&r.data[..], resp);
    assert_eq!(r.flow, flow);

    let by_ip = Dest::Addr {
        transport: Transport::Tls,
        remote,
        server_name: None,
    };
    let flow_ip = client.send(&by_ip, Bytes::from(req.clone())).expect("send");
    assert_eq!(
        flow_ip, flow,
        "no name asked for: the open connection is reused"
    );
    assert_eq!(&sev.msg().await.data[..], &req[..]);
    assert_eq!(client.connection_count(), 1);
}

#[tokio::test]
async fn transport_tls_untrusted_certificate_reports_send_error() {
    let files = self_signed("tls-untrusted");
    let server_tls = load_server_tls(&files.cert, &files.key).expect("server tls");
    let (server, mut sev) = start(
        vec![ListenerSpec {
            transport: Transport::Tls,
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls: Some(server_tls),
        }],
        cfg(),
    )
    .await;
    let (client, mut cev) = start(vec![], cfg()).await;
    let dest = Dest::Addr {
        transport: Transport::Tls,
        remote: addr_of(&server, Transport::Tls),
        server_name: Some(Arc::from("localhost")),
    };
    let flow = client.send(&dest, Bytes::from_static(b"x")).expect("send");
    match cev.next().await {
        Ev::SendErr(_, data, err) => {
            assert_eq!(&data[..], b"x");
            assert!(err.contains("TLS handshake"), "{err}");
        }
        other => panic!("expected send error, got {other:?}"),
    }
    assert_eq!(cev.closed().await, flow);
    // The server never announced the failed inbound handshake.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sev.none_pending();
    assert!(matches!(
        client.send(
            &Dest::Addr {
                transport: Transport::Tls,
                remote: addr_of(&server, Transport::Tls),
                server_name: Some(Arc::from("not a name!")),
            },
            Bytes::from_static(b"x")
        ),
        Err(SendError::BadServerName(_))
    ));
}

#[tokio::test]
async fn transport_start_rejects_bad_listener_specs() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let r = Transports::start(
        vec![spec(Transport::Tls, "127.0.0.1:0")],
        cfg(),
        Arc::new(TestHandler(tx)),
    )
    .await;
    assert!(r.is_err(), "TLS listener without a server config");
}

#[test]
fn transport_tls_loading_errors() {
    let files = self_signed("tls-errors");
    assert!(load_server_tls(&files.cert, &files.key).is_ok());
    assert!(matches!(
        load_server_tls(&files.cert, &files.cert),
        Err(TlsError::NoPrivateKey(_))
    ));
    assert!(matches!(
        load_server_tls(&files.key, &files.key),
        Err(TlsError::NoCertificate(_))
    ));
    assert!(matches!(
        client_tls(&[files.cert.with_file_name("missing.pem")]),
        Err(TlsError::Read { .. })
    ));
}

/// A handler that panics on a poisoned message must not take the caller down with it.
#[test]
fn transport_a_panicking_handler_costs_one_message() {
    struct Fragile(std::sync::atomic::AtomicUsize);
    impl Handler for Fragile {
        fn on_message(&self, msg: Inbound) {
            if msg.data.starts_with(b"boom") {
                panic!("poisoned message");
            }
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let h = Fragile(std::sync::atomic::AtomicUsize::new(0));
    let flow = Flow {
        transport: Transport::Udp,
        local: "127.0.0.1:5060".parse().unwrap(),
        remote: "127.0.0.1:5062".parse().unwrap(),
        conn: None,
    };
    let msg = |d: &'static [u8]| Inbound {
        flow,
        data: Bytes::from_static(d),
        received_at: std::time::Instant::now(),
        queued: std::time::Duration::ZERO,
    };
    super::deliver(&h, msg(b"ok"));
    super::deliver(&h, msg(b"boom"));
    super::deliver(&h, msg(b"ok again"));
    assert_eq!(h.0.load(std::sync::atomic::Ordering::Relaxed), 2);
}
