//! UDP: one receive task per socket, sends straight from the caller's thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sbc_sip::Transport;
use std::net::UdpSocket;
use std::sync::atomic::Ordering;

use super::{stamp, stats, Dest, Flow, Inbound, Inner, SendError};

/// Largest UDP payload over IPv4/IPv6 without jumbograms.
const RECV_BUFFER: usize = 65535;

/// A bound UDP listener socket. Shared between its receive task and senders.
pub(super) struct UdpEntry {
    pub(super) socket: UdpSocket,
    /// The bound address with port 0 resolved; `Flow::local` of every flow on this socket.
    pub(super) local: SocketAddr,
}

/// Datagrams read per `recvmmsg` call and written per `sendmmsg` call.
const BATCH: usize = 32;

/// The receive thread of one UDP socket. It runs inside the runtime's context so that the
/// handler may spawn tasks, and ends within the socket's read timeout after shutdown.
pub(super) fn recv_thread(inner: Arc<Inner>, entry: Arc<UdpEntry>) {
    let _rt = inner.rt.enter();
    // One slot per datagram of a batch; a datagram larger than a slot is truncated by the
    // kernel (MSG_TRUNC tells) and dropped like any oversize message.
    let slot = inner.cfg.max_message_size.clamp(1024, RECV_BUFFER) + 1;
    let mut bufs = vec![0u8; slot * BATCH];
    let mut batch = mmsg::RecvBatch::new(BATCH);
    if let Err(err) = stamp::enable(&entry.socket) {
        tracing::debug!(local = %entry.local, error = %err, "no UDP arrival timestamps");
    }
    while !inner.shut_down.load(Ordering::Acquire) {
        let n = match batch.recv(&entry.socket, &mut bufs, slot) {
            Ok(n) => n,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(err) => {
                // A shared listener socket must survive anything one peer provokes (some
                // platforms report ICMP errors here); the pause only stops a persistent error
                // from spinning a core.
                tracing::debug!(local = %entry.local, error = %err, "UDP receive error");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let received_at = Instant::now();
        let now_ns = stamp::realtime_ns();
        // Replies produced while handling this batch leave in one sendmmsg per socket: fewer
        // system calls and fewer wake-ups of the peers.
        SEND_BATCH.with(|b| b.borrow_mut().active = true);
        for i in 0..n {
            let Some((len, truncated, remote)) = batch.meta(i) else {
                continue;
            };
            if truncated || len > inner.cfg.max_message_size {
                stats::framing_error(Transport::Udp);
                tracing::debug!(%remote, len, "dropping oversize UDP datagram");
                continue;
            }
            let data = &bufs[i * slot..i * slot + len.min(slot)];
            // CRLF keep-alives (and empty datagrams) carry no message. RFC 5626 UDP keep-alive
            // is STUN, which is out of scope, so they are not answered.
            if data.iter().all(|&b| b == b'\r' || b == b'\n') {
                continue;
            }
            let flow = Flow {
                transport: Transport::Udp,
                local: entry.local,
                remote,
                conn: None,
            };
            // How long it waited in the socket queue: the overload signal.
            let queued = stamp::waited(batch.arrival_ns(i), now_ns);
            super::deliver(
                &*inner.handler,
                Inbound {
                    flow,
                    data: Bytes::copy_from_slice(data),
                    received_at,
                    queued,
                },
            );
        }
        let pending = SEND_BATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.active = false;
            std::mem::take(&mut b.queue)
        });
        if !pending.is_empty() {
            inner.flush_udp_batch(pending);
        }
    }
}

/// Datagrams queued by sends made while a receive batch is being handled on this thread.
#[derive(Default)]
struct SendBatch {
    active: bool,
    queue: Vec<(Arc<UdpEntry>, SocketAddr, Dest, Bytes)>,
}

thread_local! {
    static SEND_BATCH: std::cell::RefCell<SendBatch> = std::cell::RefCell::new(SendBatch::default());
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
        let queued = SEND_BATCH.with(|b| {
            let mut b = b.borrow_mut();
            if b.active {
                b.queue
                    .push((entry.clone(), remote, dest.clone(), data.clone()));
                true
            } else {
                false
            }
        });
        if queued {
            return Ok(flow);
        }
        let sock = socket2::SockRef::from(&entry.socket);
        match sock.send_to_with_flags(&data, &remote.into(), libc::MSG_DONTWAIT) {
            Ok(_) => Ok(flow),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                // The socket buffer is full: finish off the SIP path, in a blocking task.
                let handler = self.handler.clone();
                let dest = dest.clone();
                self.rt.spawn_blocking(move || {
                    if let Err(err) = entry.socket.send_to(&data, remote) {
                        handler.on_send_error(&dest, &data, &SendError::Io(err));
                    }
                });
                Ok(flow)
            }
            Err(err) => Err(SendError::Io(err)),
        }
    }
}

impl Inner {
    /// Sends what a receive batch produced: one sendmmsg per run of datagrams from the same
    /// socket, falling back to single sends for what the kernel did not take.
    fn flush_udp_batch(&self, queue: Vec<(Arc<UdpEntry>, SocketAddr, Dest, Bytes)>) {
        let mut start = 0;
        while start < queue.len() {
            let entry = &queue[start].0;
            let mut end = start + 1;
            while end < queue.len() && end - start < BATCH && Arc::ptr_eq(&queue[end].0, entry) {
                end += 1;
            }
            let run = &queue[start..end];
            let sent = mmsg::send_batch(&entry.socket, run.iter().map(|(_, r, _, d)| (*r, d)))
                .unwrap_or(0);
            for (e, remote, dest, data) in &run[sent.min(run.len())..] {
                let _ = self.send_udp(e.clone(), *remote, dest, data.clone());
            }
            start = end;
        }
    }
}

