//! The phones and the carrier's trunk: minimal user agents driven step by step by the script.
//!
//! They do what a real UA does on the wire and nothing more: register (answering a digest
//! challenge), send an INVITE, answer one with 180 then 200 and an SDP body, build the route
//! set from Record-Route (reversed on the caller's side, RFC 3261 12.1.2) and send ACK and BYE
//! along it. They always send requests to the SBC, which is their outbound proxy (the phones')
//! or their configured peer (the trunk's); responses go wherever the top Via says.
//!
//! Each has a real RTP socket whose address goes into its SDP, so that the media the script
//! sends (see `rtp`) has somewhere to arrive; the SDP each one receives is parsed for the
//! address to send its own media to, which is the SBC's relay, not the other phone.

use super::digest::{Answer, Params};
use super::wire::{lossy, response_dest, token, Peer};
use anyhow::{bail, Context};
use sbc_sip::addr::NameAddr;
use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::message::{HeaderName, Message, Method};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;

/// One user agent.
pub struct Ua {
    pub peer: Peer,
    /// User part of the address-of-record and the Contact.
    pub user: &'static str,
    /// Domain of the address-of-record.
    pub domain: &'static str,
    /// The RTP socket written into our SDP.
    pub rtp: Arc<UdpSocket>,
    /// Its bound address.
    pub rtp_addr: SocketAddr,
}

/// One side's view of an established dialog (RFC 3261 12.1): everything needed to send a
/// request inside it.
pub struct Dialog {
    pub call_id: String,
    /// Our From for requests in the dialog (name-addr with our tag).
    local: String,
    /// Their name-addr with their tag, our To.
    remote: String,
    /// Their Contact URI: the Request-URI of in-dialog requests.
    target: String,
    /// Route set, already in the order to send it.
    routes: Vec<String>,
    cseq: u32,
    /// Our To-tag when we are the callee (empty for the caller, whose tag is in `local`).
    local_tag: String,
    /// Where the other side's SDP says to send media (with the SBC in between: its relay).
    pub remote_media: SocketAddr,
}

/// What goes into one request.
struct Req<'a> {
    method: &'a str,
    ruri: &'a str,
    from: &'a str,
    to: &'a str,
    call_id: &'a str,
    cseq: u32,
    routes: &'a [String],
    /// Extra header lines, each ending in CRLF.
    extra: &'a str,
    body: Option<&'a str>,
}

fn header_text(m: &Message, name: HeaderName, what: &str) -> anyhow::Result<String> {
    m.header_value(name)
        .map(|v| lossy(v).trim().to_string())
        .with_context(|| format!("{what}: no {name:?} header"))
}

/// The URI of the first Contact: where the other side wants in-dialog requests.
fn contact_uri(m: &Message, what: &str) -> anyhow::Result<String> {
    let (_, v) = m
        .values(HeaderName::Contact)
        .next()
        .with_context(|| format!("{what}: no Contact"))?;
    let na = NameAddr::parse(v).map_err(|e| anyhow::anyhow!("{what}: bad Contact: {e:?}"))?;
    Ok(lossy(na.uri_raw))
}

/// The audio address of an SDP body: the `c=` address (session or media level) and the port
/// of the first `m=audio` line. Enough for the SDP the demo itself writes and the relay's
/// rewrite of it; not a general SDP parser.
pub fn sdp_audio(body: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(body).ok()?;
    let (mut session_ip, mut media_ip, mut port) = (None, None, None);
    let (mut seen_m, mut in_audio) = (false, false);
    for line in text.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            if port.is_some() {
                break;
            }
            seen_m = true;
            in_audio = m.starts_with("audio ");
            if in_audio {
                port = m.split(' ').nth(1)?.split('/').next()?.parse::<u16>().ok();
            }
        } else if let Some(c) = line.strip_prefix("c=IN IP4 ") {
            let ip = c.split('/').next()?.trim().parse().ok();
            if in_audio {
                media_ip = ip;
            } else if !seen_m {
                session_ip = ip;
            }
        }
    }
    Some(SocketAddr::new(
        media_ip.or(session_ip)?,
        port.filter(|p| *p != 0)?,
    ))
}

/// The media address of the SDP in `m`, or a named error: a call the demo cannot send media
/// on is a failed step.
fn remote_media(m: &Message, who: &str, what: &str) -> anyhow::Result<SocketAddr> {
    if m.body().is_empty() {
        bail!("{who}: the {what} carries no SDP");
    }
    sdp_audio(m.body()).with_context(|| {
        format!(
            "{who}: no IPv4 audio address in the SDP of the {what}: {:?}",
            lossy(m.body())
        )
    })
}

fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|(_, v)| lossy(v))
        .collect()
}

