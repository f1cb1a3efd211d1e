//! What the tests that run a real `sbc run` child process share: the child and its
//! signals, a scripted UDP PBX, and small waits and probes.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use bytes::Bytes;
use parking_lot::Mutex;
use sbc_sip::message::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn free_port(ip: &str) -> u16 {
    let s = UdpSocket::bind(format!("{ip}:0")).expect("bind");
    let t = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    // A port free for both (the SIP socket is UDP, the admin endpoint TCP).
    let _ = t;
    s.local_addr().expect("addr").port()
}

/// A PBX node: answers OPTIONS 200 (so the SBC sees it Up) and records the Call-ID of every
/// INVITE that reaches it (and the method of anything else); with `ring`, it answers each
/// INVITE 180 at once and leaves the final to [`Pbx::respond`].
pub struct Pbx {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
}

/// What reached the PBX: an INVITE's Call-ID with the request and its source, or another
/// method's name.
type Seen = (String, Option<(Message, SocketAddr)>);

fn pbx_response(m: &Message, status: u16) -> Vec<u8> {
    sbc_sip::edit::response(
        m,
        status,
        "PBX",
        &sbc_sip::edit::ResponseOpts {
            to_tag: Some(b"pbx"),
            ..Default::default()
        },
    )
}

impl Pbx {
    pub fn start(ip: &str, ring: bool) -> Pbx {
        let s = UdpSocket::bind(format!("{ip}:0")).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = s.local_addr().expect("addr");
        let sock = s.try_clone().expect("clone");
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
                        let _ = s.send_to(&pbx_response(&m, 200), from);
                    }
                    Some(sbc_sip::Method::Invite) => {
                        if ring {
                            let _ = s.send_to(&pbx_response(&m, 180), from);
                        }
                        let cid = String::from_utf8_lossy(m.call_id()).to_string();
                        seen.lock().push((cid, Some((m, from))));
                    }
                    Some(other) => {
                        seen.lock().push((format!("{other:?}"), None));
                    }
                    None => {}
                }
            }
        });
        Pbx {
            addr,
            seen: invites,
            sock,
            stop,
        }
    }

    pub fn saw(&self, call_id: &str) -> bool {
        self.seen.lock().iter().any(|(c, _)| c == call_id)
    }

    /// Sends the final `status` for the INVITE of `call_id` it got.
    pub fn respond(&self, call_id: &str, status: u16) {
        let seen = self.seen.lock();
        let (m, from) = seen
            .iter()
            .find_map(|(c, m)| m.as_ref().filter(|_| c == call_id))
            .expect("that INVITE reached the PBX");
        self.sock
            .send_to(&pbx_response(m, status), from)
            .expect("send");
    }
}

impl Drop for Pbx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub struct Sbc(pub Child);

impl Drop for Sbc {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid; a stopped child must be continued to
        // die of the kill that follows.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// Stops the child and returns once every one of its threads is stopped: kill(2) returns
/// before a thread running on another core has taken the signal, and on a busy machine that
/// thread could still read the datagrams sent next.
pub fn stop(child: &Child) {
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

pub fn invite(via: &str, phone: SocketAddr, call_id: &str) -> String {
    let p = phone.port();
    format!(
        "INVITE sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/{via} {phone};branch=z9hG4bK-{call_id};rport\r\n\
         From: <sip:alice@pbx.test>;tag=a-{call_id}\r\nTo: <sip:bob@pbx.test>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:alice@127.0.0.8:{p}>\r\nMax-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

pub fn eventually(what: &str, wait: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

pub fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
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

/// Starts `sbc run` on `cfg` and returns once it logs that it runs.
pub fn start_sbc(cfg: &Path) -> Sbc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sbc"))
        .args(["run", "--config"])
        .arg(cfg)
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
    sbc
}
