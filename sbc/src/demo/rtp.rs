//! A short burst of real RTP both ways through the SBC's media relay.
//!
//! Signalling alone does not show that an SBC anchors media: the SDP could be rewritten and
//! the packets still go nowhere. So each call of the demo sends real RTP packets (PCMU
//! silence, 20 ms apart, as a phone would) from each side's RTP socket to the address its SDP
//! named, which is a relay port of the SBC, and counts what arrives on the other side. Packets
//! are counted by SSRC, so a stray packet of an earlier call is never counted for this one, and
//! a packet only counts if it came from the relay address this side sends to (media is
//! symmetric through the relay: each side hears the relay port it talks to).

use super::ua::Ua;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// PCMU, 8000 Hz: 160 samples per 20 ms packet.
const SAMPLES: u32 = 160;
/// PCMU silence.
const SILENCE: u8 = 0xff;
/// Wait up to this long after the last packet is due for stragglers. Generous, because a
/// receiver stops as soon as every packet has arrived: only a lossy run waits it out, and a
/// slow (loaded, debug-built) run should not be mistaken for a lossy one.
const GRACE: Duration = Duration::from_secs(1);
/// Datagrams drained from a socket before a burst, at most (a bound on a loop that would
/// otherwise spin on a flooded socket).
const DRAIN_MAX: usize = 1024;

/// One direction of a burst.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub sent: u32,
    pub received: u32,
}

impl Flow {
    /// Delivered well enough to call the step passed: something arrived, and at most a tenth
    /// was lost (loopback loses nothing; the margin is for a loaded machine).
    pub fn ok(&self) -> bool {
        self.received > 0 && self.received * 10 >= self.sent * 9
    }
}

fn packet(ssrc: u32, seq: u16, timestamp: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + SAMPLES as usize);
    p.push(0x80); // V=2, no padding, no extension, no CSRC
    p.push(0); // no marker, PT 0 (PCMU)
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.resize(12 + SAMPLES as usize, SILENCE);
    p
}

/// The SSRC of an RTP packet, if it is one.
fn ssrc_of(p: &[u8]) -> Option<u32> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    Some(u32::from_be_bytes([p[8], p[9], p[10], p[11]]))
}

/// Throws away whatever is queued on the socket (late packets of an earlier call).
fn drain(sock: &UdpSocket) {
    let mut buf = [0u8; 2048];
    for _ in 0..DRAIN_MAX {
        if sock.try_recv_from(&mut buf).is_err() {
            break;
        }
    }
}

async fn send(sock: &UdpSocket, to: SocketAddr, ssrc: u32, count: u32, gap: Duration) -> u32 {
    let mut ticks = tokio::time::interval(gap);
    let seq0: u16 = rand::random();
    let ts0: u32 = rand::random();
    let mut sent = 0;
    for i in 0..count {
        ticks.tick().await;
        // `i` < count, which the caller keeps small: the casts cannot truncate.
        let seq = seq0.wrapping_add(i as u16);
        let ts = ts0.wrapping_add(i.wrapping_mul(SAMPLES));
        match sock.send_to(&packet(ssrc, seq, ts), to).await {
            Ok(_) => sent += 1,
            Err(e) => tracing::debug!(%to, error = %e, "demo RTP send failed"),
        }
    }
    sent
}

/// Counts packets of `ssrc` from `relay` until `count` arrived or `deadline`.
async fn receive(
    sock: &UdpSocket,
    relay: SocketAddr,
    ssrc: u32,
    count: u32,
    deadline: Instant,
) -> u32 {
    let mut buf = [0u8; 2048];
    let mut received = 0;
    while received < count {
        match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            Err(_) => break,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "demo RTP receive failed");
                // An ICMP error surfaced on the socket; keep listening until the deadline.
                continue;
            }
            Ok(Ok((n, from))) => {
                if from == relay && ssrc_of(&buf[..n]) == Some(ssrc) {
                    received += 1;
                }
            }
        }
    }
    received
}

/// Sends `count` packets `gap` apart from `a` to `a_to` and from `b` to `b_to` at the same
/// time, and counts what each side receives. Returns (a to b, b to a).
pub async fn exchange(
    a: &Ua,
    a_to: SocketAddr,
    b: &Ua,
    b_to: SocketAddr,
    count: u32,
    gap: Duration,
) -> (Flow, Flow) {
    drain(&a.rtp);
    drain(&b.rtp);
    let (ssrc_a, ssrc_b): (u32, u32) = (rand::random(), rand::random());
    let deadline = Instant::now() + gap * count + GRACE;
    let (sent_a, sent_b, got_b, got_a) = tokio::join!(
        send(&a.rtp, a_to, ssrc_a, count, gap),
        send(&b.rtp, b_to, ssrc_b, count, gap),
        receive(&b.rtp, b_to, ssrc_a, count, deadline),
        receive(&a.rtp, a_to, ssrc_b, count, deadline),
    );
    (
        Flow {
            sent: sent_a,
            received: got_b,
        },
        Flow {
            sent: sent_b,
            received: got_a,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_rtp_version_2_with_their_ssrc() {
        let p = packet(0xdead_beef, 7, 160);
        assert_eq!(p.len(), 172);
        assert_eq!(ssrc_of(&p), Some(0xdead_beef));
        assert_eq!(ssrc_of(b"not rtp at all"), None);
        assert!(Flow {
            sent: 25,
            received: 25
        }
        .ok());
        assert!(!Flow {
            sent: 25,
            received: 0
        }
        .ok());
    }
}
