//! Draining: the SBC stops taking new calls and waits for the calls in progress to end before
//! it stops, so a planned restart or upgrade of one SBC drops no call.
//!
//! While draining, a new INVITE and an OPTIONS keep-alive addressed to the SBC get `503` with
//! `Retry-After` ([`crate::proxy::Proxy::set_draining`]): callers and trunks that know
//! another SBC (DNS SRV or a second address) go there, and trunks that ping with OPTIONS take
//! this one out of their rotation. Registrations, requests in dialogs, the PBX's calls to
//! phones and every response still pass, so calls in progress can be re-INVITEd, transferred
//! and hung up. The drain ends when no call is left
//! ([`crate::proxy::Proxy::calls_in_progress`]) or at its deadline, whichever comes first;
//! `sbc run` then exits. Started by SIGTERM when `general.drain_secs` is set, or by the
//! operator (`POST /drain`, `sbc drain`), who can also call it off unless it is a shutdown's.

use crate::admin::unix_now;
use crate::proxy::Proxy;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a drain counts the calls left.
const POLL: Duration = Duration::from_millis(100);

/// A drain in progress, as `/status` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DrainReport {
    /// When it started (Unix seconds).
    pub since_unix: u64,
    /// When it gives up waiting and the SBC stops anyway (Unix seconds).
    pub deadline_unix: u64,
    /// Calls still in progress at the last count.
    pub calls: usize,
    /// Started by a shutdown signal: it cannot be called off.
    pub shutdown: bool,
}

/// Why a drain could not be called off.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelError {
    /// Nothing to call off.
    #[error("the SBC is not draining")]
    NotDraining,
    /// A shutdown's drain runs to its end.
    #[error(
        "this drain was started by a shutdown signal and runs until its calls end or its deadline"
    )]
    Shutdown,
}

struct Active {
    since_unix: u64,
    deadline: Instant,
    deadline_unix: u64,
    shutdown: bool,
    task: tokio::task::JoinHandle<()>,
}

/// The SBC's drain state; one per [`crate::Sbc`].
pub struct Drain {
    proxy: Arc<Proxy>,
    active: Mutex<Option<Active>>,
    /// Calls at the last count.
    calls: std::sync::atomic::AtomicUsize,
    /// Becomes true when a drain has ended (no call left, or its deadline).
    done: watch::Sender<bool>,
}

impl Drain {
    pub fn new(proxy: Arc<Proxy>) -> Arc<Drain> {
        Arc::new(Drain {
            proxy,
            active: Mutex::new(None),
            calls: std::sync::atomic::AtomicUsize::new(0),
            done: watch::channel(false).0,
        })
    }

    /// Starts draining, with `timeout` until the SBC stops anyway; a drain already running
    /// gets the new deadline (and becomes a shutdown's if `shutdown`). Must run inside a
    /// tokio runtime. Returns the state it is now in.
    pub fn start(self: &Arc<Self>, timeout: Duration, shutdown: bool) -> DrainReport {
        let now = Instant::now();
        let deadline = now + timeout;
        let deadline_unix = unix_now().saturating_add(timeout.as_secs());
        let calls = self.proxy.calls_in_progress();
        self.calls
            .store(calls, std::sync::atomic::Ordering::Relaxed);
        let mut active = self.active.lock();
        let a = match active.take() {
            Some(mut a) => {
                a.deadline = deadline;
                a.deadline_unix = deadline_unix;
                a.shutdown |= shutdown;
                tracing::info!(
                    calls,
                    timeout_secs = timeout.as_secs(),
                    "drain deadline moved"
                );
                a
            }
            None => {
                self.proxy.set_draining(true);
                metrics::gauge!("sbc_draining").set(1.0);
                tracing::info!(
                    calls,
                    timeout_secs = timeout.as_secs(),
                    "draining: new calls get 503; waiting for the calls in progress to end"
                );
                let me = Arc::clone(self);
                Active {
                    since_unix: unix_now(),
                    deadline,
                    deadline_unix,
                    shutdown,
                    task: tokio::spawn(async move { me.run().await }),
                }
            }
        };
        let report = a.report(calls);
        *active = Some(a);
        report
    }

    /// Calls the drain off: new calls are taken again.
    pub fn cancel(&self) -> Result<(), CancelError> {
        let mut active = self.active.lock();
        match active.as_ref() {
            None => return Err(CancelError::NotDraining),
            Some(a) if a.shutdown => return Err(CancelError::Shutdown),
            Some(_) => {}
        }
        if let Some(a) = active.take() {
            a.task.abort();
        }
        self.proxy.set_draining(false);
        metrics::gauge!("sbc_draining").set(0.0);
        tracing::info!("drain called off: new calls are taken again");
        Ok(())
    }

    /// The drain in progress, if any.
    pub fn report(&self) -> Option<DrainReport> {
        let calls = self.calls.load(std::sync::atomic::Ordering::Relaxed);
        self.active.lock().as_ref().map(|a| a.report(calls))
    }

    /// Resolves once a drain has ended: no call left, or its deadline passed. Never resolves
    /// while no drain runs (or after one was called off).
    pub async fn finished(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Counts the calls left until there are none or the deadline passes.
    async fn run(self: Arc<Self>) {
        loop {
            let calls = self.proxy.calls_in_progress();
            self.calls
                .store(calls, std::sync::atomic::Ordering::Relaxed);
            let Some(deadline) = self.active.lock().as_ref().map(|a| a.deadline) else {
                return;
            };
            if calls == 0 {
                tracing::info!("drained: no call left");
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(calls, "drain deadline reached with calls still in progress");
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        self.done.send_replace(true);
    }
}

impl Active {
    fn report(&self, calls: usize) -> DrainReport {
        DrainReport {
            since_unix: self.since_unix,
            deadline_unix: self.deadline_unix,
            calls,
            shutdown: self.shutdown,
        }
    }
}
