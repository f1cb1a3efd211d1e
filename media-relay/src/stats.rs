//! Per-stream counters and the RTP receive statistics of RFC 3550 (loss from sequence gaps,
//! interarrival jitter).
//!
//! The forwarding worker is the only writer of a stream's counters; readers (stats calls,
//! metrics) may be anywhere. So counters are atomics written with plain relaxed load+store
//! (no read-modify-write, no lock) once per received batch, and read with relaxed loads: a
//! snapshot may mix values a few packets apart, which is fine for monitoring.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

/// Counters of one socket's traffic: what arrived from the leg's endpoint on that socket.
#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped_foreign: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub dropped_no_peer: AtomicU64,
    pub send_errors: AtomicU64,
    pub lost: AtomicU64,
    pub jitter_us: AtomicU64,
    /// Addresses change rarely (SDP, latching); a lock there costs nothing per packet.
    pub addrs: Mutex<Addrs>,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Addrs {
    pub advertised: Option<SocketAddr>,
    pub learned: Option<SocketAddr>,
    pub connected: bool,
}

/// Single-writer add: the worker owning the stream is the only writer.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

impl StreamCounters {
    pub fn snapshot(&self) -> StreamStats {
        let addrs = *self.addrs.lock();
        StreamStats {
            packets: self.packets.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            dropped_foreign: self.dropped_foreign.load(Relaxed),
            dropped_invalid: self.dropped_invalid.load(Relaxed),
            dropped_no_peer: self.dropped_no_peer.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            lost: self.lost.load(Relaxed),
            jitter_us: self.jitter_us.load(Relaxed),
            advertised: addrs.advertised,
            learned: addrs.learned,
            connected: addrs.connected,
        }
    }
}

/// A snapshot of one stream (RTP or RTCP of one media line, as received from one leg).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Packets received from the leg and forwarded to the other leg.
    pub packets: u64,
    /// Bytes (UDP payload) of those packets.
    pub bytes: u64,
    /// Dropped: came from a source other than the latched one while it was active.
    pub dropped_foreign: u64,
    /// Dropped: not RTP/RTCP (or truncated) and nothing latched yet to vouch for the source.
    pub dropped_invalid: u64,
    /// Dropped: the other leg's address is not known yet (no SDP address, nothing learned).
    pub dropped_no_peer: u64,
    /// Forwarding failed in the kernel (send buffer full, unreachable).
    pub send_errors: u64,
    /// RTP packets lost, estimated from sequence-number gaps (RFC 3550 A.3), over all SSRCs seen.
    pub lost: u64,
    /// Interarrival jitter of the current SSRC in microseconds (RFC 3550 A.8).
    pub jitter_us: u64,
    /// Where the SDP says the endpoint receives this stream.
    pub advertised: Option<SocketAddr>,
    /// Where packets really come from (latched); wins over `advertised` as destination.
    pub learned: Option<SocketAddr>,
    /// Packets to `learned` leave through a socket connected to it (`RelayConfig::connect_latched`):
    /// the kernel keeps their route instead of looking it up per packet.
    pub connected: bool,
}

impl StreamStats {
    /// All drops together.
    pub fn dropped(&self) -> u64 {
        self.dropped_foreign + self.dropped_invalid + self.dropped_no_peer + self.send_errors
    }
}

const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;

/// RTP receive statistics of one stream, owned by the worker (RFC 3550 A.1, A.3, A.8).
#[derive(Debug, Default, Clone)]
pub(crate) struct RtpEstimator {
    started: bool,
    ssrc: u32,
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    bad_seq: u32,
    received: u64,
    /// Loss of SSRCs / sequence restarts already closed.
    lost_before: u64,
    transit: Option<i32>,
    /// Jitter in RTP timestamp units, scaled by 16 (A.8's integer form).
    jitter_q4: u32,
    rate: u32,
}

impl RtpEstimator {
    fn restart(&mut self, seq: u16) {
        self.lost_before += self.lost_current();
        self.base_seq = u32::from(seq);
        self.max_seq = seq;
        self.cycles = 0;
        self.bad_seq = u32::MAX;
        self.received = 0;
        self.transit = None;
        self.jitter_q4 = 0;
    }

    fn lost_current(&self) -> u64 {
        if !self.started {
            return 0;
        }
        let extended_max = u64::from(self.cycles) + u64::from(self.max_seq);
        let expected = (extended_max + 1).saturating_sub(u64::from(self.base_seq));
        expected.saturating_sub(self.received)
    }

