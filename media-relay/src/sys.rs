//! The Linux system calls of the forwarding loop: epoll, eventfd, recvmmsg/sendmmsg, and
//! conversions between `sockaddr_storage` and `SocketAddr`. All `unsafe` of the crate is here
//! (and in `uring`, the io_uring variant), behind small safe functions.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Packets taken from (and sent to) one socket per system call. 32 is where recvmmsg's gain
/// flattens out for RTP-sized packets; at 50 packets/s per stream a socket rarely holds more.
pub(crate) const BATCH: usize = 32;
/// Receive buffer per packet. RTP over UDP stays under the path MTU; a larger datagram is
/// truncated, flagged and dropped rather than forwarded cut.
pub(crate) const BUF_LEN: usize = 2048;

/// Monotonic nanoseconds (CLOCK_MONOTONIC), the clock of all relay timers. The same clock in
/// every process of the machine, which the loopback benchmark uses to time packets.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Sets the calling thread's timer slack: how late the kernel may end its sleeps to group
/// wake-ups (50 us by default, as much as a quarter of the relay's coalescing wait).
pub(crate) fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and touches no memory of ours; a
    // failure only leaves the default slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An epoll instance, level-triggered, readable events only.
pub(crate) struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the returned fd is owned from here on.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Level-triggered: reported while readable (the eventfd doorbell).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_with(fd, token, libc::EPOLLIN as u32)
    }

    /// Edge-triggered: reported once per arrival. The caller must read until the socket is
    /// empty or remember to come back. Saves the kernel a second poll of every reported
    /// socket (a level-triggered item is re-queued and polled again on the next wait just to
    /// find it empty): about 5% of the relay's CPU per packet at 50,000 packets/s.
    pub fn add_edge(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_with(fd, token, (libc::EPOLLIN | libc::EPOLLET) as u32)
    }

    fn add_with(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event pointer.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll fd; the event argument is ignored for DEL but must be non-null
        // on old kernels.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) })?;
        Ok(())
    }

    /// Waits for events; an interrupted wait returns 0 events.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: the buffer holds `max` events.
        let n =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }
}

/// A non-blocking eventfd: the control side's doorbell to a worker blocked in epoll_wait.
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: fresh fd owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) still leaves the fd
        // readable, which is all a wake-up needs, so the result is ignored.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN just means nothing was pending.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// A socket address pre-encoded for sendmmsg, so the hot path never converts.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub fn new(addr: &SocketAddr) -> RawAddr {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

impl RawAddr {
    /// The address for a `sendto`-style request: pointer (valid while `self` is) and length.
    pub fn as_ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        (
            (&self.storage as *const libc::sockaddr_storage).cast(),
            self.len,
        )
    }
}

/// Decodes an address the kernel wrote as raw bytes (io_uring's recvmsg header is followed by
/// the name, unaligned); `None` for other families or short names.
pub(crate) fn decode_bytes(name: &[u8]) -> Option<SocketAddr> {
    let len = name.len().min(size_of::<libc::sockaddr_storage>());
    // SAFETY: all-zero is a valid sockaddr_storage; at most its size is copied into it from a
    // slice at least that long.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    decode(&storage, len as libc::socklen_t)
}

