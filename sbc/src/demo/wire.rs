//! The peers' side of the wire: UDP sockets, and the one timeline everything is printed on.
//!
//! By default the timeline shows one line per step of the script; with `--verbose` it also
//! shows every SIP message a peer sends or receives. Each peer reads its socket on its own task
//! and prints a message the moment the datagram arrives, rather than when the script gets round
//! to looking at it: the trace then shows when things really happened, in the order they
//! happened, even though the script consumes messages in its own order. The SBC's OPTIONS
//! probes are never traced: two nodes probed every 250 ms would drown everything else.

use anyhow::{bail, Context};
use bytes::Bytes;
use parking_lot::Mutex;
use sbc_sip::message::{Message, Method};
use sbc_sip::uri::parse_ip;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long any single wait lasts. Loopback answers in well under a millisecond, so anything
/// slower than this is a failure worth reporting rather than waiting out.
pub const WAIT: Duration = Duration::from_secs(2);

/// Width of the peer-name columns (the longest name is "carrier").
const NAME_W: usize = 7;

/// The shared stdout narration.
pub struct Timeline {
    start: Instant,
    /// Print every SIP message, not only the steps.
    verbose: bool,
    /// Held while a line is timed and printed, so that lines from concurrent peers come out
    /// in the order of their timestamps.
    lock: Mutex<()>,
}

impl Timeline {
    pub fn new(verbose: bool) -> Arc<Timeline> {
        Arc::new(Timeline {
            start: Instant::now(),
            verbose,
            lock: Mutex::new(()),
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// One step of the script: `   0.412s  alice registered via pbx-a`.
    pub fn step(&self, text: &str) {
        let _g = self.lock.lock();
        let t = self.start.elapsed().as_secs_f64();
        out(format_args!("{t:>8.3}s  {text}"));
    }

    /// One SIP message (only with `--verbose`):
    /// `   0.012s     alice -> SBC      REGISTER sip:demo.pbx`.
    pub fn message(&self, from: &str, to: &str, what: &str, note: &str) {
        if !self.verbose {
            return;
        }
        let _g = self.lock.lock();
        let t = self.start.elapsed().as_secs_f64();
        let note = if note.is_empty() {
            String::new()
        } else {
            format!("  ({note})")
        };
        out(format_args!(
            "{t:>8.3}s      {from:>NAME_W$} -> {to:<NAME_W$}  {what}{note}"
        ));
    }

    /// A line of narration, indented under the step it explains.
    pub fn note(&self, text: &str) {
        let _g = self.lock.lock();
        out(format_args!("{:>8}   {text}", ""));
    }

    /// A note that only `--verbose` shows (detail a first-time reader can skip).
    pub fn detail(&self, text: &str) {
        if self.verbose {
            self.note(text);
        }
    }

    /// An unindented line (headings, summary).
    pub fn say(&self, text: &str) {
        let _g = self.lock.lock();
        out(format_args!("{text}"));
    }
}

/// Prints one line. A closed stdout (`sbc demo | head`) is not worth a panic: the demo runs
/// to its end and exits with its own status.
fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A message as it came off the wire, with its source address (needed for rport).
pub type Received = (Message, SocketAddr);

/// A built-in peer's UDP socket: sends and receives, printing both.
pub struct Peer {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub sbc: SocketAddr,
    sock: Arc<UdpSocket>,
    inbox: mpsc::Receiver<Received>,
    pub tl: Arc<Timeline>,
    reader: JoinHandle<()>,
}

impl Peer {
    pub fn new(
        name: &'static str,
        sock: UdpSocket,
        sbc: SocketAddr,
        tl: Arc<Timeline>,
    ) -> anyhow::Result<Peer> {
        let addr = sock
            .local_addr()
            .with_context(|| format!("{name}: reading the bound address"))?;
        let sock = Arc::new(sock);
        let (tx, inbox) = mpsc::channel(256);
        let reader = tokio::spawn(read_loop(name, sock.clone(), sbc, tl.clone(), tx));
        Ok(Peer {
            name,
            addr,
            sbc,
            sock,
            inbox,
            tl,
            reader,
        })
    }

    fn label(&self, addr: SocketAddr) -> String {
        if addr == self.sbc {
            "SBC".to_string()
        } else {
            addr.to_string()
        }
    }

    /// Sends one datagram and prints it. The bytes are parsed first so that a demo bug in a
    /// built message shows up here, named, instead of as a 400 from the SBC.
    pub async fn send(&self, to: SocketAddr, bytes: Vec<u8>, note: &str) -> anyhow::Result<()> {
        let msg = Message::parse(Bytes::from(bytes))
            .with_context(|| format!("{}: built an unparseable message", self.name))?;
        if !is_probe(&msg) {
            self.tl
                .message(self.name, &self.label(to), &describe(&msg), note);
        }
        self.sock
            .send_to(msg.as_bytes(), to)
            .await
            .with_context(|| format!("{}: sending to {to}", self.name))?;
        Ok(())
    }

    /// The next message, whatever it is (the PBX's main loop).
    pub async fn recv(&mut self) -> Option<Received> {
        self.inbox.recv().await
    }

    /// Waits up to [`WAIT`] for a message `want` accepts. Messages it does not accept are
    /// skipped (they were already printed: a 100 Trying, a provisional response nobody waits
    /// for), except an error response, which ends the wait at once with that response as the
    /// reason, instead of a timeout that would hide it.
    pub async fn expect(
        &mut self,
        what: &str,
        want: impl Fn(&Message) -> bool,
    ) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (msg, from) = match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Err(_) => bail!(
                    "{} waited {} s for {what} and got nothing",
                    self.name,
                    WAIT.as_secs()
                ),
                Ok(None) => bail!(
                    "{}: socket reader stopped while waiting for {what}",
                    self.name
                ),
                Ok(Some(r)) => r,
            };
            if want(&msg) {
                return Ok((msg, from));
            }
            if msg.status().is_some_and(|s| s >= 300) {
                bail!("{} expected {what} but got {}", self.name, describe(&msg));
            }
        }
    }

