//! The failover state of one pool: a pure machine over its nodes' health.
//!
//! A pool's nodes are in priority order (primary first). One of them is
//! **active**: the node new transactions try first. This machine decides
//! when that role moves, and in what order a new transaction tries the
//! nodes ([`PoolMachine::candidates`]); it does no I/O and takes `now` as
//! an argument, so every rule is tested with an explicit clock.
//!
//! - **Failover** when the active node goes Down, but only after the SBC
//!   has verified that it is not itself cut off: the machine asks for a
//!   witness check ([`Update::check_witnesses`]); the runtime performs it
//!   (HTTP witnesses, fresh probes of the other nodes) and reports with
//!   [`PoolMachine::witness_result`]. The role moves to the first Up node
//!   in priority order. If no witness answered, or none of the other nodes
//!   is Up, the machine stays on the node, reports why once per episode,
//!   and asks again one retry interval later.
//! - **Maintenance** of the active node moves the role at once (the
//!   operator asked for it; no witness needed).
//! - **Failback**: with [`Failback::Manual`] only [`PoolMachine::failback`]
//!   moves back, so a flapping primary never causes repeated switches; with
//!   [`Failback::Auto`], the role moves back to a node of higher priority
//!   once it has been Up continuously for the hold-down time. A manual
//!   failover pins the pool: it is never undone automatically.

use std::time::{Duration, Instant};

use sbc_config::Failback;
use smallvec::SmallVec;

use crate::error::HealthError;
use crate::state::{NodeHealth, NodeState, Observation, Thresholds, Transition};

/// The node order a new transaction should try, as indices into the pool
/// (or global indices from [`crate::HealthMonitor::candidates`]).
pub type Candidates = SmallVec<[usize; 4]>;

/// Whether the active role moved away from a node or back to one of
/// higher priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchKind {
    /// Away from a failed, maintained or manually failed-over node.
    Failover,
    /// Back to a node of higher priority.
    Failback,
}

impl SwitchKind {
    /// The webhook event this switch fires.
    pub fn event(self) -> sbc_config::WebhookEvent {
        match self {
            SwitchKind::Failover => sbc_config::WebhookEvent::Failover,
            SwitchKind::Failback => sbc_config::WebhookEvent::Failback,
        }
    }
}

/// Why the active role moved: the `reason` label of `sbc_failovers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchReason {
    /// The active node went Down and a witness answered.
    NodeDown,
    /// An operator's manual failover.
    Manual,
    /// An operator put the active node into maintenance.
    Maintenance,
    /// Automatic failback after the hold-down time.
    AutoFailback,
    /// An operator's failback.
    ManualFailback,
}

impl SwitchReason {
    /// Fixed label text.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::NodeDown => "node_down",
            SwitchReason::Manual => "manual",
            SwitchReason::Maintenance => "maintenance",
            SwitchReason::AutoFailback => "auto_failback",
            SwitchReason::ManualFailback => "manual_failback",
        }
    }
}

/// A move of the active role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// Previously active node (pool index).
    pub from: usize,
    /// Newly active node (pool index).
    pub to: usize,
    /// Failover or failback.
    pub kind: SwitchKind,
    /// Why.
    pub reason: SwitchReason,
    /// When.
    pub at: Instant,
}

/// What one input to the machine produced; the runtime logs, counts and
/// acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Update {
    /// A node changed state: (pool index, transition).
    pub transition: Option<(usize, Transition)>,
    /// The active node is Down and another node is Up: verify that the SBC
    /// can reach a witness, then call [`PoolMachine::witness_result`].
    pub check_witnesses: bool,
    /// The active role moved.
    pub switch: Option<Switch>,
}

/// Why a failover did not happen although the active node is Down: the
/// `reason` label of `sbc_failover_suppressed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suppression {
    /// Nothing answered the witness check: the fault may be the SBC's own
    /// (its link is down), and moving would not help.
    NoWitness,
    /// The SBC can reach a witness, but no other node is Up to take over.
    NoStandby,
}

impl Suppression {
    /// Fixed label text.
    pub fn as_str(self) -> &'static str {
        match self {
            Suppression::NoWitness => "no_witness",
            Suppression::NoStandby => "no_standby",
        }
    }
}

