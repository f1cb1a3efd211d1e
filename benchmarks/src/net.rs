//! Socket helpers shared by the generator and the UAS.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Requested socket buffer size. Bursts of a few thousand datagrams (a generator catching up
/// after a scheduling hiccup on a noisy 2-core machine) overflow the 208 KiB default and
/// would show up as losses of the system under test; 4 MiB is this machine's rmem_max.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Refuses any address outside loopback (127.0.0.0/8, ::1, v4-mapped 127/8). The tools are
/// load generators; pointing one at a real network by a typo must not be possible.
pub fn ensure_loopback(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    if is_loopback(addr.ip()) {
        Ok(())
    } else {
        anyhow::bail!(
            "{what} {addr} is not a loopback address; these tools only send to 127.0.0.0/8 or ::1"
        )
    }
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A bound UDP socket with large buffers and optionally SO_REUSEPORT (so several sockets,
/// one per thread, can share one address and the kernel spreads senders across them).
pub fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer still works, it only drops earlier under bursts.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The address to advertise in Via/Contact for a socket bound to `local`: an unspecified
/// bind address cannot be put in a header, so it becomes the loopback address.
pub fn advertised(local: SocketAddr) -> SocketAddr {
    if local.ip().is_unspecified() {
        let ip = match local {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, local.port())
    } else {
        local
    }
}

/// `host:port` as it goes in a SIP URI or Via (IPv6 in brackets, which `SocketAddr`'s
/// Display already does).
pub fn hostport(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The IP as it goes into SDP `c=`/`o=` lines (no brackets).
pub fn sdp_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("IN IP4 {v4}"),
        IpAddr::V6(v6) => format!("IN IP6 {v6}"),
    }
}
