//! Proves the Kamailio PBX stand-in (tests/kamailio/pbx.cfg via `sbc_tests::kamailio`) behaves
//! as the SBC interop tests expect, WITHOUT the SBC: plain UDP sockets on 127.0.0.1 and
//! hand-written SIP. One socket plays "SBC + alice" (the Path address), another plays the
//! caller.
//!
//! (a) OPTIONS -> 200 over UDP and TCP;
//! (b) REGISTER with `Path: <sip:flowtoken@127.0.0.1:P1;lr>` -> 200 echoing the Path;
//!     a Path without `;lr` is refused; without `Supported: path` the Path is not echoed;
//! (c) INVITE to the registered AOR reaches the Path address with the Request-URI set to
//!     the contact and a Route naming the Path URI; the 200 goes back to the caller;
//!     ACK and BYE follow the record-route through Kamailio to the SBC;
//! (d) INVITE to an unregistered AOR -> 404.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use sbc_tests::kamailio::{kamailio_available, KamailioPbx};

const TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Tiny SIP text helpers (this test deliberately does not use the project's SIP stack).
// ---------------------------------------------------------------------------------------

/// A parsed SIP message: start line, headers in order, body.
#[derive(Debug, Clone)]
struct Msg {
    start: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// Expands compact header names to their long form, lower-cased.
fn canonical_name(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    match lower.as_str() {
        "v" => "via",
        "f" => "from",
        "t" => "to",
        "i" => "call-id",
        "m" => "contact",
        "l" => "content-length",
        "c" => "content-type",
        "k" => "supported",
        _ => return lower,
    }
    .to_string()
}

impl Msg {
    fn parse(text: &str) -> anyhow::Result<Msg> {
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
        let mut lines = head.split("\r\n");
        let start = lines.next().unwrap_or_default().to_string();
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with(' ') || line.starts_with('\t') {
                // folded continuation line
                if let Some(last) = headers.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
                continue;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("bad header line {line:?}"))?;
            headers.push((canonical_name(name), value.trim().to_string()));
        }
        Ok(Msg {
            start,
            headers,
            body: body.to_string(),
        })
    }

    fn is_response(&self) -> bool {
        self.start.starts_with("SIP/2.0 ")
    }

    /// Status code of a response.
    fn status(&self) -> Option<u16> {
        if !self.is_response() {
            return None;
        }
        self.start.split_whitespace().nth(1)?.parse().ok()
    }

    /// Method of a request.
    fn method(&self) -> Option<&str> {
        if self.is_response() {
            return None;
        }
        self.start.split_whitespace().next()
    }

    /// Request-URI of a request.
    fn ruri(&self) -> Option<&str> {
        if self.is_response() {
            return None;
        }
        self.start.split_whitespace().nth(1)
    }

    /// First value of a header (case-insensitive, compact forms understood).
    fn header(&self, name: &str) -> Option<&str> {
        let name = canonical_name(name);
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of a header, in order (one entry per header line).
    fn headers_all(&self, name: &str) -> Vec<&str> {
        let name = canonical_name(name);
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Method from the CSeq header (for responses).
    fn cseq_method(&self) -> Option<&str> {
        self.header("CSeq")?.split_whitespace().nth(1)
    }

    fn summary(&self) -> String {
        format!(
            "{} (CSeq: {})",
            self.start,
            self.header("CSeq").unwrap_or("?")
        )
    }
}

/// Value of a `;name=value` parameter in a header value (e.g. the To tag).
fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    // Parameters after the name-addr's closing '>' (or the whole value if none).
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value,
    };
    params.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim())
    })
}

/// The URI inside `<...>` of a name-addr header value.
fn addr_uri(value: &str) -> Option<&str> {
    let start = value.find('<')? + 1;
    let end = value[start..].find('>')? + start;
    Some(&value[start..end])
}