/// What a witness check's verdict led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitnessOutcome {
    /// A witness answered and the role moved.
    Switched(Switch),
    /// The SBC stays on the Down node. `first` is true the first time in an
    /// episode this reason comes up (log and count it then, not per retry).
    Suppressed {
        /// Why.
        reason: Suppression,
        /// First time for this reason since the active node went Down.
        first: bool,
    },
    /// The check is moot: the active node recovered or the role moved
    /// meanwhile.
    NotNeeded,
    /// A witness answers again after a check found none: the active node's Down verdict
    /// was reached while the SBC was cut off, so it is withdrawn (the node is Suspect again)
    /// instead of failing over on stale evidence. The transition, if the state changed.
    Requalified(Option<(usize, Transition)>),
}

/// The pool-level settings of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Manual or automatic failback.
    pub failback: Failback,
    /// How long a node of higher priority must have been Up before an
    /// automatic failback.
    pub failback_hold: Duration,
    /// After a witness check found nothing, how long before the next one.
    pub witness_retry: Duration,
}

impl From<&sbc_config::Pool> for Policy {
    fn from(p: &sbc_config::Pool) -> Self {
        Policy {
            failback: p.failback,
            failback_hold: p.failback_hold,
            witness_retry: p.probe.interval,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Idle,
    InFlight,
    RetryAt(Instant),
}

/// The failover state of one pool (see the module docs).
#[derive(Debug, Clone)]
pub struct PoolMachine {
    name: String,
    names: Vec<String>,
    nodes: Vec<NodeHealth>,
    active: usize,
    policy: Policy,
    /// Set by a manual failover: no automatic failback until an operator's
    /// failback or another failover.
    pinned: bool,
    check: Check,
    /// The suppression last reported in this Down episode.
    reported: Option<Suppression>,
    /// A witness check found nothing while the active node was Down: the SBC itself may
    /// be cut off, so that Down verdict is not evidence against the node.
    isolated: bool,
}

impl PoolMachine {
    /// A pool named `name` with nodes `names` (priority order), all
    /// Starting, the first active.
    pub fn new(
        name: impl Into<String>,
        names: Vec<String>,
        thresholds: Thresholds,
        policy: Policy,
        now: Instant,
    ) -> PoolMachine {
        let nodes = names
            .iter()
            .map(|_| NodeHealth::new(thresholds, now))
            .collect();
        PoolMachine {
            name: name.into(),
            names,
            nodes,
            active: 0,
            policy,
            pinned: false,
            check: Check::Idle,
            reported: None,
            isolated: false,
        }
    }

    /// The machine for a configured pool.
    pub fn from_config(pool: &sbc_config::Pool, now: Instant) -> PoolMachine {
        PoolMachine::new(
            pool.name.clone(),
            pool.nodes.iter().map(|n| n.name.clone()).collect(),
            Thresholds::from(&pool.probe),
            Policy::from(pool),
            now,
        )
    }

    /// Carries over what an older machine of the same pool knew, for a
    /// configuration reload: node `i` takes `health` (judged by this
    /// machine's thresholds from now on), so a reload never revives a dead
    /// node nor restarts a live one's grace.
    pub fn adopt(&mut self, i: usize, health: NodeHealth, thresholds: Thresholds) {
        if let Some(slot) = self.nodes.get_mut(i) {
            *slot = health.with_thresholds(thresholds);
        }
    }

    /// Makes node `i` active (and keeps a manual failover's pin), for a
    /// reload that keeps the node that was active. Ignored for an unknown
    /// node.
    pub fn restore_active(&mut self, i: usize, pinned: bool) {
        if i < self.nodes.len() {
            self.active = i;
            self.pinned = pinned;
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of node `i`.
    pub fn node_name(&self, i: usize) -> Option<&str> {
        self.names.get(i).map(String::as_str)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the pool has no nodes (never, for a configured pool).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The health machine of node `i`.
    pub fn node(&self, i: usize) -> Option<&NodeHealth> {
        self.nodes.get(i)
    }

    /// The state of node `i`.
    pub fn state(&self, i: usize) -> Option<NodeState> {
        self.nodes.get(i).map(NodeHealth::state)
    }

    /// The active node.
    pub fn active(&self) -> usize {
        self.active
    }

    /// The pool's failback policy.
    pub fn failback_policy(&self) -> Failback {
        self.policy.failback
    }

    /// Whether a manual failover has disabled automatic failback.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// The order in which a new transaction should try the nodes: ready
    /// nodes (Up, Starting), then Suspect ones, then Down ones; within each
    /// group the active node first, then priority order. So the active node
    /// leads unless it is Suspect or Down, in which case the next ready node
    /// leads and the active one follows as a fallback. Nodes in maintenance
    /// are left out. No allocation for pools of up to four nodes.
    pub fn candidates(&self) -> Candidates {
        fn group(s: NodeState) -> Option<u8> {
            match s {
                NodeState::Starting | NodeState::Up => Some(0),
                NodeState::Suspect => Some(1),
                NodeState::Down => Some(2),
                NodeState::Maintenance => None,
            }
        }
        let mut out = Candidates::new();
        let active_group = self.state(self.active).and_then(group);
        for g in 0..3u8 {
            if active_group == Some(g) {
                out.push(self.active);
            }
            for (i, n) in self.nodes.iter().enumerate() {
                if i != self.active && group(n.state()) == Some(g) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// Feeds an observation of node `i`.
    pub fn observe(&mut self, i: usize, obs: Observation, now: Instant) -> Update {
        let transition = self
            .nodes
            .get_mut(i)
            .and_then(|n| n.observe(obs, now))
            .map(|t| (i, t));
        self.evaluate(transition, now)
    }

    /// Re-evaluates time-driven rules (automatic failback, witness retry)
    /// without new evidence.
    pub fn tick(&mut self, now: Instant) -> Update {
        self.evaluate(None, now)
    }

    /// The verdict of the witness check asked for by [`Update::check_witnesses`].
    pub fn witness_result(&mut self, answered: bool, now: Instant) -> WitnessOutcome {
        self.check = Check::Idle;
        if self.state(self.active) != Some(NodeState::Down) {
            self.reported = None;
            self.isolated = false;
            return WitnessOutcome::NotNeeded;
        }
        if answered && self.isolated {
            // The SBC reaches the world again. The active node went Down while it could not
            // (both nodes usually did), and whichever node's probe answers first after the
            // link returns would win a failover race. Judge the active node afresh instead.
            self.isolated = false;
            self.reported = None;
            let active = self.active;
            let t = self
                .nodes
                .get_mut(active)
                .and_then(|n| n.requalify(now))
                .map(|t| (active, t));
            return WitnessOutcome::Requalified(t);
        }
        if !answered {
            self.isolated = true;
        }
        let reason = match (answered, self.first_up_except(self.active)) {
            (true, Some(to)) => {
                return WitnessOutcome::Switched(self.switch_to(
                    to,
                    SwitchKind::Failover,
                    SwitchReason::NodeDown,
                    now,
                ))
            }
            (true, None) => Suppression::NoStandby,
            (false, _) => Suppression::NoWitness,
        };
        self.check = Check::RetryAt(now + self.policy.witness_retry);
        let first = self.reported != Some(reason);
        self.reported = Some(reason);
        WitnessOutcome::Suppressed { reason, first }
    }

    /// An operator's failover: the role moves to the next node after the
    /// active one (wrapping) that is Up, else to the next that is at least
    /// not Down. Pins the pool so that automatic failback does not undo it.
    pub fn failover(&mut self, now: Instant) -> Result<Switch, HealthError> {
        let n = self.nodes.len();
        let order = (1..n).map(|k| (self.active + k) % n);
        let to = order
            .clone()
            .find(|&i| self.state(i) == Some(NodeState::Up))
            .or_else(|| {
                order.clone().find(|&i| {
                    matches!(
                        self.state(i),
                        Some(NodeState::Starting | NodeState::Suspect)
                    )
                })
            })
            .ok_or_else(|| HealthError::NoStandby {
                pool: self.name.clone(),
            })?;
        let switch = self.switch_to(to, SwitchKind::Failover, SwitchReason::Manual, now);
        self.pinned = true;
        Ok(switch)
    }

    /// An operator's failback: the role moves to the node of highest
    /// priority above the active one that is Up (no hold-down: the operator
    /// decided). `Ok(None)` when the primary is already active.
    pub fn failback(&mut self, now: Instant) -> Result<Option<Switch>, HealthError> {
        if self.active == 0 {
            self.pinned = false;
            return Ok(None);
        }
        match (0..self.active).find(|&i| self.state(i) == Some(NodeState::Up)) {
            Some(to) => Ok(Some(self.switch_to(
                to,
                SwitchKind::Failback,
                SwitchReason::ManualFailback,
                now,
            ))),
            None => Err(HealthError::NothingToFailBackTo {
                pool: self.name.clone(),
                active: self.node_name(self.active).unwrap_or("?").to_string(),
            }),
        }
    }

    /// Puts node `i` into maintenance or takes it out. Maintenance of the
    /// active node moves the role at once to the first Up node (else the
    /// first one not Down) if there is one.
    pub fn set_maintenance(&mut self, i: usize, on: bool, now: Instant) -> Update {
        let transition = self
            .nodes
            .get_mut(i)
            .and_then(|n| n.set_maintenance(on, now))
            .map(|t| (i, t));
        self.evaluate(transition, now)
    }

    fn first_up_except(&self, except: usize) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| i != except && self.state(i) == Some(NodeState::Up))
    }

    fn switch_to(
        &mut self,
        to: usize,
        kind: SwitchKind,
        reason: SwitchReason,
        now: Instant,
    ) -> Switch {
        let from = self.active;
        self.active = to;
        self.pinned = false;
        self.check = Check::Idle;
        self.reported = None;
        Switch {
            from,
            to,
            kind,
            reason,
            at: now,
        }
    }

    fn evaluate(&mut self, transition: Option<(usize, Transition)>, now: Instant) -> Update {
        let mut update = Update {
            transition,
            ..Update::default()
        };
        let Some(active_state) = self.state(self.active) else {
            return update;
        };
        if active_state != NodeState::Down {
            self.reported = None;
            self.isolated = false;
            if matches!(self.check, Check::RetryAt(_)) {
                self.check = Check::Idle;
            }
        }
        match active_state {
            NodeState::Maintenance => {
                let target = self.first_up_except(self.active).or_else(|| {
                    (0..self.nodes.len()).find(|&i| {
                        i != self.active
                            && matches!(
                                self.state(i),
                                Some(NodeState::Starting | NodeState::Suspect)
                            )
                    })
                });
                if let Some(to) = target {
                    update.switch = Some(self.switch_to(
                        to,
                        SwitchKind::Failover,
                        SwitchReason::Maintenance,
                        now,
                    ));
                }
            }
            NodeState::Down => {
                let due = match self.check {
                    Check::Idle => true,
                    Check::InFlight => false,
                    // A standby just came Up: no reason to wait for the retry.
                    Check::RetryAt(at) => {
                        now >= at
                            || (self.reported == Some(Suppression::NoStandby)
                                && self.first_up_except(self.active).is_some())
                    }
                };
                // Checked even when no other node is Up, so that the log
                // says why nothing happens (no witness, or no standby).
                let others = (0..self.nodes.len())
                    .any(|i| i != self.active && self.state(i) != Some(NodeState::Maintenance));
                if due && others {
                    self.check = Check::InFlight;
                    update.check_witnesses = true;
                }
            }
            NodeState::Starting | NodeState::Up | NodeState::Suspect => {
                if self.policy.failback == Failback::Auto && !self.pinned {
                    let hold = self.policy.failback_hold;
                    let back = (0..self.active).find(|&i| {
                        self.nodes.get(i).is_some_and(|n| {
                            n.state() == NodeState::Up
                                && now.saturating_duration_since(n.since()) >= hold
                        })
                    });
                    if let Some(to) = back {
                        update.switch = Some(self.switch_to(
                            to,
                            SwitchKind::Failback,
                            SwitchReason::AutoFailback,
                            now,
                        ));
                    }
                }
            }
        }
        update
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn pool(n: usize, failback: Failback) -> (PoolMachine, Instant) {
        let t0 = Instant::now();
        let names = (0..n).map(|i| format!("n{i}")).collect();
        let th = Thresholds {
            failures: 2,
            successes: 2,
            start_grace: Duration::ZERO,
        };
        let policy = Policy {
            failback,
            failback_hold: S * 10,
            witness_retry: S,
        };
        (PoolMachine::new("pbx", names, th, policy, t0), t0)
    }

    /// Every node answers once at `t`, so all are Up.
    fn all_up(p: &mut PoolMachine, t: Instant) {
        for i in 0..p.len() {
            p.observe(i, Observation::probe(true), t);
        }
    }

    /// Two failures in a row at `t`: node `i` goes Down.
    fn kill(p: &mut PoolMachine, i: usize, t: Instant) -> Update {
        p.observe(i, Observation::probe(false), t);
        p.observe(i, Observation::probe(false), t)
    }

    fn revive(p: &mut PoolMachine, i: usize, t: Instant) -> Update {
        p.observe(i, Observation::probe(true), t);
        p.observe(i, Observation::probe(true), t)
    }

    fn c(list: &[usize]) -> Candidates {
        list.iter().copied().collect()
    }

    #[test]
    fn starts_on_the_primary_with_every_node_a_candidate() {
        let (p, _) = pool(2, Failback::Manual);
        assert_eq!(p.active(), 0);
        assert_eq!(p.candidates(), c(&[0, 1]));
        assert_eq!(p.name(), "pbx");
        assert_eq!(p.node_name(1), Some("n1"));
    }

    #[test]
    fn suspect_active_goes_after_the_next_ready_node() {
        let (mut p, t0) = pool(3, Failback::Manual);
        all_up(&mut p, t0);
        let u = p.observe(0, Observation::traffic_failure(), t0 + S);
        assert_eq!(
            u.transition.map(|(i, t)| (i, t.to)),
            Some((0, NodeState::Suspect))
        );
        assert!(!u.check_witnesses && u.switch.is_none());
        assert_eq!(p.active(), 0, "Suspect does not move the role");
        assert_eq!(p.candidates(), c(&[1, 2, 0]));
        // Back up: the active node leads again.
        p.observe(0, Observation::probe(true), t0 + S * 2);
        assert_eq!(p.candidates(), c(&[0, 1, 2]));
    }

    #[test]
    fn down_nodes_go_last_and_maintenance_never() {
        let (mut p, t0) = pool(4, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 1, t0 + S);
        p.observe(2, Observation::probe(false), t0 + S);
        p.set_maintenance(3, true, t0 + S);
        assert_eq!(p.candidates(), c(&[0, 2, 1]));
        // The active node Down (no witness verdict yet): it is tried first among the Down.
        kill(&mut p, 0, t0 + S * 2);
        assert_eq!(p.active(), 0);
        assert_eq!(p.candidates(), c(&[2, 0, 1]));
        // Everything Down: still tried, active first.
        kill(&mut p, 2, t0 + S * 3);
        assert_eq!(p.candidates(), c(&[0, 1, 2]));
    }

    #[test]
    fn candidates_do_not_allocate_for_four_nodes() {
        let (p, _) = pool(4, Failback::Manual);
        assert!(!p.candidates().spilled());
    }

    #[test]
    fn active_down_asks_for_a_witness_then_fails_over() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        let u = kill(&mut p, 0, t0 + S);
        assert_eq!(
            u.transition.map(|(i, t)| (i, t.to)),
            Some((0, NodeState::Down))
        );
        assert!(u.check_witnesses);
        assert_eq!(p.active(), 0, "no switch before the witness verdict");
        // While the check is in flight, no second one is asked for.
        assert!(
            !p.observe(0, Observation::probe(false), t0 + S * 2)
                .check_witnesses
        );
        assert!(!p.tick(t0 + S * 3).check_witnesses);
        let out = p.witness_result(true, t0 + S * 3);
        let WitnessOutcome::Switched(sw) = out else {
            panic!("expected a switch, got {out:?}")
        };
        assert_eq!(
            (sw.from, sw.to, sw.kind, sw.reason),
            (0, 1, SwitchKind::Failover, SwitchReason::NodeDown)
        );
        assert_eq!(sw.kind.event(), sbc_config::WebhookEvent::Failover);
        assert_eq!(p.active(), 1);
        assert_eq!(p.candidates(), c(&[1, 0]));
    }

    #[test]
    fn no_witness_no_failover_reported_once_and_retried() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        assert!(kill(&mut p, 0, t0 + S).check_witnesses);
        assert_eq!(
            p.witness_result(false, t0 + S),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoWitness,
                first: true
            }
        );
        assert_eq!(p.active(), 0);
        // Not asked again before the retry interval...
        assert!(
            !p.observe(0, Observation::probe(false), t0 + S + S / 2)
                .check_witnesses
        );
        // ...then asked again; a second "nothing" is not a new episode.
        assert!(p.tick(t0 + S * 2).check_witnesses);
        assert_eq!(
            p.witness_result(false, t0 + S * 2),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoWitness,
                first: false
            }
        );
        // The path comes back: a witness answers, but the active node's Down verdict was
        // reached while the SBC was cut off, so it is judged afresh instead of failed over.
        assert!(p.tick(t0 + S * 3).check_witnesses);
        assert!(matches!(
            p.witness_result(true, t0 + S * 3),
            WitnessOutcome::Requalified(Some((0, t))) if t.to == NodeState::Suspect
        ));
        assert_eq!(p.active(), 0);
        assert_eq!(p.state(0), Some(NodeState::Suspect));
        // It really is dead: it has to miss `failures` fresh probes, then it fails over.
        assert!(
            !p.observe(0, Observation::probe(false), t0 + S * 4)
                .check_witnesses
        );
        assert!(
            p.observe(0, Observation::probe(false), t0 + S * 5)
                .check_witnesses
        );
        assert!(matches!(
            p.witness_result(true, t0 + S * 5),
            WitnessOutcome::Switched(_)
        ));
        assert_eq!(p.active(), 1);
    }

    #[test]
    fn after_the_sbc_was_cut_off_the_first_node_back_does_not_win_a_failover() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        // The SBC's own link goes down: every probe fails, both nodes go Down.
        kill(&mut p, 1, t0 + S);
        assert!(kill(&mut p, 0, t0 + S).check_witnesses);
        assert!(matches!(
            p.witness_result(false, t0 + S),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoWitness,
                ..
            }
        ));
        // The link returns; the standby's probes happen to answer first.
        let u = p.observe(1, Observation::probe(true), t0 + S * 2);
        assert!(u.check_witnesses, "the retry is due");
        p.observe(1, Observation::probe(true), t0 + S * 2);
        assert_eq!(p.state(1), Some(NodeState::Up));
        // The witness (the standby) answers; without the isolation rule this would fail
        // over to it.
        assert!(matches!(
            p.witness_result(true, t0 + S * 2),
            WitnessOutcome::Requalified(Some(_))
        ));
        // The primary answers its next probe: back Up, and it never lost the role.
        p.observe(0, Observation::probe(true), t0 + S * 2 + S / 10);
        assert_eq!(p.state(0), Some(NodeState::Up));
        assert_eq!(p.active(), 0);
        assert!(p.tick(t0 + S * 4).switch.is_none());
    }

    #[test]
    fn a_new_down_episode_is_reported_again() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 0, t0 + S);
        p.witness_result(false, t0 + S);
        // Recovers before the retry is due.
        revive(&mut p, 0, t0 + S + S / 2);
        assert!(kill(&mut p, 0, t0 + S * 3).check_witnesses);
        assert_eq!(
            p.witness_result(false, t0 + S * 3),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoWitness,
                first: true
            }
        );
    }

    #[test]
    fn witness_verdict_is_moot_if_the_active_node_recovered() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 0, t0 + S);
        revive(&mut p, 0, t0 + S * 2);
        assert_eq!(
            p.witness_result(true, t0 + S * 2),
            WitnessOutcome::NotNeeded
        );
        assert_eq!(p.active(), 0);
    }

    #[test]
    fn no_standby_up_is_reported_then_retried() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 1, t0);
        assert!(kill(&mut p, 0, t0 + S).check_witnesses);
        assert_eq!(
            p.witness_result(true, t0 + S),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoStandby,
                first: true
            }
        );
        // Then the SBC loses its own path too: a new reason, reported once.
        assert!(p.tick(t0 + S * 2).check_witnesses);
        assert_eq!(
            p.witness_result(false, t0 + S * 2),
            WitnessOutcome::Suppressed {
                reason: Suppression::NoWitness,
                first: true
            }
        );
        // The path is back (the standby answers a probe, still Down): the primary's verdict
        // dates from the isolation, so it is judged afresh.
        assert!(
            p.observe(1, Observation::probe(true), t0 + S * 3)
                .check_witnesses
        );
        assert!(matches!(
            p.witness_result(true, t0 + S * 3),
            WitnessOutcome::Requalified(Some(_))
        ));
        // The standby comes Up; the primary misses fresh probes and is Down again.
        p.observe(1, Observation::probe(true), t0 + S * 3);
        assert!(
            !p.observe(0, Observation::probe(false), t0 + S * 4)
                .check_witnesses
        );
        let u = p.observe(0, Observation::probe(false), t0 + S * 5);
        assert!(u.check_witnesses);
        assert!(matches!(
            p.witness_result(true, t0 + S * 5),
            WitnessOutcome::Switched(Switch { to: 1, .. })
        ));
    }

    #[test]
    fn a_single_node_pool_never_checks() {
        let (mut p, t0) = pool(1, Failback::Manual);
        p.observe(0, Observation::probe(true), t0);
        assert!(!kill(&mut p, 0, t0 + S).check_witnesses);
        assert_eq!(p.candidates(), c(&[0]));
    }

    #[test]
    fn failover_goes_to_the_first_up_node_in_priority_order() {
        let (mut p, t0) = pool(3, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 1, t0);
        kill(&mut p, 0, t0 + S);
        let out = p.witness_result(true, t0 + S);
        assert!(matches!(
            out,
            WitnessOutcome::Switched(Switch { to: 2, .. })
        ));
    }

    #[test]
    fn manual_failback_policy_never_switches_back_by_itself() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 0, t0 + S);
        p.witness_result(true, t0 + S);
        // The primary flaps for a long time: the role never moves.
        for k in 2..100u32 {
            let t = t0 + S * k;
            let u = if k % 3 == 0 {
                kill(&mut p, 0, t)
            } else {
                revive(&mut p, 0, t)
            };
            assert!(u.switch.is_none(), "switched at {k}");
            assert!(p.tick(t + S * 20).switch.is_none());
            assert_eq!(p.active(), 1);
        }
        // Until the operator asks.
        revive(&mut p, 0, t0 + S * 200);
        let sw = p.failback(t0 + S * 200).expect("failback");
        assert_eq!(
            sw.map(|s| (s.from, s.to, s.kind, s.reason)),
            Some((1, 0, SwitchKind::Failback, SwitchReason::ManualFailback))
        );
        assert_eq!(p.active(), 0);
        assert_eq!(p.failback(t0 + S * 201), Ok(None));
    }

    #[test]
    fn manual_failback_needs_an_up_node_above() {
        let (mut p, t0) = pool(2, Failback::Manual);
        all_up(&mut p, t0);
        kill(&mut p, 0, t0 + S);
        p.witness_result(true, t0 + S);
        let e = p.failback(t0 + S * 2).expect_err("primary is down");
        assert!(matches!(e, HealthError::NothingToFailBackTo { .. }), "{e}");
        assert!(e.to_string().contains("n1"), "{e}");
        assert_eq!(p.active(), 1);
    }

    #[test]
    fn auto_failback_after_the_hold_down() {
        let (mut p, t0) = pool(2, Failback::Auto);
        all_up(&mut p, t0);
        kill(&mut p, 0, t0 + S);
        p.witness_result(true, t0 + S);
        revive(&mut p, 0, t0 + S * 5);
        assert!(p.tick(t0 + S * 14).switch.is_none(), "9 s < 10 s hold");
        // A single failure restarts the hold-down.
        p.observe(0, Observation::probe(false), t0 + S * 14);
        p.observe(0, Observation::probe(true), t0 + S * 15);
        assert!(p.tick(t0 + S * 24).switch.is_none());
        let sw = p.tick(t0 + S * 25).switch.expect("failback after 10 s Up");
        assert_eq!(
            (sw.from, sw.to, sw.kind, sw.reason),
            (1, 0, SwitchKind::Failback, SwitchReason::AutoFailback)
        );
        assert_eq!(sw.kind.event(), sbc_config::WebhookEvent::Failback);
        assert_eq!(p.active(), 0);
        // Observations also drive it (no separate timer needed).
        kill(&mut p, 0, t0 + S * 30);
        p.witness_result(true, t0 + S * 30);
        revive(&mut p, 0, t0 + S * 31);
        let u = p.observe(1, Observation::probe(true), t0 + S * 41);
        assert_eq!(u.switch.map(|s| s.to), Some(0));
    }

    #[test]
    fn manual_failover_is_not_undone_by_auto_failback() {
        let (mut p, t0) = pool(2, Failback::Auto);
        all_up(&mut p, t0);
        let sw = p.failover(t0 + S).expect("failover");
        assert_eq!(
            (sw.from, sw.to, sw.kind, sw.reason),
            (0, 1, SwitchKind::Failover, SwitchReason::Manual)
        );
        assert!(p.is_pinned());
        assert!(p.tick(t0 + S * 100).switch.is_none());
        // The operator's failback unpins.
        assert!(p.failback(t0 + S * 101).expect("failback").is_some());
        assert!(!p.is_pinned());
    }

    #[test]
    fn manual_failover_picks_the_next_node_and_refuses_without_one() {
        let (mut p, t0) = pool(3, Failback::Manual);
        all_up(&mut p, t0);
        assert_eq!(p.failover(t0).map(|s| s.to), Ok(1));
        assert_eq!(p.failover(t0).map(|s| s.to), Ok(2));
        assert_eq!(p.failover(t0).map(|s| s.to), Ok(0));
        // Prefers an Up node over a Suspect one.
        p.observe(1, Observation::probe(false), t0);
        assert_eq!(p.failover(t0).map(|s| s.to), Ok(2));
        let (mut single, t0) = pool(1, Failback::Manual);
        assert!(matches!(
            single.failover(t0),
            Err(HealthError::NoStandby { .. })
        ));
        let (mut both_down, t0) = pool(2, Failback::Manual);
        all_up(&mut both_down, t0);
        kill(&mut both_down, 1, t0);
        assert!(both_down.failover(t0).is_err());
        assert_eq!(both_down.active(), 0);
    }

    #[test]
    fn maintenance_of_the_active_node_moves_the_role_without_witness() {
        let (mut p, t0) = pool(2, Failback::Auto);
        all_up(&mut p, t0);
        let u = p.set_maintenance(0, true, t0 + S);
        assert_eq!(
            u.transition.map(|(i, t)| (i, t.to)),
            Some((0, NodeState::Maintenance))
        );
        let sw = u.switch.expect("switch");
        assert_eq!((sw.to, sw.reason), (1, SwitchReason::Maintenance));
        assert_eq!(p.candidates(), c(&[1]));
        // Probes keep running underneath without moving anything.
        assert_eq!(kill(&mut p, 0, t0 + S * 2), Update::default());
        // Out of maintenance (and healthy again): auto failback after the hold.
        revive(&mut p, 0, t0 + S * 3);
        let u = p.set_maintenance(0, false, t0 + S * 4);
        assert_eq!(u.transition.map(|(_, t)| t.to), Some(NodeState::Up));
        assert!(u.switch.is_none());
        assert_eq!(p.tick(t0 + S * 14).switch.map(|s| s.to), Some(0));
    }

    #[test]
    fn maintenance_of_a_single_node_pool_leaves_no_candidate() {
        let (mut p, t0) = pool(1, Failback::Manual);
        let u = p.set_maintenance(0, true, t0);
        assert!(u.switch.is_none());
        assert!(p.candidates().is_empty());
        assert_eq!(p.set_maintenance(0, true, t0), Update::default());
        p.set_maintenance(0, false, t0);
        assert_eq!(p.candidates(), c(&[0]));
    }

    #[test]
    fn a_reload_keeps_health_and_the_active_node() {
        let (mut old, t0) = pool(2, Failback::Manual);
        all_up(&mut old, t0);
        kill(&mut old, 0, t0 + S);
        old.witness_result(true, t0 + S);
        assert_eq!(old.active(), 1);
        // The new configuration has the nodes the other way round plus one.
        let th = Thresholds {
            failures: 3,
            successes: 1,
            start_grace: Duration::ZERO,
        };
        let names = vec!["n1".to_string(), "n0".to_string(), "n9".to_string()];
        let policy = old.policy;
        let mut new = PoolMachine::new("pbx", names, th, policy, t0 + S * 2);
        for (i, name) in ["n1", "n0"].iter().enumerate() {
            let j = (0..old.len())
                .find(|&j| old.node_name(j) == Some(name))
                .expect("known node");
            new.adopt(i, old.node(j).expect("node").clone(), th);
        }
        new.restore_active(0, old.is_pinned());
        assert_eq!(new.state(0), Some(NodeState::Up));
        assert_eq!(new.state(1), Some(NodeState::Down), "not revived");
        assert_eq!(new.state(2), Some(NodeState::Starting));
        assert_eq!(new.active(), 0);
        // New thresholds apply: one success brings n0 back.
        let u = new.observe(1, Observation::probe(true), t0 + S * 3);
        assert_eq!(u.transition.map(|(_, t)| t.to), Some(NodeState::Up));
        new.restore_active(7, true);
        assert_eq!(new.active(), 0);
    }

    #[test]
    fn unknown_node_indices_are_ignored() {
        let (mut p, t0) = pool(2, Failback::Manual);
        assert_eq!(
            p.observe(7, Observation::probe(false), t0),
            Update::default()
        );
        assert_eq!(p.set_maintenance(7, true, t0), Update::default());
        assert_eq!(p.state(7), None);
    }

    #[test]
    fn built_from_config() {
        let cfg = sbc_config::parse(
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n\
             [[pool]]\nname = \"pbx\"\nfailback = \"auto\"\nfailback_hold_secs = 7\n\
             [pool.probe]\ninterval_ms = 300\nfailures = 4\n\
             [[pool.node]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\n\
             [[pool.node]]\nname = \"b\"\naddress = \"127.0.0.1:5071\"\n",
            std::path::Path::new("sbc.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p = PoolMachine::from_config(&cfg.pools[0], Instant::now());
        assert_eq!(p.len(), 2);
        assert_eq!(p.policy.failback, Failback::Auto);
        assert_eq!(p.policy.failback_hold, S * 7);
        assert_eq!(p.policy.witness_retry, Duration::from_millis(300));
        assert_eq!(p.node_name(0), Some("a"));
    }
}
