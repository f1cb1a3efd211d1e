//! PBX node health and pool failover, usable on its own.
//!
//! A pool is PBX nodes in priority order (primary, then standbys). This
//! crate probes every node (SIP OPTIONS over the node's own transport
//! and/or HTTP(S) GET), keeps a health state per node (Starting, Up,
//! Suspect, Down, Maintenance) with thresholds, and keeps each pool's
//! **active** node: the one new transactions go to. When the active node
//! goes Down it first verifies that the SBC itself is not cut off (a
//! witness must answer: another node, or an always-on URL), then fails
//! over, fires webhooks and logs one line. Failback is manual by default,
//! or automatic after a hold-down.
//!
//! The proxy asks [`HealthMonitor::candidates`] for the node order of each
//! new INVITE/REGISTER and reports each branch's outcome with
//! [`HealthMonitor::observe`], so live failures count as soon as they
//! happen, not only at the next probe. On a configuration reload,
//! [`HealthMonitor::start_from`] carries the health of unchanged nodes and
//! each pool's active node over, so a reload never revives a dead primary.
//!
//! Model: pingora-load-balancing (pure `observe()` reporting only flips, an
//! operator flag apart from health, a background task per check) and
//! kamailio's dispatcher (OPTIONS probing, alive reply codes, thresholds).
//!
//! # Layout
//!
//! - [`state`] — the pure per-node machine ([`NodeHealth`]), explicit clock.
//! - [`pool`] — the pure per-pool machine ([`PoolMachine`]): active node,
//!   witness-gated failover, failback policy, maintenance, candidates.
//! - [`probe`] — SIP OPTIONS (UDP, TCP, TLS) and HTTP(S) probes of a node.
//! - [`witness`] — the "am I cut off?" check before a failover.
//! - [`webhook`] — body templates and delivery with timeout and retries.
//! - `monitor` — [`HealthMonitor`], the tokio runtime tying it together:
//!   probe tasks, locks, logs, metrics.
//! - `http`, `tls` — one HTTP/1.1 request over hyper + tokio-rustls; ring
//!   client configs with webpki roots plus a node's CA.
//!
//! # Metrics
//!
//! `sbc_node_state{pool,node,state}` (1 for the current state),
//! `sbc_active_node{pool,node}`, `sbc_node_transitions_total{pool,node,to,reason}`,
//! `sbc_failovers_total{pool,reason}`, `sbc_failbacks_total{pool,reason}`,
//! `sbc_failover_suppressed_total{pool,reason}`,
//! `sbc_probe_rtt_seconds{pool,node,kind}` (histogram),
//! `sbc_probes_total{pool,node,kind,result}`, `sbc_webhooks_total{pool,event,result}`.
//! Help texts and the exporter live in the `sbc` crate (`sbc::metrics`).

#![warn(missing_docs)]

mod error;
mod http;
mod monitor;
pub mod pool;
pub mod probe;
pub mod state;
mod tls;
pub mod webhook;
pub mod witness;

pub use error::{HealthError, ProbeError};
pub use monitor::{HealthMonitor, NodeStatus, Outcome, PoolStatus};
pub use pool::{Candidates, PoolMachine};
pub use state::{NodeHealth, NodeState};
