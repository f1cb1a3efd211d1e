//! RFC 3261 section 17 transactions (with the RFC 6026 corrections), sans-IO.
//!
//! # Shape
//!
//! A transaction here is a plain state machine in the style of quinn-proto: it owns no socket,
//! no task and no clock. Everything it needs from the outside world is passed in, and everything
//! it wants done is pulled out:
//!
//! - Inputs: `handle_*` methods (a matched response or request arrived, the TU sends a response,
//!   a timer is due, the transport failed). Every input that can start a timer takes
//!   `now: Instant`, so the machines are deterministic and tests drive them with a fake clock.
//! - Outputs: `poll_transmit()` yields opaque [`Bytes`](bytes::Bytes) to put on the wire (the
//!   request, an ACK, a response, or a retransmission of one of them); `poll_event()` yields what
//!   the TU must react to (timeout, transport error, termination); `poll_timeout()` is the
//!   earliest instant at which `handle_timeout` must be called.
//!
//! The machines know nothing about SIP syntax. The TU (the proxy core) parses messages, matches
//! them to transactions (RFC 3261 17.1.3 / 17.2.3: branch, sent-by, method) and tells the
//! machine only the status code. The machine keeps the exact bytes it was given so that a
//! retransmission is byte-identical to the original, as RFC 3261 requires, and it never needs to
//! re-serialize anything. Where those bytes go (which address, which connection) is also the
//! caller's business: a client transaction always sends to the branch's resolved target, a
//! server transaction always answers per RFC 3261 18.2.2.
//!
//! # How the proxy drives it
//!
//! ```
//! use std::time::{Duration, Instant};
//! use bytes::Bytes;
//! use sbc_sip::transaction::{ClientEvent, ClientTransaction, ResponseAction, TimerConfig};
//!
//! let start = Instant::now();
//! let invite = Bytes::from_static(b"INVITE sip:bob@example.com SIP/2.0\r\n...");
//! let mut tx = ClientTransaction::new(true, false, invite, start, TimerConfig::default());
//!
//! // After creating the transaction and after every handle_* call: flush transmissions,
//! // handle events, and (re)arm the one timer this transaction needs.
//! while let Some(bytes) = tx.poll_transmit() { /* socket.send_to(&bytes, target) */ }
//! assert_eq!(tx.poll_timeout(), Some(start + Duration::from_millis(500))); // Timer A
//!
//! // A 486 Busy Here matched to this branch arrives.
//! let now = start + Duration::from_millis(200);
//! assert_eq!(tx.handle_response(486, now), ResponseAction::ForwardAndAck);
//! tx.set_ack(Bytes::from_static(b"ACK sip:bob@example.com SIP/2.0\r\n..."));
//! assert!(tx.poll_transmit().is_some()); // the ACK
//!
//! // When the timer is due, call handle_timeout; on Terminated, drop it from the table.
//! while let Some(deadline) = tx.poll_timeout() {
//!     tx.handle_timeout(deadline);
//! }
//! assert_eq!(tx.poll_event(), Some(ClientEvent::Terminated));
//! ```
//!
//! What stays with the TU, by design:
//! - Proxy Timer C (RFC 3261 16.6 step 11) and the decision to CANCEL. The INVITE client
//!   transaction has no timer in Proceeding; [`ClientTransaction::got_provisional`] tells the
//!   proxy whether a CANCEL may be sent yet, and [`ClientTransaction::terminate`] lets it give up.
//! - The 100 Trying of an INVITE server transaction: the TU sends it through
//!   [`ServerTransaction::send_response`] like any other response.
//! - The ACK for a 2xx and 2xx retransmissions are end-to-end (not part of the transaction);
//!   RFC 6026's Accepted states only keep the transaction alive so those 2xx retransmissions are
//!   matched and forwarded instead of being mistaken for stray responses or new requests.
//!
//! Timer names follow RFC 3261 Table 4 and RFC 6026: A/B/D (INVITE client), E/F/K (non-INVITE
//! client), G/H/I (INVITE server), J (non-INVITE server), L (INVITE server Accepted), M (INVITE
//! client Accepted).