/// Builds a request with the given start line parts, headers and body
/// (Content-Length is appended).
fn request(method: &str, ruri: &str, headers: &[(&str, String)], body: &str) -> String {
    let mut s = format!("{method} {ruri} SIP/2.0\r\n");
    for (name, value) in headers {
        s.push_str(&format!("{name}: {value}\r\n"));
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

/// Builds a response to `req`: copies Via, From, To (adding `to_tag` if the To has none),
/// Call-ID, CSeq and Record-Route (for 18x/2xx), then `extra` headers and the body.
fn response(
    req: &Msg,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &[(&str, String)],
    body: &str,
) -> String {
    let mut s = format!("SIP/2.0 {code} {reason}\r\n");
    for via in req.headers_all("Via") {
        s.push_str(&format!("Via: {via}\r\n"));
    }
    s.push_str(&format!(
        "From: {}\r\n",
        req.header("From").unwrap_or_default()
    ));
    let to = req.header("To").unwrap_or_default();
    if param(to, "tag").is_some() {
        s.push_str(&format!("To: {to}\r\n"));
    } else {
        s.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    }
    s.push_str(&format!(
        "Call-ID: {}\r\n",
        req.header("Call-ID").unwrap_or_default()
    ));
    s.push_str(&format!(
        "CSeq: {}\r\n",
        req.header("CSeq").unwrap_or_default()
    ));
    if (101..300).contains(&code) {
        for rr in req.headers_all("Record-Route") {
            s.push_str(&format!("Record-Route: {rr}\r\n"));
        }
    }
    for (name, value) in extra {
        s.push_str(&format!("{name}: {value}\r\n"));
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

fn sdp(port: u16) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
}

/// A UDP endpoint on 127.0.0.1 with a receive helper that waits for a matching message.
struct Peer {
    sock: UdpSocket,
    name: &'static str,
}

impl Peer {
    fn new(name: &'static str) -> anyhow::Result<Peer> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        Ok(Peer { sock, name })
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local addr")
    }

    fn send(&self, text: &str, to: SocketAddr) -> anyhow::Result<()> {
        self.sock
            .send_to(text.as_bytes(), to)
            .with_context(|| format!("{} sending to {to}", self.name))?;
        Ok(())
    }

    /// Receives until a message satisfying `want` arrives (others, e.g. 100 Trying or
    /// retransmissions, are skipped) or `TIMEOUT` passes.
    fn expect(&self, what: &str, want: impl Fn(&Msg) -> bool) -> anyhow::Result<(Msg, SocketAddr)> {
        let deadline = Instant::now() + TIMEOUT;
        let mut skipped = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{}: timed out waiting for {what}; skipped: {skipped:?}",
                    self.name
                );
            }
            self.sock.set_read_timeout(Some(left))?;
            let (len, from) = match self.sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Err(anyhow!(e).context(format!("{} recv", self.name))),
            };
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let msg = match Msg::parse(&text) {
                Ok(m) => m,
                Err(e) => {
                    skipped.push(format!("unparsable: {e}"));
                    continue;
                }
            };
            if want(&msg) {
                return Ok((msg, from));
            }
            skipped.push(msg.summary());
        }
    }

    /// Waits for the final response (>= 200) to a request with this Call-ID and CSeq method.
    fn final_response(&self, call_id: &str, method: &str) -> anyhow::Result<Msg> {
        let what = format!("final response to {method} (Call-ID {call_id})");
        let (msg, _) = self.expect(&what, |m| {
            m.status().is_some_and(|s| s >= 200)
                && m.header("Call-ID") == Some(call_id)
                && m.cseq_method() == Some(method)
        })?;
        Ok(msg)
    }

    /// Waits for a request of this method and Call-ID.
    fn request(&self, call_id: &str, method: &str) -> anyhow::Result<(Msg, SocketAddr)> {
        let what = format!("{method} request (Call-ID {call_id})");
        self.expect(&what, |m| {
            m.method() == Some(method) && m.header("Call-ID") == Some(call_id)
        })
    }
}

