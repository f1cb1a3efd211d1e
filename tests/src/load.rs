//! Steady SIP load for failover drills: calls at a fixed rate from a scripted trunk,
//! periodic re-registrations from phones, and [`AutoAnswer`], a stateless callee that answers
//! every INVITE at once.
//!
//! Every load is bounded: a fixed number of operations at a fixed rate, each with its own
//! timeouts (the UA's), so a drill ends by itself whatever the system under test does.
//! Each operation is recorded ([`OpRecord`]: when it started, how long it took, how it
//! ended) so a drill can count failures and delays relative to the moment of the fault.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use sbc_sip::edit::{self, ResponseOpts};
use sbc_sip::{HeaderName, Message, Method};
use tokio::task::JoinSet;

use crate::sip_io::{AutoReply, Endpoint};
use crate::ua::{lossy, Ua};

/// How one operation (a call, or one REGISTER) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// Call: INVITE answered 200 and the BYE answered 200. REGISTER: 200.
    Ok,
    /// Call: the INVITE got this final status (not 200). REGISTER: this final status.
    Status(u16),
    /// Call: set up, but the BYE got this status (or none: 0) — the dialog broke.
    ByeFailed(u16),
    /// No final response, or the UA gave up: the error text.
    Error(String),
}

/// One operation of a load run.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// Sequence number in the run.
    pub n: usize,
    /// When its first request was sent.
    pub started: Instant,
    /// Call: INVITE sent to its final response (setup delay). REGISTER: to its final.
    pub latency: Duration,
    pub outcome: OpOutcome,
}

impl OpRecord {
    /// Whether the call could be set up (whatever happened at hang-up) / the REGISTER got 200.
    pub fn setup_ok(&self) -> bool {
        matches!(self.outcome, OpOutcome::Ok | OpOutcome::ByeFailed(_))
    }

    pub fn is_ok(&self) -> bool {
        self.outcome == OpOutcome::Ok
    }
}

/// Calls at `rate` per second, `count` of them, from `ua` to the URI `target(n)`; each is
/// set up, then hung up at once (BYE). Returns one record per call, in order.
pub async fn run_calls<P>(
    ua: Arc<P>,
    rate: f64,
    count: usize,
    target: impl Fn(usize) -> String,
) -> Vec<OpRecord>
where
    P: std::ops::Deref<Target = Ua> + Send + Sync + 'static,
{
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut set = JoinSet::new();
    for n in 0..count {
        tokio::time::sleep_until(start + period * n as u32).await;
        let ua = ua.clone();
        let uri = target(n);
        set.spawn(async move {
            let started = Instant::now();
            let outcome;
            let latency;
            match ua.invite(&uri).await {
                Ok(call) => {
                    latency = started.elapsed();
                    outcome = if call.final_status == 200 {
                        match ua.bye(&call).await {
                            Ok(r) if r.status() == Some(200) => OpOutcome::Ok,
                            Ok(r) => OpOutcome::ByeFailed(r.status().unwrap_or(0)),
                            Err(_) => OpOutcome::ByeFailed(0),
                        }
                    } else {
                        OpOutcome::Status(call.final_status)
                    };
                }
                Err(e) => {
                    latency = started.elapsed();
                    outcome = OpOutcome::Error(format!("{e:#}"));
                }
            }
            OpRecord {
                n,
                started,
                latency,
                outcome,
            }
        });
    }
    collect(set).await
}

/// Each phone re-registers (`expires` seconds) every `period`, `rounds` times, the phones
/// spread evenly over the period (a phone whose REGISTER takes longer than the period sends
/// its next one at once). Returns one record per REGISTER, in start order.
///
/// The phones are driven from this one future (a REGISTER in progress is not `Send`), so
/// run it with `join!` beside the rest of a drill rather than spawning it.
pub async fn run_registrations<P>(
    phones: Vec<Arc<P>>,
    period: Duration,
    rounds: usize,
    expires: u32,
) -> Vec<OpRecord>
where
    P: std::ops::Deref<Target = Ua>,
{
    let start = tokio::time::Instant::now();
    let count = phones.len().max(1);
    let step = period / count as u32;
    let loops: Vec<Pin<Box<dyn Future<Output = Vec<OpRecord>> + '_>>> = phones
        .iter()
        .enumerate()
        .map(|(i, phone)| {
            let f: Pin<Box<dyn Future<Output = Vec<OpRecord>> + '_>> = Box::pin(async move {
                let mut out = Vec::with_capacity(rounds);
                for round in 0..rounds {
                    tokio::time::sleep_until(start + period * round as u32 + step * i as u32).await;
                    let started = Instant::now();
                    let r = phone.register(expires).await;
                    let latency = started.elapsed();
                    let outcome = match r {
                        Ok(m) if m.status() == Some(200) => OpOutcome::Ok,
                        Ok(m) => OpOutcome::Status(m.status().unwrap_or(0)),
                        Err(e) => OpOutcome::Error(format!("{e:#}")),
                    };
                    out.push(OpRecord {
                        n: round * count + i,
                        started,
                        latency,
                        outcome,
                    });
                }
                out
            });
            f
        })
        .collect();
    let mut out: Vec<OpRecord> = join_all(loops).await.into_iter().flatten().collect();
    out.sort_by_key(|r| r.n);
    out
}

