//! `sbc demo`: the SBC in front of a PBX pair, with built-in phones and a carrier trunk, all on
//! loopback; it registers, calls with real RTP, kills the primary PBX, fails over, brings the
//! primary back and fails back by hand, printing one timeline line per step.
//!
//! It is the first command of the README, so it needs no files, no root and no network: the
//! config is embedded, every socket is on 127.0.0.0/8 (SIP ports picked by the OS, media in
//! 41000-41999, the admin endpoint on 127.0.0.1:9090 or any free port), and every wait is
//! bounded (2-3 s each, 20 s for the whole script) so that a broken SBC makes the demo fail
//! with the step that went wrong instead of hanging. It exits non-zero then, and prints the
//! SBC's own warnings, which it otherwise keeps to itself: a failover logs warnings by
//! design, and the demo's timeline already says what they say.
//!
//! Cast: the SBC on 127.0.0.1; PBX nodes pbx-a (primary, 127.0.0.2) and pbx-b (standby,
//! 127.0.0.4) in one pool; phones alice and bob on 127.0.0.1; the carrier's trunk on
//! 127.0.0.3. Distinct loopback addresses let the SBC tell them apart by source address
//! exactly as it would real peers.

mod digest;
mod pbx;
mod rtp;
mod script;
mod ua;
mod watch;
mod wire;

use anyhow::Context;
use parking_lot::Mutex;
use script::Script;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use ua::Ua;
use watch::HealthWatch;
use wire::{Peer, Timeline};

/// The phones' domain: what they register to and call in.
const DOMAIN: &str = "demo.pbx";
/// The carrier's domain: the PBX sends `+` numbers there and the SBC maps it to the trunk.
const CARRIER_DOMAIN: &str = "carrier.demo";
/// The external number bob calls and the carrier calls from.
const NUMBER: &str = "+15551234567";
/// Demo credentials, known to the phones and the registrar.
const USERS: &[(&str, &str)] = &[("alice", "alice-secret"), ("bob", "bob-secret")];
/// The pool and its nodes, as named in the embedded config.
const POOL: &str = "pbx";
const PRIMARY: &str = "pbx-a";
const STANDBY: &str = "pbx-b";
/// RTP per call and direction: 25 packets of 20 ms, half a second of audio.
const PACKETS: u32 = 25;
const PTIME: Duration = Duration::from_millis(20);
/// The media relay's port range (the demo checks that SDP points into it).
const MEDIA_PORTS: std::ops::RangeInclusive<u16> = 41000..=41999;
/// Probe settings: quick, so that a dead primary is seen within half a second.
const PROBE_INTERVAL_MS: u64 = 250;
const PROBE_FAILURES: u32 = 2;
/// The admin port tried first: `sbc status`'s default, so it works against a lingering demo.
const ADMIN_PORT: u16 = 9090;
/// The whole script's budget; every single wait is also bounded.
const BUDGET: Duration = Duration::from_secs(20);
/// How long the SBC may take to see a node change state (probe interval times failures or
/// successes, plus slack for a loaded machine).
const HEALTH_WAIT: Duration = Duration::from_secs(3);

/// `sbc demo`'s options.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Also print every SIP message the phones, the trunk and the PBXs send and receive
    /// (without the SBC's OPTIONS probes), and the SBC's info logs on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Keep everything running this many seconds after the script, to look at /metrics and
    /// /status or run `sbc status` (Ctrl-C ends it sooner).
    #[arg(long, value_name = "SECS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub linger: u64,
}

/// Runs the demo in its own runtime. Exits the process with status 1 if a step fails, after
/// printing the step; `Err` only if the runtime cannot start.
pub fn main(args: &Args) -> anyhow::Result<()> {
    let logs = init_tracing(args.verbose);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    if rt.block_on(run(args)).is_err() {
        // `run` printed what failed (DEMO FAILED: ...); add the SBC's warnings, and exit
        // without repeating the error.
        if let Some(logs) = logs {
            logs.dump();
        }
        drop(rt);
        std::process::exit(1);
    }
    Ok(())
}

/// The SBC's log lines, kept in memory until the demo knows whether it failed.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

/// Enough for every warning a failed run produces; later lines are dropped.
const LOG_CAP: usize = 64 * 1024;

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = self.0.lock();
        let room = LOG_CAP.saturating_sub(b.len());
        b.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn dump(&self) {
        let b = self.0.lock();
        if !b.is_empty() {
            eprintln!("\nThe SBC's warnings during the demo:");
            eprint!("{}", String::from_utf8_lossy(&b));
        }
    }
}

