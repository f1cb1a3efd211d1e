//! The runtime: probe tasks, the pools' machines behind locks, and what
//! every transition leads to (one log line, metrics, witness checks,
//! webhooks, a bump of the change channel).
//!
//! Shape as in pingora-load-balancing's `background.rs`: one task per node
//! sleeps until its next probe, probes, and feeds the verdict to the pure
//! machine; only flips are logged. The proxy reads
//! [`HealthMonitor::candidates`] per new transaction (a read lock and a
//! few comparisons) and reports branch outcomes with
//! [`HealthMonitor::observe`] (no lock at all when the branch succeeded).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use sbc_config::{Config, HttpUrl, Webhook};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::HealthError;
use crate::pool::{
    Candidates, PoolMachine, Suppression, Switch, SwitchKind, Update, WitnessOutcome,
};
use crate::probe::{ProbeReport, Prober};
use crate::state::{NodeState, Observation, Transition};
use crate::tls::Tls;
use crate::webhook::{self, WebhookVars};
use crate::witness;

/// How a transaction sent to a node ended, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The node sent a response with this code.
    Answered(u16),
    /// No response within the branch timeout.
    Timeout,
    /// Sending failed: connection refused or reset, ICMP unreachable.
    TransportError,
    /// No response yet, for longer than a healthy node takes to send 100 Trying (the
    /// pool's `suspect_after`): the node becomes Suspect, no failure is counted.
    Slow,
}

impl Outcome {
    /// Whether the outcome says anything about the node's health at all: failures, and a
    /// slow start (which only makes it Suspect). A plain answer proves nothing new.
    pub fn is_evidence(self) -> bool {
        self.is_failure() || self == Outcome::Slow
    }

    /// Whether this counts against the node: timeouts, transport errors and
    /// 503 (the node saying it cannot serve). Any other answer proves the
    /// node is there.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Timeout | Outcome::TransportError | Outcome::Answered(503)
        )
    }
}

/// A pool in [`HealthMonitor::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// The active node's name.
    pub active: Option<String>,
    /// `"manual"` or `"auto"`.
    pub failback: &'static str,
    /// A manual failover is in force (no automatic failback).
    pub pinned: bool,
    /// The nodes, in priority order.
    pub nodes: Vec<NodeStatus>,
}

/// A node in [`HealthMonitor::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// Its global index (as in [`HealthMonitor::candidates`]).
    pub index: usize,
    /// Its address as written in the configuration.
    pub address: String,
    /// Its state.
    pub state: NodeState,
    /// When it entered that state, in Unix seconds.
    pub since: u64,
    /// Whether it is the pool's active node.
    pub active: bool,
}

/// Probes every node, keeps every pool's active node, and fails over and
/// back (see the crate docs).
pub struct HealthMonitor {
    /// Replaced whole by [`HealthMonitor::reload`], so that the proxy, the
    /// admin endpoint and the SBC keep one handle across reloads. Every
    /// call clones the `Arc` out and drops the guard at once: a call works
    /// on one generation of pools and nodes, and no lock is nested in it.
    shared: RwLock<Arc<Shared>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = self.shared();
        f.debug_struct("HealthMonitor")
            .field("pools", &shared.pools.len())
            .field("nodes", &shared.nodes.len())
            .finish()
    }
}

struct Shared {
    pools: Vec<PoolRt>,
    nodes: Vec<NodeRt>,
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
    /// Webpki roots only: witnesses and webhooks are public services.
    tls: Tls,
}

struct PoolRt {
    name: String,
    /// Global index of the pool's first node.
    first: usize,
    /// Write-locked for an observation or a command, read-locked for
    /// candidates. parking_lot: short, never held across an await.
    machine: RwLock<PoolMachine>,
    witnesses: Vec<HttpUrl>,
    webhooks: Vec<Webhook>,
    interval: Duration,
    timeout: Duration,
}

struct NodeRt {
    pool: usize,
    local: usize,
    name: String,
    address: String,
    /// What makes a node "the same" across a reload.
    identity: (std::net::SocketAddr, sbc_config::Transport),
    prober: Arc<Prober>,
}

