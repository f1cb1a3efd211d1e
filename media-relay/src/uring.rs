//! The io_uring variant of the forwarding loop's system calls (`RelayConfig::io` =
//! [`IoBackend::Uring`](crate::IoBackend::Uring)): one ring per worker thread, one multishot
//! `recvmsg` per socket drawing from a ring of provided buffers, every send a `sendto` request,
//! all of a pass's sends and the next wait in one `io_uring_enter`. Like `sys`, this module
//! holds the `unsafe` its calls need, behind small safe functions.
//!
//! Why: with epoll each forwarded packet costs a `recvmmsg` on its socket and a `sendmmsg` on
//! the partner socket (at RTP rates a socket rarely holds more than one packet), plus the
//! `epoll_wait`. Here packets arrive as completions (the kernel runs the receives in the
//! worker's own context, `DEFER_TASKRUN`, when the worker asks for completions) and leave as
//! submissions: one system call per pass however many sockets were busy.
//!
//! A received packet stays in its provided buffer until its send has completed; then the buffer
//! goes back to the kernel. A buffer is thus never copied and never reused while the kernel may
//! still read it.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, EnterFlags, IoUring};

use crate::sys::{decode_bytes, RawAddr, BUF_LEN};

/// Provided buffers per worker: packets received and not yet sent on. At 50,000 packets/s and
/// one pass per 200 us a pass holds ~10-50; 512 leaves room for a stall of ~10 ms before the
/// kernel runs out. It then ends the receives that find no buffer (ENOBUFS) and leaves their
/// packets in the socket queues; the worker re-arms them a few at a time as buffers come back
/// ([`Ring::rearm_budget`]), not at once: a receive re-armed into an empty ring fails again
/// at once, and re-arming every socket on every pass made an overloaded relay spend its time
/// on failed receives (10 per forwarded packet, half the packets it could forward).
pub(crate) const NBUF: u16 = 512;
/// Free buffers per receive re-armed after ENOBUFS ([`Ring::rearm_budget`]).
const REARM_SHARE: u16 = 16;
/// Upper bound of the fixed-file table (kernel memory: 16 bytes or so per slot).
const MAX_FIXED_FILES: u32 = 65_536;

/// The process's fd limit (RLIMIT_NOFILE, soft): no socket can have a higher number.
fn max_fds() -> u32 {
    // SAFETY: all-zero is a valid rlimit; getrlimit only writes into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit owned by this frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    u32::try_from(rl.rlim_cur).unwrap_or(u32::MAX)
}
/// Buffer group id of the provided buffer ring.
const BGID: u16 = 0;
/// `struct io_uring_recvmsg_out`: name length, control length, payload length, flags.
const OUT_HDR: usize = 16;
/// Room for the source address: the largest one we use (IPv6).
const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Where the payload starts in a buffer.
const PAYLOAD_OFF: usize = OUT_HDR + NAME_LEN;
/// Bytes the kernel may fill per buffer: the payload gets `BUF_LEN`, as with epoll (a larger
/// datagram is flagged truncated and dropped).
const BUF_SPACE: usize = PAYLOAD_OFF + BUF_LEN;
/// Distance between buffers (cache-line multiple).
const STRIDE: usize = BUF_SPACE.next_multiple_of(64);
/// Submission queue entries; completions get four times as many (every buffer can be a receive
/// and a send completion at once, plus re-arms and the doorbell).
const SQ_ENTRIES: u32 = 1024;
// The ring's index arithmetic masks with NBUF - 1; buffers must not overlap.
const _: () = assert!(NBUF.is_power_of_two() && STRIDE >= BUF_SPACE);

/// `user_data` low half marking a send; the high half is the buffer id. Slab indices never get
/// near these values.
const SEND_IDX: u32 = 0xffff_fffe;
/// `user_data` of the ring's own housekeeping requests (cancels, fixed-file updates).
const CONTROL: u64 = 0xffff_fffd;
/// What a fixed-file update writes into a slot to empty it.
static NO_FILE: [RawFd; 1] = [-1];

/// What one completion is about.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// A multishot receive of the socket with this slab token.
    Recv(u64),
    /// A send from buffer `bid` finished.
    Send(u16),
    /// The doorbell poll (token given to [`Ring::arm_poll`]).
    Wake,
    /// A housekeeping request that failed (successful ones post nothing): a cancel that
    /// found no request, a fixed-file update refused.
    Control,
}