/// `RUST_LOG` wins; else `--verbose` shows the SBC's info logs on stderr; else warnings are
/// captured and shown only if the demo fails (see the module docs).
fn init_tracing(verbose: bool) -> Option<LogBuffer> {
    use tracing_subscriber::EnvFilter;
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        let _ = fmt.with_env_filter(filter).try_init();
        return None;
    }
    if verbose {
        let _ = fmt.with_env_filter(EnvFilter::new("info")).try_init();
        return None;
    }
    let buf = LogBuffer::default();
    let writer = buf.clone();
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(EnvFilter::new("warn"))
        .with_writer(move || writer.clone())
        .try_init();
    Some(buf)
}

/// The SBC configuration, as a user would write it (see config/examples/minimal.toml and
/// docs/config.md).
fn config_text(a: SocketAddr, b: SocketAddr, trunk: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"[general]
name = "sbc-demo"

[[listen]]
transport = "udp"
addr = "127.0.0.1:0"

[admin]
listen = "{admin}"

[media]
port_min = {port_min}
port_max = {port_max}
workers = 1

[[pool]]
name = "{POOL}"
failback = "manual"

  [pool.probe]
  interval_ms = {PROBE_INTERVAL_MS}
  timeout_ms = 200
  failures = {PROBE_FAILURES}
  successes = 2
  start_grace_secs = 1

  [[pool.node]]
  name = "{PRIMARY}"
  address = "{a}"

  [[pool.node]]
  name = "{STANDBY}"
  address = "{b}"

[[trunk]]
name = "carrier"
sources = ["{trunk_ip}"]
address = "{trunk}"
domains = ["{CARRIER_DOMAIN}"]

[phones]
sources = ["127.0.0.0/8"]
domains = ["{DOMAIN}"]
"#,
        port_min = MEDIA_PORTS.start(),
        port_max = MEDIA_PORTS.end(),
        trunk_ip = trunk.ip()
    )
}

async fn bind(addr: SocketAddr, who: &str) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind(addr).await.with_context(|| {
        format!("binding {who} on {addr} (the demo needs the loopback range 127.0.0.0/8, as Linux provides)")
    })
}

fn any_port(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

/// Starts the SBC with its admin endpoint on [`ADMIN_PORT`], or on any free port if that one
/// is taken (another SBC, another demo).
async fn start_sbc(a: SocketAddr, b: SocketAddr, trunk: SocketAddr) -> anyhow::Result<sbc::Sbc> {
    let opts = sbc::StartOptions { admin: true };
    let mut last = None;
    for port in [ADMIN_PORT, 0] {
        let admin = SocketAddr::from(([127, 0, 0, 1], port));
        let text = config_text(a, b, trunk, admin);
        let cfg = sbc_config::parse(&text, Path::new("<embedded demo>"))
            .map_err(|e| anyhow::anyhow!("the embedded demo config: {e}"))?;
        match sbc::Sbc::start_with(&cfg, opts.clone()).await {
            Ok(sbc) => return Ok(sbc),
            Err(e @ sbc::server::StartError::Admin(sbc::admin::AdminError::Bind { .. })) => {
                last = Some(e);
            }
            Err(e) => return Err(e).context("starting the SBC"),
        }
    }
    Err(anyhow::anyhow!("starting the SBC: {last:?}"))
}

/// Runs the demo; `Err` if any step fails.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let tl = Timeline::new(args.verbose);
    let a_sock = bind(any_port([127, 0, 0, 2]), "PBX pbx-a").await?;
    let b_sock = bind(any_port([127, 0, 0, 4]), "PBX pbx-b").await?;
    let trunk_sock = bind(any_port([127, 0, 0, 3]), "the carrier trunk").await?;
    let a_addr = a_sock.local_addr()?;
    let b_addr = b_sock.local_addr()?;
    let trunk_addr = trunk_sock.local_addr()?;

    let sbc = start_sbc(a_addr, b_addr, trunk_addr).await?;
    let (Some(sbc_addr), Some(admin)) = (sbc.addr(sbc_sip::Transport::Udp), sbc.admin_addr())
    else {
        sbc.shutdown();
        anyhow::bail!("the SBC has no UDP listener or no admin endpoint");
    };
    let result = async {
        let cast = Cast::new(&tl, sbc_addr, [a_sock, b_sock], trunk_sock).await?;
        let watch = HealthWatch::start(sbc.health.clone(), tl.clone());
        let mut script = Script {
            tl: &tl,
            sbc: &sbc,
            admin: format!("http://{admin}"),
            c: cast,
            watch,
            calls: Vec::new(),
        };
        let outcome = tokio::time::timeout(BUDGET, script.run())
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the demo did not finish within {} s",
                    BUDGET.as_secs()
                ))
            });
        if outcome.is_ok() && args.linger > 0 {
            linger(&tl, &script.admin, args.linger).await;
        }
        outcome
    }
    .await;
    sbc.shutdown();
    if let Err(e) = &result {
        tl.say(&format!("\nDEMO FAILED: {e:#}"));
    }
    result
}