impl HealthMonitor {
    /// Starts probe tasks for every node of every pool. Nodes are numbered
    /// globally in configuration order (pools, then their nodes), as
    /// `sbc_routing::RouteTable` numbers them.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the probe tasks).
    pub fn start(cfg: &Config) -> Arc<HealthMonitor> {
        HealthMonitor::start_from(cfg, None)
    }

    /// As [`HealthMonitor::start`], for a configuration reload: nodes whose
    /// identity (pool, name, address, transport) is unchanged keep the
    /// health `previous` learnt, and a pool keeps its active node (and a
    /// manual failover's pin) if that node is still in it. So a reload never
    /// revives a dead primary nor moves traffic by itself. The caller swaps
    /// the monitors and shuts `previous` down.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the probe tasks).
    pub fn start_from(cfg: &Config, previous: Option<&HealthMonitor>) -> Arc<HealthMonitor> {
        let previous = previous.map(HealthMonitor::shared);
        let shared = build(cfg, previous.as_deref(), watch::channel(0u64).0);
        publish_gauges(&shared);
        let tasks = spawn_probes(&shared);
        Arc::new(HealthMonitor {
            shared: RwLock::new(shared),
            tasks: Mutex::new(tasks),
        })
    }

    /// Applies a new configuration in place, for a hot reload, with the
    /// carry-over of [`HealthMonitor::start_from`]: unchanged nodes keep
    /// their health, pools keep their active node. In place, because the
    /// proxy, the admin endpoint and the embedder all hold this monitor.
    /// Node and pool indices follow `cfg` from the moment this returns.
    ///
    /// The carry-over is done a second time under the swap's write lock,
    /// so a transition the old probes saw while the new state was being
    /// built is not lost (a node that just went down stays down). A no-op
    /// once the monitor is shut down.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the probe tasks).
    pub fn reload(&self, cfg: &Config) {
        let current = self.shared();
        let fresh = build(cfg, Some(&current), current.changes.clone());
        let old = {
            let mut slot = self.shared.write();
            if *slot.shutdown.borrow() {
                return;
            }
            for (p, pool) in cfg.pools.iter().enumerate() {
                let Some(rt) = fresh.pools.get(p) else {
                    continue;
                };
                let nodes = fresh
                    .nodes
                    .get(rt.first..rt.first + pool.nodes.len())
                    .unwrap_or_default();
                carry_over(&slot, pool, nodes, &mut rt.machine.write());
            }
            std::mem::replace(&mut *slot, Arc::clone(&fresh))
        };
        old.shutdown.send_replace(true);
        let tasks = spawn_probes(&fresh);
        for task in std::mem::replace(&mut *self.tasks.lock(), tasks) {
            task.abort();
        }
        // Nodes that left the configuration: their gauges read 0 rather
        // than their last state forever.
        for rt in &old.pools {
            let m = rt.machine.read();
            for i in 0..m.len() {
                let node = old.node_name(rt.first + i);
                let kept = fresh.nodes.iter().any(|n| {
                    n.name == node && fresh.pools.get(n.pool).is_some_and(|f| f.name == rt.name)
                });
                if !kept {
                    for state in NodeState::ALL {
                        node_state_gauge(&rt.name, node, state).set(0.0);
                    }
                    metrics::gauge!(
                        "sbc_active_node",
                        "pool" => rt.name.clone(),
                        "node" => node.to_string(),
                    )
                    .set(0.0);
                }
            }
        }
        publish_gauges(&fresh);
        fresh.bump();
    }

    fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared.read())
    }

    /// The global node indices a NEW transaction to `pool` should try, in
    /// order (see [`PoolMachine::candidates`]). Empty for an unknown pool.
    /// Cheap: a read lock and no allocation for pools of up to four nodes.
    pub fn candidates(&self, pool: usize) -> Candidates {
        let shared = self.shared();
        let Some(rt) = shared.pools.get(pool) else {
            return Candidates::new();
        };
        let mut out = rt.machine.read().candidates();
        for i in &mut out {
            *i += rt.first;
        }
        out
    }

    /// The global index of the pool's active node.
    pub fn active(&self, pool: usize) -> Option<usize> {
        let shared = self.shared();
        let rt = shared.pools.get(pool)?;
        let active = rt.machine.read().active();
        Some(rt.first + active)
    }

    /// Records how a live transaction to global node `node` ended
    /// (see [`Outcome::is_failure`]). Successes take no lock: they do not
    /// change health (probes decide recovery).
    pub fn observe(&self, node: usize, outcome: Outcome) {
        if !outcome.is_evidence() {
            return;
        }
        let shared = self.shared();
        let Some(n) = shared.nodes.get(node) else {
            return;
        };
        let Some(rt) = shared.pools.get(n.pool) else {
            return;
        };
        let mut m = rt.machine.write();
        let obs = if outcome == Outcome::Slow {
            Observation::traffic_slow()
        } else {
            Observation::traffic_failure()
        };
        let update = m.observe(n.local, obs, Instant::now());
        let detail = match outcome {
            Outcome::Answered(code) => format!("transaction answered {code}"),
            Outcome::Timeout => "transaction timed out".to_string(),
            Outcome::TransportError => "transaction hit a transport error".to_string(),
            Outcome::Slow => {
                "transaction has had no response yet (not even 100 Trying)".to_string()
            }
        };
        shared.apply(n.pool, &mut m, update, &detail);
    }

    /// An operator's failover of `pool` to its next node (no witness check:
    /// the operator decided). Automatic failback will not undo it.
    pub fn failover(&self, pool: usize, reason: &str) -> Result<(), HealthError> {
        let shared = self.shared();
        let rt = shared
            .pools
            .get(pool)
            .ok_or(HealthError::UnknownPool(pool))?;
        let mut m = rt.machine.write();
        let switch = m.failover(Instant::now())?;
        let reason = if reason.trim().is_empty() {
            "manual"
        } else {
            reason
        };
        shared.on_switch(pool, &m, switch, reason, None);
        Ok(())
    }

    /// An operator's failback of `pool` to its highest-priority Up node
    /// above the active one; a no-op when the primary is already active.
    pub fn failback(&self, pool: usize) -> Result<(), HealthError> {
        let shared = self.shared();
        let rt = shared
            .pools
            .get(pool)
            .ok_or(HealthError::UnknownPool(pool))?;
        let mut m = rt.machine.write();
        if let Some(switch) = m.failback(Instant::now())? {
            shared.on_switch(pool, &m, switch, switch.reason.as_str(), None);
        }
        Ok(())
    }

    /// Puts global node `node` into maintenance (never chosen; if it is
    /// active, the role moves at once) or takes it out.
    pub fn set_maintenance(&self, node: usize, on: bool) -> Result<(), HealthError> {
        let shared = self.shared();
        let n = shared
            .nodes
            .get(node)
            .ok_or(HealthError::UnknownNode(node))?;
        let rt = shared
            .pools
            .get(n.pool)
            .ok_or(HealthError::UnknownNode(node))?;
        let mut m = rt.machine.write();
        let update = m.set_maintenance(n.local, on, Instant::now());
        shared.apply(n.pool, &mut m, update, "operator");
        Ok(())
    }

    /// Every pool with its active node and its nodes' states.
    pub fn status(&self) -> Vec<PoolStatus> {
        let shared = self.shared();
        let now = Instant::now();
        let wall = SystemTime::now();
        shared
            .pools
            .iter()
            .map(|rt| {
                let m = rt.machine.read();
                let nodes = (0..m.len())
                    .filter_map(|i| {
                        let health = m.node(i)?;
                        let n = shared.nodes.get(rt.first + i)?;
                        let since = wall
                            .checked_sub(now.saturating_duration_since(health.since()))
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_secs());
                        Some(NodeStatus {
                            name: n.name.clone(),
                            index: rt.first + i,
                            address: n.address.clone(),
                            state: health.state(),
                            since,
                            active: i == m.active(),
                        })
                    })
                    .collect();
                PoolStatus {
                    name: rt.name.clone(),
                    active: m.node_name(m.active()).map(str::to_string),
                    failback: m.failback_policy().as_str(),
                    pinned: m.is_pinned(),
                    nodes,
                }
            })
            .collect()
    }

    /// A channel whose value goes up on every node transition and every
    /// move of an active node, so the proxy or admin can react without
    /// polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let shared = self.shared();
        shared.changes.subscribe()
    }

    /// The index of the pool named `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        let shared = self.shared();
        shared.pools.iter().position(|p| p.name == name)
    }

    /// The global index of the node named `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        let shared = self.shared();
        shared.nodes.iter().position(|n| n.name == name)
    }

    /// The state of global node `node`.
    pub fn node_state(&self, node: usize) -> Option<NodeState> {
        let shared = self.shared();
        let n = shared.nodes.get(node)?;
        let rt = shared.pools.get(n.pool)?;
        let state = rt.machine.read().state(n.local);
        state
    }

    /// Stops probing and any witness check in flight. Webhooks already
    /// fired still go out. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        let shared = self.shared();
        shared.shutdown.send_replace(true);
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The runtime state for `cfg`, without its probe tasks, with what
/// `previous` knew carried over (see [`HealthMonitor::start_from`]).
///
/// # Panics
/// Outside a tokio runtime.
fn build(cfg: &Config, previous: Option<&Shared>, changes: watch::Sender<u64>) -> Arc<Shared> {
    let now = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let mut pools = Vec::with_capacity(cfg.pools.len());
    let mut nodes = Vec::new();
    for (p, pool) in cfg.pools.iter().enumerate() {
        let first = nodes.len();
        for (local, node) in pool.nodes.iter().enumerate() {
            nodes.push(NodeRt {
                pool: p,
                local,
                name: node.name.clone(),
                address: node.address_text.clone(),
                identity: (node.address, node.transport),
                prober: Arc::new(Prober::new(&pool.name, node, &pool.probe)),
            });
        }
        let witnesses = pool
            .probe
            .witnesses
            .iter()
            .filter_map(|w| match HttpUrl::parse(w) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::error!(pool = %pool.name, error = %e, "bad witness URL ignored");
                    None
                }
            })
            .collect();
        let mut machine = PoolMachine::from_config(pool, now);
        if let Some(previous) = previous {
            carry_over(
                previous,
                pool,
                nodes.get(first..).unwrap_or_default(),
                &mut machine,
            );
        }
        pools.push(PoolRt {
            name: pool.name.clone(),
            first,
            machine: RwLock::new(machine),
            witnesses,
            webhooks: pool.webhooks.clone(),
            interval: pool.probe.interval,
            timeout: pool.probe.timeout,
        });
    }
    let (shutdown, _) = watch::channel(false);
    Arc::new(Shared {
        pools,
        nodes,
        changes,
        shutdown,
        runtime,
        tls: Tls::new(None),
    })
}

