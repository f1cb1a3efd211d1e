//! Small helpers every end-to-end test needs: a free loopback port, and RTP packets to send
//! through the relay and count at the far end.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// A UDP address on `ip` that was free a moment ago (bound to port 0, then released), for a
/// peer that must be named in the SBC's config before it starts.
pub fn free_udp(ip: &str) -> SocketAddr {
    let s = std::net::UdpSocket::bind(format!("{ip}:0")).expect("bind");
    s.local_addr().expect("addr")
}

/// A minimal RTP packet: version 2, PCMU, 160 bytes of payload, `seq` and `ssrc` as given
/// (the SSRC lets a receiver tell whose packets arrived).
pub fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// Sends `n` RTP packets of `ssrc` to `to`, pausing a little every 10 (bounded: `n` packets).
pub async fn send_rtp(s: &UdpSocket, to: SocketAddr, ssrc: u32, n: u16) {
    for seq in 0..n {
        s.send_to(&rtp(seq, ssrc), to).await.expect("send rtp");
        if seq % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// RTP packets of `ssrc` received on `s` until it stays quiet for 300 ms.
pub async fn count_rtp(s: &UdpSocket, ssrc: u32) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while let Ok(Ok((len, _))) =
        tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
    {
        if len >= 12 && buf[8..12] == ssrc.to_be_bytes() {
            n += 1;
        }
    }
    n
}
