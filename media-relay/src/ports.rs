//! RTP/RTCP port-pair pools, one per distinct (bind address, range).
//!
//! Pairs are handed out from the front of a FIFO and returned to the back, so a pair just
//! released is the last to be reused: late packets of an ended call then hit a closed port
//! instead of a new call. Binding happens at allocation, so a port held by another process is
//! found and skipped right there, and the caller gets bound sockets, not a promise.
//!
//! An RTP port may get a second socket, its *twin*, bound to the same address and port
//! (`RelayConfig::connect_latched`). The first bind is exclusive (it fails where anybody holds
//! the port); then `SO_REUSEPORT` is set on both for the second bind and cleared again right
//! after it: a third socket (another process of the same user, a second SBC on the same range)
//! then gets "address in use" as it would without the twin, and the kernel picks between the
//! two by plain lookup score. Once the worker `connect`s the twin to the latched source, that
//! source's datagrams go to the twin (a connected socket outscores an unconnected one) and
//! everything else still reaches the first socket.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;

use socket2::{Domain, Protocol, Socket, Type};

/// Number of even/odd pairs (RTP even, RTCP = RTP + 1) inside an inclusive range.
pub(crate) fn pair_count(range: &RangeInclusive<u16>) -> usize {
    pairs(range).count()
}

fn pairs(range: &RangeInclusive<u16>) -> impl Iterator<Item = u16> {
    let start = u32::from(*range.start());
    let end = u32::from(*range.end());
    let first = start + (start & 1);
    (first..end)
        .step_by(2)
        .filter(move |p| *p < end && *p > 0)
        .map(|p| p as u16)
}

/// A bound RTP/RTCP socket pair, non-blocking, ready to be registered with a worker.
pub(crate) struct BoundPair {
    pub rtp_port: u16,
    pub rtp: UdpSocket,
    /// The RTP port's second socket (see the module doc), when asked for and available.
    pub rtp_twin: Option<UdpSocket>,
    pub rtcp: UdpSocket,
}

/// Free pairs of one address and range.
pub(crate) struct PortPool {
    bind: IpAddr,
    free: VecDeque<u16>,
    total: usize,
}

impl PortPool {
    pub fn new(bind: IpAddr, range: &RangeInclusive<u16>) -> Self {
        let free: VecDeque<u16> = pairs(range).collect();
        PortPool {
            bind,
            total: free.len(),
            free,
        }
    }

    /// Pairs not handed out (some may still turn out to be busy in another process).
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Pairs in the range.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Takes the next pair that binds. Each free pair is tried at most once per call; a pair
    /// that fails with "address in use" goes to the back (the other process may let go of it)
    /// and the next one is tried. `None` when no pair could be bound. With `twin`, the RTP
    /// port also gets its second socket.
    pub fn allocate(&mut self, twin: bool) -> Option<BoundPair> {
        for _ in 0..self.free.len() {
            let port = self.free.pop_front()?;
            match bind_pair(self.bind, port, twin) {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::debug!(port, bind = %self.bind, error = %e, "RTP port pair busy, skipped");
                    self.free.push_back(port);
                }
            }
        }
        None
    }

    /// Gives a pair back. The caller has closed both sockets already.
    pub fn release(&mut self, rtp_port: u16) {
        debug_assert!(
            !self.free.contains(&rtp_port),
            "double release of {rtp_port}"
        );
        self.free.push_back(rtp_port);
    }
}

fn bind_pair(ip: IpAddr, port: u16, twin: bool) -> io::Result<BoundPair> {
    let addr = SocketAddr::new(ip, port);
    let (rtp, rtp_twin) = if twin {
        bind_twins(addr)?
    } else {
        (UdpSocket::bind(addr)?, None)
    };
    let rtcp = UdpSocket::bind(SocketAddr::new(ip, port + 1))?;
    rtp.set_nonblocking(true)?;
    rtcp.set_nonblocking(true)?;
    Ok(BoundPair {
        rtp_port: port,
        rtp,
        rtp_twin,
        rtcp,
    })
}

