//! The scripted PBX behind `sbc-uas`: a stateless UDP user agent server that answers every
//! request at once.
//!
//! It stands in for the PBX nodes behind the proxy under test, so it must never be what
//! limits a run: it keeps no dialog or transaction state, answers each datagram from the
//! datagram alone (to the source address, which is the proxy), and uses blocking sockets on
//! plain threads: one `recvfrom` and one `sendto` per message, no event loop in between.
//! Several threads can share one address through SO_REUSEPORT, but the kernel spreads
//! datagrams by source 4-tuple, so traffic from a single proxy socket still lands on one
//! thread; extra threads help only with several senders.
//!
//! Because it is stateless, a retransmitted INVITE is answered again with the same To-tag
//! (derived from Call-ID and From-tag), which is exactly what a proxy in between must cope
//! with anyway.

use crate::net;
use bytes::Bytes;
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::scan::trim;
use sbc_sip::uri::find_param;
use sbc_sip::{HeaderName, Message, Method};
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::ops::AddAssign;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM; worker threads poll it between receive timeouts.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Makes Ctrl-C and `kill` end the UAS cleanly (threads finish, the summary is printed)
/// instead of killing it mid-way without telling what it saw.
pub fn install_signal_handlers() {
    let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only performs an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
}

/// How often a blocked receive wakes up to check the stop flag and the deadline.
const RECV_TICK: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct UasConfig {
    pub listen: Vec<SocketAddr>,
    /// Sockets (and threads) per listen address.
    pub threads: usize,
    /// The UAS exits by itself after this long, so a forgotten one does not linger.
    pub duration: Duration,
    /// Registration lifetime granted when the REGISTER names none.
    pub expires: u32,
    /// Media calls (see [`MediaAnswer`]); `None` answers every INVITE with the fixed SDP.
    pub media: Option<MediaAnswer>,
}

/// Media mode, for runs that send RTP through the proxy (benchmarks/scale, benchmarks/soak):
/// an INVITE whose Request-URI user is `m<c>` (call `c`) is answered with SDP naming endpoint
/// B of call `c` (`b_ip:peer_base+2c`, the layout of [`crate::media::Layout`]), and the RTP
/// address of the offer as the UAS received it (the proxy's relay port facing the PBX) is
/// appended to `log` as `c ip:port`. The generator reads that log to know where endpoint B
/// must send, which a stateless UAS could not tell it any other way.
#[derive(Clone, Debug)]
pub struct MediaAnswer {
    pub b_ip: std::net::IpAddr,
    pub peer_base: u16,
    pub log: std::sync::Arc<parking_lot::Mutex<std::fs::File>>,
}

/// What the UAS saw; summed over threads at exit.
#[derive(Clone, Copy, Debug, Default)]
pub struct UasStats {
    pub received: u64,
    pub parse_errors: u64,
    /// Responses received (a UAS has no client transactions): ignored.
    pub responses_ignored: u64,
    /// Datagrams from outside loopback: never answered.
    pub foreign: u64,
    pub invite: u64,
    pub ack: u64,
    pub bye: u64,
    pub register: u64,
    pub options: u64,
    pub other_ok: u64,
    pub not_implemented: u64,
    pub sent: u64,
    pub send_errors: u64,
}

impl AddAssign for UasStats {
    fn add_assign(&mut self, o: UasStats) {
        self.received += o.received;
        self.parse_errors += o.parse_errors;
        self.responses_ignored += o.responses_ignored;
        self.foreign += o.foreign;
        self.invite += o.invite;
        self.ack += o.ack;
        self.bye += o.bye;
        self.register += o.register;
        self.options += o.options;
        self.other_ok += o.other_ok;
        self.not_implemented += o.not_implemented;
        self.sent += o.sent;
        self.send_errors += o.send_errors;
    }
}

impl std::fmt::Display for UasStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {} (unparseable {}, responses {}, foreign {}): INVITE {} ACK {} BYE {} REGISTER {} OPTIONS {} other-200 {} 501 {}; sent {} (errors {})",
            self.received,
            self.parse_errors,
            self.responses_ignored,
            self.foreign,
            self.invite,
            self.ack,
            self.bye,
            self.register,
            self.options,
            self.other_ok,
            self.not_implemented,
            self.sent,
            self.send_errors
        )
    }
}

