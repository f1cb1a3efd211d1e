//! `sbc demo`: the SBC between built-in phones, a PBX and a carrier trunk, all on loopback,
//! with every SIP message the peers see printed on a timeline.
//!
//! It is the first command of the README, so it needs no files, no root and no network: the
//! config is embedded, every socket is on 127.0.0.0/8 with a port picked by the OS, and every
//! wait is bounded (2 s each, 12 s for the whole script) so that a broken SBC makes the demo
//! fail with the step and message that went wrong instead of hanging. It exits non-zero then.
//!
//! Cast: the SBC on 127.0.0.1; the PBX on 127.0.0.2 (its only pool node); phones alice and bob
//! on 127.0.0.1; the carrier's trunk on 127.0.0.3. Using distinct loopback addresses lets the
//! SBC tell them apart by source address exactly as it would real peers.

mod digest;
mod pbx;
mod ua;
mod wire;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use ua::Ua;
use wire::{Peer, Timeline};

/// The phones' domain: what they register to and call in.
const DOMAIN: &str = "demo.pbx";
/// The carrier's domain: the PBX sends `+` numbers there and the SBC maps it to the trunk.
const CARRIER_DOMAIN: &str = "carrier.demo";
/// The external number bob calls and the carrier calls from.
const NUMBER: &str = "+15551234567";
/// Demo credentials, known to the phones and the registrar.
const USERS: &[(&str, &str)] = &[("alice", "alice-secret"), ("bob", "bob-secret")];
/// How long each call stays up between ACK and BYE.
const TALK: Duration = Duration::from_secs(1);
/// The whole script's budget; every single wait is also bounded by [`wire::WAIT`].
const BUDGET: Duration = Duration::from_secs(12);

/// The SBC configuration, as a user would write it (see config/examples/minimal.toml).
fn config_text(pbx: SocketAddr, trunk: SocketAddr) -> String {
    format!(
        r#"[general]
name = "sbc-demo"

[[listen]]
transport = "udp"
addr = "127.0.0.1:0"

[[pool]]
name = "pbx"

  [[pool.node]]
  name = "pbx-1"
  address = "{pbx}"

[[trunk]]
name = "carrier"
sources = ["{trunk_ip}"]
address = "{trunk}"
domains = ["{CARRIER_DOMAIN}"]

[phones]
sources = ["127.0.0.0/8"]
domains = ["{DOMAIN}"]
"#,
        trunk_ip = trunk.ip()
    )
}

async fn bind(ip: &str, who: &str) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind((ip, 0)).await.with_context(|| {
        format!("binding {who} on {ip}:0 (the demo needs the loopback range 127.0.0.0/8, as Linux provides)")
    })
}

/// Runs the demo; `Err` if any step fails.
pub async fn run() -> anyhow::Result<()> {
    let tl = Timeline::new();
    let pbx_sock = bind("127.0.0.2", "the PBX").await?;
    let trunk_sock = bind("127.0.0.3", "the carrier trunk").await?;
    let alice_sock = bind("127.0.0.1", "alice").await?;
    let bob_sock = bind("127.0.0.1", "bob").await?;
    let pbx_addr = pbx_sock.local_addr()?;
    let trunk_addr = trunk_sock.local_addr()?;

    let text = config_text(pbx_addr, trunk_addr);
    let cfg = sbc_config::parse(&text, Path::new("<embedded demo>"))
        .map_err(|e| anyhow::anyhow!("the embedded demo config: {e}"))?;
    let sbc = sbc::Sbc::start(&cfg).await.context("starting the SBC")?;
    let Some(sbc_addr) = sbc.addr(sbc_sip::Transport::Udp) else {
        sbc.shutdown();
        anyhow::bail!("the SBC has no UDP listener");
    };
    let result = match Cast::new(&tl, sbc_addr, pbx_sock, trunk_sock, alice_sock, bob_sock) {
        Ok(cast) => tokio::time::timeout(BUDGET, script(&tl, &sbc, cast))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the demo did not finish within {} s",
                    BUDGET.as_secs()
                ))
            }),
        Err(e) => Err(e),
    };
    sbc.shutdown();
    if let Err(e) = &result {
        tl.say(&format!("\nDEMO FAILED: {e:#}"));
    }
    result
}

/// Everyone but the SBC.
struct Cast {
    pbx: tokio::task::JoinHandle<()>,
    pbx_addr: SocketAddr,
    alice: Ua,
    bob: Ua,
    carrier: Ua,
    sbc_addr: SocketAddr,
}

impl Cast {
    fn new(
        tl: &Arc<Timeline>,
        sbc: SocketAddr,
        pbx: UdpSocket,
        trunk: UdpSocket,
        alice: UdpSocket,
        bob: UdpSocket,
    ) -> anyhow::Result<Cast> {
        let pbx = Peer::new("pbx", pbx, sbc, tl.clone())?;
        let pbx_addr = pbx.addr;
        let pbx = pbx::Pbx::new(pbx, DOMAIN, CARRIER_DOMAIN, USERS);
        let ua = |name: &'static str, user, domain, sock, rtp_port| -> anyhow::Result<Ua> {
            Ok(Ua {
                peer: Peer::new(name, sock, sbc, tl.clone())?,
                user,
                domain,
                rtp_port,
            })
        };
        Ok(Cast {
            pbx: tokio::spawn(pbx.run()),
            pbx_addr,
            alice: ua("alice", "alice", DOMAIN, alice, 40000)?,
            bob: ua("bob", "bob", DOMAIN, bob, 40002)?,
            carrier: ua("carrier", NUMBER, CARRIER_DOMAIN, trunk, 40004)?,
            sbc_addr: sbc,
        })
    }
}

