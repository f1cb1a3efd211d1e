//! UDP: one receive task per socket, sends straight from the caller's thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sbc_sip::Transport;
use tokio::net::UdpSocket;

use super::{stats, Dest, Flow, Inbound, Inner, SendError};

/// Largest UDP payload over IPv4/IPv6 without jumbograms.
const RECV_BUFFER: usize = 65535;

/// A bound UDP listener socket. Shared between its receive task and senders.
pub(super) struct UdpEntry {
    pub(super) socket: UdpSocket,
    /// The bound address with port 0 resolved; `Flow::local` of every flow on this socket.
    pub(super) local: SocketAddr,
}

pub(super) async fn recv_loop(inner: Arc<Inner>, entry: Arc<UdpEntry>) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let (n, remote) = match entry.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(err) => {
                // A shared listener socket must survive anything one peer provokes (some
                // platforms report ICMP errors here); the pause only stops a persistent error
                // from spinning a core.
                tracing::debug!(local = %entry.local, error = %err, "UDP receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let received_at = Instant::now();
        let data = &buf[..n];
        if n > inner.cfg.max_message_size {
            stats::framing_error(Transport::Udp);
            tracing::debug!(%remote, len = n, "dropping oversize UDP datagram");
            continue;
        }
        // CRLF keep-alives (and empty datagrams) carry no message. RFC 5626 UDP keep-alive is
        // STUN, which is out of scope, so they are not answered.
        if data.iter().all(|&b| b == b'\r' || b == b'\n') {
            continue;
        }
        let flow = Flow {
            transport: Transport::Udp,
            local: entry.local,
            remote,
            conn: None,
        };
        inner.handler.on_message(Inbound {
            flow,
            data: Bytes::copy_from_slice(data),
            received_at,
        });
    }
}

impl Inner {
    /// The socket bound exactly at `local`, for replies over a known flow.
    pub(super) fn udp_at(&self, local: SocketAddr) -> Option<Arc<UdpEntry>> {
        self.udp.read().iter().find(|e| e.local == local).cloned()
    }

    /// A socket to send a new request to `remote` from: one of the same address family,
    /// preferring one whose address can plausibly reach it (wildcard, or loopback exactly when
    /// the remote is loopback), since a loopback-bound socket cannot reach other hosts.
    pub(super) fn udp_for(&self, remote: SocketAddr) -> Option<Arc<UdpEntry>> {
        let list = self.udp.read();
        let same_family = || {
            list.iter()
                .filter(move |e| e.local.is_ipv4() == remote.is_ipv4())
        };
        same_family()
            .find(|e| {
                let ip = e.local.ip();
                ip.is_unspecified() || ip.is_loopback() == remote.ip().is_loopback()
            })
            .or_else(|| same_family().next())
            .cloned()
    }

    /// Sends without blocking: the datagram normally goes out at once; if the socket buffer
    /// is full the send finishes in a task and a failure is reported to the handler.
    pub(super) fn send_udp(
        &self,
        entry: Arc<UdpEntry>,
        remote: SocketAddr,
        dest: &Dest,
        data: Bytes,
    ) -> Result<Flow, SendError> {
        let flow = Flow {
            transport: Transport::Udp,
            local: entry.local,
            remote,
            conn: None,
        };
        match entry.socket.try_send_to(&data, remote) {
            Ok(_) => Ok(flow),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let handler = self.handler.clone();
                let dest = dest.clone();
                self.rt.spawn(async move {
                    if let Err(err) = entry.socket.send_to(&data, remote).await {
                        handler.on_send_error(&dest, &data, &SendError::Io(err));
                    }
                });
                Ok(flow)
            }
            Err(err) => Err(SendError::Io(err)),
        }
    }
}
