//! Batched, kernel-timestamped UDP receive (`recvmmsg` + `SO_TIMESTAMPNS`).
//!
//! On the 2-core VMs this project measures on, a syscall is cheap (~0.5 us) but putting a
//! process to sleep and waking it is not (tens of microseconds of CPU spread over both
//! sides): a generator that wakes for every response spends most of its CPU there, and so
//! does everything it talks to. The generator therefore wakes on a fixed tick and reads
//! everything queued in one go. The kernel stamps each datagram when it is queued on the
//! socket, so latencies stay accurate to the microsecond however late the batch is read.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// SOL_SOCKET option and control message type; 35 on x86_64 and aarch64 (asm-generic,
/// SO_TIMESTAMPNS_OLD, which carries a native 64-bit `timespec`).
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Datagrams read per syscall.
pub const BATCH: usize = 32;
/// Largest datagram kept whole; longer ones are flagged truncated and dropped by the caller.
/// Responses in these benchmarks are under 1 KiB.
pub const MAX_DATAGRAM: usize = 16 * 1024;
const CTRL: usize = 64;

/// Asks the kernel to timestamp every datagram queued on `fd`.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd, pointer to a c_int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One received datagram.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    /// Longer than [`MAX_DATAGRAM`]: `data` is incomplete.
    pub truncated: bool,
    /// When the kernel queued it (monotonic clock), or when it was read if unstamped.
    pub at: Instant,
}

/// Reusable buffers for one `recvmmsg` call.
pub struct RxBatch {
    bufs: Vec<u8>,
    ctrl: Vec<u8>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    n: usize,
    /// Monotonic and realtime clocks read together after the batch, to map kernel
    /// (realtime) stamps onto `Instant`.
    mono: Instant,
    real: Duration,
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RxBatch {
    pub fn new() -> RxBatch {
        RxBatch {
            bufs: vec![0u8; BATCH * MAX_DATAGRAM],
            ctrl: vec![0u8; BATCH * CTRL],
            // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            n: 0,
            mono: Instant::now(),
            real: Duration::ZERO,
        }
    }

    /// Reads up to [`BATCH`] queued datagrams without blocking; returns how many (0 when
    /// none is queued).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.n = 0;
        for i in 0..BATCH {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i * MAX_DATAGRAM..].as_mut_ptr() as *mut libc::c_void,
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = std::ptr::null_mut();
            h.msg_hdr.msg_namelen = 0;
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i * CTRL..].as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = CTRL as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by self that outlive the call, with
        // the lengths given; a null timeout is allowed.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.n = r as usize;
        self.mono = Instant::now();
        self.real = realtime_now();
        Ok(self.n)
    }

    /// The `i`th datagram of the last [`RxBatch::recv`].
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.n {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(MAX_DATAGRAM);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let at = match stamp(&h.msg_hdr) {
            // The datagram has waited (real now - stamp); a stamp "in the future" (clock
            // stepped) means no usable information.
            Some(ts) if ts <= self.real => {
                self.mono.checked_sub(self.real - ts).unwrap_or(self.mono)
            }
            _ => self.mono,
        };
        Some(Datagram {
            data: &self.bufs[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len],
            truncated,
            at,
        })
    }
}

fn realtime_now() -> Duration {
    // SAFETY: writes into a timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The SCM_TIMESTAMPNS control message of a received message, as time since the epoch.
fn stamp(m: &libc::msghdr) -> Option<Duration> {
    // SAFETY: the control buffer and its length were filled in by the kernel; the CMSG_*
    // macros stay within msg_controllen, and the payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                if ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) {
                    return None;
                }
                return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_with_timestamps() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_timestamps(b.as_raw_fd()).unwrap();
        let mut rx = RxBatch::new();
        assert_eq!(rx.recv(b.as_raw_fd()).unwrap(), 0);
        // The kernel turns receive timestamping on system-wide from a deferred work item.
        std::thread::sleep(Duration::from_millis(20));
        let before = Instant::now();
        for i in 0..3u8 {
            a.send_to(&[i; 10], b.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rx.recv(b.as_raw_fd()).unwrap(), 3);
        for i in 0..3 {
            let d = rx.get(i).unwrap();
            assert_eq!(d.data, &[i as u8; 10]);
            assert!(!d.truncated);
            // Stamped at arrival, not at the read 20 ms later.
            assert!(
                rx.mono.duration_since(d.at) >= Duration::from_millis(15),
                "{i}"
            );
            assert!(d.at + Duration::from_millis(5) >= before);
        }
        assert!(rx.get(3).is_none());
    }
}