/// Decodes a kernel-filled address; `None` for families other than IPv4/IPv6.
fn decode(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(storage as *const _ as *const _) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(storage as *const _ as *const _) };
            // Flow info is left out: it is not part of who sent the packet, and a sender
            // changing flow labels must not look like a new source to the latch.
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                0,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Buffers and message headers for one recvmmsg and one sendmmsg, allocated once per worker.
/// The headers point into the same heap block, so it must never move out of its `Box`; it is
/// not `Clone`. (The send headers' msg_name is the one exception: `send` points it at the
/// destination it is given, for the duration of that call only.)
pub(crate) struct Batch {
    data: [[u8; BUF_LEN]; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    rx_iov: [libc::iovec; BATCH],
    rx: [libc::mmsghdr; BATCH],
    tx_iov: [libc::iovec; BATCH],
    tx: [libc::mmsghdr; BATCH],
    received: usize,
}

// SAFETY: the raw pointers inside point only into the same heap block (the Box's contents),
// which moves with the Box; nothing else aliases it, so handing it to another thread is sound.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new() -> Box<Batch> {
        let layout = std::alloc::Layout::new::<Batch>();
        // SAFETY: every field is plain old data for which all-zero bytes are valid; the block
        // is allocated with Batch's layout and handed to Box, which frees it with the same.
        let mut b: Box<Batch> = unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut Batch;
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Box::from_raw(p)
        };
        for i in 0..BATCH {
            b.rx_iov[i] = libc::iovec {
                iov_base: b.data[i].as_mut_ptr().cast(),
                iov_len: BUF_LEN,
            };
            let iov: *mut libc::iovec = &mut b.rx_iov[i];
            let name: *mut libc::sockaddr_storage = &mut b.addrs[i];
            let h = &mut b.rx[i].msg_hdr;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h.msg_name = name.cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let tiov: *mut libc::iovec = &mut b.tx_iov[i];
            let t = &mut b.tx[i].msg_hdr;
            t.msg_iov = tiov;
            t.msg_iovlen = 1;
            // msg_name is set by `send`, to the destination it is given.
        }
        b
    }

    /// Receives up to [`BATCH`] datagrams without blocking. `Ok(0)` when none are waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in &mut self.rx[..self.received] {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
        }
        self.received = 0;
        // SAFETY: rx holds BATCH headers pointing at buffers owned by self, which outlive the
        // call; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.rx.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.received = n as usize;
        Ok(self.received)
    }

    /// Datagram `i` of the last receive: its bytes and whether the kernel cut it short.
    #[inline]
    pub fn packet(&self, i: usize) -> (&[u8], bool) {
        let h = &self.rx[i];
        let len = (h.msg_len as usize).min(BUF_LEN);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&self.data[i][..len], truncated)
    }

    /// Source address of datagram `i` of the last receive.
    #[inline]
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        decode(&self.addrs[i], self.rx[i].msg_hdr.msg_namelen)
    }

    /// Puts received datagram `i` into send slot `slot`.
    #[inline]
    pub fn queue(&mut self, slot: usize, i: usize) {
        let len = (self.rx[i].msg_len as usize).min(BUF_LEN);
        self.tx_iov[slot] = libc::iovec {
            iov_base: self.data[i].as_mut_ptr().cast(),
            iov_len: len,
        };
    }

    /// Sends the first `count` queued datagrams to `dest` from `fd` (no `dest`: `fd` is
    /// connected). Returns how many left and how many failed; a failed datagram is skipped (a
    /// relay drops, it does not retry), and a full send buffer drops the rest of the batch.
    pub fn send(&mut self, fd: RawFd, count: usize, dest: Option<&RawAddr>) -> (usize, usize) {
        // Pointing at the caller's address (it outlives the call) rather than copying its 128
        // bytes into the batch for every send.
        let (name, len) = match dest {
            Some(d) => (
                (&d.storage as *const libc::sockaddr_storage).cast_mut(),
                d.len,
            ),
            None => (std::ptr::null_mut(), 0),
        };
        for h in &mut self.tx[..count] {
            h.msg_hdr.msg_name = name.cast();
            h.msg_hdr.msg_namelen = len;
        }
        let (mut off, mut sent, mut failed) = (0usize, 0usize, 0usize);
        while off < count {
            // SAFETY: tx[off..count] are initialised headers pointing at self's buffers and
            // at `dest`, all alive for the call; the kernel only reads msg_name on send.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.tx.as_mut_ptr().add(off),
                    (count - off) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                off += r as usize;
                sent += r as usize;
                continue;
            }
            if r == 0 {
                failed += count - off;
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    failed += count - off;
                    break;
                }
                _ => {
                    // The datagram at `off` failed on its own (e.g. a pending ICMP error).
                    failed += 1;
                    off += 1;
                }
            }
        }
        (sent, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_addr_round_trips() {
        for s in ["127.0.0.1:5004", "[::1]:40000", "[2001:db8::7]:9"] {
            let a: SocketAddr = s.parse().unwrap();
            let raw = RawAddr::new(&a);
            assert_eq!(decode(&raw.storage, raw.len), Some(a));
            // io_uring hands the name over as bytes, possibly unaligned.
            let (p, len) = raw.as_ptr();
            // SAFETY: p points at raw's storage, valid for len bytes.
            let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) };
            let mut shifted = vec![0u8; 1];
            shifted.extend_from_slice(bytes);
            assert_eq!(decode_bytes(&shifted[1..]), Some(a));
            assert_eq!(decode_bytes(&shifted[1..4]), None, "short name");
        }
    }

    #[test]
    fn batch_receives_and_sends_on_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        for i in 0..5u8 {
            a.send_to(&[i; 20], b.local_addr().unwrap()).unwrap();
        }
        let mut batch = Batch::new();
        let mut got = 0;
        while got < 5 {
            let n = batch.recv(b.as_raw_fd()).unwrap();
            for i in 0..n {
                assert_eq!(batch.source(i), Some(a.local_addr().unwrap()));
                let (p, trunc) = batch.packet(i);
                assert!(!trunc);
                assert_eq!(p.len(), 20);
                batch.queue(i, i);
            }
            let dest = RawAddr::new(&c.local_addr().unwrap());
            assert_eq!(batch.send(b.as_raw_fd(), n, Some(&dest)), (n, 0));
            got += n;
        }
        let mut buf = [0u8; 64];
        for i in 0..5u8 {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((n, buf[0], from), (20, i, b.local_addr().unwrap()));
        }
    }
}
