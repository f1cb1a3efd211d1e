//! Draining on SIGTERM (`general.drain_secs`), end to end on a real `sbc run` child process:
//! new calls get 503 while the call being set up finishes, and the process exits when it
//! has; a drain that runs out of time stops anyway; a second signal stops at once. Raw UDP
//! sockets stand in for a trunk and the PBX (which rings, then answers when told).

mod common;

use bytes::Bytes;
use common::{eventually, free_port, invite, metric, signal, start_sbc, Pbx, Sbc};
use sbc_sip::message::Message;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

struct Lab {
    sbc: Sbc,
    pbx: Pbx,
    sip: SocketAddr,
    admin: SocketAddr,
    trunk: UdpSocket,
    dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `sbc run` with `drain_secs`, media off (the SBC then counts only calls being set up), a
/// ringing PBX and a trunk at 127.0.0.8, on the listener address `ip`.
fn lab(ip: &str, drain_secs: u64) -> Lab {
    let pbx = Pbx::start("127.0.0.7", true);
    let (sip_port, admin_port) = (free_port(ip), free_port(ip));
    let sip: SocketAddr = format!("{ip}:{sip_port}").parse().expect("addr");
    let admin: SocketAddr = format!("{ip}:{admin_port}").parse().expect("addr");
    let dir = std::env::temp_dir().join(format!("sbc-drain-{ip}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("sbc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[general]\ndrain_secs = {drain_secs}\n\n[[listen]]\ntransport = \"udp\"\naddr = \"{sip}\"\n\n\
             [[pool]]\nname = \"pbx\"\n[[pool.node]]\nname = \"pbx-a\"\naddress = \"{}\"\n\n\
             [[trunk]]\nname = \"carrier\"\nsources = [\"127.0.0.8\"]\naddress = \"127.0.0.8:5099\"\n\
             pool = \"pbx\"\n\n[media]\nenabled = false\n\n[admin]\nlisten = \"{admin}\"\n",
            pbx.addr
        ),
    )
    .expect("config");
    let sbc = start_sbc(&cfg);
    let trunk = UdpSocket::bind("127.0.0.8:0").expect("bind");
    trunk
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    Lab {
        sbc,
        pbx,
        sip,
        admin,
        trunk,
        dir,
    }
}

impl Lab {
    fn send_invite(&self, cid: &str) {
        let me = self.trunk.local_addr().expect("addr");
        self.trunk
            .send_to(invite("UDP", me, cid).as_bytes(), self.sip)
            .expect("send");
    }

    /// Waits for a response with `status` to the INVITE of `cid`.
    fn wait_response(&self, cid: &str, status: u16) -> Message {
        let mut buf = vec![0u8; 65535];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let Ok((n, _)) = self.trunk.recv_from(&mut buf) else {
                continue;
            };
            let m = Message::parse(Bytes::copy_from_slice(&buf[..n])).expect("parse");
            if m.status() == Some(status) && m.call_id() == cid.as_bytes() {
                return m;
            }
        }
        panic!("no {status} to {cid}");
    }

    /// A call the PBX is ringing: the SBC's INVITE transaction waits for its final.
    fn ringing_call(&self, cid: &str) {
        self.send_invite(cid);
        self.wait_response(cid, 180);
    }

    fn running(&mut self) -> bool {
        self.sbc.0.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit; its status and how long that took.
    fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(st) = self.sbc.0.try_wait().expect("try_wait") {
                return (st, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the SBC did not exit within {within:?}");
    }
}

#[test]
fn sigterm_drains_until_the_call_being_set_up_is_answered() {
    let mut lab = lab("127.0.0.11", 30);
    lab.ringing_call("ringing");
    signal(&lab.sbc.0, libc::SIGTERM);
    eventually("the drain started", Duration::from_secs(5), || {
        metric(lab.admin, "sbc_draining") == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.running(),
        "a call is being set up: the SBC waits for it"
    );

    // New calls are refused with Retry-After and never reach the PBX.
    lab.send_invite("late");
    let refused = lab.wait_response("late", 503);
    assert_eq!(
        refused.header_value_by_name(b"Retry-After"),
        Some(&b"30"[..])
    );
    assert!(!lab.pbx.saw("late"));
    assert_eq!(
        metric(lab.admin, "sbc_drain_refused_total{method=\"INVITE\"}"),
        Some(1.0)
    );

    // The ringing call is answered: the caller gets the 200, and then the SBC exits, cleanly.
    lab.pbx.respond("ringing", 200);
    lab.wait_response("ringing", 200);
    let (status, took) = lab.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn a_drain_that_runs_out_of_time_stops_anyway_and_a_second_signal_stops_at_once() {
    // drain_secs = 1: the ringing call is never answered.
    let mut lab1 = lab("127.0.0.12", 1);
    lab1.ringing_call("forever");
    let t0 = Instant::now();
    signal(&lab1.sbc.0, libc::SIGTERM);
    let (status, _) = lab1.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // drain_secs = 30, and a second SIGTERM.
    let mut lab2 = lab("127.0.0.13", 30);
    lab2.ringing_call("forever");
    signal(&lab2.sbc.0, libc::SIGTERM);
    eventually("the drain started", Duration::from_secs(5), || {
        metric(lab2.admin, "sbc_draining") == Some(1.0)
    });
    assert!(lab2.running());
    signal(&lab2.sbc.0, libc::SIGTERM);
    let (status, took) = lab2.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn without_drain_secs_sigterm_stops_at_once() {
    let mut lab = lab("127.0.0.14", 0);
    lab.ringing_call("ringing");
    signal(&lab.sbc.0, libc::SIGTERM);
    let (status, took) = lab.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}
