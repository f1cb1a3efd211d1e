//! The health of one node: a pure state machine fed with observations and
//! an explicit clock.
//!
//! As in pingora-load-balancing's `Health::observe_health`, [`NodeHealth::observe`]
//! reports only flips: it returns `Some(Transition)` exactly when the
//! node's state changes, so callers log and count transitions, never
//! observations. It owns no clock and does no I/O, so every rule is tested
//! with made-up instants.
//!
//! The rules:
//! - **Starting** until the node answers once. Failures are not counted
//!   until it has answered or `start_grace` has passed since start, so a
//!   PBX booting slower than the SBC is not declared Down.
//! - **Up** on any answer from Starting or Suspect.
//! - **Suspect** on the first failure; **Down** after `failures`
//!   consecutive failures.
//! - From Down, **Up** after `successes` consecutive answers.
//! - **Maintenance** is an operator's flag over all of this (pingora's
//!   `enabled`, apart from health): observations keep updating the health
//!   underneath without reporting anything, and clearing the flag reports
//!   a move to whatever the health is by then.
//! - Live traffic failures (a transaction to the node timing out, a
//!   transport error, a 503) count exactly like probe failures. Live traffic
//!   successes are ignored: they would mask a failing HTTP probe (a PBX
//!   whose application server died still answers SIP), and recovery is the
//!   probes' call.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The state of a node as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// No answer seen yet since the SBC started; usable (traffic must flow
    /// before the first probe has come back).
    Starting,
    /// Answering.
    Up,
    /// Some consecutive failures, fewer than the threshold; still usable as
    /// a fallback, but new transactions try a ready node first.
    Suspect,
    /// `failures` consecutive failures; tried only when nothing else is left.
    Down,
    /// Taken out of service by an operator; never chosen.
    Maintenance,
}

impl NodeState {
    /// Every state, for metrics that export one gauge per state.
    pub const ALL: [NodeState; 5] = [
        NodeState::Starting,
        NodeState::Up,
        NodeState::Suspect,
        NodeState::Down,
        NodeState::Maintenance,
    ];

    /// Lower-case name, as in logs, metric labels and the status JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Maintenance => "maintenance",
        }
    }

    /// Whether new transactions may go to the node first.
    pub fn is_ready(self) -> bool {
        matches!(self, NodeState::Starting | NodeState::Up)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an observation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A health probe (OPTIONS and/or HTTP).
    Probe,
    /// The outcome of a real transaction sent to the node.
    Traffic,
    /// A real transaction to the node has had no response at all for longer than a
    /// healthy node takes to send 100 Trying: a hint, not a failure.
    TrafficSlow,
}

/// One piece of evidence about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Observation {
    /// Whether the node proved alive.
    pub alive: bool,
    /// Where the evidence came from.
    pub source: Source,
}

impl Observation {
    /// A probe round's verdict.
    pub fn probe(alive: bool) -> Observation {
        Observation {
            alive,
            source: Source::Probe,
        }
    }

    /// A transaction to the node timed out, hit a transport error or got a 503.
    pub fn traffic_failure() -> Observation {
        Observation {
            alive: false,
            source: Source::Traffic,
        }
    }

    /// A new transaction to the node has had no response for the pool's `suspect_after`.
    pub fn traffic_slow() -> Observation {
        Observation {
            alive: false,
            source: Source::TrafficSlow,
        }
    }

    /// A transaction to the node got an answer (ignored, see the module docs).
    pub fn traffic_success() -> Observation {
        Observation {
            alive: true,
            source: Source::Traffic,
        }
    }
}

/// Why a node changed state: the `reason` label of
/// `sbc_node_transitions_total` and of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A probe was answered.
    ProbeAnswered,
    /// A probe failed.
    ProbeFailed,
    /// A live transaction to the node failed.
    TrafficFailed,
    /// An operator put the node into maintenance.
    MaintenanceOn,
    /// An operator took the node out of maintenance.
    MaintenanceOff,
    /// A live transaction has had no response for longer than a healthy node takes.
    TrafficSlow,
    /// The node was judged Down while the SBC itself could reach nothing; now that it can
    /// again, that verdict is withdrawn and the node must show its death afresh.
    Requalified,
}