fn branch(tag: &str) -> String {
    format!("z9hG4bK-{tag}-{}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

struct Ctx {
    pbx: SocketAddr,
    /// Plays the SBC: the Path address, where Kamailio sends requests for alice.
    sbc: Peer,
    /// Alice's contact address (only its port is used: the Contact in the REGISTER).
    alice: Peer,
    /// Plays the calling phone.
    caller: Peer,
}

fn options_udp(ctx: &Ctx) -> anyhow::Result<()> {
    let call_id = format!("opt-{}@127.0.0.1", rand::random::<u32>());
    let req = request(
        "OPTIONS",
        &format!("sip:{}", ctx.pbx),
        &[
            (
                "Via",
                format!(
                    "SIP/2.0/UDP {};branch={};rport",
                    ctx.caller.addr(),
                    branch("opt")
                ),
            ),
            ("Max-Forwards", "70".into()),
            (
                "From",
                format!(
                    "<sip:bob@{}>;tag=o{}",
                    ctx.caller.addr(),
                    rand::random::<u16>()
                ),
            ),
            ("To", format!("<sip:{}>", ctx.pbx)),
            ("Call-ID", call_id.clone()),
            ("CSeq", "1 OPTIONS".into()),
        ],
        "",
    );
    ctx.caller.send(&req, ctx.pbx)?;
    let resp = ctx.caller.final_response(&call_id, "OPTIONS")?;
    ensure!(resp.status() == Some(200), "OPTIONS/UDP got {}", resp.start);
    Ok(())
}

fn options_tcp(ctx: &Ctx) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&ctx.pbx, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let local = stream.local_addr()?;
    let call_id = format!("opt-tcp-{}@127.0.0.1", rand::random::<u32>());
    let req = request(
        "OPTIONS",
        &format!("sip:{};transport=tcp", ctx.pbx),
        &[
            (
                "Via",
                format!("SIP/2.0/TCP {local};branch={};rport", branch("opttcp")),
            ),
            ("Max-Forwards", "70".into()),
            ("From", format!("<sip:bob@{local}>;tag=t1")),
            ("To", format!("<sip:{}>", ctx.pbx)),
            ("Call-ID", call_id),
            ("CSeq", "1 OPTIONS".into()),
        ],
        "",
    );
    stream.write_all(req.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        ensure!(Instant::now() < deadline, "OPTIONS/TCP: no response");
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "OPTIONS/TCP: connection closed without a response");
        got.extend_from_slice(&buf[..n]);
    }
    let resp = Msg::parse(&String::from_utf8_lossy(&got))?;
    ensure!(resp.status() == Some(200), "OPTIONS/TCP got {}", resp.start);
    Ok(())
}

/// Sends a REGISTER as the SBC would forward it (SBC's Via on top of the phone's, Path
/// added) and returns the final response.
fn register(
    ctx: &Ctx,
    user: &str,
    path: &str,
    supported_path: bool,
    expires: u32,
) -> anyhow::Result<Msg> {
    let call_id = format!("reg-{user}-{}@127.0.0.1", rand::random::<u32>());
    let mut headers = vec![
        (
            "Via",
            format!(
                "SIP/2.0/UDP {};branch={};rport",
                ctx.sbc.addr(),
                branch("sbc")
            ),
        ),
        (
            "Via",
            format!(
                "SIP/2.0/UDP {};branch={};rport={};received=127.0.0.1",
                ctx.alice.addr(),
                branch("ua"),
                ctx.alice.addr().port()
            ),
        ),
        ("Max-Forwards", "69".into()),
        ("From", format!("<sip:{user}@pbx.test>;tag=r{user}")),
        ("To", format!("<sip:{user}@pbx.test>")),
        ("Call-ID", call_id.clone()),
        ("CSeq", "1 REGISTER".into()),
        ("Contact", format!("<sip:{user}@{}>", ctx.alice.addr())),
        ("Expires", expires.to_string()),
        ("Path", path.to_string()),
    ];
    if supported_path {
        headers.push(("Supported", "path".into()));
    }
    let req = request("REGISTER", "sip:pbx.test", &headers, "");
    ctx.sbc.send(&req, ctx.pbx)?;
    ctx.sbc.final_response(&call_id, "REGISTER")
}

fn registrations(ctx: &Ctx) -> anyhow::Result<String> {
    let path = format!("<sip:flowtoken@{};lr>", ctx.sbc.addr());

    // (b) alice registers through the "SBC"; the 200 echoes the Path.
    let resp = register(ctx, "alice", &path, true, 300)?;
    ensure!(
        resp.status() == Some(200),
        "REGISTER alice: {}",
        resp.summary()
    );
    let echoed = resp.headers_all("Path").join(",");
    ensure!(
        echoed.contains(&format!("sip:flowtoken@{};lr", ctx.sbc.addr())),
        "200 to REGISTER does not echo the Path; Path headers: {echoed:?}"
    );
    let contact = resp.header("Contact").unwrap_or_default();
    ensure!(
        contact.contains(&format!("sip:alice@{}", ctx.alice.addr())),
        "200 to REGISTER lacks alice's contact: {contact:?}"
    );
    ensure!(
        param(contact, "expires").is_some(),
        "200 contact without expires: {contact:?}"
    );

    // Kamailio refuses a first Path URI that is not a loose router.
    let resp = register(
        ctx,
        "strict",
        &format!("<sip:flowtoken@{}>", ctx.sbc.addr()),
        true,
        300,
    )?;
    ensure!(
        resp.status().is_some_and(|s| s >= 400),
        "REGISTER with a Path lacking ;lr should fail, got {}",
        resp.summary()
    );

    // Lazy path mode: without "Supported: path" the Path is stored but not echoed.
    let resp = register(ctx, "carol", &path, false, 300)?;
    ensure!(
        resp.status() == Some(200),
        "REGISTER carol: {}",
        resp.summary()
    );
    ensure!(
        resp.header("Path").is_none(),
        "Path echoed although the REGISTER had no Supported: path"
    );
    Ok(path)
}

