//! Moving phones to the active node after a failover, and keeping them registered on the
//! standby beforehand.
//!
//! After a failover the standby knows no phone: calls to a phone work only once it registered
//! there. Split expiry already bounds that by the phone's short lifetime (its next refresh is
//! forwarded, since the node holding its binding is no longer active, and the phone answers
//! the standby's digest challenge itself: no credentials move). This task shortens it:
//!
//! - **the wave**: TCP/TLS phones whose binding is held by another node than the active one
//!   have their flow closed, at most `phones.reregister_rate` per second so the standby is not
//!   stormed; a phone whose flow drops registers again at once (RFC 5626 4.4). Flows that carry
//!   a call in progress wait for the call to end.
//! - **shadow registration** (`pool.shadow_registration`, for standbys that trust the SBC by
//!   source address): every binding is also registered, with its Path, on the pool's other
//!   ready nodes, and kept fresh, so calls to the phone work on the standby at once.
//! - **progress**: the share of cached phones reachable on the active node, and after each
//!   failover the time until 50%, 95% and 100% of them were (metrics and /status).

use crate::proxy::Proxy;
use crate::registrations::{contact_expires, header_expires, shadow_register, ShadowJob};
use parking_lot::Mutex;
use sbc_sip::addr::NameAddr;
use sbc_sip::message::HeaderName;
use sbc_sip::scan::trim;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the task wakes: the wave's pace is kept at this granularity.
const TICK: Duration = Duration::from_millis(100);
/// How often the bindings are scanned (share on the active node, flows to close, shadows
/// due): a scan walks the whole cache, so it is kept rare...
const SCAN: Duration = Duration::from_secs(1);
/// ...except right after a failover, while phones are moving and the time to 50/95/100% is
/// being measured.
const FAST_SCAN: Duration = TICK;
const FAST_FOR: Duration = Duration::from_secs(60);
/// Lifetime asked for shadow registrations (refreshed at half).
const SHADOW_EXPIRES: u32 = 600;
/// A refused or unanswered shadow REGISTER is tried again after this.
const SHADOW_RETRY: Duration = Duration::from_secs(30);
/// Shadow REGISTERs started per second at most.
const SHADOW_PER_SECOND: f64 = 200.0;
/// How long a failover's progress is followed before it is called finished without 100%
/// (phones that never come back must not keep the wave going forever).
const FOLLOW_FOR: Duration = Duration::from_secs(3600);

/// Progress after the last failover, for /status.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The phone pool's active node.
    pub active: Option<String>,
    /// Live bindings, and how many of them the active node can reach.
    pub live: usize,
    pub on_active: usize,
    pub shadowed: usize,
    /// When the active node last changed (seconds ago), and how long until 50/95/100% of the
    /// cached phones were reachable on it.
    pub since_failover_secs: Option<f64>,
    pub to_50_secs: Option<f64>,
    pub to_95_secs: Option<f64>,
    pub to_100_secs: Option<f64>,
    /// Flows the wave closed since the last failover.
    pub wave_closed: u64,
}

/// Close times of the wave kept for [`Rereg::wave_closes`].
const CLOSES_KEPT: usize = 4096;

/// State of the task, readable from the admin API.
#[derive(Default)]
pub struct Rereg {
    progress: Mutex<Progress>,
    closes: Mutex<std::collections::VecDeque<Instant>>,
}

impl Rereg {
    pub fn progress(&self) -> Progress {
        self.progress.lock().clone()
    }

    /// When the wave closed each of its last flows (at most 4,096): what its pace really
    /// was, for tests and diagnostics.
    pub fn wave_closes(&self) -> Vec<Instant> {
        self.closes.lock().iter().copied().collect()
    }