mod client;
mod server;

use std::time::{Duration, Instant};

pub use client::{ClientEvent, ClientTransaction, ResponseAction};
pub use server::{ServerEvent, ServerTransaction};

/// The base timer values of RFC 3261 Table 4. Configurable because T1 may legitimately be raised
/// on high-latency links (every derived timer scales with it), and tests use small values.
#[derive(Clone, Copy, Debug)]
pub struct TimerConfig {
    /// Round-trip time estimate: the first retransmission interval, and 64*T1 is every
    /// transaction timeout (B, F, H, J, L, M).
    pub t1: Duration,
    /// Cap on the retransmission interval for non-INVITE requests and INVITE final responses.
    pub t2: Duration,
    /// Maximum time a message stays in the network: how long a completed transaction lingers
    /// to absorb retransmissions on unreliable transports (K, I).
    pub t4: Duration,
}

impl Default for TimerConfig {
    /// RFC 3261 Table 4 defaults: T1 = 500 ms, T2 = 4 s, T4 = 5 s.
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    /// 64*T1: Timers B, F, H, J, L and M.
    pub fn t1x64(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// Timer D. RFC 3261 asks for "at least 32 seconds" on unreliable transports; it must cover
    /// the server's whole Timer G/H retransmission window (64*T1), so if T1 is raised D grows
    /// with it instead of expiring while the server may still be retransmitting its final.
    fn timer_d(&self) -> Duration {
        Duration::from_secs(32).max(self.t1x64())
    }
}

/// States of all four machines (RFC 3261 Figures 5-8, RFC 6026 Figures 5 and 7). Each machine
/// uses a subset: INVITE client Calling/Proceeding/Completed/Accepted; non-INVITE client
/// Trying/Proceeding/Completed; INVITE server Proceeding/Completed/Confirmed/Accepted;
/// non-INVITE server Trying/Proceeding/Completed. All end in Terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Calling,
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
    Terminated,
}

/// Smallest retransmission interval the machines will arm. A zero T1 or T2 is a configuration
/// error that would otherwise make `poll_timeout` return `now` forever (a busy loop).
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A retransmission timer (A, E or G): when it is due and the interval it was last armed with,
/// from which the next interval is derived.
#[derive(Clone, Copy, Debug)]
struct Retransmit {
    at: Instant,
    interval: Duration,
}

impl Retransmit {
    /// Arms the first retransmission T1 after `now`. `None` if the deadline is not
    /// representable, in which case there simply are no retransmissions.
    fn start(now: Instant, t1: Duration) -> Option<Retransmit> {
        let interval = t1.max(MIN_INTERVAL);
        now.checked_add(interval)
            .map(|at| Retransmit { at, interval })
    }

    /// Re-arms after firing at `now` with `interval`. The next deadline is anchored to the
    /// scheduled one so a caller that is consistently a little late still follows the RFC
    /// schedule; if the caller was so late that the next deadline has passed too, the missed
    /// copies are not sent in a burst (they would only add load) and the schedule restarts from
    /// `now`.
    fn rearm(self, now: Instant, interval: Duration) -> Option<Retransmit> {
        let interval = interval.max(MIN_INTERVAL);
        let at = match self.at.checked_add(interval) {
            Some(at) if at > now => Some(at),
            _ => now.checked_add(interval),
        };
        at.map(|at| Retransmit { at, interval })
    }
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Deadline `d` after `now`, or `None` (never fires) if that instant is not representable.
fn after(now: Instant, d: Duration) -> Option<Instant> {
    now.checked_add(d)
}

/// Which timer of a machine is due next. Declaration order is the tie-break for equal
/// deadlines: a transaction that times out or ends at the same instant a retransmission is due
/// must not send that retransmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// B, F or H: the transaction failed.
    Timeout,
    /// D, K, M, I, J or L: the lingering state ends normally.
    Linger,
    /// A, E or G.
    Retransmit,
}

