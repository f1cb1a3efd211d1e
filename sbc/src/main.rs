//! The `sbc` command: run the SBC from a config file, check a config, run the demo, or talk
//! to a running SBC's admin endpoint (status, failover, failback, maintenance).

mod demo;

use anyhow::Context;

/// mimalloc instead of glibc malloc: every SIP transaction allocates and frees a few buffers
/// (the received datagram, the forwarded copy, responses kept for retransmission) across
/// threads; glibc's arena free path (consolidation, unlinking) was a quarter of the CPU the
/// SBC spent retiring transactions. Measured in benchmarks/README.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};
use sbc::admin::unix_now;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sbc",
    version,
    about = "SIP session border controller for a PBX pair"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the SBC with a TOML config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without starting; exits non-zero with file:line on error.
    CheckConfig { file: PathBuf },
    /// Run the SBC with built-in phones, trunk and a PBX pair on loopback: register, call
    /// with media, kill the primary, fail over, fail back; prints a timeline.
    Demo(demo::Args),
    /// Show a running SBC's pools, nodes and counters (GET /status).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Move a pool to its next ready node now; automatic failback will not undo it.
    Failover {
        /// The pool's name, as in the config.
        pool: String,
        /// Why, for the log line and the webhooks (default "manual").
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Move a pool back to its highest-priority node that is up.
    Failback {
        /// The pool's name, as in the config.
        pool: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain the SBC: new calls get 503 while the calls in progress end; then it exits.
    Drain {
        /// Stop anyway after this long [default: general.drain_secs, or 600]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Call off the drain in progress: new calls are taken again.
        #[arg(long, conflicts_with = "timeout")]
        cancel: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Put a PBX node into maintenance (never chosen; traffic moves off it) or take it out.
    Maintenance {
        /// The node's name, as in the config.
        node: String,
        state: OnOff,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Where the admin endpoint is and how to authenticate. Flags win over `--config`.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin endpoint base URL [default: http://127.0.0.1:9090, or admin.listen from --config]
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// Bearer token (admin.token) [default: admin.token from --config]
    #[arg(long, env = "SBC_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Take the admin address and token from this config file.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Status { admin, json } => client_command(&admin, |c| c.status(json)),
        Cmd::Failover {
            pool,
            reason,
            admin,
        } => client_command(&admin, |c| c.failover(&pool, reason.as_deref())),
        Cmd::Failback { pool, admin } => client_command(&admin, |c| c.failback(&pool)),
        Cmd::Drain {
            timeout,
            cancel,
            admin,
        } => client_command(&admin, |c| c.drain(timeout, cancel)),
        Cmd::Maintenance { node, state, admin } => {
            client_command(&admin, |c| c.maintenance(&node, matches!(state, OnOff::On)))
        }
        Cmd::CheckConfig { file } => match sbc_config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listeners, {} pools, {} trunks)",
                    file.display(),
                    cfg.listen.len(),
                    cfg.pools.len(),
                    cfg.trunks.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        },
        Cmd::Run { config } => {
            init_tracing("info");
            if !sbc::memory::disable_transparent_huge_pages() {
                tracing::warn!(
                    "could not turn transparent huge pages off; RSS may grow in 2 MiB steps"
                );
            }
            let cfg = sbc_config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            check_descriptor_limit(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let opts = sbc::StartOptions { admin: true };
                let sbc = sbc::Sbc::start_with(&cfg, opts)
                    .await
                    .context("starting the SBC")?;
                // Hot reload: POST /reload, SIGHUP, and edits of the file. A trigger that
                // cannot be set up is worth a warning, not a refusal to serve.
                sbc.enable_reload_api();
                if let Err(e) = sbc.reload_on_sighup() {
                    tracing::warn!(error = %e, "reload on SIGHUP is off");
                }
                if let Err(e) = sbc.reload_on_file_change(Duration::from_millis(500)) {
                    tracing::warn!(error = %e, "reload on config file change is off");
                }
                // Before "running": a SIGTERM from then on must find our handler, not the
                // default action that kills the process without a drain.
                let mut signals = Signals::install();
                tracing::info!(name = %cfg.general.name, "sbc running");
                run_until_stopped(&sbc, cfg.general.drain, &mut signals).await;
                tracing::info!("shutting down");
                sbc.shutdown();
                anyhow::Ok(())
            })
        }
        Cmd::Demo(args) => demo::main(&args),
    }
}

