//! Kernel arrival stamps (`SO_TIMESTAMPNS`) on what the SBC reads: how long a message waited
//! in a socket queue before the SBC got to it, its overload signal ([`super::Inbound::queued`]).
//! A saturated SBC falls behind in the kernel's queues, not in its own, so only the kernel
//! can say how late a message is.
//!
//! UDP asks for a stamp per datagram (`udp.rs`). A TCP read returns the stamp of the newest
//! segment it consumed, which [`StampedTcp`] takes from `recvmsg` and hands to the read loop
//! of its connection through [`take_stream_stamp`]: for a message read from older segments
//! it under-states the wait, which errs on the side of accepting.

use std::cell::Cell;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Room for one `SCM_TIMESTAMPNS` control message (a `timespec`), 8-byte aligned.
pub(super) type Ctrl = [u64; 8];

/// Asks the kernel to stamp what arrives on `sock` with its arrival time.
pub(super) fn enable(sock: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The arrival stamp (CLOCK_REALTIME, ns) in the control messages the kernel wrote: `len`
/// bytes of `ctrl`. `None` unless the first message is a whole `SCM_TIMESTAMPNS`, the one
/// these sockets ask for.
// The control lengths are size_t on glibc and socklen_t on musl.
#[allow(clippy::unnecessary_cast)]
pub(super) fn from_cmsgs(ctrl: &Ctrl, len: usize) -> Option<i128> {
    let want = size_of::<libc::cmsghdr>() + size_of::<libc::timespec>();
    if len < want || len > size_of::<Ctrl>() {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes (checked to fit the buffer) of control messages
    // into `ctrl`, which is 8-byte aligned; the data is read only when the header says it is
    // a whole SCM_TIMESTAMPNS.
    unsafe {
        let c = ctrl.as_ptr().cast::<libc::cmsghdr>();
        if (*c).cmsg_level != libc::SOL_SOCKET
            || (*c).cmsg_type != libc::SCM_TIMESTAMPNS
            || ((*c).cmsg_len as usize) < want
        {
            return None;
        }
        let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
        Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
    }
}

/// CLOCK_REALTIME in ns, the clock of the kernel's arrival stamps.
pub(super) fn realtime_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// How long since `stamp` (zero when there is none, or the clock stepped back past it).
pub(super) fn waited(stamp: Option<i128>, now_ns: i128) -> Duration {
    stamp
        .and_then(|t| u64::try_from(now_ns - t).ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

thread_local! {
    /// The stamp of the last [`StampedTcp`] read on this thread, for its caller to take
    /// right after the read returns (nothing else runs on the thread in between).
    static STREAM_STAMP: Cell<Option<i128>> = const { Cell::new(None) };
}

/// Forgets any stamp left on this thread: called before a read, so a read that did not reach
/// the socket (TLS plaintext already decrypted) finds none rather than another connection's.
pub(super) fn clear_stream_stamp() {
    STREAM_STAMP.with(|s| s.set(None));
}

/// The stamp the last read on this thread got from a [`StampedTcp`], if it got one.
pub(super) fn take_stream_stamp() -> Option<i128> {
    STREAM_STAMP.with(Cell::take)
}

/// A TCP connection whose reads carry the kernel's arrival stamp (`recvmsg` instead of
/// `read`: the same one system call). TLS runs over it unchanged.
#[derive(Debug)]
pub(super) struct StampedTcp(TcpStream);

impl StampedTcp {
    pub(super) fn new(tcp: TcpStream) -> StampedTcp {
        if let Err(err) = enable(&tcp) {
            tracing::debug!(error = %err, "no TCP arrival timestamps");
        }
        StampedTcp(tcp)
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// One `recvmsg` into `buf`: the byte count and the arrival stamp of the newest segment read.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<i128>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut ctrl: Ctrl = [0; 8];
    // SAFETY: all-zero is a valid msghdr; the pointers set below stay valid for the call.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = ctrl.as_mut_ptr().cast();
    hdr.msg_controllen = size_of::<Ctrl>() as _;
    // SAFETY: `hdr` points at one iovec over `buf` and at `ctrl`, both live for the call.
    let n = unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_DONTWAIT) };
    let Ok(n) = usize::try_from(n) else {
        return Err(io::Error::last_os_error());
    };
    // The control lengths are size_t on glibc and socklen_t on musl.
    #[allow(clippy::unnecessary_cast)]
    let stamp = from_cmsgs(&ctrl, hdr.msg_controllen as usize);
    Ok((n.min(buf.len()), stamp))
}

impl AsyncRead for StampedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.get_mut().0;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            match tcp.try_io(Interest::READABLE, || recv_stamped(tcp.as_raw_fd(), dst)) {
                Ok((n, stamp)) => {
                    buf.advance(n);
                    if stamp.is_some() {
                        STREAM_STAMP.with(|s| s.set(stamp));
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for StampedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A read returns the data and a stamp from when it arrived, not from when it was read.
    #[tokio::test]
    async fn a_read_carries_the_arrival_stamp_of_its_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.expect("connect");
        let mut server = StampedTcp::new(accepted.expect("accept").0);
        let mut buf = [0u8; 64];
        // The first socket in the system to ask for stamps turns them on in a kernel work
        // item a moment later (in the SBC the UDP sockets have long done it): until a byte
        // arrives stamped, none is asked of the test.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            client.write_all(b".").await.expect("write");
            clear_stream_stamp();
            server.read_exact(&mut buf[..1]).await.expect("read");
            if take_stream_stamp().is_some() || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent_ns = realtime_ns();
        client.write_all(b"hello").await.expect("write");
        tokio::time::sleep(Duration::from_millis(150)).await;
        clear_stream_stamp();
        let n = server.read(&mut buf).await.expect("read");
        let stamp = take_stream_stamp();
        assert_eq!(&buf[..n], b"hello");
        let stamp = stamp.expect("a stamp");
        assert!(stamp >= sent_ns - 1_000_000, "{stamp} vs {sent_ns}");
        let w = waited(Some(stamp), realtime_ns());
        assert!(w >= Duration::from_millis(140), "{w:?}");
        assert_eq!(take_stream_stamp(), None, "taken once");

        // Writes pass through; end of stream reads 0.
        server.write_all(b"back").await.expect("write");
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"back");
        drop(client);
        assert_eq!(server.read(&mut buf).await.expect("eof"), 0);
    }

    #[test]
    fn control_messages_that_are_not_a_whole_stamp_give_none() {
        let ctrl: Ctrl = [0; 8];
        assert_eq!(from_cmsgs(&ctrl, 0), None);
        assert_eq!(from_cmsgs(&ctrl, size_of::<Ctrl>() + 8), None);
        // Right length, but level and type are zero.
        let len = size_of::<libc::cmsghdr>() + size_of::<libc::timespec>();
        assert_eq!(from_cmsgs(&ctrl, len), None);
        assert_eq!(waited(None, 5), Duration::ZERO);
        assert_eq!(waited(Some(10), 5), Duration::ZERO, "clock stepped back");
        assert_eq!(waited(Some(5), 1_000_005), Duration::from_millis(1));
    }
}
