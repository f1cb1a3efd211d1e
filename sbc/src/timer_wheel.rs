//! A hashed timer wheel for transaction deadlines.
//!
//! At a few thousand calls per second the proxy holds hundreds of thousands of pending
//! deadlines (RFC 3261 keeps completed transactions around for 32 s on UDP). A binary heap
//! pays O(log n) cache-missing comparisons per insert and pop; the wheel files a deadline in
//! the slot of its tick in O(1) and hands back everything due slot by slot. Deadlines are
//! rounded up to the tick, which SIP timers (T1 = 500 ms) tolerate. Entries are not removed
//! when a transaction's deadline moves: the owner ignores stale ones when they come due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

pub struct TimerWheel {
    epoch: Instant,
    tick: Duration,
    slots: Vec<Vec<u64>>,
    /// The first tick not yet handed out.
    cursor: u64,
    /// Deadlines beyond one revolution.
    far: BinaryHeap<Reverse<(u64, u64)>>,
    len: usize,
}

impl TimerWheel {
    /// A wheel of `slots` ticks of `tick` each (one revolution = slots x tick).
    pub fn new(epoch: Instant, tick: Duration, slots: usize) -> TimerWheel {
        TimerWheel {
            epoch,
            tick,
            slots: (0..slots.max(1)).map(|_| Vec::new()).collect(),
            cursor: 0,
            far: BinaryHeap::new(),
            len: 0,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        since.div_ceil(self.tick.as_nanos()) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.epoch + Duration::from_nanos((tick as u128 * self.tick.as_nanos()) as u64)
    }

    /// The deadline as it will fire (rounded up to the tick).
    pub fn round(&self, at: Instant) -> Instant {
        self.instant_of(self.tick_of(at))
    }

    /// The deadline rounded up to a multiple of `ticks` ticks: deadlines that may be late
    /// share fewer slots, so the owner wakes less often for them.
    pub fn round_coarse(&self, at: Instant, ticks: u64) -> Instant {
        let ticks = ticks.max(1);
        self.instant_of(self.tick_of(at).div_ceil(ticks) * ticks)
    }

    pub fn insert(&mut self, at: Instant, id: u64) {
        let t = self.tick_of(at).max(self.cursor);
        let n = self.slots.len() as u64;
        if t - self.cursor < n {
            self.slots[(t % n) as usize].push(id);
        } else {
            self.far.push(Reverse((t, id)));
        }
        self.len += 1;
    }

    /// Takes back the entry `insert(at, id)` filed, when it is still within one revolution:
    /// an owner whose deadline moved later skips the wasted wake-up and the stale fire. An
    /// entry beyond the revolution stays, and its owner ignores it when it comes due.
    pub fn cancel(&mut self, at: Instant, id: u64) -> bool {
        let t = self.tick_of(at);
        let n = self.slots.len() as u64;
        if t < self.cursor || t - self.cursor >= n {
            return false;
        }
        let slot = &mut self.slots[(t % n) as usize];
        match slot.iter().rposition(|&x| x == id) {
            Some(i) => {
                slot.swap_remove(i);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The earliest pending deadline (scans forward over empty slots).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u64;
        let far = self.far.peek().map(|r| r.0 .0);
        for t in self.cursor..self.cursor + n {
            if far.is_some_and(|f| f <= t) {
                break;
            }
            if !self.slots[(t % n) as usize].is_empty() {
                return Some(self.instant_of(t));
            }
        }
        far.map(|f| self.instant_of(f))
    }

    /// Moves every id due at `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<u64>) {
        let now_tick = self.tick_of(now);
        // A deadline at tick t is due once now >= instant_of(t), i.e. t <= floor(now).
        let due = if self.instant_of(now_tick) <= now {
            now_tick
        } else {
            now_tick.saturating_sub(1)
        };
        let n = self.slots.len() as u64;
        while self.cursor <= due {
            // Pull far deadlines that now fall within one revolution.
            while let Some(&Reverse((t, id))) = self.far.peek() {
                if t >= self.cursor + n {
                    break;
                }
                self.far.pop();
                self.slots[(t.max(self.cursor) % n) as usize].push(id);
            }
            let slot = &mut self.slots[(self.cursor % n) as usize];
            self.len -= slot.len();
            out.append(slot);
            self.cursor += 1;
            if self.len == 0 {
                // Nothing pending: jump the cursor straight to now.
                self.cursor = self.cursor.max(due + 1);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_and_not_early() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_millis(5), 16);
        w.insert(t0 + Duration::from_millis(12), 1);
        w.insert(t0 + Duration::from_millis(3), 2);
        w.insert(t0 + Duration::from_secs(10), 3); // far
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_millis(5)));
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(4), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(5), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        w.expire(t0 + Duration::from_millis(14), &mut out);
        assert!(out.is_empty(), "12 ms rounds up to 15 ms");
        w.expire(t0 + Duration::from_millis(15), &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_secs(10)));
        w.expire(t0 + Duration::from_millis(9_999), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(out, vec![3]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn cancel_takes_back_an_entry_within_the_revolution_only() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_millis(5), 16);
        let soon = t0 + Duration::from_millis(12);
        let far = t0 + Duration::from_secs(10);
        w.insert(soon, 1);
        w.insert(soon, 2);
        w.insert(far, 3);
        assert!(w.cancel(soon, 1));
        assert!(!w.cancel(soon, 1), "already gone");
        assert!(
            !w.cancel(far, 3),
            "beyond the revolution: left for the owner to ignore"
        );
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(15), &mut out);
        assert_eq!(out, vec![2]);
        w.expire(far, &mut out);
        assert_eq!(out, vec![2, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn coarse_rounding_never_fires_early_and_shares_slots() {
        let t0 = Instant::now();
        let w = TimerWheel::new(t0, Duration::from_millis(20), 64);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(w.round_coarse(ms(1), 10), ms(200));
        assert_eq!(w.round_coarse(ms(199), 10), ms(200));
        assert_eq!(w.round_coarse(ms(200), 10), ms(200));
        assert_eq!(w.round_coarse(ms(201), 10), ms(400));
        assert_eq!(w.round_coarse(ms(30), 1), w.round(ms(30)));
        assert_eq!(w.round_coarse(ms(30), 0), ms(40));
    }

    #[test]
    fn past_deadlines_fire_at_the_next_tick_and_many_share_a_slot() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::from_millis(5), 8);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(100), &mut out);
        w.insert(t0, 7); // in the past
        for i in 0..1000 {
            w.insert(t0 + Duration::from_millis(120), 100 + i);
        }
        // A deadline already past is filed at the next tick to hand out.
        w.expire(t0 + Duration::from_millis(101), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(105), &mut out);
        assert_eq!(out, vec![7]);
        out.clear();
        w.expire(t0 + Duration::from_millis(120), &mut out);
        assert_eq!(out.len(), 1000);
        assert!(w.is_empty());
    }
}
