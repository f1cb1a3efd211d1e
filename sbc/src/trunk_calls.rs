//! Calls per trunk (`trunk.max_calls`): a carrier sells a trunk with so many channels, and a
//! limit here stops a flood of calls (a compromised phone dialling out, a PBX loop) before
//! it runs up the bill or the carrier starts refusing.
//!
//! A call holds a [`CallSlot`] from its INVITE (in or out) until it ends: the proxy's
//! transaction holds it while the call is being set up and hands it to the media anchor's
//! record of the dialog on the 2xx, which drops it when the dialog ends (BYE, media timeout,
//! the SBC hanging up). A failed call drops it with its final response. Counters are kept
//! by trunk name, so a reload that adds, removes or reorders trunks keeps the calls in
//! progress counted. Without media anchoring the SBC keeps no dialogs, so only calls being
//! set up count.

use ahash::AHashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Calls in progress of each trunk, by name.
#[derive(Default)]
pub struct TrunkCalls {
    counts: Mutex<AHashMap<Box<str>, Arc<Count>>>,
}

/// One trunk's count, with its `sbc_trunk_calls` gauge registered once (a call then sets
/// it without building a labelled key).
struct Count {
    trunk: Box<str>,
    calls: AtomicUsize,
    gauge: metrics::Gauge,
}

/// One call of a trunk; dropping it ends the call's count. One pointer: every live INVITE
/// transaction carries an `Option` of it.
pub struct CallSlot(Arc<Count>);

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallSlot({})", self.0.trunk)
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let now = self
            .0
            .calls
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        self.0.gauge.set(now as f64);
    }
}

impl TrunkCalls {
    /// A slot for one more call of `trunk`, unless it already has `limit` (then how many it
    /// has). Without a limit the call is counted all the same.
    pub fn acquire(&self, trunk: &str, limit: Option<u32>) -> Result<CallSlot, usize> {
        let count = {
            let mut counts = self.counts.lock();
            match counts.get(trunk) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(Count {
                        trunk: trunk.into(),
                        calls: AtomicUsize::new(0),
                        gauge: metrics::gauge!("sbc_trunk_calls", "trunk" => trunk.to_string()),
                    });
                    counts.insert(trunk.into(), c.clone());
                    c
                }
            }
        };
        let before = count.calls.fetch_add(1, Ordering::AcqRel);
        if let Some(limit) = limit {
            if before >= limit as usize {
                count.calls.fetch_sub(1, Ordering::AcqRel);
                return Err(before);
            }
        }
        count.gauge.set((before + 1) as f64);
        Ok(CallSlot(count))
    }

    /// Calls `trunk` has now.
    pub fn current(&self, trunk: &str) -> usize {
        self.counts
            .lock()
            .get(trunk)
            .map_or(0, |c| c.calls.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_up_to_the_limit_and_back_down_when_dropped() {
        let t = TrunkCalls::default();
        let a = t.acquire("carrier", Some(2)).expect("first");
        let b = t.acquire("carrier", Some(2)).expect("second");
        assert_eq!(
            t.acquire("carrier", Some(2)).err(),
            Some(2),
            "the third is refused"
        );
        assert_eq!(t.current("carrier"), 2, "a refusal takes nothing");
        // Another trunk, and no limit: counted apart.
        let c = t.acquire("other", None).expect("unlimited");
        assert_eq!(t.current("other"), 1);
        drop(a);
        assert_eq!(t.current("carrier"), 1);
        let d = t.acquire("carrier", Some(2)).expect("room again");
        drop((b, c, d));
        assert_eq!((t.current("carrier"), t.current("other")), (0, 0));
        assert_eq!(t.current("never"), 0);
    }
}