fn call(ctx: &Ctx, path: &str) -> anyhow::Result<()> {
    let call_id = format!("call-{}@127.0.0.1", rand::random::<u32>());
    let from = format!("<sip:bob@pbx.test>;tag=b{}", rand::random::<u32>());
    let invite = request(
        "INVITE",
        "sip:alice@pbx.test",
        &[
            (
                "Via",
                format!(
                    "SIP/2.0/UDP {};branch={};rport",
                    ctx.caller.addr(),
                    branch("inv")
                ),
            ),
            ("Max-Forwards", "70".into()),
            ("From", from.clone()),
            ("To", "<sip:alice@pbx.test>".into()),
            ("Call-ID", call_id.clone()),
            ("CSeq", "1 INVITE".into()),
            ("Contact", format!("<sip:bob@{}>", ctx.caller.addr())),
            ("Content-Type", "application/sdp".into()),
        ],
        &sdp(40000),
    );
    ctx.caller.send(&invite, ctx.pbx)?;

    // (c) the INVITE comes back via the Path address, R-URI = contact, Route = Path.
    let (inv, inv_from) = ctx.sbc.request(&call_id, "INVITE")?;
    let alice_contact = format!("sip:alice@{}", ctx.alice.addr());
    ensure!(
        inv.ruri() == Some(alice_contact.as_str()),
        "INVITE R-URI {:?}, expected {alice_contact}",
        inv.ruri()
    );
    let routes = inv.headers_all("Route").join(",");
    ensure!(
        routes.contains(path),
        "INVITE Route {routes:?} does not name the Path URI {path}"
    );
    ensure!(
        inv_from == ctx.pbx,
        "INVITE came from {inv_from}, not Kamailio {}",
        ctx.pbx
    );
    ensure!(
        inv.header("Record-Route").is_some(),
        "Kamailio did not record-route the INVITE"
    );
    ensure!(
        inv.body.contains("m=audio 40000"),
        "SDP not relayed: {:?}",
        inv.body
    );

    // "SBC + alice" answers; its Contact is the SBC address (as an SBC rewrites it).
    let alice_tag = format!("a{}", rand::random::<u32>());
    let ok = response(
        &inv,
        200,
        "OK",
        &alice_tag,
        &[
            ("Contact", format!("<sip:alice@{}>", ctx.sbc.addr())),
            ("Content-Type", "application/sdp".into()),
        ],
        &sdp(40002),
    );
    ctx.sbc.send(&ok, inv_from)?;
    let resp = ctx.caller.final_response(&call_id, "INVITE")?;
    ensure!(
        resp.status() == Some(200),
        "caller got {} to INVITE",
        resp.summary()
    );
    let to = resp.header("To").unwrap_or_default().to_string();
    ensure!(
        param(&to, "tag") == Some(alice_tag.as_str()),
        "200 To tag mismatch: {to}"
    );
    ensure!(
        resp.body.contains("m=audio 40002"),
        "answer SDP not relayed"
    );

    // Route set from the 200's Record-Route (reversed for the UAC), target = its Contact.
    let mut route_set: Vec<String> = resp
        .headers_all("Record-Route")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    route_set.reverse();
    ensure!(!route_set.is_empty(), "200 has no Record-Route");
    let target = addr_uri(resp.header("Contact").unwrap_or_default())
        .ok_or_else(|| anyhow!("200 without Contact"))?
        .to_string();
    let in_dialog = |method: &str, cseq: u32| {
        request(
            method,
            &target,
            &[
                (
                    "Via",
                    format!(
                        "SIP/2.0/UDP {};branch={};rport",
                        ctx.caller.addr(),
                        branch(&method.to_ascii_lowercase())
                    ),
                ),
                ("Max-Forwards", "70".into()),
                ("From", from.clone()),
                ("To", to.clone()),
                ("Call-ID", call_id.clone()),
                ("CSeq", format!("{cseq} {method}")),
                ("Route", route_set.join(", ")),
            ],
            "",
        )
    };

    // ACK goes to the first route hop (Kamailio), which loose-routes it to the SBC.
    ctx.caller.send(&in_dialog("ACK", 1), ctx.pbx)?;
    let (ack, _) = ctx.sbc.request(&call_id, "ACK")?;
    ensure!(
        ack.ruri() == Some(target.as_str()),
        "ACK R-URI {:?}, expected {target}",
        ack.ruri()
    );

    // BYE the same way; the SBC answers and the 200 reaches the caller.
    ctx.caller.send(&in_dialog("BYE", 2), ctx.pbx)?;
    let (bye, bye_from) = ctx.sbc.request(&call_id, "BYE")?;
    ensure!(
        bye.ruri() == Some(target.as_str()),
        "BYE R-URI {:?}",
        bye.ruri()
    );
    ctx.sbc
        .send(&response(&bye, 200, "OK", &alice_tag, &[], ""), bye_from)?;
    let resp = ctx.caller.final_response(&call_id, "BYE")?;
    ensure!(
        resp.status() == Some(200),
        "caller got {} to BYE",
        resp.summary()
    );
    Ok(())
}