    /// Runs until aborted.
    pub async fn run(proxy: Arc<Proxy>) {
        let this = &proxy.rereg;
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_active: Option<Arc<str>> = None;
        let mut failover_at: Option<Instant> = None;
        let mut budget = 0.0f64;
        let mut last_tick = Instant::now();
        let mut next_scan = Instant::now();
        let mut last_scan = Instant::now();
        let mut share = 1.0f64;
        // TCP/TLS flows still on the old node, from the last scan, closed at the wave's pace.
        let mut pending: Vec<crate::transport::Flow> = Vec::new();
        loop {
            interval.tick().await;
            let now = Instant::now();
            let dt = now.duration_since(last_tick).as_secs_f64();
            last_tick = now;
            let routes = proxy.routes();
            let pool = routes.phone_pool;
            let active: Option<Arc<str>> = proxy
                .active_node(&routes, pool)
                .and_then(|n| routes.nodes.get(n))
                .map(|n| Arc::from(n.name.as_str()));
            if active != last_active {
                if last_active.is_some() {
                    failover_at = Some(now);
                    next_scan = now;
                    // Unknown until scanned: scan fast from here.
                    share = 0.0;
                    pending.clear();
                    let mut p = this.progress.lock();
                    p.to_50_secs = None;
                    p.to_95_secs = None;
                    p.to_100_secs = None;
                    p.wave_closed = 0;
                    tracing::info!(from = ?last_active.as_deref(), to = ?active.as_deref(), "phones follow the new active node");
                }
                last_active = active.clone();
            }
            let following = failover_at.is_some_and(|t| now.duration_since(t) < FOLLOW_FOR);
            let rate = f64::from(routes.reregister_rate);
            if now >= next_scan {
                let fast =
                    failover_at.is_some_and(|t| now.duration_since(t) < FAST_FOR) && share < 1.0;
                next_scan = now + if fast { FAST_SCAN } else { SCAN };
                let since_scan = now.duration_since(last_scan).as_secs_f64();
                last_scan = now;
                share = self::scan_progress(this, &proxy, active.as_deref(), failover_at, now);
                if let (Some(a), true) = (active.as_deref(), rate > 0.0 && following) {
                    let busy = proxy
                        .media()
                        .map(|m| m.flows_in_calls())
                        .unwrap_or_default();
                    pending = proxy.registrations.flows_off(a, now);
                    // Flows carrying a call wait for it to end (a later scan).
                    pending.retain(|f| !busy.contains(f));
                    // Closed from the end: keep the order the list has.
                    pending.reverse();
                }
                // Shadow registrations.
                let shadowing = routes
                    .pools
                    .get(pool)
                    .is_some_and(|p| p.shadow_registration);
                if shadowing {
                    let ready = proxy.ready_nodes(pool);
                    let nodes: Vec<Arc<str>> = ready
                        .iter()
                        .filter_map(|n| routes.nodes.get(*n))
                        .map(|n| Arc::from(n.name.as_str()))
                        .collect();
                    // Bindings held by a node that is not ready are not shadowed meanwhile:
                    // `shadow_jobs` only looks at bindings whose holder is in the list.
                    let max = (SHADOW_PER_SECOND * since_scan.max(TICK.as_secs_f64())) as usize;
                    for job in
                        proxy
                            .registrations
                            .shadow_jobs(&nodes, SHADOW_EXPIRES, now, max.max(1))
                    {
                        let Some(idx) = routes.nodes.iter().position(|n| *n.name == *job.node)
                        else {
                            continue;
                        };
                        let Some(dest) = proxy.node_dest(&routes, idx) else {
                            continue;
                        };
                        send_shadow(&proxy, dest, job);
                    }
                }
            }
            // The wave.
            if rate > 0.0 && following && !pending.is_empty() {
                // No burst: at most one tick's share (or one flow) at a time, so no window of
                // a second ever sees more than `rate` closes.
                budget = (budget + rate * dt).min((rate * TICK.as_secs_f64()).max(1.0));
                let mut closed = 0u64;
                while budget >= 1.0 {
                    let Some(flow) = pending.pop() else { break };
                    if proxy.close_flow(&flow) {
                        budget -= 1.0;
                        closed += 1;
                        let mut c = this.closes.lock();
                        if c.len() == CLOSES_KEPT {
                            c.pop_front();
                        }
                        c.push_back(now);
                    }
                }
                if closed > 0 {
                    metrics::counter!("sbc_reregister_wave_closed_total").increment(closed);
                    this.progress.lock().wave_closed += closed;
                }
            } else {
                budget = 0.0;
            }
        }
    }
}