/// `recvmmsg`/`sendmmsg` (Linux): the only unsafe code in the transports, kept to building
/// the kernel's message headers over buffers this module owns.
mod mmsg {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use super::super::stamp::{self, Ctrl};

    pub(super) struct RecvBatch {
        hdrs: Vec<libc::mmsghdr>,
        iovs: Vec<libc::iovec>,
        addrs: Vec<libc::sockaddr_storage>,
        ctrls: Vec<Ctrl>,
        /// The buffer (address, length, slot size) the headers point into: set up once and
        /// reused while the caller passes the same buffer.
        armed: Option<(usize, usize, usize)>,
        /// How many headers the last call filled: only those need their in/out fields reset.
        filled: usize,
    }

    // The raw pointers inside are only used during a call made by the owner.
    unsafe impl Send for RecvBatch {}

    impl RecvBatch {
        pub(super) fn new(n: usize) -> RecvBatch {
            RecvBatch {
                // SAFETY: all-zero is a valid value for these plain C structs.
                hdrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
                iovs: (0..n)
                    .map(|_| libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    })
                    .collect(),
                addrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
                ctrls: vec![[0; 8]; n],
                armed: None,
                filled: 0,
            }
        }

        /// Waits for at least one datagram (or the socket's read timeout), then takes up to
        /// `n` that are queued, into `bufs` (slots of `slot` bytes).
        pub(super) fn recv(
            &mut self,
            sock: &impl AsRawFd,
            bufs: &mut [u8],
            slot: usize,
        ) -> io::Result<usize> {
            let n = self.hdrs.len().min(bufs.len() / slot);
            let key = (bufs.as_ptr() as usize, bufs.len(), slot);
            if self.armed != Some(key) {
                // A new buffer: point every header at its slot, name and iovec.
                self.armed = Some(key);
                for i in 0..n {
                    self.iovs[i] = libc::iovec {
                        iov_base: bufs[i * slot..].as_mut_ptr().cast(),
                        iov_len: slot,
                    };
                    let h = &mut self.hdrs[i];
                    h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                    h.msg_hdr.msg_iov = &mut self.iovs[i];
                    h.msg_hdr.msg_iovlen = 1;
                    h.msg_hdr.msg_control = self.ctrls[i].as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = size_of::<Ctrl>() as _;
                }
                self.filled = n;
            }
            // The kernel changes only the name length, flags and length of the headers it
            // fills: only those are reset (all 32 each time cost ~800 instructions per call,
            // more than handling a datagram's Via).
            for h in &mut self.hdrs[..self.filled.min(n)] {
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_controllen = size_of::<Ctrl>() as _;
                h.msg_hdr.msg_flags = 0;
                h.msg_len = 0;
            }
            self.call(sock, n)
        }

        fn call(&mut self, sock: &impl AsRawFd, n: usize) -> io::Result<usize> {
            self.filled = 0;
            // SAFETY: every header points at `self.iovs` and `self.addrs` (never reallocated)
            // and, through the iovecs, at slots of the buffer `recv` was passed, which is the
            // one they were armed for (same address and length) and is borrowed mutably for
            // the duration of the call.
            let r = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            self.filled = r as usize;
            Ok(r as usize)
        }

        /// Length, truncation flag and source of datagram `i` of the last batch.
        pub(super) fn meta(&self, i: usize) -> Option<(usize, bool, SocketAddr)> {
            let h = self.hdrs.get(i)?;
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let addr = from_storage(self.addrs.get(i)?)?;
            Some((h.msg_len as usize, truncated, addr))
        }

        /// When the kernel queued datagram `i` of the last batch (CLOCK_REALTIME, ns), if
        /// the socket stamps arrivals ([`stamp::enable`]).
        // The control lengths are size_t on glibc and socklen_t on musl.
        #[allow(clippy::unnecessary_cast)]
        pub(super) fn arrival_ns(&self, i: usize) -> Option<i128> {
            let h = &self.hdrs.get(i)?.msg_hdr;
            stamp::from_cmsgs(self.ctrls.get(i)?, h.msg_controllen as usize)
        }
    }

    fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let a: &libc::sockaddr_in =
                    unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let a: &libc::sockaddr_in6 =
                    unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    fn to_storage(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
                unsafe { std::ptr::write(&mut s as *mut _ as *mut libc::sockaddr_in, sin) };
                (s, size_of::<libc::sockaddr_in>() as libc::socklen_t)
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: as above.
                unsafe { std::ptr::write(&mut s as *mut _ as *mut libc::sockaddr_in6, sin6) };
                (s, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
            }
        }
    }

    /// Sends the datagrams in one call; returns how many the kernel took.
    pub(super) fn send_batch<'a>(
        sock: &impl AsRawFd,
        items: impl Iterator<Item = (SocketAddr, &'a bytes::Bytes)>,
    ) -> io::Result<usize> {
        let items: Vec<(SocketAddr, &bytes::Bytes)> = items.collect();
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            items.iter().map(|(a, _)| to_storage(*a)).collect();
        let mut iovs: Vec<libc::iovec> = items
            .iter()
            .map(|(_, d)| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..items.len())
            .map(|i| {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = addrs[i].1;
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        if hdrs.is_empty() {
            return Ok(0);
        }
        // SAFETY: headers point into `addrs`, `iovs` and the borrowed payloads, all alive for
        // the call; the kernel only reads the payloads.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}