fn unregistered(ctx: &Ctx) -> anyhow::Result<()> {
    let call_id = format!("nobody-{}@127.0.0.1", rand::random::<u32>());
    let via = format!(
        "SIP/2.0/UDP {};branch={};rport",
        ctx.caller.addr(),
        branch("nobody")
    );
    let from = format!("<sip:bob@pbx.test>;tag=n{}", rand::random::<u32>());
    let invite = request(
        "INVITE",
        "sip:nobody@pbx.test",
        &[
            ("Via", via.clone()),
            ("Max-Forwards", "70".into()),
            ("From", from.clone()),
            ("To", "<sip:nobody@pbx.test>".into()),
            ("Call-ID", call_id.clone()),
            ("CSeq", "1 INVITE".into()),
            ("Contact", format!("<sip:bob@{}>", ctx.caller.addr())),
            ("Content-Type", "application/sdp".into()),
        ],
        &sdp(40004),
    );
    ctx.caller.send(&invite, ctx.pbx)?;
    let resp = ctx.caller.final_response(&call_id, "INVITE")?;
    ensure!(
        matches!(resp.status(), Some(404) | Some(480)),
        "INVITE to an unregistered AOR got {}",
        resp.summary()
    );
    // ACK the non-2xx final response (same branch) so Kamailio stops retransmitting.
    let ack = request(
        "ACK",
        "sip:nobody@pbx.test",
        &[
            ("Via", via),
            ("Max-Forwards", "70".into()),
            ("From", from),
            ("To", resp.header("To").unwrap_or_default().to_string()),
            ("Call-ID", call_id),
            ("CSeq", "1 ACK".into()),
        ],
        "",
    );
    ctx.caller.send(&ack, ctx.pbx)?;
    Ok(())
}

fn scenario(pbx: &KamailioPbx) -> anyhow::Result<()> {
    let ctx = Ctx {
        pbx: pbx.addr(),
        sbc: Peer::new("sbc")?,
        alice: Peer::new("alice")?,
        caller: Peer::new("caller")?,
    };
    options_udp(&ctx).context("(a) OPTIONS over UDP")?;
    options_tcp(&ctx).context("(a) OPTIONS over TCP")?;
    let path = registrations(&ctx).context("(b) REGISTER with Path")?;
    call(&ctx, &path).context("(c) call to the registered AOR via the Path")?;
    unregistered(&ctx).context("(d) call to an unregistered AOR")?;
    Ok(())
}

#[test]
fn kamailio_pbx_stand_in_routes_calls_back_through_the_path() {
    if !kamailio_available() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "kamailio is not installed but CI is set: scripts/install-deps.sh installs it \
                 (apt-get install kamailio)"
            );
        }
        eprintln!(
            "SKIP kamailio_pbx: kamailio is not installed (run scripts/install-deps.sh to \
             install it)"
        );
        return;
    }
    let pbx = KamailioPbx::start_any().expect("start kamailio");
    if let Err(e) = scenario(&pbx) {
        panic!(
            "{e:#}\n--- kamailio (pid {}) log ---\n{}",
            pbx.pid(),
            pbx.log()
        );
    }
}
