//! The demo's script: the steps, the checks that make each one pass or fail, and the
//! summary. Every step prints one timeline line; a step that does not do what it says (a call
//! through the wrong PBX node, SDP not pointing at the relay, RTP lost, no failover within
//! a few probe intervals) ends the demo with an error naming it.

use super::ua::Ua;
use super::watch::{self, HealthWatch};
use super::wire::Timeline;
use super::{
    http, pbx, rtp, Cast, CARRIER_DOMAIN, DOMAIN, HEALTH_WAIT, MEDIA_PORTS, NUMBER, PACKETS, POOL,
    PRIMARY, PROBE_FAILURES, PROBE_INTERVAL_MS, PTIME, STANDBY, USERS,
};
use anyhow::Context;
use sbc_health::NodeState;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map_or("", |(_, p)| p)
}

/// One finished call, for the summary.
pub struct CallRecord {
    node: &'static str,
    sent: u32,
    received: u32,
}

/// Which PBX node a call or registration must go through: index into `Cast::pbx`.
#[derive(Clone, Copy)]
enum Via {
    Primary = 0,
    Standby = 1,
}

/// The demo's steps, with everything they act on and what they found so far.
pub struct Script<'a> {
    pub tl: &'a Arc<Timeline>,
    pub sbc: &'a sbc::Sbc,
    /// `http://127.0.0.1:PORT` of the admin endpoint.
    pub admin: String,
    pub c: Cast,
    pub watch: HealthWatch,
    pub calls: Vec<CallRecord>,
}

/// Snapshot of what each PBX node handled, to check which one served a step.
fn counts(c: &Cast, f: impl Fn(&pbx::Counters) -> u32) -> [u32; 2] {
    [f(&c.pbx[0].counters), f(&c.pbx[1].counters)]
}

/// Checks that only node `via` saw `what` between two snapshots.
fn check_via(
    before: [u32; 2],
    after: [u32; 2],
    via: Via,
    names: [&str; 2],
    what: &str,
) -> anyhow::Result<()> {
    let (i, j) = (via as usize, 1 - via as usize);
    anyhow::ensure!(
        after[i] > before[i] && after[j] == before[j],
        "{what} should have gone through {} but {} saw {} and {} saw {}",
        names[i],
        names[i],
        after[i].saturating_sub(before[i]),
        names[j],
        after[j].saturating_sub(before[j])
    );
    Ok(())
}

/// Which phone or trunk takes part in a call.
#[derive(Clone, Copy)]
enum Who {
    Alice,
    Bob,
    Carrier,
}