/// One completion, copied out of the ring so the worker may queue new requests while handling
/// it.
#[derive(Clone, Copy)]
pub(crate) struct Cqe {
    pub user_data: u64,
    pub res: i32,
    pub flags: u32,
}

impl Cqe {
    /// Classifies by `user_data`; `wake` is the doorbell's token.
    #[inline]
    pub fn kind(&self, wake: u64) -> Kind {
        let low = self.user_data as u32;
        if self.user_data == wake {
            Kind::Wake
        } else if self.user_data == CONTROL {
            Kind::Control
        } else if low == SEND_IDX {
            Kind::Send((self.user_data >> 32) as u16)
        } else {
            Kind::Recv(self.user_data)
        }
    }

    /// The provided buffer this completion filled, if any.
    #[inline]
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether the request stays armed (multishot).
    #[inline]
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// A received datagram inside its buffer.
pub(crate) struct Received {
    /// Payload bytes in the buffer (after the header and address).
    pub len: usize,
    pub src: Option<SocketAddr>,
    /// The datagram was larger than `BUF_LEN` (or the address did not fit).
    pub truncated: bool,
}

/// What a send in flight carries for the accounting of its completion.
#[derive(Clone, Copy)]
pub(crate) struct SendMeta {
    /// Slab token of the socket the packet came in on (its counters).
    pub from: u64,
    pub len: u32,
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: anonymous private mapping, no file, no fixed address. Populated now so the
        // pages count against the relay from the start, not against the first calls.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing refers to the mapping after
        // the ring is gone (Ring drops its IoUring first, see there).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One worker's ring, its provided buffers and the state of sends in flight.
pub(crate) struct Ring {
    // Field order matters: the ring is closed before the memory the kernel wrote into goes.
    ring: IoUring,
    /// The provided buffer ring: `NBUF` entries of 16 bytes, page-aligned.
    br: Mapping,
    /// The buffers themselves, `STRIDE` apart.
    bufs: Mapping,
    /// Next tail of the provided buffer ring (published with a release store).
    tail: u16,
    /// Template for the multishot receives: only the name and control lengths are read.
    rx_msg: Box<libc::msghdr>,
    /// Per buffer id: destination of its send in flight (the kernel reads it when the send is
    /// submitted, so it must not move before then) and what the completion accounts.
    dest: Box<[RawAddr]>,
    meta: Box<[SendMeta]>,
    /// The kernel takes a minimum wait (`min_wait_usec`, 6.12+).
    min_wait: bool,
    /// Completions a dense pass waits for at most.
    cq_entries: u32,
    /// Sends queued since the last `reap`. Each posts its completion while it is submitted
    /// (a UDP send with MSG_DONTWAIT finishes or fails at once), so a wait for "one more than
    /// these" sleeps until something really arrives instead of returning for the sends.
    unreaped_sends: u32,
    /// Sockets registered as fixed files, indexed by fd (slot n holds fd n). A request on a
    /// fixed file skips the kernel's per-request file lookup and reference count (fget/fput:
    /// 4-5% of the relay's CPU at 1,000 streams); empty where the kernel refused the table.
    fixed: Vec<bool>,
    /// Provided buffers handed out in completions and not yet recycled; the kernel holds
    /// the other `NBUF - held`.
    held: u16,
}

// SAFETY: the raw pointers point into mappings and boxes owned by the Ring, which move with it;
// the ring is used from one thread at a time (it is created on the worker thread and stays
// there, SINGLE_ISSUER).
unsafe impl Send for Ring {}

impl Ring {
    /// Sets up the ring on the calling thread (the one that will use it) with its provided
    /// buffers. Fails on kernels without what the loop needs (multishot recvmsg, provided
    /// buffer rings, sync cancel: 6.0), or where io_uring is disabled.
    pub fn new() -> io::Result<Ring> {
        let cq = SQ_ENTRIES * 4;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_submit_all()
            .setup_cqsize(cq)
            .build(SQ_ENTRIES)
            .or_else(|_| {
                // Before 6.1 (no DEFER_TASKRUN): completions are posted as they happen.
                IoUring::builder()
                    .setup_submit_all()
                    .setup_cqsize(cq)
                    .build(SQ_ENTRIES)
            })?;
        // Sync cancel exists since 6.0, as multishot recvmsg does: a kernel that knows it
        // answers "nothing matched".
        match ring
            .submitter()
            .register_sync_cancel(None, CancelBuilder::user_data(u64::MAX - 7))
        {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Ok(()) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("io_uring sync cancel (kernel 6.0+): {e}"),
                ))
            }
        }
        let min_wait = ring.params().is_feature_min_timeout();
        let cq_entries = ring.params().cq_entries();
        let page = 4096usize;
        let br = Mapping::new((usize::from(NBUF) * 16).next_multiple_of(page))?;
        let bufs = Mapping::new(usize::from(NBUF) * STRIDE)?;
        // SAFETY: br is page-aligned, holds NBUF entries and lives as long as the ring (it is
        // dropped after it); the group id is unused so far.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(br.ptr as u64, NBUF, BGID, 0)?;
        }
        // SAFETY: all-zero is a valid msghdr.
        let mut rx_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        rx_msg.msg_namelen = NAME_LEN as libc::socklen_t;
        let mut r = Ring {
            ring,
            br,
            bufs,
            tail: 0,
            rx_msg,
            dest: vec![RawAddr::new(&SocketAddr::from(([0, 0, 0, 0], 0))); usize::from(NBUF)]
                .into_boxed_slice(),
            meta: vec![SendMeta { from: 0, len: 0 }; usize::from(NBUF)].into_boxed_slice(),
            min_wait,
            cq_entries,
            unreaped_sends: 0,
            fixed: Vec::new(),
            held: NBUF,
        };
        for bid in 0..NBUF {
            r.recycle(bid);
        }
        // One slot per possible fd of the process (capped): sockets are registered under
        // their own fd number, so no slot allocator is needed.
        let slots = max_fds().min(MAX_FIXED_FILES);
        match r.ring.submitter().register_files_sparse(slots) {
            Ok(()) => r.fixed = vec![false; slots as usize],
            Err(e) => tracing::debug!(error = %e, "io_uring fixed files unavailable"),
        }
        Ok(r)
    }

    /// The fixed-file slot of socket `fd`, registering it on first use.
    fn fixed_slot(&mut self, fd: RawFd) -> Option<u32> {
        let slot = usize::try_from(fd).ok()?;
        if *self.fixed.get(slot)? {
            return Some(slot as u32);
        }
        match self
            .ring
            .submitter()
            .register_files_update(slot as u32, &[fd])
        {
            Ok(_) => {
                self.fixed[slot] = true;
                Some(slot as u32)
            }
            Err(e) => {
                tracing::debug!(error = %e, fd, "io_uring fixed file registration failed");
                None
            }
        }
    }

    /// The registered slot of `fd`, if it has one.
    #[inline]
    fn slot_of(&self, fd: RawFd) -> Option<u32> {
        let slot = usize::try_from(fd).ok()?;
        self.fixed.get(slot).copied()?.then_some(slot as u32)
    }

    /// Queues a request; a full submission queue is submitted first. False: the kernel took
    /// nothing (the request is not queued).
    fn push(&mut self, e: &squeue::Entry) -> bool {
        loop {
            // SAFETY: every entry built here points only at memory that stays valid until
            // the kernel is done with it: buffers and send state owned by the Ring, the
            // receive template (read at submission), socket fds the worker cancels before
            // closing.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return true;
            }
            if let Err(err) = self.ring.submit() {
                tracing::warn!(error = %err, "io_uring submit failed");
                return false;
            }
        }
    }

    /// Arms the multishot receive of socket `fd`; its completions carry `token`.
    pub fn arm_recv(&mut self, fd: RawFd, token: u64) {
        let e = match self.fixed_slot(fd) {
            Some(slot) => opcode::RecvMsgMulti::new(Fixed(slot), &*self.rx_msg, BGID).build(),
            None => opcode::RecvMsgMulti::new(Fd(fd), &*self.rx_msg, BGID).build(),
        }
        .user_data(token);
        // Not queued (the ring refuses submissions): the worker has bigger problems, which
        // its next wait reports.
        let _ = self.push(&e);
    }

    /// Arms a multishot readability poll of `fd` (the doorbell eventfd).
    pub fn arm_poll(&mut self, fd: RawFd, token: u64) {
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(token);
        let _ = self.push(&e);
    }

    /// The datagram a receive completion of `res` bytes put into buffer `bid`.
    #[inline]
    pub fn received(&self, bid: u16, res: i32) -> Received {
        let b = self.buffer(bid);
        let filled = usize::try_from(res).unwrap_or(0).min(BUF_SPACE);
        if filled < PAYLOAD_OFF {
            return Received {
                len: 0,
                src: None,
                truncated: true,
            };
        }
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (namelen, payloadlen, flags) = (word(0) as usize, word(8) as usize, word(12));
        let src = if namelen <= NAME_LEN {
            decode_bytes(&b[OUT_HDR..OUT_HDR + namelen])
        } else {
            None
        };
        Received {
            len: payloadlen.min(filled - PAYLOAD_OFF),
            src,
            truncated: flags & libc::MSG_TRUNC as u32 != 0,
        }
    }

    /// The payload of a received datagram.
    #[inline]
    pub fn payload(&self, bid: u16, len: usize) -> &[u8] {
        &self.buffer(bid)[PAYLOAD_OFF..PAYLOAD_OFF + len.min(BUF_LEN)]
    }

    #[inline]
    fn buffer(&self, bid: u16) -> &[u8] {
        let bid = usize::from(bid % NBUF);
        // SAFETY: bid < NBUF, so the range lies inside the mapping. The kernel writes a buffer
        // only while it is in the provided ring; a buffer handed out in a completion is ours
        // until `recycle` puts it back.
        unsafe { std::slice::from_raw_parts(self.bufs.ptr.add(bid * STRIDE), BUF_SPACE) }
    }

    /// Sends `len` payload bytes of buffer `bid` from socket `fd` to `dest`; the buffer stays
    /// out of the provided ring until the send completes. False: not queued (the caller
    /// counts the drop and recycles the buffer).
    #[inline]
    pub fn send(
        &mut self,
        bid: u16,
        len: usize,
        fd: RawFd,
        dest: Option<&RawAddr>,
        from: u64,
    ) -> bool {
        let b = usize::from(bid % NBUF);
        self.meta[b] = SendMeta {
            from,
            len: len as u32,
        };
        // No address: `fd` is connected (the twin of a latched stream).
        let (name, namelen) = match dest {
            Some(d) => {
                self.dest[b] = *d;
                self.dest[b].as_ptr()
            }
            None => (std::ptr::null(), 0),
        };
        let data = self.payload(bid, len).as_ptr();
        // MSG_DONTWAIT: a full send buffer fails the send (counted, the packet dropped) instead
        // of parking it, as sendmmsg does.
        let send = match self.slot_of(fd) {
            Some(slot) => opcode::Send::new(Fixed(slot), data, len as u32),
            None => opcode::Send::new(Fd(fd), data, len as u32),
        };
        let e = send
            .dest_addr(name)
            .dest_addr_len(namelen)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .user_data((u64::from(bid) << 32) | u64::from(SEND_IDX));
        if !self.push(&e) {
            return false;
        }
        self.unreaped_sends += 1;
        true
    }

    /// What the send from buffer `bid` was for.
    #[inline]
    pub fn send_meta(&self, bid: u16) -> SendMeta {
        self.meta[usize::from(bid % NBUF)]
    }

    /// Gives buffer `bid` back to the kernel.
    #[inline]
    pub fn recycle(&mut self, bid: u16) {
        let bid = bid % NBUF;
        let slot = usize::from(self.tail & (NBUF - 1));
        let addr = self.bufs.ptr as u64 + (usize::from(bid) * STRIDE) as u64;
        // SAFETY: slot < NBUF entries of 16 bytes inside the (page-sized) ring mapping. Entry
        // layout (struct io_uring_buf): addr u64, len u32, bid u16, resv u16; the resv of entry
        // 0 is the ring's tail, written only below. The kernel reads entries up to the tail it
        // sees, so the entry is complete before the release store publishes it.
        unsafe {
            let e = self.br.ptr.add(slot * 16);
            std::ptr::write(e.cast::<u64>(), addr);
            std::ptr::write(e.add(8).cast::<u32>(), BUF_SPACE as u32);
            std::ptr::write(e.add(12).cast::<u16>(), bid);
            self.tail = self.tail.wrapping_add(1);
            (*self.br.ptr.add(14).cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
        self.held = self.held.saturating_sub(1);
    }

    /// How many receives that ended for want of a buffer are worth re-arming now: one per
    /// `REARM_SHARE` buffers in the kernel's ring (each brings its socket's backlog).
    #[inline]
    pub fn rearm_budget(&self) -> usize {
        usize::from(NBUF.saturating_sub(self.held) / REARM_SHARE)
    }

    /// Submits what is queued and waits for completions: at least one besides those of the
    /// sends just submitted, until `timeout_ns` passes. With `coalesce_us` > 0 (dense traffic)
    /// the wait lasts that long once something has arrived, so one wake-up serves everything
    /// that comes in meanwhile. With `hurry`, only for the sends' own completions: receives
    /// wait for the buffers those sends hold.
    pub fn submit_and_wait(
        &mut self,
        timeout_ns: u64,
        coalesce_us: u32,
        hurry: bool,
    ) -> io::Result<()> {
        let ts = Timespec::new()
            .sec(timeout_ns / 1_000_000_000)
            .nsec((timeout_ns % 1_000_000_000) as u32);
        let r = if hurry {
            // Back as soon as the sends have completed (they do during the submission).
            let want = self.unreaped_sends.clamp(1, self.cq_entries) as usize;
            self.ring
                .submitter()
                .submit_with_args(want, &SubmitArgs::new().timespec(&ts))
        } else if coalesce_us == 0 {
            let want = (self.unreaped_sends + 1).min(self.cq_entries) as usize;
            self.ring
                .submitter()
                .submit_with_args(want, &SubmitArgs::new().timespec(&ts))
        } else if self.min_wait {
            let args = SubmitArgs::new().timespec(&ts).min_wait_usec(coalesce_us);
            self.ring
                .submitter()
                .submit_with_args(self.cq_entries as usize, &args)
        } else {
            // No min-wait before 6.12: wait the coalescing time (or for a full ring) even if
            // nothing arrives, then look.
            let c = u64::from(coalesce_us) * 1_000;
            let ts = Timespec::new()
                .sec(c / 1_000_000_000)
                .nsec((c % 1_000_000_000) as u32);
            self.ring
                .submitter()
                .submit_with_args(self.cq_entries as usize, &SubmitArgs::new().timespec(&ts))
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Moves every completion posted so far into `out`.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        self.unreaped_sends = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        let mut taken: u16 = 0;
        out.extend(cq.map(|c| {
            taken = taken.saturating_add(u16::from(cqueue::buffer_select(c.flags()).is_some()));
            Cqe {
                user_data: c.user_data(),
                res: c.result(),
                flags: c.flags(),
            }
        }));
        self.held = self.held.saturating_add(taken);
    }

    /// Submits what is queued and runs the kernel's deferred work without waiting: requests
    /// cancelled since are then freed along with their hold on the socket.
    fn flush(&mut self) {
        let queued = self.ring.submission().len() as u32;
        // SAFETY: plain io_uring_enter with no argument.
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued,
                0,
                EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "io_uring flush");
        }
    }

    /// Stops the multishot receive of each given socket (`(fd, token)`: the token it was armed
    /// with) and empties its fixed-file slot, so that closing it really frees its port (a
    /// request in flight and the table both hold the socket open). Both are queued as requests
    /// and submitted together with one `io_uring_enter` that also runs the kernel's deferred
    /// work. A synchronous cancel by fd (`io_uring_register`) cost a system call and a scan of
    /// every armed request per socket: 3.7% of the SBC's CPU at 2,000 calls/s with media.
    /// Requests are issued in queue order, so a receive queued and not yet submitted is armed
    /// before its cancel runs.
    pub fn cancel(&mut self, socks: &[(RawFd, u64)]) {
        if socks.is_empty() {
            return;
        }
        for &(fd, token) in socks {
            // "All": a socket should have one receive at a time, but a second one armed by
            // mistake would hold the socket (and its port) open for good.
            let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(token).all())
                .build()
                .flags(squeue::Flags::SKIP_SUCCESS)
                .user_data(CONTROL);
            let _ = self.push(&e);
            if let Some(slot) = self.slot_of(fd) {
                let e = opcode::FilesUpdate::new(NO_FILE.as_ptr(), 1)
                    .offset(slot as i32)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(CONTROL);
                if self.push(&e) {
                    self.fixed[slot as usize] = false;
                }
            }
        }
        self.flush();
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Nothing may write into the buffers once they are unmapped.
        let _ = self
            .ring
            .submitter()
            .register_sync_cancel(None, CancelBuilder::any());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the ring until `done` says so (bounded: 2 s).
    fn pump(ring: &mut Ring, mut on: impl FnMut(&mut Ring, Cqe) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut cqes = Vec::new();
        loop {
            assert!(std::time::Instant::now() < deadline, "ring stalled");
            ring.submit_and_wait(20_000_000, 0, false).unwrap();
            ring.reap(&mut cqes);
            let mut done = false;
            for c in cqes.drain(..) {
                done |= on(ring, c);
            }
            if done {
                return;
            }
        }
    }

    /// A multishot receive takes datagrams into provided buffers, sends leave from them, the
    /// buffers come back; after `cancel` a closed socket's port is free at once.
    #[test]
    fn receives_sends_and_cancels_on_loopback() {
        let mut ring = match Ring::new() {
            Ok(r) => r,
            Err(e) => {
                // The relay falls back to epoll there; nothing of this path to test.
                eprintln!("io_uring unavailable here ({e}); skipped");
                return;
            }
        };
        for ip in ["127.0.0.1", "::1"] {
            let bind = || std::net::UdpSocket::bind((ip, 0)).unwrap();
            let (a, b, c) = (bind(), bind(), bind());
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            use std::os::fd::AsRawFd;
            ring.arm_recv(b.as_raw_fd(), 7);
            let dest = RawAddr::new(&c.local_addr().unwrap());
            // More than NBUF datagrams in all: buffers must come back to be reused.
            let total = usize::from(NBUF) + 100;
            let big = vec![9u8; BUF_LEN + 1];
            let (mut sent, mut got, mut completed) = (0usize, 0usize, 0usize);
            let (mut truncated, mut big_sent) = (0, false);
            let (mut buf, mut read) = ([0u8; 64], 0usize);
            while completed < total {
                for _ in 0..50.min(total - sent) {
                    a.send_to(&[(sent % 251) as u8; 20], b.local_addr().unwrap())
                        .unwrap();
                    sent += 1;
                }
                if sent == total && !big_sent {
                    a.send_to(&big, b.local_addr().unwrap()).unwrap();
                    big_sent = true;
                }
                pump(&mut ring, |ring, cqe| match cqe.kind(u64::MAX) {
                    Kind::Recv(token) => {
                        assert_eq!(token, 7);
                        if !cqe.more() {
                            ring.arm_recv(b.as_raw_fd(), 7);
                        }
                        let Some(bid) = cqe.buffer() else {
                            return false;
                        };
                        let rx = ring.received(bid, cqe.res);
                        assert_eq!(rx.src, Some(a.local_addr().unwrap()));
                        if rx.truncated {
                            truncated += 1;
                            ring.recycle(bid);
                            return false;
                        }
                        assert_eq!(rx.len, 20);
                        assert_eq!(ring.payload(bid, rx.len)[0], (got % 251) as u8);
                        got += 1;
                        assert!(ring.send(bid, rx.len, b.as_raw_fd(), Some(&dest), 7));
                        false
                    }
                    Kind::Send(bid) => {
                        assert_eq!(cqe.res, 20);
                        assert_eq!(ring.send_meta(bid).len, 20);
                        ring.recycle(bid);
                        completed += 1;
                        true
                    }
                    Kind::Wake | Kind::Control => false,
                });
                // Completed sends are in c's queue (loopback delivers inside the send); read
                // them before it overflows.
                while read < completed {
                    let (n, from) = c.recv_from(&mut buf).unwrap();
                    assert_eq!((n, from), (20, b.local_addr().unwrap()));
                    assert_eq!(buf[0], (read % 251) as u8, "order kept");
                    read += 1;
                }
            }
            assert_eq!(truncated, 1);
            let port = b.local_addr().unwrap();
            ring.cancel(&[(b.as_raw_fd(), 7)]);
            // The receive ended, cancelled; reaped here so that the next round's pump does not
            // take it for the end of its own receive and arm a second one.
            let mut ended = Vec::new();
            ring.reap(&mut ended);
            assert!(
                ended
                    .iter()
                    .any(|c| c.user_data == 7 && c.res == -libc::ECANCELED && !c.more()),
                "receive cancelled"
            );
            drop(b);
            std::net::UdpSocket::bind(port).expect("port free after cancel and close");
        }
    }
}