    /// Packets lost over the stream's life.
    pub fn lost(&self) -> u64 {
        self.lost_before + self.lost_current()
    }

    /// Current jitter in microseconds.
    pub fn jitter_us(&self) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        u64::from(self.jitter_q4 >> 4) * 1_000_000 / u64::from(self.rate)
    }

    /// Accounts one RTP packet. `arrival_ns` is on any monotonic clock; `rate` is the payload
    /// type's clock rate (0 when unknown: jitter is then not computed).
    pub fn on_packet(&mut self, ssrc: u32, seq: u16, ts: u32, arrival_ns: u64, rate: u32) {
        if !self.started || ssrc != self.ssrc {
            // A new source (or the first): close the old sequence space, start a new one.
            self.restart(seq);
            self.started = true;
            self.ssrc = ssrc;
        } else {
            let udelta = seq.wrapping_sub(self.max_seq);
            if udelta < MAX_DROPOUT {
                if seq < self.max_seq {
                    self.cycles = self.cycles.wrapping_add(1 << 16);
                }
                self.max_seq = seq;
            } else if udelta <= u16::MAX - MAX_MISORDER {
                // A big jump: trust it only when the next packet continues from it (A.1).
                if u32::from(seq) == self.bad_seq {
                    self.restart(seq);
                } else {
                    self.bad_seq = u32::from(seq.wrapping_add(1));
                    return;
                }
            }
            // else: duplicate or reordered; counted as received below.
        }
        self.received += 1;
        if rate == 0 {
            return;
        }
        if rate != self.rate {
            self.rate = rate;
            self.transit = None;
            self.jitter_q4 = 0;
        }
        // Arrival in RTP units; only differences matter, so wrapping is fine.
        let arrival = ((u128::from(arrival_ns) * u128::from(rate)) / 1_000_000_000) as u32;
        let transit = arrival.wrapping_sub(ts) as i32;
        if let Some(prev) = self.transit {
            let d = transit.wrapping_sub(prev).unsigned_abs();
            // J += (|D| - J) / 16, in the integer form of A.8.
            self.jitter_q4 = self
                .jitter_q4
                .wrapping_add(d)
                .wrapping_sub((self.jitter_q4 + 8) >> 4);
        }
        self.transit = Some(transit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_gaps_across_wrap() {
        let mut e = RtpEstimator::default();
        let mut seq: u16 = 65500;
        for i in 0..100u32 {
            if i % 10 != 3 {
                e.on_packet(7, seq, i * 160, u64::from(i) * 20_000_000, 8000);
            }
            seq = seq.wrapping_add(1);
        }
        assert_eq!(e.lost(), 10);
        assert_eq!(e.jitter_us(), 0);
    }

    #[test]
    fn duplicates_and_reorder_do_not_count_as_loss() {
        let mut e = RtpEstimator::default();
        for s in [1u16, 2, 4, 3, 5, 5, 6] {
            e.on_packet(1, s, u32::from(s) * 160, u64::from(s) * 20_000_000, 8000);
        }
        assert_eq!(e.lost(), 0);
    }

    #[test]
    fn ssrc_change_keeps_old_loss_and_restarts() {
        let mut e = RtpEstimator::default();
        for s in [10u16, 11, 13] {
            e.on_packet(1, s, 0, 0, 0);
        }
        assert_eq!(e.lost(), 1);
        for s in [500u16, 501, 502] {
            e.on_packet(2, s, 0, 0, 0);
        }
        assert_eq!(e.lost(), 1);
        // A lone jump is ignored, a confirmed one restarts the sequence space.
        e.on_packet(2, 20000, 0, 0, 0);
        assert_eq!(e.lost(), 1);
        e.on_packet(2, 20001, 0, 0, 0);
        e.on_packet(2, 20002, 0, 0, 0);
        assert_eq!(e.lost(), 1);
    }

    #[test]
    fn jitter_converges_to_the_arrival_spread() {
        // 20 ms of audio per packet; arrivals alternate 10 ms and 30 ms apart: |D| = 10 ms.
        let mut e = RtpEstimator::default();
        let mut t = 0u64;
        for i in 0..400u32 {
            e.on_packet(9, i as u16, i * 160, t, 8000);
            t += if i % 2 == 0 { 10_000_000 } else { 30_000_000 };
        }
        let j = e.jitter_us();
        assert!((9_000..=10_500).contains(&j), "jitter {j} us");
    }
}
