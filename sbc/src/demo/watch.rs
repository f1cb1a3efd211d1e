//! What the SBC's health monitor decides, printed as it happens.
//!
//! The monitor bumps a counter on every node transition and every move of a pool's active
//! node ([`sbc_health::HealthMonitor::subscribe`]); on each bump this task reads the status,
//! prints what changed against the previous reading, and publishes the reading to the script.
//! The script waits on the published reading rather than on the monitor itself, so a line like
//! "pbx-a is down" is always printed before the script's own line about it. Two changes
//! between two readings are printed as one (e.g. `up -> down` when `suspect` came and went
//! in between); with a 250 ms probe interval that does not happen in practice.

use super::wire::Timeline;
use sbc_health::{HealthMonitor, NodeState, PoolStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct HealthWatch {
    readings: watch::Receiver<Vec<PoolStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthWatch {
    pub fn start(health: Arc<HealthMonitor>, tl: Arc<Timeline>) -> HealthWatch {
        // Subscribe before the first reading: a change between the two is then seen as a
        // change, never lost.
        let changes = health.subscribe();
        let first = health.status();
        let (tx, readings) = watch::channel(first.clone());
        let task = tokio::spawn(run(health, changes, tl, first, tx));
        HealthWatch { readings, task }
    }

    /// Waits up to `limit` for a reading that `cond` accepts; `what` names it in the error.
    pub async fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&[PoolStatus]) -> bool,
    ) -> anyhow::Result<()> {
        let waited = tokio::time::timeout(limit, self.readings.wait_for(|r| cond(r)))
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => anyhow::bail!("the health watcher stopped while waiting for {what}"),
            Err(_) => {
                let now = self.readings.borrow().clone();
                anyhow::bail!(
                    "waited {:.1} s for {what}; the SBC reports {}",
                    limit.as_secs_f64(),
                    describe(&now)
                )
            }
        }
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The state of node `node` in the reading.
pub fn state(r: &[PoolStatus], node: &str) -> Option<NodeState> {
    r.iter()
        .flat_map(|p| &p.nodes)
        .find(|n| n.name == node)
        .map(|n| n.state)
}

/// The active node of pool `pool` in the reading.
pub fn active<'a>(r: &'a [PoolStatus], pool: &str) -> Option<&'a str> {
    r.iter()
        .find(|p| p.name == pool)
        .and_then(|p| p.active.as_deref())
}

/// `pool pbx: active pbx-a; pbx-a up, pbx-b up` (for error messages).
fn describe(r: &[PoolStatus]) -> String {
    r.iter()
        .map(|p| {
            let nodes: Vec<String> = p
                .nodes
                .iter()
                .map(|n| format!("{} {}", n.name, n.state))
                .collect();
            format!(
                "pool {}: active {}; {}",
                p.name,
                p.active.as_deref().unwrap_or("-"),
                nodes.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs until the demo aborts it (the demo's own budget bounds it) or the monitor is gone.
async fn run(
    health: Arc<HealthMonitor>,
    mut changes: watch::Receiver<u64>,
    tl: Arc<Timeline>,
    mut prev: Vec<PoolStatus>,
    tx: watch::Sender<Vec<PoolStatus>>,
) {
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        let now = health.status();
        for (p, old) in now.iter().zip(&prev) {
            for n in &p.nodes {
                let before = old.nodes.iter().find(|o| o.name == n.name);
                // Leaving Starting is not news: the script waits for it and says so.
                let news = |b: &&sbc_health::NodeStatus| {
                    b.state != n.state && b.state != NodeState::Starting
                };
                if let Some(b) = before.filter(news) {
                    tl.step(&format!("SBC: node {} {} -> {}", n.name, b.state, n.state));
                }
            }
            if p.active != old.active {
                let from = old.active.as_deref().unwrap_or("-");
                let to = p.active.as_deref().unwrap_or("-");
                // Nodes are listed in priority order: moving to a later one is a failover.
                let rank = |name: &str| p.nodes.iter().position(|n| n.name == name);
                let kind = if rank(to) > rank(from) {
                    "failed over"
                } else {
                    "failed back"
                };
                tl.step(&format!("SBC: pool {} {kind} from {from} to {to}", p.name));
            }
        }
        prev = now;
        tx.send_replace(prev.clone());
    }
}
