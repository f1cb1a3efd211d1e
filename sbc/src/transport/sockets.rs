//! Binding listener sockets with the options tokio's plain `bind` does not set.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Kernel receive buffer asked for on UDP sockets: absorbs bursts (a REGISTER storm after an
/// outage) while the receive task is inside the handler. The kernel may cap it; that is fine.
const UDP_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Pending-connection backlog for stream listeners.
const LISTEN_BACKLOG: i32 = 1024;

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        // An IPv6 wildcard socket would otherwise also take IPv4 traffic as mapped addresses,
        // colliding with a separate IPv4 listener on the same port and giving flows two
        // spellings of one peer.
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A blocking UDP socket: its receive thread sleeps in `recvmmsg` (one system call per wake,
/// no epoll round trip), while sends from any thread pass MSG_DONTWAIT. The read timeout
/// lets the thread notice shutdown.
pub(super) fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    if let Err(err) = sock.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!(%addr, error = %err, "could not enlarge UDP receive buffer");
    }
    sock.bind(&addr.into())?;
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    Ok(sock.into())
}

pub(super) fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    // Lets a restarted SBC rebind while connections of the previous process sit in TIME_WAIT.
    #[cfg(unix)]
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(sock.into())
}