impl Drop for Cast {
    fn drop(&mut self) {
        self.pbx.abort();
    }
}

fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map_or("", |(_, p)| p)
}

/// One call from INVITE to the 200 for the BYE. `callee_hangs_up` picks who sends the BYE,
/// so both directions of in-dialog routing are shown.
async fn call(
    tl: &Timeline,
    caller: &mut Ua,
    callee: &mut Ua,
    ruri: &str,
    callee_hangs_up: bool,
) -> anyhow::Result<()> {
    let (call_id, from) = caller.invite(ruri, "").await?;
    let inc = callee.await_invite().await?;
    callee.answer(&inc, 180, "Ringing").await?;
    caller.await_ringing(&call_id).await?;
    callee.answer(&inc, 200, "OK").await?;
    let mut caller_d = caller.await_answer_and_ack(&call_id, &from).await?;
    let mut callee_d = inc.dialog;
    callee.await_ack(&callee_d).await?;
    tl.note(&format!(
        "call up: {} and {} talk for {} s (SDP exchanged; the demo sends no RTP)",
        caller.peer.name,
        callee.peer.name,
        TALK.as_secs()
    ));
    tokio::time::sleep(TALK).await;
    // Both sides at once: the hanging-up side waits for its 200 while the other answers.
    if callee_hangs_up {
        tokio::try_join!(callee.hang_up(&mut callee_d), caller.await_bye(&caller_d))?;
    } else {
        tokio::try_join!(caller.hang_up(&mut caller_d), callee.await_bye(&callee_d))?;
    }
    Ok(())
}

async fn script(tl: &Arc<Timeline>, sbc: &sbc::Sbc, mut c: Cast) -> anyhow::Result<()> {
    tl.say("sbc demo: the SBC between two phones, a PBX and a carrier trunk, all on loopback");
    tl.say(&format!(
        "  SBC      udp {:<21} phones from 127.0.0.0/8, pool \"pbx\", trunk \"carrier\"",
        c.sbc_addr
    ));
    tl.say(&format!(
        "  pbx      udp {:<21} registrar for {DOMAIN} (digest auth), stateless proxy",
        c.pbx_addr
    ));
    tl.say(&format!("  alice    udp {}", c.alice.peer.addr));
    tl.say(&format!("  bob      udp {}", c.bob.peer.addr));
    tl.say(&format!(
        "  carrier  udp {:<21} trunk for {CARRIER_DOMAIN}, calls from {NUMBER}",
        c.carrier.peer.addr
    ));
    tl.say("Each line is one SIP message as a peer sent or received it; time since start.");

    // (summary label, time taken) per step.
    let mut steps: Vec<(&str, Duration)> = Vec::new();
    let mut calls = 0u32;

    tl.say("\nStep 1: alice and bob register through the SBC (401 challenge, then 200)");
    let t0 = Instant::now();
    for user in ["alice", "bob"] {
        let ua = if user == "alice" {
            &mut c.alice
        } else {
            &mut c.bob
        };
        ua.register(password(user))
            .await
            .with_context(|| format!("step 1, {user}"))?;
    }
    let held = sbc.proxy.registrations.len();
    tl.note(&format!(
        "the SBC now holds {held} registered flows; the PBX keeps each binding's Path"
    ));
    anyhow::ensure!(
        held == 2,
        "step 1: the SBC holds {held} registrations, expected 2"
    );
    steps.push(("1 register alice and bob", t0.elapsed()));

    tl.say("\nStep 2: alice calls bob (the PBX reaches bob through his Path); alice hangs up");
    let t0 = Instant::now();
    let ruri = format!("sip:bob@{DOMAIN}");
    call(tl, &mut c.alice, &mut c.bob, &ruri, false)
        .await
        .context("step 2")?;
    calls += 1;
    steps.push(("2 alice calls bob", t0.elapsed()));

    tl.say(&format!(
        "\nStep 3: bob calls {NUMBER} (PBX -> {CARRIER_DOMAIN} -> trunk); the carrier hangs up"
    ));
    let t0 = Instant::now();
    let ruri = format!("sip:{NUMBER}@{DOMAIN}");
    call(tl, &mut c.bob, &mut c.carrier, &ruri, true)
        .await
        .context("step 3")?;
    calls += 1;
    steps.push(("3 bob calls the trunk", t0.elapsed()));

    tl.say("\nStep 4: the carrier calls alice (over the flow alice registered on); alice hangs up");
    let t0 = Instant::now();
    let ruri = format!("sip:alice@{DOMAIN}");
    call(tl, &mut c.carrier, &mut c.alice, &ruri, true)
        .await
        .context("step 4")?;
    calls += 1;
    steps.push(("4 the trunk calls alice", t0.elapsed()));

    tl.say("\nSummary");
    tl.say(&format!(
        "  registrations held by the SBC: {}",
        sbc.proxy.registrations.len()
    ));
    tl.say(&format!(
        "  calls completed: {calls} of 3 ({} s of talk each)",
        TALK.as_secs()
    ));
    for (label, took) in &steps {
        tl.say(&format!("  step {label:<25} {:>6.3} s", took.as_secs_f64()));
    }
    tl.say(&format!("  total{:>32.3} s", tl.elapsed().as_secs_f64()));
    tl.say("demo finished: every step passed");
    Ok(())
}