impl Ua {
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }

    fn contact(&self) -> String {
        format!("<sip:{}@{}>", self.user, self.peer.addr)
    }

    fn sdp(&self) -> String {
        let ip = self.rtp_addr.ip();
        format!(
            "v=0\r\no={} 1 1 IN IP4 {ip}\r\ns=sbc demo\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n",
            self.user,
            self.rtp_addr.port()
        )
    }

    fn build(&self, r: &Req<'_>) -> Vec<u8> {
        let mut s = format!(
            "{} {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK{};rport\r\nMax-Forwards: 70\r\n",
            r.method,
            r.ruri,
            self.peer.addr,
            token()
        );
        if !r.routes.is_empty() {
            s.push_str(&format!("Route: {}\r\n", r.routes.join(", ")));
        }
        s.push_str(&format!(
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
            r.from, r.to, r.call_id, r.cseq, r.method
        ));
        if matches!(r.method, "INVITE" | "REGISTER") {
            s.push_str(&format!("Contact: {}\r\n", self.contact()));
        }
        s.push_str("User-Agent: sbc-demo\r\n");
        s.push_str(r.extra);
        match r.body {
            Some(b) => s.push_str(&format!(
                "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None => s.push_str("Content-Length: 0\r\n\r\n"),
        }
        s.into_bytes()
    }

    async fn send_request(&self, r: &Req<'_>, note: &str) -> anyhow::Result<()> {
        self.peer.send(self.peer.sbc, self.build(r), note).await
    }

    /// Answers a request: `to_tag` for a dialog-forming answer, Record-Route copied and our
    /// Contact added for INVITE (RFC 3261 12.1.1), SDP on a 200 to INVITE.
    async fn respond(
        &self,
        req: &Message,
        src: SocketAddr,
        status: u16,
        reason: &str,
        to_tag: &str,
    ) -> anyhow::Result<()> {
        let invite = req.method() == Some(Method::Invite);
        let mut extra = String::new();
        if invite {
            let rr = record_routes(req);
            if !rr.is_empty() {
                extra.push_str(&format!("Record-Route: {}\r\n", rr.join(", ")));
            }
            extra.push_str(&format!("Contact: {}\r\n", self.contact()));
        }
        let sdp = self.sdp();
        let bytes = edit::response(
            req,
            status,
            reason,
            &ResponseOpts {
                to_tag: Some(to_tag.as_bytes()),
                extra: extra.as_bytes(),
                body: (invite && status == 200).then_some(("application/sdp", sdp.as_bytes())),
                ..Default::default()
            },
        );
        let to = response_dest(req, src)?;
        self.peer.send(to, bytes, "").await
    }

    /// REGISTER, answer the 401 challenge, REGISTER again; fails unless the second gets 200.
    pub async fn register(&mut self, password: &str) -> anyhow::Result<()> {
        let call_id = format!("{}@{}", token(), self.peer.addr.ip());
        let aor = self.aor();
        let from = format!("<{aor}>;tag={}", token());
        let to = format!("<{aor}>");
        let ruri = format!("sip:{}", self.domain);
        let mut req = Req {
            method: "REGISTER",
            ruri: &ruri,
            from: &from,
            to: &to,
            call_id: &call_id,
            cseq: 1,
            routes: &[],
            extra: "Expires: 300\r\n",
            body: None,
        };
        self.send_request(&req, "").await?;
        let challenge = self.peer.expect_final(Method::Register, 401).await?;
        let www = challenge
            .header_value(HeaderName::WwwAuthenticate)
            .context("401 without WWW-Authenticate")?;
        let p = Params::parse(www).context("WWW-Authenticate is not a digest challenge")?;
        let realm = p.get("realm").context("challenge without realm")?;
        let nonce = p.get("nonce").context("challenge without nonce")?;
        let cnonce = token();
        let auth = Answer {
            user: self.user,
            realm,
            password,
            method: "REGISTER",
            uri: &ruri,
            nonce,
            nc: "00000001",
            cnonce: &cnonce,
        }
        .header();
        let extra = format!("Expires: 300\r\n{auth}");
        req.cseq = 2;
        req.extra = &extra;
        self.send_request(&req, "with the digest answer").await?;
        self.peer.expect_final(Method::Register, 200).await?;
        Ok(())
    }

    /// Sends an INVITE to `ruri`; returns the call's Call-ID and our From (to build the
    /// dialog from the 200 later).
    pub async fn invite(&self, ruri: &str, note: &str) -> anyhow::Result<(String, String)> {
        let call_id = format!("{}@{}", token(), self.peer.addr.ip());
        let from = format!("<{}>;tag={}", self.aor(), token());
        let to = format!("<{ruri}>");
        let sdp = self.sdp();
        self.send_request(
            &Req {
                method: "INVITE",
                ruri,
                from: &from,
                to: &to,
                call_id: &call_id,
                cseq: 1,
                routes: &[],
                extra: "",
                body: Some(&sdp),
            },
            note,
        )
        .await?;
        Ok((call_id, from))
    }

    /// Waits for the caller's 180 Ringing of this call.
    pub async fn await_ringing(&mut self, call_id: &str) -> anyhow::Result<()> {
        self.peer
            .expect("180 Ringing", |m| {
                m.status() == Some(180) && m.call_id() == call_id.as_bytes()
            })
            .await?;
        Ok(())
    }

    /// Waits for the 200 to our INVITE, builds the dialog from it and sends the ACK along
    /// the reversed Record-Route.
    pub async fn await_answer_and_ack(
        &mut self,
        call_id: &str,
        from: &str,
    ) -> anyhow::Result<Dialog> {
        let (ok, _) = self
            .peer
            .expect("200 OK to the INVITE", |m| {
                m.status() == Some(200)
                    && m.cseq_method() == Method::Invite
                    && m.call_id() == call_id.as_bytes()
            })
            .await?;
        let media = remote_media(&ok, self.peer.name, "200 OK")?;
        let mut routes = record_routes(&ok);
        routes.reverse();
        let d = Dialog {
            call_id: call_id.to_string(),
            local: from.to_string(),
            remote: header_text(&ok, HeaderName::To, "200 OK")?,
            target: contact_uri(&ok, "200 OK")?,
            routes,
            cseq: 1,
            local_tag: String::new(),
            remote_media: media,
        };
        self.send_in_dialog(&d, "ACK", 1, "route set = Record-Route reversed")
            .await?;
        Ok(d)
    }

    /// Waits for an INVITE and forms the callee's side of the dialog from it.
    pub async fn await_invite(&mut self) -> anyhow::Result<Incoming> {
        let (invite, src) = self
            .peer
            .expect("an INVITE", |m| m.method() == Some(Method::Invite))
            .await?;
        // Phones and the trunk only ever hear from the SBC; for a phone this is the flow it
        // registered over, which is the point of Path.
        if src != self.peer.sbc {
            bail!(
                "{}: the INVITE came from {src}, not from the SBC",
                self.peer.name
            );
        }
        let media = remote_media(&invite, self.peer.name, "INVITE")?;
        let local_tag = token();
        let dialog = Dialog {
            call_id: lossy(invite.call_id()),
            local: format!(
                "{};tag={local_tag}",
                header_text(&invite, HeaderName::To, "INVITE")?
            ),
            remote: header_text(&invite, HeaderName::From, "INVITE")?,
            target: contact_uri(&invite, "INVITE")?,
            routes: record_routes(&invite),
            cseq: 0,
            local_tag,
            remote_media: media,
        };
        Ok(Incoming {
            invite,
            src,
            dialog,
        })
    }

    /// Answers an incoming INVITE with `status` (180 or 200).
    pub async fn answer(&self, inc: &Incoming, status: u16, reason: &str) -> anyhow::Result<()> {
        self.respond(&inc.invite, inc.src, status, reason, &inc.dialog.local_tag)
            .await
    }

    /// Waits for the ACK that completes the three-way handshake of this dialog.
    pub async fn await_ack(&mut self, d: &Dialog) -> anyhow::Result<()> {
        self.peer
            .expect("the ACK", |m| {
                m.method() == Some(Method::Ack) && m.call_id() == d.call_id.as_bytes()
            })
            .await?;
        Ok(())
    }

    /// Hangs up: BYE along the route set, then waits for its 200.
    pub async fn hang_up(&mut self, d: &mut Dialog) -> anyhow::Result<()> {
        d.cseq += 1;
        self.send_in_dialog(d, "BYE", d.cseq, "").await?;
        let call_id = d.call_id.clone();
        self.peer
            .expect("200 OK to the BYE", |m| {
                m.status() == Some(200)
                    && m.cseq_method() == Method::Bye
                    && m.call_id() == call_id.as_bytes()
            })
            .await?;
        Ok(())
    }

    /// Waits for the other side's BYE and answers it 200.
    pub async fn await_bye(&mut self, d: &Dialog) -> anyhow::Result<()> {
        let (bye, src) = self
            .peer
            .expect("a BYE", |m| {
                m.method() == Some(Method::Bye) && m.call_id() == d.call_id.as_bytes()
            })
            .await?;
        self.respond(&bye, src, 200, "OK", &d.local_tag).await
    }

    async fn send_in_dialog(
        &self,
        d: &Dialog,
        method: &str,
        cseq: u32,
        note: &str,
    ) -> anyhow::Result<()> {
        let req = Req {
            method,
            ruri: &d.target,
            from: &d.local,
            to: &d.remote,
            call_id: &d.call_id,
            cseq,
            routes: &d.routes,
            extra: "",
            body: None,
        };
        self.send_request(&req, note).await
    }
}

/// An INVITE received by a callee, with what it needs to answer it.
pub struct Incoming {
    pub invite: Message,
    src: SocketAddr,
    pub dialog: Dialog,
}

#[cfg(test)]
mod tests {
    use super::sdp_audio;

    #[test]
    fn sdp_audio_address() {
        let session = b"v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 41000 RTP/AVP 0\r\n";
        assert_eq!(sdp_audio(session), "10.0.0.2:41000".parse().ok());
        let media_level = b"v=0\r\nc=IN IP4 10.0.0.2\r\nm=video 5000 RTP/AVP 96\r\nc=IN IP4 10.0.0.9\r\nm=audio 6000 RTP/AVP 0\r\nc=IN IP4 10.0.0.3\r\n";
        assert_eq!(sdp_audio(media_level), "10.0.0.3:6000".parse().ok());
        assert_eq!(
            sdp_audio(b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 0 RTP/AVP 0\r\n"),
            None
        );
        assert_eq!(sdp_audio(b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n"), None);
    }
}