/// Picks the earliest due timer at `now`, applying the [`Due`] tie-break.
fn next_due(
    now: Instant,
    timeout: Option<Instant>,
    linger: Option<Instant>,
    retransmit: Option<Retransmit>,
) -> Option<Due> {
    [
        (timeout, Due::Timeout),
        (linger, Due::Linger),
        (retransmit.map(|r| r.at), Due::Retransmit),
    ]
    .into_iter()
    .filter_map(|(at, due)| at.filter(|at| *at <= now).map(|at| (at, due)))
    .min()
    .map(|(_, due)| due)
}

#[cfg(test)]
mod test_util {
    use super::*;
    use bytes::Bytes;

    /// The parts of both machines the timer-driving helper needs.
    pub(super) trait Machine {
        fn poll_timeout(&self) -> Option<Instant>;
        fn handle_timeout(&mut self, now: Instant);
        fn poll_transmit(&mut self) -> Option<Bytes>;
    }

    impl Machine for ClientTransaction {
        fn poll_timeout(&self) -> Option<Instant> {
            ClientTransaction::poll_timeout(self)
        }
        fn handle_timeout(&mut self, now: Instant) {
            ClientTransaction::handle_timeout(self, now)
        }
        fn poll_transmit(&mut self) -> Option<Bytes> {
            ClientTransaction::poll_transmit(self)
        }
    }

    impl Machine for ServerTransaction {
        fn poll_timeout(&self) -> Option<Instant> {
            ServerTransaction::poll_timeout(self)
        }
        fn handle_timeout(&mut self, now: Instant) {
            ServerTransaction::handle_timeout(self, now)
        }
        fn poll_transmit(&mut self) -> Option<Bytes> {
            ServerTransaction::poll_transmit(self)
        }
    }

    pub(super) fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives `m` like a well-behaved caller: calls `handle_timeout` exactly at each deadline
    /// up to and including `base + until`, and records the millisecond offset (from `base`) of
    /// every transmission. Also checks that a handled deadline is never reported again.
    pub(super) fn run_until<M: Machine>(m: &mut M, base: Instant, until: Duration) -> Vec<u64> {
        let mut sent = Vec::new();
        while let Some(at) = m.poll_timeout() {
            if at > base + until {
                break;
            }
            m.handle_timeout(at);
            if let Some(next) = m.poll_timeout() {
                assert!(
                    next > at,
                    "deadline {at:?} reported again after being handled"
                );
            }
            while m.poll_transmit().is_some() {
                sent.push(u64::try_from((at - base).as_millis()).unwrap_or(u64::MAX));
            }
        }
        sent
    }

    /// Drains and counts queued transmissions.
    pub(super) fn drain<M: Machine>(m: &mut M) -> usize {
        let mut n = 0;
        while m.poll_transmit().is_some() {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_timer_config_defaults_are_rfc_table_4() {
        let c = TimerConfig::default();
        assert_eq!(c.t1, Duration::from_millis(500));
        assert_eq!(c.t2, Duration::from_secs(4));
        assert_eq!(c.t4, Duration::from_secs(5));
        assert_eq!(c.t1x64(), Duration::from_secs(32));
        assert_eq!(c.timer_d(), Duration::from_secs(32));
    }

    #[test]
    fn transaction_timer_d_covers_raised_t1() {
        let c = TimerConfig {
            t1: Duration::from_secs(1),
            ..TimerConfig::default()
        };
        assert_eq!(c.timer_d(), Duration::from_secs(64));
    }

    #[test]
    fn transaction_next_due_prefers_timeout_over_retransmit_on_tie() {
        let now = Instant::now();
        let r = Some(Retransmit {
            at: now,
            interval: Duration::from_secs(1),
        });
        assert_eq!(next_due(now, Some(now), None, r), Some(Due::Timeout));
        assert_eq!(next_due(now, None, Some(now), r), Some(Due::Linger));
        assert_eq!(next_due(now, None, None, r), Some(Due::Retransmit));
        let later = now + Duration::from_millis(1);
        assert_eq!(next_due(now, Some(later), None, None), None);
    }
}