/// Binds every socket, then serves until the deadline or a signal; returns the totals.
pub fn run(cfg: &UasConfig) -> anyhow::Result<UasStats> {
    anyhow::ensure!(!cfg.listen.is_empty(), "no --listen address");
    anyhow::ensure!((1..=64).contains(&cfg.threads), "--threads must be 1..=64");
    let deadline = Instant::now() + cfg.duration;
    let mut socks = Vec::new();
    for &addr in &cfg.listen {
        net::ensure_loopback(net::advertised(addr), "--listen")?;
        let mut bound = addr;
        for _ in 0..cfg.threads {
            // The first socket may pick an ephemeral port; the others must share it.
            let s = net::udp_socket(bound, cfg.threads > 1)
                .map_err(|e| anyhow::anyhow!("binding {bound}: {e}"))?;
            s.set_read_timeout(Some(RECV_TICK))?;
            bound = s.local_addr()?;
            socks.push(s);
        }
        eprintln!(
            "sbc-uas: listening on udp {bound} ({} socket(s))",
            cfg.threads
        );
    }
    let mut handles = Vec::new();
    for s in socks {
        let expires = cfg.expires;
        let media = cfg.media.clone();
        handles.push(std::thread::spawn(move || {
            serve(s, expires, media, deadline)
        }));
    }
    let mut total = UasStats::default();
    for h in handles {
        match h.join() {
            Ok(Ok(st)) => total += st,
            Ok(Err(e)) => eprintln!("sbc-uas: worker failed: {e}"),
            Err(_) => eprintln!("sbc-uas: worker panicked"),
        }
    }
    Ok(total)
}

fn serve(
    sock: UdpSocket,
    expires: u32,
    media: Option<MediaAnswer>,
    deadline: Instant,
) -> io::Result<UasStats> {
    let local = net::advertised(sock.local_addr()?);
    let mut h = Handler::new(local, expires);
    h.media = media;
    let mut st = UasStats::default();
    let mut buf = vec![0u8; 65536];
    while !STOP.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // Not expected on a bound UDP socket; do not spin on it.
                eprintln!("sbc-uas: recv on {local}: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        st.received += 1;
        if !net::is_loopback(src.ip()) {
            st.foreign += 1;
            continue;
        }
        let data = Bytes::copy_from_slice(&buf[..n]);
        h.handle(
            data,
            &mut st,
            &mut |resp: &[u8]| match sock.send_to(resp, src) {
                Ok(_) => 1,
                Err(_) => 0,
            },
        );
    }
    Ok(st)
}

/// Builds the answers for one datagram; owns the per-thread constant parts and scratch.
pub struct Handler {
    contact_line: Vec<u8>,
    sdp: Vec<u8>,
    extra: Vec<u8>,
    expires: u32,
    /// Media mode; see [`MediaAnswer`].
    pub media: Option<MediaAnswer>,
    media_sdp: Vec<u8>,
}

impl Handler {
    pub fn new(local: SocketAddr, expires: u32) -> Handler {
        Handler {
            contact_line: format!("Contact: <sip:uas@{}>\r\n", net::hostport(local)).into_bytes(),
            sdp: format!(
                "v=0\r\no=uas 1 1 {c}\r\ns=-\r\nc={c}\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
                c = net::sdp_addr(local.ip())
            )
            .into_bytes(),
            extra: Vec::with_capacity(512),
            expires,
            media: None,
            media_sdp: Vec::new(),
        }
    }