impl Reason {
    /// Fixed label text.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ProbeAnswered => "probe_answered",
            Reason::ProbeFailed => "probe_failed",
            Reason::TrafficFailed => "traffic_failed",
            Reason::MaintenanceOn => "maintenance_on",
            Reason::MaintenanceOff => "maintenance_off",
            Reason::TrafficSlow => "traffic_slow",
            Reason::Requalified => "requalified",
        }
    }
}

/// A change of a node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: NodeState,
    /// State after.
    pub to: NodeState,
    /// What caused it.
    pub reason: Reason,
    /// When.
    pub at: Instant,
}

/// The thresholds of a pool's probe settings that drive the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failures to go Down (at least 1).
    pub failures: u32,
    /// Consecutive successes to come back Up from Down (at least 1).
    pub successes: u32,
    /// Failures of a never-answered node are ignored this long after start.
    pub start_grace: Duration,
}

impl From<&sbc_config::Probe> for Thresholds {
    fn from(p: &sbc_config::Probe) -> Self {
        Thresholds {
            failures: p.failures,
            successes: p.successes,
            start_grace: p.start_grace,
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::from(&sbc_config::Probe::default())
    }
}

/// The health of one node (see the module docs for the rules).
#[derive(Debug, Clone)]
pub struct NodeHealth {
    thresholds: Thresholds,
    /// Health from observations; never `Maintenance`.
    health: NodeState,
    /// Operator's maintenance flag, over `health`.
    maintenance: bool,
    /// When the effective state (`state()`) began.
    since: Instant,
    started: Instant,
    answered: bool,
    failures: u32,
    successes: u32,
}

impl NodeHealth {
    /// A node in `Starting`, its start grace beginning at `now`.
    pub fn new(thresholds: Thresholds, now: Instant) -> NodeHealth {
        NodeHealth {
            thresholds: Thresholds {
                failures: thresholds.failures.max(1),
                successes: thresholds.successes.max(1),
                start_grace: thresholds.start_grace,
            },
            health: NodeState::Starting,
            maintenance: false,
            since: now,
            started: now,
            answered: false,
            failures: 0,
            successes: 0,
        }
    }

    /// The same health judged by new thresholds from now on (a reload that
    /// changed `failures`, `successes` or the grace keeps what was learnt).
    pub fn with_thresholds(mut self, thresholds: Thresholds) -> NodeHealth {
        self.thresholds = Thresholds {
            failures: thresholds.failures.max(1),
            successes: thresholds.successes.max(1),
            start_grace: thresholds.start_grace,
        };
        self
    }

    /// The state routing uses: `Maintenance` while the flag is set, else
    /// the health.
    pub fn state(&self) -> NodeState {
        if self.maintenance {
            NodeState::Maintenance
        } else {
            self.health
        }
    }

    /// The health under the maintenance flag.
    pub fn health(&self) -> NodeState {
        self.health
    }

    /// Whether an operator has put the node into maintenance.
    pub fn in_maintenance(&self) -> bool {
        self.maintenance
    }

    /// When [`NodeHealth::state`] last changed (or the machine started).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Failures counted in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Successes counted in a row so far.
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Feeds one observation; returns the transition if the state changed.
    pub fn observe(&mut self, obs: Observation, now: Instant) -> Option<Transition> {
        let before = self.health;
        let reason;
        if obs.source == Source::TrafficSlow {
            // Only an Up node becomes Suspect, and nothing is counted: a slow answer is not
            // a failure, but the next transactions should not queue behind it.
            if before != NodeState::Up || obs.alive {
                return None;
            }
            self.health = NodeState::Suspect;
            if self.maintenance {
                return None;
            }
            self.since = now;
            return Some(Transition {
                from: before,
                to: NodeState::Suspect,
                reason: Reason::TrafficSlow,
                at: now,
            });
        }
        if obs.alive {
            if obs.source != Source::Probe {
                return None;
            }
            reason = Reason::ProbeAnswered;
            self.answered = true;
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            self.health = match before {
                NodeState::Down if self.successes < self.thresholds.successes => NodeState::Down,
                _ => NodeState::Up,
            };
        } else {
            reason = match obs.source {
                Source::Probe => Reason::ProbeFailed,
                // TrafficSlow returned above.
                Source::Traffic | Source::TrafficSlow => Reason::TrafficFailed,
            };
            self.successes = 0;
            let in_grace = !self.answered
                && now.saturating_duration_since(self.started) < self.thresholds.start_grace;
            if in_grace {
                return None;
            }
            self.failures = self.failures.saturating_add(1);
            // A Down node stays Down while failing: the count only matters
            // on the way down.
            self.health = if self.failures >= self.thresholds.failures || before == NodeState::Down
            {
                NodeState::Down
            } else {
                NodeState::Suspect
            };
        }
        if self.health == before || self.maintenance {
            return None;
        }
        self.since = now;
        Some(Transition {
            from: before,
            to: self.health,
            reason,
            at: now,
        })
    }

