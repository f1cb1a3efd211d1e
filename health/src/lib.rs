//! PBX node health and pool failover.
//!
//! This crate will own: SIP OPTIONS and HTTP GET probes, the per-node health state machine
//! (Starting, Up, Suspect, Down, maintenance) with thresholds, the witness check that keeps a
//! cut-off SBC from failing over, the active node of each pool with its failback policy, and
//! failover webhooks. It stays usable without the rest of the SBC.
//!
//! Today the SBC serves one node per pool and nothing here is wired in yet (issue 4).