async fn linger(tl: &Timeline, admin: &str, secs: u64) {
    tl.say(&format!(
        "\nStill running for {secs} s (Ctrl-C ends it): curl {admin}/metrics, curl {admin}/status, \
         or sbc status --admin {admin}"
    ));
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// One built-in PBX node, which the script can kill and restart on the same address.
struct PbxNode {
    name: &'static str,
    addr: SocketAddr,
    counters: Arc<pbx::Counters>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PbxNode {
    fn spawn(
        &mut self,
        tl: &Arc<Timeline>,
        sbc: SocketAddr,
        sock: UdpSocket,
    ) -> anyhow::Result<()> {
        let peer = Peer::new(self.name, sock, sbc, tl.clone())?;
        let pbx = pbx::Pbx::new(peer, DOMAIN, CARRIER_DOMAIN, USERS, self.counters.clone());
        self.task = Some(tokio::spawn(pbx.run()));
        Ok(())
    }

    /// Stops the PBX: its task ends and its socket closes, so probes and requests to it meet
    /// a closed port, as with a crashed PBX process.
    async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Starts it again on the same address, with an empty registrar (a restarted process).
    /// The old socket closes when its reader task has been dropped, which is asynchronous,
    /// so binding is retried for up to a second.
    async fn restart(&mut self, tl: &Arc<Timeline>, sbc: SocketAddr) -> anyhow::Result<()> {
        let mut tries = 0;
        let sock = loop {
            match UdpSocket::bind(self.addr).await {
                Ok(s) => break s,
                Err(e) if tries < 40 => {
                    tries += 1;
                    tracing::debug!(addr = %self.addr, error = %e, "rebinding the PBX, retrying");
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("restarting {} on {}", self.name, self.addr))
                }
            }
        };
        self.spawn(tl, sbc, sock)
    }
}

impl Drop for PbxNode {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Everyone but the SBC.
struct Cast {
    /// Primary, then standby.
    pbx: [PbxNode; 2],
    alice: Ua,
    bob: Ua,
    carrier: Ua,
    sbc_addr: SocketAddr,
}

impl Cast {
    async fn new(
        tl: &Arc<Timeline>,
        sbc: SocketAddr,
        pbx_socks: [UdpSocket; 2],
        trunk: UdpSocket,
    ) -> anyhow::Result<Cast> {
        let mut nodes = Vec::with_capacity(2);
        for (name, sock) in [PRIMARY, STANDBY].into_iter().zip(pbx_socks) {
            let mut node = PbxNode {
                name,
                addr: sock.local_addr()?,
                counters: Arc::default(),
                task: None,
            };
            node.spawn(tl, sbc, sock)?;
            nodes.push(node);
        }
        let pbx: [PbxNode; 2] = nodes
            .try_into()
            .map_err(|_| anyhow::anyhow!("expected two PBX nodes"))?;
        let ua = |name: &'static str, user, domain, sock: UdpSocket, rtp: UdpSocket| {
            let rtp_addr = rtp.local_addr()?;
            anyhow::Ok(Ua {
                peer: Peer::new(name, sock, sbc, tl.clone())?,
                user,
                domain,
                rtp: Arc::new(rtp),
                rtp_addr,
            })
        };
        let phone = [127, 0, 0, 1];
        let alice = ua(
            "alice",
            "alice",
            DOMAIN,
            bind(any_port(phone), "alice").await?,
            bind(any_port(phone), "alice's RTP").await?,
        )?;
        let bob = ua(
            "bob",
            "bob",
            DOMAIN,
            bind(any_port(phone), "bob").await?,
            bind(any_port(phone), "bob's RTP").await?,
        )?;
        let carrier = ua(
            "carrier",
            NUMBER,
            CARRIER_DOMAIN,
            trunk,
            bind(any_port([127, 0, 0, 3]), "the trunk's RTP").await?,
        )?;
        Ok(Cast {
            pbx,
            alice,
            bob,
            carrier,
            sbc_addr: sbc,
        })
    }
}

/// One plain-HTTP request to the admin endpoint on a blocking thread (the CLI's client,
/// ureq, is blocking); bounded by [`wire::WAIT`].
async fn http(method: &'static str, url: String) -> anyhow::Result<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(wire::WAIT))
            .build()
            .into();
        let result = if method == "POST" {
            agent.post(&url).send_empty()
        } else {
            agent.get(&url).call()
        };
        let mut resp = result.with_context(|| format!("{method} {url}"))?;
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        anyhow::Ok((code, body))
    })
    .await
    .context("the HTTP client thread")?
}