/// Binds `addr` and, if it can, a second socket to the same address (module doc). The port is
/// refused only when the first bind fails; a second socket that cannot be had (descriptor
/// limit) leaves the stream without one.
fn bind_twins(addr: SocketAddr) -> io::Result<(UdpSocket, Option<UdpSocket>)> {
    let open = || -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    // The first bind is exclusive, as without a twin: it fails wherever anybody holds the
    // port, even a socket of this user with SO_REUSEPORT set. Only then is the port opened
    // for the second socket.
    let first = open()?;
    first.bind(&addr.into())?;
    first.set_reuse_port(true)?;
    let second = open().and_then(|s| {
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    });
    // Closed again for everybody else: the two sockets stay bound side by side.
    first.set_reuse_port(false)?;
    let second = match second.and_then(|s| s.set_reuse_port(false).map(|()| s)) {
        Ok(s) => Some(UdpSocket::from(s)),
        Err(e) => {
            tracing::debug!(%addr, error = %e, "no second RTP socket; the stream sends unconnected");
            None
        }
    };
    Ok((UdpSocket::from(first), second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_even_odd_inside_the_range() {
        assert_eq!(
            pairs(&(10000..=10005)).collect::<Vec<_>>(),
            vec![10000, 10002, 10004]
        );
        assert_eq!(
            pairs(&(10001..=10006)).collect::<Vec<_>>(),
            vec![10002, 10004]
        );
        assert_eq!(pairs(&(10001..=10002)).count(), 0);
        assert_eq!(pairs(&(65534..=65535)).collect::<Vec<_>>(), vec![65534]);
        assert_eq!(pairs(&(0..=3)).collect::<Vec<_>>(), vec![2]);
    }

    /// An even port that was free a moment ago (the kernel's pick, rounded down).
    fn free_even_port(ip: IpAddr) -> u16 {
        let probe = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        probe.local_addr().unwrap().port() & !1
    }

    #[test]
    fn busy_port_is_skipped_and_release_reuses_last() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Find a free even port pair, then occupy its RTCP half from "another process".
        let base = free_even_port(ip);
        let range = base.saturating_sub(4)..=base + 1;
        let Ok(blocker) = UdpSocket::bind(SocketAddr::new(ip, base - 3)) else {
            return; // port raced away; nothing to prove on this run
        };
        let mut pool = PortPool::new(ip, &range);
        assert_eq!(pool.total(), 3);
        let a = pool.allocate(false).expect("a free pair");
        assert_ne!(
            a.rtp_port,
            base - 4,
            "pair with busy RTCP port must be skipped"
        );
        assert_eq!(a.rtp_port % 2, 0);
        let b = pool.allocate(false);
        let c = pool.allocate(false);
        // base-4 is blocked, so at most two pairs are bound.
        assert!(b.is_none() || c.is_none());
        drop(blocker);
        let port_a = a.rtp_port;
        drop(a);
        pool.release(port_a);
        assert!(pool.allocate(false).is_some());
        drop((b, c));
    }

    #[test]
    fn a_port_shared_by_reuseport_elsewhere_is_skipped() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let base = free_even_port(ip);
        // Another program of this user, listening with SO_REUSEPORT on the first pair's port.
        let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        other.set_reuse_port(true).unwrap();
        if other.bind(&SocketAddr::new(ip, base).into()).is_err() {
            return; // port raced away
        }
        let mut pool = PortPool::new(ip, &(base..=base + 3));
        // None: base + 2 raced away.
        if let Some(pair) = pool.allocate(true) {
            assert_eq!(pair.rtp_port, base + 2, "shared port must be skipped");
        }
    }

    #[test]
    fn twin_gets_its_connected_peer_and_the_first_socket_the_rest() {
        for ip in ["127.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let base = free_even_port(ip);
            let mut pool = PortPool::new(ip, &(base..=base + 1));
            let Some(pair) = pool.allocate(true) else {
                return; // port raced away
            };
            let twin = pair.rtp_twin.expect("a second socket");
            let port = SocketAddr::new(ip, pair.rtp_port);
            assert!(
                UdpSocket::bind(port).is_err(),
                "a third socket must not get the port"
            );
            let peer = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
            let other = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
            twin.connect(peer.local_addr().unwrap()).unwrap();
            for _ in 0..3 {
                peer.send_to(b"peer", port).unwrap();
                other.send_to(b"other", port).unwrap();
            }
            let read = |s: &UdpSocket| {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 16];
                for _ in 0..3 {
                    let (n, from) = s.recv_from(&mut buf).unwrap();
                    got.push((buf[..n].to_vec(), from));
                }
                got
            };
            for (data, from) in read(&twin) {
                assert_eq!(
                    (data.as_slice(), from),
                    (&b"peer"[..], peer.local_addr().unwrap())
                );
            }
            for (data, from) in read(&pair.rtp) {
                assert_eq!(
                    (data.as_slice(), from),
                    (&b"other"[..], other.local_addr().unwrap())
                );
            }
            // The twin sends from the port itself.
            twin.send(b"back").unwrap();
            let mut buf = [0u8; 16];
            peer.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"back"[..], port));
        }
    }
}