/// Counts the cached phones the active node can reach, publishes the share, and after a
/// failover records when it passed 50, 95 and 100%. Returns the share.
fn scan_progress(
    this: &Rereg,
    proxy: &Proxy,
    active: Option<&str>,
    failover_at: Option<Instant>,
    now: Instant,
) -> f64 {
    let counts = proxy.registrations.counts(active, now);
    let share = if counts.live == 0 {
        1.0
    } else {
        counts.on_node as f64 / counts.live as f64
    };
    // Published from here, once a second, rather than on every REGISTER's 2xx.
    metrics::gauge!("sbc_registrations").set(counts.flows as f64);
    metrics::gauge!("sbc_registration_cache_entries").set(counts.entries as f64);
    metrics::gauge!("sbc_registrations_on_active_ratio").set(share);
    metrics::gauge!("sbc_registrations_shadowed").set(counts.shadowed as f64);
    let mut guard = this.progress.lock();
    let p = &mut *guard;
    p.active = active.map(str::to_string);
    p.live = counts.live;
    p.on_active = counts.on_node;
    p.shadowed = counts.shadowed;
    p.since_failover_secs = failover_at.map(|t| now.duration_since(t).as_secs_f64());
    if let Some(t) = failover_at {
        let took = now.duration_since(t).as_secs_f64();
        for (mark, slot, label) in [
            (0.5, &mut p.to_50_secs, "50"),
            (0.95, &mut p.to_95_secs, "95"),
            (1.0, &mut p.to_100_secs, "100"),
        ] {
            if slot.is_none() && share >= mark {
                *slot = Some(took);
                metrics::gauge!("sbc_reregistration_seconds", "share" => label).set(took);
                tracing::info!(
                    share = label,
                    seconds = took,
                    "phones on the active node after failover"
                );
            }
        }
    }
    share
}

/// Sends one shadow REGISTER and records its outcome.
fn send_shadow(proxy: &Arc<Proxy>, dest: crate::transport::Dest, job: ShadowJob) {
    let domain = job
        .aor
        .split_once('@')
        .map_or(&*job.aor, |(_, h)| h)
        .to_string();
    let agent = proxy.name().to_string();
    let task = proxy.originate(dest, |l, branch| {
        let mut job = job.clone();
        job.contact = proxy.contact_for_pbx(&job.contact, l).into();
        shadow_register(
            &job,
            &format!("sip:{domain}"),
            (l.transport.via_token(), &l.host, l.port),
            branch,
            &agent,
        )
    });
    let proxy = proxy.clone();
    metrics::counter!("sbc_local_requests_total", "method" => "REGISTER").increment(1);
    tokio::spawn(async move {
        let resp = match task {
            Some(t) => t.await.ok().flatten(),
            None => None,
        };
        let status = resp.as_ref().and_then(|m| m.status()).unwrap_or(0);
        let granted = resp.as_ref().map_or(0, |m| granted_expiry(m, &job));
        let result = if (200..300).contains(&status) {
            "ok"
        } else if status == 0 {
            "timeout"
        } else {
            "refused"
        };
        metrics::counter!("sbc_shadow_registrations_total", "result" => result).increment(1);
        if result != "ok" {
            tracing::debug!(node = %job.node, aor = %job.aor, status, "shadow registration failed");
        }
        proxy
            .registrations
            .shadow_done(&job, status, granted, SHADOW_RETRY, Instant::now());
    });
}

/// The lifetime a registrar granted the job's contact in its 2xx.
fn granted_expiry(m: &sbc_sip::Message, job: &ShadowJob) -> u64 {
    m.values(HeaderName::Contact)
        .filter_map(|(_, v)| NameAddr::parse(trim(v)).ok())
        .find(|na| na.uri_raw == job.contact.as_bytes())
        .and_then(|na| contact_expires(&na).or_else(|| header_expires(m)))
        .unwrap_or(0)
}