    /// Withdraws a Down verdict that was reached while the SBC was cut off from everything (its
    /// probes failed because of its own link, not the node): the node goes to Suspect with no
    /// failures counted, so one answered probe brings it back Up and a real death has to be
    /// shown again by `failures` fresh misses.
    pub fn requalify(&mut self, now: Instant) -> Option<Transition> {
        if self.health != NodeState::Down {
            return None;
        }
        self.health = NodeState::Suspect;
        self.failures = 0;
        self.successes = 0;
        if self.maintenance {
            return None;
        }
        self.since = now;
        Some(Transition {
            from: NodeState::Down,
            to: NodeState::Suspect,
            reason: Reason::Requalified,
            at: now,
        })
    }

    /// Sets or clears the maintenance flag; returns the transition if the
    /// effective state changed.
    pub fn set_maintenance(&mut self, on: bool, now: Instant) -> Option<Transition> {
        if on == self.maintenance {
            return None;
        }
        let from = self.state();
        self.maintenance = on;
        self.since = now;
        Some(Transition {
            from,
            to: self.state(),
            reason: if on {
                Reason::MaintenanceOn
            } else {
                Reason::MaintenanceOff
            },
            at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn machine(failures: u32, successes: u32, grace_ms: u64) -> (NodeHealth, Instant) {
        let t0 = Instant::now();
        let th = Thresholds {
            failures,
            successes,
            start_grace: MS * u32::try_from(grace_ms).unwrap_or(u32::MAX),
        };
        (NodeHealth::new(th, t0), t0)
    }

    fn probe(n: &mut NodeHealth, alive: bool, at: Instant) -> Option<(NodeState, NodeState)> {
        n.observe(Observation::probe(alive), at)
            .map(|t| (t.from, t.to))
    }

    #[test]
    fn a_slow_transaction_makes_an_up_node_suspect_without_counting_a_failure() {
        let (mut n, t0) = machine(2, 2, 0);
        probe(&mut n, true, t0);
        let t = n.observe(Observation::traffic_slow(), t0 + MS);
        assert_eq!(
            t.map(|t| (t.to, t.reason)),
            Some((NodeState::Suspect, Reason::TrafficSlow))
        );
        assert_eq!(n.consecutive_failures(), 0);
        // Nothing more while Suspect; one answered probe brings it back.
        assert_eq!(n.observe(Observation::traffic_slow(), t0 + MS * 2), None);
        assert_eq!(
            probe(&mut n, true, t0 + MS * 3),
            Some((NodeState::Suspect, NodeState::Up))
        );
        // Slowness never brings a node Down, however often.
        for k in 4..10 {
            n.observe(Observation::traffic_slow(), t0 + MS * k);
        }
        assert_eq!(n.state(), NodeState::Suspect);
    }

    #[test]
    fn starts_in_starting_and_first_answer_makes_it_up() {
        let (mut n, t0) = machine(2, 2, 30_000);
        assert_eq!(n.state(), NodeState::Starting);
        assert!(n.state().is_ready());
        let t = n.observe(Observation::probe(true), t0 + MS * 10);
        assert_eq!(
            t,
            Some(Transition {
                from: NodeState::Starting,
                to: NodeState::Up,
                reason: Reason::ProbeAnswered,
                at: t0 + MS * 10
            })
        );
        assert_eq!(n.since(), t0 + MS * 10);
        // Further answers report nothing: only flips are reported.
        assert_eq!(probe(&mut n, true, t0 + MS * 20), None);
    }

    #[test]
    fn failures_during_start_grace_are_not_counted() {
        let (mut n, t0) = machine(2, 2, 1000);
        for i in 0..5 {
            assert_eq!(probe(&mut n, false, t0 + MS * (100 * i)), None);
        }
        assert_eq!(n.state(), NodeState::Starting);
        assert_eq!(n.consecutive_failures(), 0);
        // Traffic failures are not counted either.
        assert_eq!(
            n.observe(Observation::traffic_failure(), t0 + MS * 900),
            None
        );
        // Once the grace is over, failures count: Suspect, then Down.
        assert_eq!(
            probe(&mut n, false, t0 + MS * 1000),
            Some((NodeState::Starting, NodeState::Suspect))
        );
        assert_eq!(
            probe(&mut n, false, t0 + MS * 2000),
            Some((NodeState::Suspect, NodeState::Down))
        );
    }

    #[test]
    fn zero_grace_counts_from_the_first_failure() {
        let (mut n, t0) = machine(1, 1, 0);
        assert_eq!(
            probe(&mut n, false, t0),
            Some((NodeState::Starting, NodeState::Down))
        );
    }

    #[test]
    fn grace_ends_once_the_node_has_answered() {
        let (mut n, t0) = machine(3, 2, 60_000);
        probe(&mut n, true, t0 + MS);
        // Within the grace period, but the node answered once: counted.
        assert_eq!(
            probe(&mut n, false, t0 + MS * 2),
            Some((NodeState::Up, NodeState::Suspect))
        );
    }

    #[test]
    fn first_failure_suspect_then_down_at_threshold() {
        let (mut n, t0) = machine(3, 2, 0);
        probe(&mut n, true, t0);
        assert_eq!(
            probe(&mut n, false, t0 + MS),
            Some((NodeState::Up, NodeState::Suspect))
        );
        assert_eq!(probe(&mut n, false, t0 + MS * 2), None);
        assert_eq!(n.consecutive_failures(), 2);
        let t = n.observe(Observation::probe(false), t0 + MS * 3);
        assert_eq!(
            t.map(|t| (t.to, t.reason)),
            Some((NodeState::Down, Reason::ProbeFailed))
        );
        assert_eq!(n.since(), t0 + MS * 3);
        // Staying down reports nothing.
        assert_eq!(probe(&mut n, false, t0 + MS * 4), None);
    }

    #[test]
    fn one_failure_threshold_goes_straight_down() {
        let (mut n, t0) = machine(1, 1, 0);
        probe(&mut n, true, t0);
        assert_eq!(
            probe(&mut n, false, t0 + MS),
            Some((NodeState::Up, NodeState::Down))
        );
    }

    #[test]
    fn an_answer_clears_suspect_at_once() {
        let (mut n, t0) = machine(2, 3, 0);
        probe(&mut n, true, t0);
        probe(&mut n, false, t0 + MS);
        assert_eq!(
            probe(&mut n, true, t0 + MS * 2),
            Some((NodeState::Suspect, NodeState::Up))
        );
        // The failure streak restarted: one more failure is Suspect again, not Down.
        assert_eq!(
            probe(&mut n, false, t0 + MS * 3),
            Some((NodeState::Up, NodeState::Suspect))
        );
    }

    #[test]
    fn down_needs_consecutive_successes_to_come_back() {
        let (mut n, t0) = machine(1, 3, 0);
        probe(&mut n, true, t0);
        probe(&mut n, false, t0 + MS);
        assert_eq!(n.state(), NodeState::Down);
        assert_eq!(probe(&mut n, true, t0 + MS * 2), None);
        assert_eq!(probe(&mut n, true, t0 + MS * 3), None);
        // A failure in between restarts the count.
        assert_eq!(probe(&mut n, false, t0 + MS * 4), None);
        assert_eq!(probe(&mut n, true, t0 + MS * 5), None);
        assert_eq!(probe(&mut n, true, t0 + MS * 6), None);
        assert_eq!(n.consecutive_successes(), 2);
        assert_eq!(
            probe(&mut n, true, t0 + MS * 7),
            Some((NodeState::Down, NodeState::Up))
        );
    }

    #[test]
    fn traffic_failures_count_like_probe_failures() {
        let (mut n, t0) = machine(2, 2, 0);
        probe(&mut n, true, t0);
        let t = n.observe(Observation::traffic_failure(), t0 + MS);
        assert_eq!(
            t.map(|t| (t.from, t.to, t.reason)),
            Some((NodeState::Up, NodeState::Suspect, Reason::TrafficFailed))
        );
        // A probe failure continues the same streak.
        assert_eq!(
            probe(&mut n, false, t0 + MS * 2),
            Some((NodeState::Suspect, NodeState::Down))
        );
        // A traffic failure on a Down node restarts its recovery count.
        probe(&mut n, true, t0 + MS * 3);
        n.observe(Observation::traffic_failure(), t0 + MS * 4);
        assert_eq!(probe(&mut n, true, t0 + MS * 5), None);
        assert_eq!(n.state(), NodeState::Down);
    }

    #[test]
    fn traffic_successes_are_ignored() {
        let (mut n, t0) = machine(2, 2, 0);
        probe(&mut n, true, t0);
        probe(&mut n, false, t0 + MS);
        assert_eq!(n.observe(Observation::traffic_success(), t0 + MS * 2), None);
        assert_eq!(n.state(), NodeState::Suspect);
        assert_eq!(n.consecutive_failures(), 1);
        // Nor do they end Starting.
        let (mut s, t0) = machine(2, 2, 0);
        assert_eq!(s.observe(Observation::traffic_success(), t0), None);
        assert_eq!(s.state(), NodeState::Starting);
    }

    #[test]
    fn maintenance_overrides_health() {
        let (mut n, t0) = machine(1, 1, 0);
        probe(&mut n, true, t0);
        let t = n.set_maintenance(true, t0 + MS);
        assert_eq!(
            t.map(|t| (t.from, t.to, t.reason)),
            Some((NodeState::Up, NodeState::Maintenance, Reason::MaintenanceOn))
        );
        assert_eq!(n.set_maintenance(true, t0 + MS * 2), None);
        // Observations update the health underneath but report nothing.
        assert_eq!(probe(&mut n, false, t0 + MS * 3), None);
        assert_eq!(n.state(), NodeState::Maintenance);
        assert_eq!(n.health(), NodeState::Down);
        assert_eq!(n.since(), t0 + MS);
        // Leaving maintenance reports the health found by then.
        let t = n.set_maintenance(false, t0 + MS * 4);
        assert_eq!(
            t.map(|t| (t.from, t.to, t.reason)),
            Some((
                NodeState::Maintenance,
                NodeState::Down,
                Reason::MaintenanceOff
            ))
        );
        assert_eq!(n.since(), t0 + MS * 4);
        assert!(!n.in_maintenance());
        assert_eq!(n.set_maintenance(false, t0 + MS * 5), None);
    }

    #[test]
    fn new_thresholds_keep_the_health() {
        let (mut n, t0) = machine(5, 5, 0);
        probe(&mut n, true, t0);
        probe(&mut n, false, t0 + MS);
        let mut n = n.with_thresholds(Thresholds {
            failures: 2,
            successes: 1,
            start_grace: Duration::ZERO,
        });
        assert_eq!(n.state(), NodeState::Suspect);
        assert_eq!(
            probe(&mut n, false, t0 + MS * 2),
            Some((NodeState::Suspect, NodeState::Down))
        );
        assert_eq!(
            probe(&mut n, true, t0 + MS * 3),
            Some((NodeState::Down, NodeState::Up))
        );
    }

    #[test]
    fn thresholds_come_from_config() {
        let th = Thresholds::default();
        assert_eq!((th.failures, th.successes), (2, 2));
        assert_eq!(th.start_grace, Duration::from_secs(30));
        // Zero thresholds (not allowed by config) behave as one.
        let t0 = Instant::now();
        let mut n = NodeHealth::new(
            Thresholds {
                failures: 0,
                successes: 0,
                start_grace: Duration::ZERO,
            },
            t0,
        );
        assert_eq!(
            probe(&mut n, false, t0),
            Some((NodeState::Starting, NodeState::Down))
        );
        assert_eq!(
            probe(&mut n, true, t0),
            Some((NodeState::Down, NodeState::Up))
        );
    }
}