/// Copies into `machine` (for configured `pool`, whose nodes are `nodes`)
/// what `old` knows about the same pool: the health of nodes with the same
/// name and identity, and the active node (with a manual failover's pin)
/// if it is still in the pool.
fn carry_over(old: &Shared, pool: &sbc_config::Pool, nodes: &[NodeRt], machine: &mut PoolMachine) {
    let Some(old_rt) = old.pools.iter().find(|p| p.name == pool.name) else {
        return;
    };
    let previous = old_rt.machine.read();
    let thresholds = crate::state::Thresholds::from(&pool.probe);
    let old_nodes = old.nodes.get(old_rt.first..).unwrap_or_default();
    for new in nodes {
        let same = (0..previous.len()).find(|&j| {
            old_nodes
                .get(j)
                .is_some_and(|o| o.name == new.name && o.identity == new.identity)
        });
        if let Some(health) = same.and_then(|j| previous.node(j)) {
            machine.adopt(new.local, health.clone(), thresholds);
        }
    }
    let active = previous.node_name(previous.active());
    if let Some(i) = nodes.iter().position(|n| Some(n.name.as_str()) == active) {
        machine.restore_active(i, previous.is_pinned());
    }
}

/// Sets every node's state gauges and every pool's active-node gauges.
fn publish_gauges(shared: &Shared) {
    for rt in &shared.pools {
        let m = rt.machine.read();
        for i in 0..m.len() {
            let node = shared.node_name(rt.first + i);
            let current = m.state(i);
            for state in NodeState::ALL {
                let value = if Some(state) == current { 1.0 } else { 0.0 };
                node_state_gauge(&rt.name, node, state).set(value);
            }
        }
        set_active_gauges(shared, rt, &m);
    }
}

fn spawn_probes(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    (0..shared.nodes.len())
        .map(|node| {
            let shared = Arc::clone(shared);
            shared.runtime.clone().spawn(probe_loop(shared, node))
        })
        .collect()
}