    /// Waits for the final response to a request of `method` (skipping provisionals).
    pub async fn expect_final(&mut self, method: Method, status: u16) -> anyhow::Result<Message> {
        let what = format!("a {status} to {}", method.as_str());
        let (msg, _) = self
            .expect(&what, |m| {
                m.status() == Some(status) && m.cseq_method() == method
            })
            .await?;
        Ok(msg)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    name: &'static str,
    sock: Arc<UdpSocket>,
    sbc: SocketAddr,
    tl: Arc<Timeline>,
    tx: mpsc::Sender<Received>,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // Nothing on loopback should fail; stop and let the waits time out with a
                // clear message rather than spin on a broken socket.
                tl.note(&format!("{name}: receive error, no longer listening: {e}"));
                return;
            }
        };
        let label = if from == sbc {
            "SBC".to_string()
        } else {
            from.to_string()
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        match Message::parse(data) {
            Ok(msg) => {
                if !is_probe(&msg) {
                    tl.message(&label, name, &describe(&msg), "");
                }
                if tx.send((msg, from)).await.is_err() {
                    return;
                }
            }
            Err(e) => tl.message(&label, name, &format!("unparseable datagram: {e}"), ""),
        }
    }
}

/// An OPTIONS request or its response: the SBC's health probes, kept out of the trace.
fn is_probe(m: &Message) -> bool {
    m.cseq_method() == Method::Options
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The timeline text of a message: a request's start line, or a response's status with the
/// method it answers (so the 200 to a BYE is not confused with the 200 to the INVITE).
pub fn describe(m: &Message) -> String {
    match m.status() {
        None => format!("{} {}", lossy(m.method_bytes()), lossy(m.uri_bytes())),
        Some(s) => format!(
            "{s} {} ({})",
            lossy(m.reason_bytes()),
            lossy(m.cseq_method_bytes())
        ),
    }
}

/// Where a response to `req` goes (RFC 3261 18.2.2 with RFC 3581): back to the source port
/// when the top Via asked for rport, else to the Via's received address (or sent-by) and port.
pub fn response_dest(req: &Message, src: SocketAddr) -> anyhow::Result<SocketAddr> {
    let via = req.top_via().context("request without a Via")?;
    if via.rport.is_some() {
        return Ok(src);
    }
    via_addr(&via).context("top Via has no IP address to answer to")
}

/// The address a Via names: received (or the sent-by host, which the demo always writes as an
/// IP) and rport (or the sent-by port).
pub fn via_addr(via: &sbc_sip::via::Via<'_>) -> Option<SocketAddr> {
    let ip = parse_ip(via.received.unwrap_or(via.host))?;
    let port = match via.rport {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Some(SocketAddr::new(ip, port))
}

/// A random hex string for tags, branches and Call-IDs.
pub fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}