/// Raises the soft descriptor limit to the hard one and warns when even that is short of what
/// the configuration may need (`sbc::limits`): better a line at start than 503s at peak.
fn check_descriptor_limit(cfg: &sbc_config::Config) {
    let limit = match sbc::limits::raise_nofile_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(
                    from = before,
                    to = after,
                    "descriptor limit raised to the hard limit"
                );
            }
            after
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the descriptor limit");
            return;
        }
    };
    let needed = sbc::limits::descriptors_needed(cfg);
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "descriptor limit (RLIMIT_NOFILE) is below what the media port range and signalling \
             may need: calls will get 503 while ports are still free; raise the hard limit \
             (systemd LimitNOFILE=, ulimit -Hn) or narrow [media] port_min..port_max"
        );
    }
}

/// Serves until a drain the operator started ends, or a shutdown signal: with
/// `general.drain_secs` set, that signal drains first (a second signal stops at once).
async fn run_until_stopped(sbc: &sbc::Sbc, drain_for: Duration, signals: &mut Signals) {
    tokio::select! {
        () = signals.next() => {}
        () = sbc.drain.finished() => return,
    }
    if !drain_for.is_zero() {
        sbc.drain.start(drain_for, true);
    } else if sbc.drain.report().is_none() {
        return;
    }
    tracing::info!("draining before shutdown; a second signal stops at once");
    tokio::select! {
        () = signals.next() => tracing::info!("second signal: stopping now"),
        () = sbc.drain.finished() => {}
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed (tokio registers a
/// handler when the stream is made, not when it is first awaited).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let caught = |kind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, signal = name, "cannot catch the signal");
                    None
                }
            };
            Signals {
                term: caught(SignalKind::terminate(), "SIGTERM"),
                int: caught(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = one(&mut self.term) => {}
                () = one(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs an admin command; on failure prints one clear line and exits 1.
fn client_command(
    args: &AdminArgs,
    run: impl FnOnce(&AdminClient) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let result = AdminClient::new(args).and_then(|c| run(&c));
    if let Err(e) = result {
        eprintln!("sbc: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// A blocking client of the admin endpoint (see `sbc::admin`).
struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// The response of one admin request: status code and body.
struct Answer {
    code: u16,
    body: String,
}

impl AdminClient {
    fn new(args: &AdminArgs) -> anyhow::Result<AdminClient> {
        let from_config = match &args.config {
            Some(path) => {
                let cfg = sbc_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                Some(cfg.admin)
            }
            None => None,
        };
        let base = match (&args.admin, &from_config) {
            (Some(url), _) => url.clone(),
            (None, Some(a)) => base_url(a.listen),
            (None, None) => base_url(sbc_config::Admin::default().listen),
        };
        if !base.starts_with("http://") {
            anyhow::bail!(
                "--admin {base}: expected an http:// URL (the admin endpoint serves plain HTTP)"
            );
        }
        let token = args
            .token
            .clone()
            .or_else(|| from_config.and_then(|a| a.token));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    fn request(&self, method: &str, path: &str) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_empty()
            }
        };
        let mut resp = result.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the admin endpoint at {}: {e} (is the SBC running? point --admin or --config at it)",
                self.base
            )
        })?;
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {method} {url}"))?;
        if !(200..300).contains(&code) {
            let reason = resp.status().canonical_reason().unwrap_or("");
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.trim().to_string());
            let hint = if code == 401 {
                " (pass --token, set SBC_ADMIN_TOKEN, or --config with admin.token)"
            } else {
                ""
            };
            anyhow::bail!("{method} {path}: {code} {reason}: {message}{hint}");
        }
        Ok(Answer { code, body })
    }

    fn status(&self, json: bool) -> anyhow::Result<()> {
        let a = self.request("GET", "/status")?;
        if json {
            print!("{}", a.body);
            return Ok(());
        }
        let st: sbc::admin::StatusReport =
            serde_json::from_str(&a.body).context("the /status answer is not a status report")?;
        println!(
            "{} (sbc {}), config generation {}, up {}",
            st.name,
            st.version,
            st.generation,
            human(st.uptime_seconds)
        );
        println!(
            "registrations {}  transactions {}  connections {}  calls {}  media sessions {}",
            st.registrations, st.transactions, st.connections, st.calls, st.media_sessions
        );
        let e = st.ended_calls;
        if e.one_way + e.no_media > 0 {
            println!(
                "ended calls: {} with media both ways, {} one way, {} without media",
                e.both_ways, e.one_way, e.no_media
            );
        }
        for t in &st.trunks {
            let limit = t.max_calls.map_or(String::new(), |m| format!(" of {m}"));
            println!("trunk {}: {} call(s){limit}", t.name, t.calls);
        }
        if let Some(d) = &st.drain {
            println!(
                "DRAINING{}: new calls get 503; {} call(s) left; stops in {} at the latest",
                if d.shutdown { " for shutdown" } else { "" },
                d.calls,
                human(d.deadline_unix.saturating_sub(unix_now()))
            );
        }
        for p in &st.pools {
            let pin = if p.pinned {
                ", pinned by a manual failover"
            } else {
                ""
            };
            println!(
                "pool {}: active {} (failback {}{pin})",
                p.name,
                p.active.as_deref().unwrap_or("-"),
                p.failback
            );
            let width = p.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
            for n in &p.nodes {
                println!(
                    "  {} {:width$}  {:<24} {:<11} for {}",
                    if n.active { '*' } else { ' ' },
                    n.name,
                    n.address,
                    n.state,
                    human(n.since_seconds_ago),
                );
            }
        }
        Ok(())
    }

    fn failover(&self, pool: &str, reason: Option<&str>) -> anyhow::Result<()> {
        let mut path = format!("/pools/{}/failover", encode(pool));
        if let Some(r) = reason {
            path.push_str(&format!("?reason={}", encode(r)));
        }
        self.switch(&path, pool)
    }

    fn failback(&self, pool: &str) -> anyhow::Result<()> {
        self.switch(&format!("/pools/{}/failback", encode(pool)), pool)
    }

    fn switch(&self, path: &str, pool: &str) -> anyhow::Result<()> {
        let a = self.request("POST", path)?;
        let r: sbc::admin::SwitchReport = serde_json::from_str(&a.body)
            .with_context(|| format!("unexpected answer ({}): {}", a.code, a.body.trim()))?;
        let active = r.active.as_deref().unwrap_or("-");
        if r.changed {
            println!(
                "pool {pool}: active node {} -> {active}",
                r.previous.as_deref().unwrap_or("-")
            );
        } else {
            println!("pool {pool}: active node stays {active} (nothing to do)");
        }
        Ok(())
    }

    fn drain(&self, timeout: Option<u64>, cancel: bool) -> anyhow::Result<()> {
        if cancel {
            self.request("POST", "/drain?state=off")?;
            println!("drain called off: new calls are taken again");
            return Ok(());
        }
        let path = match timeout {
            Some(t) => format!("/drain?timeout_secs={t}"),
            None => "/drain".to_string(),
        };
        let a = self.request("POST", &path)?;
        let r: sbc::drain::DrainReport = serde_json::from_str(&a.body)
            .with_context(|| format!("unexpected answer ({}): {}", a.code, a.body.trim()))?;
        let left = r.deadline_unix.saturating_sub(unix_now());
        println!(
            "draining: new calls get 503; {} call(s) in progress; the SBC exits when they end, or in {} at the latest",
            r.calls,
            human(left)
        );
        Ok(())
    }

    fn maintenance(&self, node: &str, on: bool) -> anyhow::Result<()> {
        let state = if on { "on" } else { "off" };
        let a = self.request(
            "POST",
            &format!("/nodes/{}/maintenance?state={state}", encode(node)),
        )?;
        let r: sbc::admin::MaintenanceReport = serde_json::from_str(&a.body)
            .with_context(|| format!("unexpected answer ({}): {}", a.code, a.body.trim()))?;
        println!(
            "node {} (pool {}) is {}; active node of the pool: {}",
            r.node,
            r.pool,
            r.state,
            r.active.as_deref().unwrap_or("-")
        );
        Ok(())
    }
}

/// `http://ADDR` for a listen address; a wildcard address is reached over loopback.
fn base_url(listen: std::net::SocketAddr) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, listen.port()))
}

/// Percent-encodes everything but unreserved URL characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// 3725 -> "1h2m5s".
fn human(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m{s}s"),
        _ => format!("{d}d{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_url_from_listen_address() {
        assert_eq!(
            base_url("0.0.0.0:9090".parse().expect("addr")),
            "http://127.0.0.1:9090"
        );
        assert_eq!(
            base_url("[::]:9091".parse().expect("addr")),
            "http://[::1]:9091"
        );
        assert_eq!(
            base_url("10.1.2.3:80".parse().expect("addr")),
            "http://10.1.2.3:80"
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("pbx-a.1_x~"), "pbx-a.1_x~");
        assert_eq!(encode("a b/c?&é"), "a%20b%2Fc%3F%26%C3%A9");
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(5), "5s");
        assert_eq!(human(65), "1m5s");
        assert_eq!(human(3725), "1h2m5s");
        assert_eq!(human(90061), "1d1h1m");
    }
}