    /// Answers one datagram through `send` (which returns 1 when the datagram went out).
    /// Garbage and responses are counted and dropped.
    pub fn handle(&mut self, data: Bytes, st: &mut UasStats, send: &mut dyn FnMut(&[u8]) -> u64) {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(_) => {
                st.parse_errors += 1;
                return;
            }
        };
        let Some(method) = msg.method() else {
            st.responses_ignored += 1;
            return;
        };
        let tag = to_tag(&msg);
        let mut out = |r: Vec<u8>, st: &mut UasStats| {
            let ok = send(&r);
            st.sent += ok;
            st.send_errors += 1 - ok.min(1);
        };
        match method {
            Method::Invite => {
                st.invite += 1;
                out(
                    edit::response(&msg, 100, "Trying", &ResponseOpts::default()),
                    st,
                );
                // RFC 3261 12.1.1: Record-Route is copied into dialog-creating responses,
                // in order; the Contact is ours.
                self.extra.clear();
                for h in msg.headers_named(HeaderName::RecordRoute) {
                    push_line(&mut self.extra, msg.slice(h.line));
                }
                self.extra.extend_from_slice(&self.contact_line);
                let initial = msg.to_tag().is_none();
                if initial {
                    out(
                        edit::response(&msg, 180, "Ringing", &with_tag(&tag, &self.extra)),
                        st,
                    );
                }
                let body = match self.media_call(&msg) {
                    true => &self.media_sdp,
                    false => &self.sdp,
                };
                let mut opts = with_tag(&tag, &self.extra);
                opts.body = Some(("application/sdp", body));
                out(edit::response(&msg, 200, "OK", &opts), st);
            }
            Method::Ack => st.ack += 1,
            Method::Register => {
                st.register += 1;
                self.register_extra(&msg);
                out(
                    edit::response(&msg, 200, "OK", &with_tag(&tag, &self.extra)),
                    st,
                );
            }
            Method::Bye
            | Method::Options
            | Method::Cancel
            | Method::Info
            | Method::Update
            | Method::Prack
            | Method::Message
            | Method::Notify => {
                match method {
                    Method::Bye => st.bye += 1,
                    Method::Options => st.options += 1,
                    _ => st.other_ok += 1,
                }
                out(edit::response(&msg, 200, "OK", &with_tag(&tag, b"")), st);
            }
            _ => {
                st.not_implemented += 1;
                out(
                    edit::response(
                        &msg,
                        501,
                        "Not Implemented",
                        &with_tag(&tag, b"Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, INFO, UPDATE, PRACK, MESSAGE, NOTIFY\r\n"),
                    ),
                    st,
                );
            }
        }
    }

    /// Media mode: for an INVITE to `m<c>` renders B's SDP into `media_sdp` and logs the
    /// offer's RTP address. False (the fixed SDP) for any other INVITE, an offer without a
    /// usable RTP address, or a call index outside the port range.
    fn media_call(&mut self, msg: &Message) -> bool {
        let Some(m) = &self.media else {
            return false;
        };
        let Some(c) = media_index(msg) else {
            return false;
        };
        let Some(port) = usize::from(m.peer_base).checked_add(2 * c) else {
            return false;
        };
        let Ok(port) = u16::try_from(port) else {
            return false;
        };
        let Some(offer) = sbc_media_relay::sdp::Sdp::parse(msg.body())
            .ok()
            .and_then(|s| s.rtp_addr(0))
        else {
            return false;
        };
        self.media_sdp = crate::media::endpoint_sdp(SocketAddr::new(m.b_ip, port), c).into_bytes();
        // One write per line under the lock: threads share the file, a line must stay whole.
        let _ = m.log.lock().write_all(format!("{c} {offer}\n").as_bytes());
        true
    }

    /// Registrar answer headers (RFC 3261 10.3 step 8, RFC 3327 5.3): every Contact bound,
    /// each with its expiry, and the Path headers echoed so the edge proxy sees its own Path
    /// accepted. `*` (remove all) binds nothing.
    fn register_extra(&mut self, msg: &Message) {
        self.extra.clear();
        let default = msg
            .header_value(HeaderName::Expires)
            .and_then(|v| std::str::from_utf8(trim(v)).ok()?.parse::<u32>().ok())
            .unwrap_or(self.expires);
        for (_, v) in msg.values(HeaderName::Contact) {
            if v == b"*" {
                continue;
            }
            let Ok(na) = NameAddr::parse(v) else {
                continue;
            };
            self.extra.extend_from_slice(b"Contact: ");
            self.extra.extend_from_slice(v);
            if find_param(na.params, b"expires").is_none() {
                let _ = write!(self.extra, ";expires={default}");
            }
            self.extra.extend_from_slice(b"\r\n");
        }
        for h in msg.headers_named(HeaderName::Path) {
            push_line(&mut self.extra, msg.slice(h.line));
        }
    }
}

