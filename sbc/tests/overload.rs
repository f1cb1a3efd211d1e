//! Overload protection end to end (`[limits] overload_queue_ms`): a real `sbc run` child
//! process is stopped with SIGSTOP while INVITEs arrive, so that they wait in its socket
//! queue as they do behind a saturated CPU. Raw UDP sockets stand in for a trunk and the
//! PBX; the admin endpoint's /metrics is read over a plain TCP connection.

use bytes::Bytes;
use parking_lot::Mutex;
use sbc_sip::message::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port(ip: &str) -> u16 {
    let s = UdpSocket::bind(format!("{ip}:0")).expect("bind");
    let t = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    // A port free for both (the SIP socket is UDP, the admin endpoint TCP).
    let _ = t;
    s.local_addr().expect("addr").port()
}

/// A PBX node: answers OPTIONS 200 (so the SBC sees it Up) and records the Call-ID of every
/// INVITE that reaches it, and the method of anything else.
struct Pbx {
    addr: SocketAddr,
    invites: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Pbx {
    fn start(ip: &str) -> Pbx {
        let s = UdpSocket::bind(format!("{ip}:0")).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = s.local_addr().expect("addr");
        let invites = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (invites.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) else {
                    continue;
                };
                match m.method() {
                    Some(sbc_sip::Method::Options) => {
                        let r = sbc_sip::edit::response(
                            &m,
                            200,
                            "OK",
                            &sbc_sip::edit::ResponseOpts {
                                to_tag: Some(b"pbx"),
                                ..Default::default()
                            },
                        );
                        let _ = s.send_to(&r, from);
                    }
                    Some(sbc_sip::Method::Invite) => {
                        let cid = String::from_utf8_lossy(m.call_id()).to_string();
                        seen.lock().push(cid);
                    }
                    Some(other) => {
                        seen.lock().push(format!("{other:?}"));
                    }
                    None => {}
                }
            }
        });
        Pbx {
            addr,
            invites,
            stop,
        }
    }

    fn saw(&self, call_id: &str) -> bool {
        self.invites.lock().iter().any(|c| c == call_id)
    }
}

impl Drop for Pbx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Sbc(Child);

impl Drop for Sbc {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid; a stopped child must be continued to
        // die of the kill that follows.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// Stops the child and returns once every one of its threads is stopped: kill(2) returns
/// before a thread running on another core has taken the signal, and on a busy machine that
/// thread could still read the datagrams sent next.
fn stop(child: &Child) {
    signal(child, libc::SIGSTOP);
    let tasks = format!("/proc/{}/task", child.id());
    eventually(
        "every thread of the SBC stopped",
        Duration::from_secs(5),
        || {
            std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.filter_map(Result::ok).all(|t| {
                    // The state follows the ")" that closes the command name.
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                        st.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                    })
                })
            })
        },
    );
}

fn invite(phone: SocketAddr, call_id: &str) -> String {
    let p = phone.port();
    format!(
        "INVITE sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {phone};branch=z9hG4bK-{call_id};rport\r\n\
         From: <sip:alice@pbx.test>;tag=a-{call_id}\r\nTo: <sip:bob@pbx.test>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:alice@127.0.0.8:{p}>\r\nMax-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn eventually(what: &str, wait: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut c = TcpStream::connect(admin).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: sbc\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    c.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn invites_that_waited_past_the_overload_limit_get_503_and_the_rest_pass() {
    let pbx = Pbx::start("127.0.0.7");
    let (sip_port, admin_port) = (free_port("127.0.0.6"), free_port("127.0.0.6"));
    let sip: SocketAddr = format!("127.0.0.6:{sip_port}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.6:{admin_port}").parse().expect("addr");
    let dir = std::env::temp_dir().join(format!("sbc-overload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("sbc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listen]]\ntransport = \"udp\"\naddr = \"{sip}\"\n\n[[pool]]\nname = \"pbx\"\n\
             [[pool.node]]\nname = \"pbx-a\"\naddress = \"{}\"\n\n[[trunk]]\n\
             name = \"carrier\"\nsources = [\"127.0.0.8\"]\naddress = \"127.0.0.8:5099\"\n\
             pool = \"pbx\"\n\n[media]\nenabled = false\n\n[admin]\n\
             listen = \"{admin}\"\n\n[limits]\noverload_queue_ms = 100\n",
            pbx.addr
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sbc"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SBC_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sbc");
    // The log goes to stdout.
    let stdout = child.stdout.take().expect("stdout");
    let sbc = Sbc(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("sbc running")) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => log.push(line),
            Err(_) => panic!("sbc did not start:\n{}", log.join("\n")),
        }
    }

    // A carrier trunk's calls toward the PBX.
    let phone = UdpSocket::bind("127.0.0.8:0").expect("bind");
    phone
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let me = phone.local_addr().expect("addr");
    let passes = |cid: &str| {
        phone
            .send_to(invite(me, cid).as_bytes(), sip)
            .expect("send");
        eventually(
            &format!("INVITE {cid} at the PBX"),
            Duration::from_secs(5),
            || pbx.saw(cid),
        );
    };
    // Not overloaded: the INVITE reaches the PBX.
    passes("before");

    // Stopped, as a saturated SBC is: these INVITEs wait in its socket queue.
    stop(&sbc.0);
    let stalled: Vec<String> = (0..5).map(|i| format!("stalled-{i}")).collect();
    for cid in &stalled {
        phone
            .send_to(invite(me, cid).as_bytes(), sip)
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(400));
    signal(&sbc.0, libc::SIGCONT);

    // Each gets a 503 with Retry-After, straight from the SBC; none reaches the PBX.
    let mut refused = Vec::new();
    let mut to_tag = String::new();
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.len() < stalled.len() && Instant::now() < deadline {
        let Ok((n, _)) = phone.recv_from(&mut buf) else {
            continue;
        };
        let m = Message::parse(Bytes::copy_from_slice(&buf[..n])).expect("parse");
        if m.status() == Some(503) {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.contains("\r\nRetry-After: 2\r\n"), "{text}");
            refused.push(String::from_utf8_lossy(m.call_id()).to_string());
            to_tag = String::from_utf8_lossy(m.to_tag().unwrap_or_default()).to_string();
        }
    }
    refused.sort();
    // The caller ACKs each 503 (RFC 3261 17.1.1.3); those ACKs end at the SBC too.
    for cid in &stalled {
        let ack = format!(
            "ACK sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{cid};rport\r\n\
             From: <sip:alice@pbx.test>;tag=a-{cid}\r\nTo: <sip:bob@pbx.test>;tag={to_tag}\r\nCall-ID: {cid}\r\n\
             CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        phone.send_to(ack.as_bytes(), sip).expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(refused, stalled);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        stalled.iter().all(|c| !pbx.saw(c)),
        "a refused INVITE was forwarded"
    );

    // Caught up: the next INVITE passes again, and the refusals are counted.
    passes("after");
    assert_eq!(metric(admin, "sbc_overload_rejected_total"), Some(5.0));
    drop(sbc);
    let _ = std::fs::remove_dir_all(&dir);
}