/// One node's probe loop: one probe per interval, never overlapping (the
/// timeout is below the interval, and a late probe delays the next tick
/// instead of bunching them).
async fn probe_loop(shared: Arc<Shared>, node: usize) {
    let Some(n) = shared.nodes.get(node) else {
        return;
    };
    let Some(rt) = shared.pools.get(n.pool) else {
        return;
    };
    let mut shutdown = shared.shutdown.subscribe();
    let mut ticks = tokio::time::interval(rt.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let report = tokio::select! {
            report = n.prober.probe() => report,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        shared.on_probe(node, &report);
    }
}

impl Shared {
    fn node_name(&self, node: usize) -> &str {
        self.nodes.get(node).map_or("?", |n| n.name.as_str())
    }

    fn on_probe(self: &Arc<Self>, node: usize, report: &ProbeReport) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        let Some(rt) = self.pools.get(n.pool) else {
            return;
        };
        for (kind, result) in report.results() {
            let outcome = match result {
                Ok(rtt) => {
                    metrics::histogram!(
                        "sbc_probe_rtt_seconds",
                        "pool" => rt.name.clone(),
                        "node" => n.name.clone(),
                        "kind" => kind.as_str(),
                    )
                    .record(rtt.as_secs_f64());
                    "ok"
                }
                Err(e) => e.label(),
            };
            metrics::counter!(
                "sbc_probes_total",
                "pool" => rt.name.clone(),
                "node" => n.name.clone(),
                "kind" => kind.as_str(),
                "result" => outcome,
            )
            .increment(1);
        }
        let detail = match report.first_error() {
            Some((kind, e)) => format!("{} probe: {e}", kind.as_str()),
            None => "probe answered".to_string(),
        };
        let mut m = rt.machine.write();
        let update = m.observe(n.local, Observation::probe(report.alive), Instant::now());
        self.apply(n.pool, &mut m, update, &detail);
    }

    /// Acts on a machine's update while its lock is held, so that gauges
    /// and log lines come out in the order the machine changed.
    fn apply(self: &Arc<Self>, pool: usize, m: &mut PoolMachine, update: Update, detail: &str) {
        let Some(rt) = self.pools.get(pool) else {
            return;
        };
        if let Some((local, t)) = update.transition {
            self.on_transition(rt, local, &t, detail);
        }
        if let Some(switch) = update.switch {
            self.on_switch(pool, m, switch, switch.reason.as_str(), None);
        }
        if update.check_witnesses {
            self.spawn_witness_check(pool, m);
        }
    }

    fn on_transition(&self, rt: &PoolRt, local: usize, t: &Transition, detail: &str) {
        let node = self.node_name(rt.first + local);
        node_state_gauge(&rt.name, node, t.from).set(0.0);
        node_state_gauge(&rt.name, node, t.to).set(1.0);
        metrics::counter!(
            "sbc_node_transitions_total",
            "pool" => rt.name.clone(),
            "node" => node.to_string(),
            "to" => t.to.as_str(),
            "reason" => t.reason.as_str(),
        )
        .increment(1);
        let (from, to, reason) = (t.from.as_str(), t.to.as_str(), t.reason.as_str());
        match t.to {
            NodeState::Down | NodeState::Suspect => tracing::warn!(
                pool = %rt.name, node, from, to, reason, detail,
                "node {node} is {to}"
            ),
            _ => tracing::info!(
                pool = %rt.name, node, from, to, reason, detail,
                "node {node} is {to}"
            ),
        }
        self.bump();
    }

    fn on_switch(
        &self,
        pool: usize,
        m: &PoolMachine,
        switch: Switch,
        reason: &str,
        witness: Option<&witness::Witness>,
    ) {
        let Some(rt) = self.pools.get(pool) else {
            return;
        };
        let from = m.node_name(switch.from).unwrap_or("?");
        let to = m.node_name(switch.to).unwrap_or("?");
        let label = switch.reason.as_str();
        let witness = witness.map(ToString::to_string).unwrap_or_default();
        match switch.kind {
            SwitchKind::Failover => {
                metrics::counter!("sbc_failovers_total", "pool" => rt.name.clone(), "reason" => label)
                    .increment(1);
                tracing::warn!(
                    pool = %rt.name, from, to, reason, witness = %witness,
                    "pool {} failed over from {from} to {to}", rt.name
                );
            }
            SwitchKind::Failback => {
                metrics::counter!("sbc_failbacks_total", "pool" => rt.name.clone(), "reason" => label)
                    .increment(1);
                tracing::info!(
                    pool = %rt.name, from, to, reason,
                    "pool {} failed back from {from} to {to}", rt.name
                );
            }
        }
        set_active_gauges(self, rt, m);
        self.bump();
        if !rt.webhooks.is_empty() {
            let vars = WebhookVars {
                event: switch.kind.event(),
                pool: rt.name.clone(),
                from: from.to_string(),
                to: to.to_string(),
                reason: reason.to_string(),
                time: SystemTime::now(),
            };
            webhook::fire(&self.runtime, &rt.webhooks, &vars, &self.tls);
        }
    }

    /// Checks, off the lock, that the SBC can still reach a witness; then
    /// feeds the verdict back to the machine.
    fn spawn_witness_check(self: &Arc<Self>, pool: usize, m: &PoolMachine) {
        let Some(rt) = self.pools.get(pool) else {
            return;
        };
        let others: Vec<Arc<Prober>> = (0..m.len())
            .filter(|&i| i != m.active() && m.state(i) != Some(NodeState::Maintenance))
            .filter_map(|i| self.nodes.get(rt.first + i))
            .map(|n| Arc::clone(&n.prober))
            .collect();
        let urls = rt.witnesses.clone();
        // Slack over the probe timeout so a node probe that answers just in
        // time still counts.
        let timeout = rt.timeout + Duration::from_millis(100);
        let shared = Arc::clone(self);
        let mut shutdown = self.shutdown.subscribe();
        self.runtime.spawn(async move {
            let verdict = tokio::select! {
                v = witness::check_with(&urls, &others, timeout, &shared.tls) => v,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let Some(rt) = shared.pools.get(pool) else {
                return;
            };
            let mut m = rt.machine.write();
            match m.witness_result(verdict.is_some(), Instant::now()) {
                WitnessOutcome::Switched(switch) => {
                    shared.on_switch(pool, &m, switch, switch.reason.as_str(), verdict.as_ref());
                }
                WitnessOutcome::Suppressed { reason, first } => {
                    if first {
                        let node = m.node_name(m.active()).unwrap_or("?");
                        match reason {
                            Suppression::NoWitness => tracing::warn!(
                                pool = %rt.name, node, reason = reason.as_str(),
                                "node {node} is down but no witness answered: not failing over (the fault may be on the SBC's side)"
                            ),
                            Suppression::NoStandby => tracing::warn!(
                                pool = %rt.name, node, reason = reason.as_str(),
                                "node {node} is down and no other node is up: nothing to fail over to"
                            ),
                        }
                        metrics::counter!(
                            "sbc_failover_suppressed_total",
                            "pool" => rt.name.clone(),
                            "reason" => reason.as_str(),
                        )
                        .increment(1);
                    }
                }
                WitnessOutcome::Requalified(transition) => {
                    let node = m.node_name(m.active()).unwrap_or("?").to_string();
                    tracing::info!(
                        pool = %rt.name, node = %node,
                        "a witness answers again: {node}'s down verdict was reached while the SBC was cut off, judging it afresh instead of failing over"
                    );
                    let update = Update {
                        transition,
                        ..Update::default()
                    };
                    shared.apply(pool, &mut m, update, "witness reachable again after isolation");
                }
                WitnessOutcome::NotNeeded => {}
            }
        });
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

fn node_state_gauge(pool: &str, node: &str, state: NodeState) -> metrics::Gauge {
    metrics::gauge!(
        "sbc_node_state",
        "pool" => pool.to_string(),
        "node" => node.to_string(),
        "state" => state.as_str(),
    )
}

fn set_active_gauges(shared: &Shared, rt: &PoolRt, m: &PoolMachine) {
    for i in 0..m.len() {
        metrics::gauge!(
            "sbc_active_node",
            "pool" => rt.name.clone(),
            "node" => shared.node_name(rt.first + i).to_string(),
        )
        .set(if i == m.active() { 1.0 } else { 0.0 });
    }
}