/// `c` of a Request-URI `sip:m<c>@...`.
fn media_index(msg: &Message) -> Option<usize> {
    let uri = msg.uri_bytes();
    let rest = uri.strip_prefix(b"sip:m")?;
    let end = rest.iter().position(|&b| b == b'@')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn with_tag<'a>(tag: &'a [u8], extra: &'a [u8]) -> ResponseOpts<'a> {
    ResponseOpts {
        to_tag: Some(tag),
        extra,
        ..Default::default()
    }
}

/// A To-tag that is the same for every retransmission of a request (FNV-1a of Call-ID and
/// From-tag), so a stateless UAS still gives one dialog one remote tag.
fn to_tag(msg: &Message) -> [u8; 16] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in msg
        .call_id()
        .iter()
        .chain(b"/")
        .chain(msg.from_tag().unwrap_or(b""))
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = [0u8; 16];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate() {
        *o = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Copies a header line, normalising its terminator to CRLF.
fn push_line(out: &mut Vec<u8>, line: &[u8]) {
    let mut l = line;
    while let [rest @ .., b'\r' | b'\n'] = l {
        l = rest;
    }
    out.extend_from_slice(l);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(req: &[u8]) -> (Vec<Message>, UasStats) {
        let mut h = Handler::new("127.0.0.1:5070".parse().unwrap(), 3600);
        let mut st = UasStats::default();
        let mut got = Vec::new();
        h.handle(Bytes::copy_from_slice(req), &mut st, &mut |r: &[u8]| {
            got.push(Message::parse(Bytes::copy_from_slice(r)).unwrap());
            1
        });
        (got, st)
    }

    const INVITE: &[u8] = b"INVITE sip:uas@127.0.0.1:5070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp1\r\n\
Via: SIP/2.0/UDP 127.0.0.1:40000;rport;branch=z9hG4bKlg1\r\n\
Record-Route: <sip:127.0.0.1:5060;lr>\n\
Record-Route: <sip:10.9.9.9;lr>, <sip:10.9.9.8;lr>\r\n\
Max-Forwards: 69\r\n\
From: <sip:lg@bench.test>;tag=a\r\n\
To: <sip:uas@bench.test>\r\n\
Call-ID: c1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn media_mode_answers_with_b_and_logs_the_offer() {
        let path = std::env::temp_dir().join(format!("uas-media-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let mut h = Handler::new("127.0.0.1:5070".parse().unwrap(), 3600);
        h.media = Some(MediaAnswer {
            b_ip: "127.0.0.36".parse().unwrap(),
            peer_base: 40000,
            log: std::sync::Arc::new(parking_lot::Mutex::new(file)),
        });
        let sdp = "v=0\r\no=x 1 1 IN IP4 127.0.0.32\r\ns=-\r\nc=IN IP4 127.0.0.32\r\nt=0 0\r\n\
                   m=audio 30004 RTP/AVP 0\r\n";
        let req = |user: &str| {
            format!(
                "INVITE sip:{user}@bench.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKm{user}\r\n\
                 From: <sip:a@b>;tag=a\r\nTo: <sip:{user}@b>\r\nCall-ID: c-{user}\r\nCSeq: 1 INVITE\r\n\
                 Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
                sdp.len()
            )
        };
        let mut bodies = Vec::new();
        for user in ["m3", "uas"] {
            let mut st = UasStats::default();
            h.handle(Bytes::from(req(user)), &mut st, &mut |r: &[u8]| {
                let m = Message::parse(Bytes::copy_from_slice(r)).unwrap();
                if m.status() == Some(200) {
                    bodies.push(String::from_utf8_lossy(m.body()).into_owned());
                }
                1
            });
        }
        assert!(bodies[0].contains("c=IN IP4 127.0.0.36") && bodies[0].contains("m=audio 40006 "));
        assert!(
            bodies[1].contains("m=audio 30000 "),
            "other users get the fixed SDP"
        );
        let log = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(log, "3 127.0.0.32:30004\n");
    }

    #[test]
    fn invite_gets_100_180_200_with_record_route() {
        let (r, st) = answers(INVITE);
        assert_eq!(st.invite, 1);
        assert_eq!(st.sent, 3);
        let codes: Vec<_> = r.iter().map(|m| m.status().unwrap()).collect();
        assert_eq!(codes, [100, 180, 200]);
        assert!(r[0].to_tag().is_none());
        assert_eq!(r[1].to_tag(), r[2].to_tag());
        assert!(r[1].to_tag().is_some());
        let rr: Vec<_> = r[2]
            .values(HeaderName::RecordRoute)
            .map(|(_, v)| v.to_vec())
            .collect();
        assert_eq!(
            rr,
            [
                b"<sip:127.0.0.1:5060;lr>".to_vec(),
                b"<sip:10.9.9.9;lr>".to_vec(),
                b"<sip:10.9.9.8;lr>".to_vec()
            ]
        );
        assert_eq!(r[2].via_count(), 2);
        assert_eq!(
            r[2].header_value(HeaderName::Contact),
            Some(&b"<sip:uas@127.0.0.1:5070>"[..])
        );
        assert!(r[2].body().starts_with(b"v=0"));
        // A retransmission gets the same tag.
        let (again, _) = answers(INVITE);
        assert_eq!(again[2].to_tag(), r[2].to_tag());
    }

    #[test]
    fn register_echoes_contacts_and_path() {
        let req = b"REGISTER sip:bench.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp2\r\n\
Path: <sip:127.0.0.1:5060;lr>\r\n\
From: <sip:u1@bench.test>;tag=x\r\n\
To: <sip:u1@bench.test>\r\n\
Call-ID: r1\r\n\
CSeq: 7 REGISTER\r\n\
Contact: <sip:u1@127.0.0.1:40000>, <sip:u1@127.0.0.1:40001>;expires=60\r\n\
Expires: 120\r\n\
Content-Length: 0\r\n\r\n";
        let (r, st) = answers(req);
        assert_eq!(st.register, 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status(), Some(200));
        let c: Vec<_> = r[0]
            .values(HeaderName::Contact)
            .map(|(_, v)| v.to_vec())
            .collect();
        assert_eq!(
            c,
            [
                b"<sip:u1@127.0.0.1:40000>;expires=120".to_vec(),
                b"<sip:u1@127.0.0.1:40001>;expires=60".to_vec()
            ]
        );
        assert_eq!(
            r[0].header_value(HeaderName::Path),
            Some(&b"<sip:127.0.0.1:5060;lr>"[..])
        );
    }

    #[test]
    fn garbage_ack_and_responses_are_silent() {
        for junk in [
            &b""[..],
            b"\x00\xff\xfe",
            b"INVITE sip:x SIP/2.0\r\n\r\n",
            b"SIP/2.0 200 OK\r\n",
        ] {
            let (r, st) = answers(junk);
            assert!(r.is_empty());
            assert_eq!(st.parse_errors, 1);
        }
        let ack = b"ACK sip:uas@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK3\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n";
        let (r, st) = answers(ack);
        assert!(r.is_empty());
        assert_eq!(st.ack, 1);
        let resp = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK3\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n";
        let (r, st) = answers(resp);
        assert!(r.is_empty());
        assert_eq!(st.responses_ignored, 1);
    }

    #[test]
    fn unknown_method_gets_501() {
        let req = b"FOO sip:uas@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK4\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 FOO\r\nContent-Length: 0\r\n\r\n";
        let (r, st) = answers(req);
        assert_eq!(r[0].status(), Some(501));
        assert_eq!(st.not_implemented, 1);
    }
}