impl Script<'_> {
    fn names(&self) -> [&'static str; 2] {
        [self.c.pbx[0].name, self.c.pbx[1].name]
    }

    fn two(&mut self, x: Who, y: Who) -> anyhow::Result<(&mut Ua, &mut Ua)> {
        let c = &mut self.c;
        Ok(match (x, y) {
            (Who::Alice, Who::Bob) => (&mut c.alice, &mut c.bob),
            (Who::Bob, Who::Alice) => (&mut c.bob, &mut c.alice),
            (Who::Alice, Who::Carrier) => (&mut c.alice, &mut c.carrier),
            (Who::Carrier, Who::Alice) => (&mut c.carrier, &mut c.alice),
            (Who::Bob, Who::Carrier) => (&mut c.bob, &mut c.carrier),
            (Who::Carrier, Who::Bob) => (&mut c.carrier, &mut c.bob),
            _ => anyhow::bail!("a call needs two different parties"),
        })
    }

    pub async fn run(&mut self) -> anyhow::Result<()> {
        self.header();
        let tl = self.tl;

        self.watch
            .wait(
                "both PBX nodes to answer the SBC's probes",
                HEALTH_WAIT,
                |r| {
                    watch::state(r, PRIMARY) == Some(NodeState::Up)
                        && watch::state(r, STANDBY) == Some(NodeState::Up)
                        && watch::active(r, POOL) == Some(PRIMARY)
                },
            )
            .await?;
        tl.step(&format!(
            "SBC up: pool {POOL} has {PRIMARY} up (active) and {STANDBY} up (standby)"
        ));

        self.register(Via::Primary, "").await?;
        self.call(Who::Alice, Who::Bob, Via::Primary).await?;
        self.call(Who::Bob, Who::Carrier, Via::Primary).await?;
        self.call(Who::Carrier, Who::Alice, Via::Primary).await?;

        // The primary dies.
        self.c.pbx[0].kill().await;
        let killed = Instant::now();
        tl.step(&format!(
            "{PRIMARY} killed: the primary PBX stops, its port is closed"
        ));
        self.watch
            .wait(
                &format!("the SBC to see {PRIMARY} down"),
                HEALTH_WAIT,
                |r| watch::state(r, PRIMARY) == Some(NodeState::Down),
            )
            .await?;
        let down = killed.elapsed();
        self.watch
            .wait(
                &format!("the SBC to fail over to {STANDBY}"),
                HEALTH_WAIT,
                |r| watch::active(r, POOL) == Some(STANDBY),
            )
            .await?;
        let switched = killed.elapsed();
        tl.step(&format!(
            "failover: {PRIMARY} detected down {:.2} s after the kill, traffic on {STANDBY} {:.2} s after",
            down.as_secs_f64(),
            switched.as_secs_f64()
        ));

        self.show_status().await?;
        self.register(
            Via::Standby,
            &format!(
                "{STANDBY} has its own registrar, empty: real phones re-register at their next refresh, the demo does it now"
            ),
        )
        .await?;
        self.call(Who::Alice, Who::Bob, Via::Standby).await?;
        self.call(Who::Carrier, Who::Alice, Via::Standby).await?;

        // The primary comes back; failback is manual.
        let sbc_addr = self.c.sbc_addr;
        self.c.pbx[0].restart(tl, sbc_addr).await?;
        tl.step(&format!(
            "{PRIMARY} restarted (with an empty registrar); the SBC keeps probing it"
        ));
        self.watch
            .wait(
                &format!("the SBC to see {PRIMARY} up again"),
                HEALTH_WAIT,
                |r| watch::state(r, PRIMARY) == Some(NodeState::Up),
            )
            .await?;
        let active = self
            .sbc
            .health
            .status()
            .iter()
            .find(|p| p.name == POOL)
            .and_then(|p| p.active.clone());
        anyhow::ensure!(
            active.as_deref() == Some(STANDBY),
            "failback is manual, yet the pool moved to {active:?} by itself"
        );
        tl.step(&format!(
            "{PRIMARY} is up, traffic stays on {STANDBY}: failback is manual (a flapping primary never moves calls)"
        ));
        let url = format!("{}/pools/{POOL}/failback", self.admin);
        tl.step(&format!(
            "operator: POST {url} (what `sbc failback {POOL}` sends)"
        ));
        let t0 = Instant::now();
        let report = self.failback(&url).await?;
        self.watch
            .wait(
                &format!("the SBC to fail back to {PRIMARY}"),
                HEALTH_WAIT,
                |r| watch::active(r, POOL) == Some(PRIMARY),
            )
            .await?;
        let failback = t0.elapsed();
        tl.step(&format!(
            "failback: answered {report} in {:.3} s",
            failback.as_secs_f64()
        ));

        self.register(Via::Primary, "the restarted pbx-a lost its registrations")
            .await?;
        self.call(Who::Alice, Who::Bob, Via::Primary).await?;

        let scraped = self.scrape().await?;
        self.summary(down, switched, failback, &scraped);
        Ok(())
    }

    fn header(&self) {
        let tl = self.tl;
        let c = &self.c;
        tl.say("sbc demo: an SBC in front of a PBX pair, with two phones and a carrier trunk, all on loopback\n");
        tl.say(&format!(
            "  SBC      {:<21} SIP over UDP; media relay on 127.0.0.1 ports {}-{}",
            c.sbc_addr,
            MEDIA_PORTS.start(),
            MEDIA_PORTS.end()
        ));
        tl.say(&format!(
            "  {PRIMARY}    {:<21} primary PBX: registrar for {DOMAIN} (digest auth) and proxy",
            c.pbx[0].addr
        ));
        tl.say(&format!(
            "  {STANDBY}    {:<21} standby PBX, same role; the SBC probes both with OPTIONS every {PROBE_INTERVAL_MS} ms",
            c.pbx[1].addr
        ));
        for ua in [&c.alice, &c.bob] {
            tl.say(&format!(
                "  {:<8} {:<21} phone, RTP on {}",
                ua.peer.name, ua.peer.addr, ua.rtp_addr
            ));
        }
        tl.say(&format!(
            "  carrier  {:<21} trunk for {CARRIER_DOMAIN} ({NUMBER}), RTP on {}",
            c.carrier.peer.addr, c.carrier.rtp_addr
        ));
        tl.say(&format!("  metrics  {}/metrics", self.admin));
        tl.say(&format!(
            "  status   {}/status  (or: sbc status --admin {})",
            self.admin, self.admin
        ));
        tl.say(
            "  --verbose prints every SIP message; --linger SECS keeps it all running afterwards\n",
        );
        tl.say("Timeline (seconds since start)");
    }

    /// Registers alice and bob (401 challenge, then 200) and checks which node took them.
    async fn register(&mut self, via: Via, why: &str) -> anyhow::Result<()> {
        let before = counts(&self.c, pbx::Counters::registered);
        for user in ["alice", "bob"] {
            let ua = if user == "alice" {
                &mut self.c.alice
            } else {
                &mut self.c.bob
            };
            ua.register(password(user))
                .await
                .with_context(|| format!("{user} registering"))?;
        }
        let after = counts(&self.c, pbx::Counters::registered);
        check_via(before, after, via, self.names(), "the REGISTERs")?;
        let held = self.sbc.proxy.registrations.len();
        anyhow::ensure!(
            held == 2,
            "the SBC holds {held} registered flows, expected 2"
        );
        self.tl.step(&format!(
            "alice and bob registered via {} (401 digest challenge, then 200)",
            self.names()[via as usize]
        ));
        if !why.is_empty() {
            self.tl.note(&format!("({why})"));
        }
        Ok(())
    }

    /// One call from INVITE to the 200 for the BYE, with RTP both ways in between. The callee
    /// hangs up when the call came from the trunk, the caller otherwise, so both directions
    /// of in-dialog routing are used.
    async fn call(&mut self, from: Who, to: Who, via: Via) -> anyhow::Result<()> {
        let n = self.calls.len() + 1;
        let names = self.names();
        let node = names[via as usize];
        let tl = self.tl;
        let before = counts(&self.c, pbx::Counters::invites);
        let sbc = self.sbc;
        let (caller, callee) = self.two(from, to)?;
        let ruri = match callee.domain {
            CARRIER_DOMAIN => format!("sip:{NUMBER}@{DOMAIN}"),
            _ => format!("sip:{}@{DOMAIN}", callee.user),
        };
        let label = format!("call {n}");
        let result: anyhow::Result<CallRecord> = async {
            let (call_id, from_hdr) = caller.invite(&ruri, "").await?;
            // Whichever comes first: the INVITE at the callee, or a failure at the caller
            // (then the demo says which, rather than "no INVITE").
            let refused = async {
                let failed = caller
                    .peer
                    .expect("a failure response", |m| m.status().is_some_and(|s| s >= 300))
                    .await;
                match failed {
                    Ok((m, _)) => super::wire::describe(&m),
                    Err(_) => std::future::pending().await,
                }
            };
            let inc = tokio::select! {
                inc = callee.await_invite() => inc?,
                why = refused => anyhow::bail!(
                    "{} got {why} instead of the call reaching {}",
                    caller.peer.name,
                    callee.peer.name
                ),
            };
            callee.answer(&inc, 180, "Ringing").await?;
            caller.await_ringing(&call_id).await?;
            callee.answer(&inc, 200, "OK").await?;
            let mut caller_d = caller.await_answer_and_ack(&call_id, &from_hdr).await?;
            let mut callee_d = inc.dialog;
            callee.await_ack(&callee_d).await?;
            for (ua, d, other) in [
                (&*caller, &caller_d, &*callee),
                (&*callee, &callee_d, &*caller),
            ] {
                let m = d.remote_media;
                anyhow::ensure!(
                    m.ip() == std::net::Ipv4Addr::LOCALHOST && MEDIA_PORTS.contains(&m.port()),
                    "the SBC did not anchor the media: {}'s SDP points at {m}, not at the relay ({} is {})",
                    ua.peer.name,
                    other.peer.name,
                    other.rtp_addr
                );
            }
            tl.step(&format!(
                "{label} up: {} -> {} via {node}; SDP points {} at relay port {}, {} at {}",
                caller.peer.name,
                callee.peer.name,
                caller.peer.name,
                caller_d.remote_media.port(),
                callee.peer.name,
                callee_d.remote_media.port()
            ));
            if n == 1 {
                tl.detail(&format!(
                    "(the call crosses the SBC twice, phone -> PBX and PBX -> phone: the relay holds {} media sessions for it, RTP goes phone -> relay -> relay -> phone)",
                    sbc.proxy.media().map_or(0, |m| m.sessions())
                ));
            }
            let (out, back) = rtp::exchange(
                caller,
                caller_d.remote_media,
                callee,
                callee_d.remote_media,
                PACKETS,
                PTIME,
            )
            .await;
            let callee_hangs_up = caller.domain == CARRIER_DOMAIN;
            if callee_hangs_up {
                tokio::try_join!(callee.hang_up(&mut callee_d), caller.await_bye(&caller_d))?;
            } else {
                tokio::try_join!(caller.hang_up(&mut caller_d), callee.await_bye(&callee_d))?;
            }
            let hung_up = if callee_hangs_up { &callee } else { &caller };
            tl.step(&format!(
                "{label} media: {} -> {} {}/{} RTP packets, {} -> {} {}/{}, through the relay; {} hung up",
                caller.peer.name,
                callee.peer.name,
                out.received,
                out.sent,
                callee.peer.name,
                caller.peer.name,
                back.received,
                back.sent,
                hung_up.peer.name
            ));
            anyhow::ensure!(
                out.ok() && back.ok(),
                "too little RTP made it through the relay ({}/{} and {}/{})",
                out.received,
                out.sent,
                back.received,
                back.sent
            );
            Ok(CallRecord {
                node,
                sent: out.sent + back.sent,
                received: out.received + back.received,
            })
        }
        .await;
        let record = result.with_context(|| format!("{label} ({ruri})"))?;
        let after = counts(&self.c, pbx::Counters::invites);
        check_via(before, after, via, names, &format!("{label}'s INVITE"))?;
        self.calls.push(record);
        Ok(())
    }

    /// Fails the pool back over the admin API, as an operator would with curl or
    /// `sbc failback pbx`. Returns the answer in a few words.
    async fn failback(&self, url: &str) -> anyhow::Result<String> {
        let (code, body) = http("POST", url.to_string()).await?;
        anyhow::ensure!(code == 200, "POST {url} answered {code}: {body}");
        let r: sbc::admin::SwitchReport = serde_json::from_str(&body)
            .with_context(|| format!("POST {url}: unexpected answer {body}"))?;
        anyhow::ensure!(
            r.changed && r.active.as_deref() == Some(PRIMARY),
            "POST {url} did not move the pool to {PRIMARY}: {body}"
        );
        Ok(format!(
            "200, active node {} -> {}",
            r.previous.as_deref().unwrap_or("-"),
            r.active.as_deref().unwrap_or("-")
        ))
    }

    /// Reads /status, as `sbc status` does, and prints the pool in one line.
    async fn show_status(&self) -> anyhow::Result<()> {
        let url = format!("{}/status", self.admin);
        let (code, body) = http("GET", url.clone()).await?;
        anyhow::ensure!(code == 200, "GET {url} answered {code}: {body}");
        let st: sbc::admin::StatusReport = serde_json::from_str(&body)
            .with_context(|| format!("GET {url}: unexpected answer {body}"))?;
        let pool = st
            .pools
            .iter()
            .find(|p| p.name == POOL)
            .with_context(|| format!("GET {url}: no pool {POOL}"))?;
        let nodes: Vec<String> = pool
            .nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.state))
            .collect();
        self.tl.step(&format!(
            "GET {url}: pool {POOL} active {}; {}",
            pool.active.as_deref().unwrap_or("-"),
            nodes.join(", ")
        ));
        Ok(())
    }

    /// Scrapes /metrics, as Prometheus would, and picks the lines the demo is about.
    async fn scrape(&self) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/metrics", self.admin);
        let (code, body) = http("GET", url.clone()).await?;
        anyhow::ensure!(code == 200, "GET {url} answered {code}");
        let wanted = [
            "sbc_failovers_total{",
            "sbc_failbacks_total{",
            "sbc_sip_requests_total{method=\"INVITE\"}",
            "sbc_registrations ",
        ];
        // In the order of `wanted` (the exposition's own order varies from run to run).
        let lines: Vec<String> = wanted
            .iter()
            .flat_map(|w| body.lines().filter(move |l| l.starts_with(w)))
            .filter(|l| !l.ends_with(" 0"))
            .take(8)
            .map(str::to_string)
            .collect();
        anyhow::ensure!(
            lines.iter().any(|l| l.starts_with("sbc_failovers_total{")),
            "GET {url}: no sbc_failovers_total line counted the failover"
        );
        self.tl.step(&format!(
            "GET {url}: {} lines of Prometheus metrics; the failover is counted",
            body.lines().count()
        ));
        Ok(lines)
    }

    fn summary(&self, down: Duration, switched: Duration, failback: Duration, scraped: &[String]) {
        let tl = self.tl;
        let on = |node: &str| self.calls.iter().filter(|c| c.node == node).count();
        let sent: u32 = self.calls.iter().map(|c| c.sent).sum();
        let received: u32 = self.calls.iter().map(|c| c.received).sum();
        tl.say("\nSummary");
        tl.say("  registrations  alice and bob, three times: on pbx-a, on pbx-b after the failover, on pbx-a after the failback");
        tl.say(&format!(
            "  calls          {} of {} completed with media: {} via {PRIMARY}, {} via {STANDBY}",
            self.calls.len(),
            self.calls.len(),
            on(PRIMARY),
            on(STANDBY)
        ));
        tl.say(&format!(
            "  RTP            {received} of {sent} packets arrived through the relay ({PACKETS} per call each way)"
        ));
        tl.say(&format!(
            "  failover       {PRIMARY} down {:.2} s after the kill, traffic on {STANDBY} {:.2} s after (probe every {PROBE_INTERVAL_MS} ms, down after {PROBE_FAILURES} misses)",
            down.as_secs_f64(),
            switched.as_secs_f64()
        ));
        tl.say(&format!(
            "  failback       by hand over the admin API (failback = \"manual\"), traffic on {PRIMARY} {:.3} s after the POST",
            failback.as_secs_f64()
        ));
        tl.say("  metrics        from /metrics:");
        for l in scraped {
            tl.say(&format!("                   {l}"));
        }
        tl.say(&format!(
            "  total          {:.2} s",
            tl.elapsed().as_secs_f64()
        ));
        tl.say("demo finished: every step passed");
    }
}