/// Polls every future until all are done (none of them needs to be `Send`).
async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut slots: Vec<Option<Pin<Box<dyn Future<Output = T> + '_>>>> =
        futures.into_iter().map(Some).collect();
    let mut done: Vec<Option<T>> = slots.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, result) in slots.iter_mut().zip(done.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

async fn collect(mut set: JoinSet<OpRecord>) -> Vec<OpRecord> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(rec) => out.push(rec),
            Err(e) => tracing::warn!("load task failed: {e}"),
        }
    }
    out.sort_by_key(|r| r.n);
    out
}

/// Summary of records relative to an instant (the fault).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Operations started at or after the instant.
    pub after: usize,
    /// Of those, how many failed (call: INVITE not 200, or BYE failed; REGISTER: not 200).
    pub failed_after: usize,
    /// Of those, how many could not even be set up (INVITE not 200 / REGISTER not 200).
    pub setup_failed_after: usize,
    /// Operations started before the instant that failed (e.g. a call up on the primary
    /// whose BYE died with it).
    pub failed_before: usize,
    /// Started before the instant.
    pub before: usize,
    /// Texts of the first few failures after the instant, for assertion messages.
    pub examples: Vec<String>,
}

/// Counts records against `fault`.
pub fn tally(records: &[OpRecord], fault: Instant) -> Tally {
    let mut t = Tally::default();
    for r in records {
        if r.started >= fault {
            t.after += 1;
            if !r.is_ok() {
                t.failed_after += 1;
                if !r.setup_ok() {
                    t.setup_failed_after += 1;
                }
                if t.examples.len() < 5 {
                    t.examples.push(format!(
                        "#{} at +{:?}: {:?}",
                        r.n,
                        r.started.saturating_duration_since(fault),
                        r.outcome
                    ));
                }
            }
        } else {
            t.before += 1;
            if !r.is_ok() {
                t.failed_before += 1;
            }
        }
    }
    t
}

/// Setup latencies of successful operations started in `[from, to)`, sorted.
pub fn latencies(records: &[OpRecord], from: Instant, to: Instant) -> Vec<Duration> {
    let mut v: Vec<Duration> = records
        .iter()
        .filter(|r| r.started >= from && r.started < to && r.setup_ok())
        .map(|r| r.latency)
        .collect();
    v.sort();
    v
}

/// A stateless callee on a UDP socket: every INVITE gets 200 at once (To-tag, Contact,
/// Record-Route copied, SDP), BYE/OPTIONS/CANCEL/others 200, ACK nothing. Answers are built
/// from the request alone, so a retransmitted INVITE gets the same 200 (the To-tag is
/// derived from Call-ID and From-tag).
pub struct AutoAnswer {
    ep: Endpoint,
    drain: tokio::task::JoinHandle<()>,
}

impl AutoAnswer {
    pub async fn start(local: SocketAddr) -> anyhow::Result<AutoAnswer> {
        let ep = Endpoint::udp(local).await?;
        let me = ep.local_addr();
        let hook: AutoReply = Arc::new(move |m: &Message, _src| answer(m, me));
        ep.set_auto_reply(Some(hook));
        // Whatever the hook does not answer (ACKs, stray responses) is discarded.
        let drain_ep = ep.clone();
        let drain = tokio::spawn(async move { while drain_ep.next().await.is_some() {} });
        Ok(AutoAnswer { ep, drain })
    }

    pub fn addr(&self) -> SocketAddr {
        self.ep.local_addr()
    }

    /// INVITEs received (retransmissions included).
    pub fn invites(&self) -> usize {
        self.ep
            .received_log()
            .iter()
            .filter(|(m, _)| m.method() == Some(Method::Invite))
            .count()
    }
}

impl Drop for AutoAnswer {
    fn drop(&mut self) {
        self.drain.abort();
        self.ep.close();
    }
}

fn answer(m: &Message, me: SocketAddr) -> Option<Vec<u8>> {
    let method = m.method()?;
    if method == Method::Ack {
        return None;
    }
    let tag_src = format!(
        "{}|{}",
        lossy(m.call_id()),
        m.from()
            .and_then(|f| f.tag().map(lossy))
            .unwrap_or_default()
    );
    let tag = &crate::digest::md5_hex(&tag_src)[..12];
    if method != Method::Invite {
        return Some(edit::response(
            m,
            200,
            "OK",
            &ResponseOpts {
                to_tag: Some(tag.as_bytes()),
                ..Default::default()
            },
        ));
    }
    let mut extra = format!("Contact: <sip:callee@{me}>\r\n");
    for (_, v) in m.values(HeaderName::RecordRoute) {
        extra.push_str("Record-Route: ");
        extra.push_str(&lossy(v));
        extra.push_str("\r\n");
    }
    let sdp = format!(
        "v=0\r\no=callee 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n",
        ip = me.ip()
    );
    Some(edit::response(
        m,
        200,
        "OK",
        &ResponseOpts {
            to_tag: Some(tag.as_bytes()),
            extra: extra.as_bytes(),
            body: Some(("application/sdp", sdp.as_bytes())),
            ..Default::default()
        },
    ))
}
