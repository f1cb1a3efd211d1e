//! Hot reload of the configuration file: SIGHUP, a change of the file, or `POST /reload`.
//!
//! A reload re-reads `cfg.source` and prepares everything off to the side first: the whole
//! file is validated, the route table built and every TLS listener's certificate and key
//! loaded (and checked to match). Any error there leaves the running configuration untouched
//! and is reported with the file (and line, for what the config crate checks). Only then is
//! the new state swapped in, in one step with no await in between: the route table, the
//! health monitor's pools (nodes whose identity is unchanged keep their health and each pool
//! keeps its active node, so a reload never revives a dead primary nor moves traffic by
//! itself) and the listeners' certificates (new TLS connections get the new one; established
//! connections keep theirs). Transactions in flight finish with the destinations they chose;
//! calls and registrations are not touched.
//!
//! What cannot change while running is read, compared and reported in
//! [`ReloadReport::restart_required`] (with a warning in the log), while the rest of the file
//! is applied: listeners added, removed or re-addressed (sockets are bound once), `general`
//! (name, flow-token secret), `limits`, `timers`, `admin` and `media` (the relay keeps its
//! port range and timeouts; it is never restarted by a reload), and the CA files trusted for
//! outbound TLS (`tls_ca` of nodes and trunks). Those take a restart.
//!
//! Reloads are serialized: a trigger that fires during a reload waits for it and then reloads
//! again.

use crate::metrics::CertExpiry;
use crate::proxy::Proxy;
use crate::server::HealthSelector;
use crate::transport::{self, ServerCert, TlsError};
use crate::Sbc;
use parking_lot::RwLock;
use sbc_config::{Config, Listener};
use sbc_health::HealthMonitor;
use sbc_routing::RouteTable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a reload was refused (the running configuration stays), or a trigger could not be set
/// up.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or validate; shown as `file:line:column: key: message`.
    #[error(transparent)]
    Config(#[from] sbc_config::ConfigError),
    /// A TLS listener's certificate or key does not load.
    #[error(transparent)]
    Certificate(Box<CertificateError>),
    /// The blocking part of the reload (file and certificate reads) did not finish.
    #[error("reload task failed: {0}")]
    Task(String),
    /// The SIGHUP handler could not be installed.
    #[error("installing the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// The configuration file's directory cannot be watched.
    #[error("watching {}: {source}", path.display())]
    Watch {
        /// The directory.
        path: PathBuf,
        /// What the watcher said.
        source: notify::Error,
    },
}

/// A TLS listener's certificate or key that does not load (bad PEM, a key that does not
/// match the certificate): the reload is refused rather than every later handshake failing.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: listen[{index}] ({addr}): {source}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct CertificateError {
    /// The configuration file.
    pub file: PathBuf,
    /// The line of the listener's `cert` key, when it can be found.
    pub line: Option<usize>,
    /// The listener's position in the file.
    pub index: usize,
    /// Its configured address.
    pub addr: SocketAddr,
    /// What loading said.
    pub source: TlsError,
}

/// What a successful reload did, for the log, `POST /reload` and tests. Names of nodes are
/// `pool/node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The configuration generation now running.
    pub generation: u64,
    /// The file that was read.
    pub file: String,
    /// Pools that appeared.
    pub pools_added: Vec<String>,
    /// Pools that went away.
    pub pools_removed: Vec<String>,
    /// Pools kept whose settings (probe, failback, timeouts, webhooks, node settings) changed.
    pub pools_changed: Vec<String>,
    /// Nodes that appeared, or whose address or transport changed (they start with no health).
    pub nodes_added: Vec<String>,
    /// Nodes that went away, or whose address or transport changed.
    pub nodes_removed: Vec<String>,
    /// Trunks that appeared.
    pub trunks_added: Vec<String>,
    /// Trunks that went away.
    pub trunks_removed: Vec<String>,
    /// Trunks kept whose settings changed.
    pub trunks_changed: Vec<String>,
    /// The `[phones]` section changed.
    pub phones_changed: bool,
    /// TLS listeners (bound address) whose certificate and key were read again.
    pub certificates: Vec<String>,
    /// Changes in the file that were not applied and take a restart.
    pub restart_required: Vec<String>,
}

impl ReloadReport {
    /// One line of what changed, for the log.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let mut list = |label: &str, items: &[String]| {
            if !items.is_empty() {
                parts.push(format!("{label} [{}]", items.join(", ")));
            }
        };
        list("pools added", &self.pools_added);
        list("pools removed", &self.pools_removed);
        list("pools changed", &self.pools_changed);
        list("nodes added", &self.nodes_added);
        list("nodes removed", &self.nodes_removed);
        list("trunks added", &self.trunks_added);
        list("trunks removed", &self.trunks_removed);
        list("trunks changed", &self.trunks_changed);
        list("certificates reloaded", &self.certificates);
        list("NOT applied, restart needed", &self.restart_required);
        if self.phones_changed {
            parts.push("phones changed".to_string());
        }
        if parts.is_empty() {
            "no routing change".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// A listener as it runs: sockets are bound once, only the certificate can change.
#[derive(Debug, Clone)]
pub(crate) struct RunningListener {
    /// As configured (matched against the new file by transport and address).
    pub transport: sbc_config::Transport,
    pub configured: SocketAddr,
    /// As bound (port 0 resolved): the label of the certificate expiry gauge.
    pub bound: SocketAddr,
    /// The certificate a TLS listener serves.
    pub cert: Option<Arc<ServerCert>>,
}

/// What a reload needs from the running SBC. Shared by the triggers.
pub struct Reloader {
    /// The configuration in effect (what was applied: the sections that take a restart keep
    /// their start-up values). Its lock serializes reloads.
    running: tokio::sync::Mutex<Config>,
    source: PathBuf,
    listeners: Vec<RunningListener>,
    /// `tls_ca` files trusted for outbound TLS at start (not reloadable).
    trust: BTreeSet<PathBuf>,
    proxy: Arc<Proxy>,
    health: Arc<HealthMonitor>,
    selector: Arc<HealthSelector>,
    generation: Arc<AtomicU64>,
    certs: Arc<RwLock<Vec<CertExpiry>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.source)
            .finish()
    }
}

/// Everything a reload swaps in, built before anything is touched.
struct Prepared {
    routes: RouteTable,
    loaded: Config,
    effective: Config,
    /// (index into the running listeners, new certificate, its file).
    certs: Vec<(usize, Arc<rustls::sign::CertifiedKey>, PathBuf)>,
    report: ReloadReport,
}

/// The `tls_ca` files of nodes and trunks: the outbound TLS trust, fixed at start.
pub(crate) fn trust_roots(cfg: &Config) -> BTreeSet<PathBuf> {
    cfg.pools
        .iter()
        .flat_map(|p| p.nodes.iter().filter_map(|n| n.tls_ca.clone()))
        .chain(cfg.trunks.iter().filter_map(|t| t.tls_ca.clone()))
        .collect()
}

impl Reloader {
    pub(crate) fn new(
        cfg: &Config,
        listeners: Vec<RunningListener>,
        proxy: Arc<Proxy>,
        health: Arc<HealthMonitor>,
        selector: Arc<HealthSelector>,
        generation: Arc<AtomicU64>,
        certs: Arc<RwLock<Vec<CertExpiry>>>,
    ) -> Reloader {
        Reloader {
            running: tokio::sync::Mutex::new(cfg.clone()),
            source: cfg.source.clone(),
            trust: trust_roots(cfg),
            listeners,
            proxy,
            health,
            selector,
            generation,
            certs,
        }
    }

    /// The configuration file reloads read.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Re-reads the file and swaps the new configuration in, or leaves the running one in
    /// place and returns why. Counts `sbc_reloads_total` and logs one line either way.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut running = self.running.lock().await;
        let current = running.clone();
        let source = self.source.clone();
        let listeners = self.listeners.clone();
        let trust = self.trust.clone();
        // Reads files and may resolve names: off the runtime's workers.
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&source, &current, &listeners, &trust))
                .await
                .map_err(|e| ReloadError::Task(e.to_string()))
                .and_then(|r| r);
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                crate::metrics::reload_result(false);
                tracing::error!(file = %self.source.display(), error = %e, "config reload failed; the running config stays: {e}");
                return Err(e);
            }
        };
        let Prepared {
            routes,
            loaded,
            effective,
            certs,
            mut report,
        } = prepared;
        // The swap: no await from here on.
        let renumbered = renumbered_nodes(&running, &loaded);
        if !renumbered.is_empty() {
            self.selector
                .ignore_failures(renumbered, Instant::now() + transaction_lifetime(&running));
        }
        self.health.reload(&loaded);
        if let Some(limiter) = self.proxy.limiter() {
            limiter.reconfigure(&effective, &routes);
        }
        self.proxy.set_routes(routes);
        let mut expiries = Vec::new();
        for (i, key, path) in certs {
            let Some(l) = self.listeners.get(i) else {
                continue;
            };
            if let Some(cert) = &l.cert {
                cert.replace(key);
            }
            match crate::metrics::certificate_not_after(&path) {
                Ok(not_after) => expiries.push(CertExpiry {
                    listener: l.bound.to_string(),
                    not_after,
                }),
                Err(e) => {
                    tracing::warn!(listener = %l.bound, error = %e, "cannot read the certificate's expiry")
                }
            }
        }
        {
            let mut published = self.certs.write();
            for e in expiries {
                e.publish();
                match published.iter_mut().find(|c| c.listener == e.listener) {
                    Some(slot) => *slot = e,
                    None => published.push(e),
                }
            }
        }
        *running = effective;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        crate::metrics::set_generation(generation);
        crate::metrics::reload_result(true);
        report.generation = generation;
        tracing::info!(
            file = %self.source.display(),
            generation,
            "config reloaded (generation {generation}): {}",
            report.summary()
        );
        for what in &report.restart_required {
            tracing::warn!(file = %self.source.display(), change = %what, "config change not applied until a restart: {what}");
        }
        Ok(report)
    }
}

/// Loads and checks the new file and builds everything the swap needs.
fn prepare(
    source: &Path,
    running: &Config,
    listeners: &[RunningListener],
    trust: &BTreeSet<PathBuf>,
) -> Result<Prepared, ReloadError> {
    let loaded = sbc_config::load(source)?;
    let mut certs = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        if l.cert.is_none() {
            continue;
        }
        let Some((j, nl)) = loaded
            .listen
            .iter()
            .enumerate()
            .find(|(_, n)| same_listener(l.transport, l.configured, n))
        else {
            continue;
        };
        let (Some(cert), Some(key)) = (&nl.cert, &nl.key) else {
            continue;
        };
        let certified = transport::load_certified_key(cert, key).map_err(|e| {
            ReloadError::Certificate(Box::new(CertificateError {
                file: source.to_path_buf(),
                line: listener_cert_line(source, j),
                index: j,
                addr: nl.addr,
                source: e,
            }))
        })?;
        certs.push((i, certified, cert.clone()));
    }
    let routes = RouteTable::new(&loaded);
    let effective = effective(running, &loaded);
    let mut report = diff(running, &loaded);
    report.file = source.display().to_string();
    report.certificates = certs
        .iter()
        .filter_map(|(i, _, _)| listeners.get(*i))
        .map(|l| l.bound.to_string())
        .collect();
    report.restart_required = restart_required(&effective, &loaded, trust);
    Ok(Prepared {
        routes,
        loaded,
        effective,
        certs,
        report,
    })
}

fn same_listener(transport: sbc_config::Transport, addr: SocketAddr, l: &Listener) -> bool {
    l.transport == transport && l.addr == addr
}

/// What is in effect after applying `new` over `running`: the reloadable sections from `new`,
/// the rest as running (so the next reload still reports them as needing a restart).
/// Starts from `running`, so a section added to the config later is not applied (nor
/// reported as applied) until it is made reloadable here: [`restart_required`] reports it.
fn effective(running: &Config, new: &Config) -> Config {
    let mut e = running.clone();
    e.pools = new.pools.clone();
    e.trunks = new.trunks.clone();
    e.phones = new.phones.clone();
    // Rates, bursts, block time, scanners, exemptions: the limiter takes new settings in place
    // and keeps what it knows of each source (its buckets, its blocks).
    e.ratelimit = new.ratelimit.clone();
    e.listen = running
        .listen
        .iter()
        .map(|l| {
            match new
                .listen
                .iter()
                .find(|n| same_listener(l.transport, l.addr, n))
            {
                Some(n) => Listener {
                    cert: n.cert.clone(),
                    key: n.key.clone(),
                    ..l.clone()
                },
                None => l.clone(),
            }
        })
        .collect();
    e
}

/// The differences between what runs after the reload and the file: what takes a restart.
fn restart_required(effective: &Config, new: &Config, trust: &BTreeSet<PathBuf>) -> Vec<String> {
    let mut out = Vec::new();
    for l in &new.listen {
        match effective
            .listen
            .iter()
            .find(|e| same_listener(l.transport, l.addr, e))
        {
            None => out.push(format!("listen: new {} listener {}", l.transport, l.addr)),
            Some(e) if e.advertise != l.advertise || e.side != l.side => out.push(format!(
                "listen: {} listener {} advertise/side",
                l.transport, l.addr
            )),
            Some(_) => {}
        }
    }
    for e in &effective.listen {
        if !new
            .listen
            .iter()
            .any(|l| same_listener(e.transport, e.addr, l))
        {
            out.push(format!(
                "listen: {} listener {} removed (still serving)",
                e.transport, e.addr
            ));
        }
    }
    let sections = [
        ("general", effective.general != new.general),
        ("limits", effective.limits != new.limits),
        ("timers", effective.timers != new.timers),
        ("admin", effective.admin != new.admin),
        ("media", effective.media != new.media),
        ("tls_ca (outbound TLS trust)", &trust_roots(new) != trust),
    ];
    out.extend(
        sections
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| name.to_string()),
    );
    // Anything else that differs is a section this module does not know yet.
    let mut rest = effective.clone();
    rest.listen = new.listen.clone();
    rest.general = new.general.clone();
    rest.limits = new.limits.clone();
    rest.timers = new.timers.clone();
    rest.admin = new.admin.clone();
    rest.media = new.media.clone();
    if rest != *new {
        out.push("other settings".to_string());
    }
    out
}

/// What makes a node the same across a reload: pool, name, address, transport.
type NodeId = (String, String, SocketAddr, &'static str);

/// Every node's identity, in global index order.
fn node_ids(c: &Config) -> Vec<NodeId> {
    c.pools
        .iter()
        .flat_map(|p| {
            p.nodes.iter().map(|n| {
                (
                    p.name.clone(),
                    n.name.clone(),
                    n.address,
                    n.transport.as_str(),
                )
            })
        })
        .collect()
}

/// What changed in the reloadable sections.
fn diff(old: &Config, new: &Config) -> ReloadReport {
    let mut r = ReloadReport::default();
    for p in &new.pools {
        match old.pools.iter().find(|o| o.name == p.name) {
            None => r.pools_added.push(p.name.clone()),
            Some(o) if o != p => r.pools_changed.push(p.name.clone()),
            Some(_) => {}
        }
    }
    r.pools_removed = old
        .pools
        .iter()
        .filter(|o| !new.pools.iter().any(|p| p.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    let (before, after): (BTreeSet<_>, BTreeSet<_>) = (
        node_ids(old).into_iter().collect(),
        node_ids(new).into_iter().collect(),
    );
    let label = |(p, n, _, _): &NodeId| format!("{p}/{n}");
    r.nodes_added = after.difference(&before).map(label).collect();
    r.nodes_removed = before.difference(&after).map(label).collect();
    for t in &new.trunks {
        match old.trunks.iter().find(|o| o.name == t.name) {
            None => r.trunks_added.push(t.name.clone()),
            Some(o) if o != t => r.trunks_changed.push(t.name.clone()),
            Some(_) => {}
        }
    }
    r.trunks_removed = old
        .trunks
        .iter()
        .filter(|o| !new.trunks.iter().any(|t| t.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    r.phones_changed = old.phones != new.phones;
    r
}

/// Global node indices (as the route table and the health monitor number them) that name a
/// different node after the reload. A transaction in flight reports outcomes by the index of
/// the table it started with, so a failure reported on one of these may be another node's.
fn renumbered_nodes(old: &Config, new: &Config) -> Vec<usize> {
    let (a, b) = (node_ids(old), node_ids(new));
    (0..a.len().min(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .collect()
}

/// How long a transaction started before a reload can still report an outcome.
fn transaction_lifetime(cfg: &Config) -> Duration {
    let branch = cfg
        .pools
        .iter()
        .map(|p| p.branch_timeout)
        .max()
        .unwrap_or_default();
    (cfg.timers.t1 * 64)
        .max(cfg.timers.timer_c)
        .max(branch)
        .saturating_add(Duration::from_secs(1))
}

/// Best effort: the line of `cert` in the `index`-th `[[listen]]` table of the file, so a bad
/// certificate is reported at file:line like the config crate's errors.
fn listener_cert_line(file: &Path, index: usize) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut seen = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            seen = match (t.starts_with("[[listen]]"), seen) {
                (true, None) => Some(0),
                (true, Some(k)) => Some(k + 1),
                // Another table: only a `cert` inside the listener table counts.
                (false, Some(k)) if k == index => return None,
                (false, s) => s,
            };
            continue;
        }
        if seen == Some(index) {
            let key = t.split('=').next().map(str::trim);
            if key == Some("cert") {
                return Some(n + 1);
            }
        }
    }
    None
}

/// Whether a file-system event may have changed the file: reads (including our own) and
/// metadata changes (atime) must not trigger a reload.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::EventKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

/// Waits for `debounce` of quiet after an event, then reloads; until the channel closes.
async fn watch_loop(
    reloader: Arc<Reloader>,
    mut events: tokio::sync::mpsc::Receiver<()>,
    debounce: Duration,
    _watcher: notify::RecommendedWatcher,
) {
    while events.recv().await.is_some() {
        loop {
            match tokio::time::timeout(debounce, events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        tracing::info!(file = %reloader.source.display(), "config file changed: reloading");
        // The outcome is logged and counted by reload itself.
        let _ = reloader.reload().await;
    }
}

impl Sbc {
    /// Re-reads the configuration file and applies it (see the module docs); on error the
    /// running configuration stays.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.reloader.reload().await
    }

    /// Lets `POST /reload` run [`Sbc::reload`] (200 with the report; 422 with the error).
    /// Opt-in, like the other triggers, so embedders and tests choose; `sbc run` turns it on.
    /// No-op without an admin endpoint.
    pub fn enable_reload_api(&self) {
        let reloader = self.reloader.clone();
        self.set_reload_hook(Arc::new(move || {
            let reloader = reloader.clone();
            Box::pin(async move { reloader.reload().await.map_err(|e| e.to_string()) })
        }));
    }

    /// Reloads on every SIGHUP. The handler is process-wide: turn it on for one SBC per
    /// process (`sbc run` does). Once installed, SIGHUP no longer terminates the process.
    pub fn reload_on_sighup(&self) -> Result<(), ReloadError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(ReloadError::Signal)?;
        let reloader = self.reloader.clone();
        let task = tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!(file = %reloader.source.display(), "SIGHUP: reloading the config");
                let _ = reloader.reload().await;
            }
        });
        self.triggers.lock().push(task);
        Ok(())
    }

    /// Reloads when the configuration file changes, once it has been quiet for `debounce`
    /// (editors and deploy tools write in several steps). The file's directory is watched, so
    /// a replace by rename is seen as well as a write in place. Metadata-only changes (`touch`)
    /// do not trigger: use SIGHUP or `POST /reload` to force a reload.
    pub fn reload_on_file_change(&self, debounce: Duration) -> Result<(), ReloadError> {
        use notify::Watcher;
        let file = self.reloader.source.clone();
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = file.file_name().map(|n| n.to_os_string());
        // One pending event is enough: the loop only needs to know something happened.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(ev) => {
                    let ours = ev
                        .paths
                        .iter()
                        .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
                    if ours && is_change(&ev.kind) {
                        let _ = tx.try_send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "config file watcher error"),
            })
            .map_err(|source| ReloadError::Watch {
                path: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| ReloadError::Watch {
                path: dir.clone(),
                source,
            })?;
        tracing::info!(file = %file.display(), debounce_ms = debounce.as_millis() as u64, "watching the config file for changes");
        let task = tokio::spawn(watch_loop(self.reloader.clone(), rx, debounce, watcher));
        self.triggers.lock().push(task);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_line_is_found_in_the_right_listener() {
        let dir = std::env::temp_dir().join(format!("sbc-reload-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("x.toml");
        std::fs::write(
            &file,
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n\n[[listen]]\ntransport = \"tls\"\naddr = \"127.0.0.1:0\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[admin]\ncert = \"no\"\n",
        )
        .expect("write");
        assert_eq!(listener_cert_line(&file, 1), Some(8));
        assert_eq!(listener_cert_line(&file, 0), None);
        assert_eq!(listener_cert_line(&file, 2), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_do_not_count_as_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, MetadataKind, ModifyKind};
        use notify::EventKind;
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Any
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            notify::event::RenameMode::To
        ))));
    }

    fn parse(extra: &str) -> Config {
        sbc_config::parse(
            &format!("[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n[[pool]]\nname = \"p\"\n[[pool.node]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\n{extra}"),
            Path::new("/tmp/x.toml"),
        )
        .expect("config")
    }

    #[test]
    fn what_takes_a_restart_is_reported_and_not_applied() {
        let running = parse("");
        let trust = trust_roots(&running);
        let new = parse("[timers]\nt1_ms = 400\n[[trunk]]\nname = \"t\"\nsources = [\"127.0.0.9\"]\naddress = \"127.0.0.9:5060\"\n");
        let e = effective(&running, &new);
        assert_eq!(e.timers, running.timers, "timers stay as started");
        assert_eq!(e.trunks, new.trunks, "trunks apply");
        assert_eq!(restart_required(&e, &new, &trust), ["timers"]);
        let report = diff(&running, &new);
        assert_eq!(report.trunks_added, ["t"]);
        assert!(report.pools_changed.is_empty());
        // The next reload of the same file still says so.
        assert_eq!(
            restart_required(&effective(&e, &new), &new, &trust),
            ["timers"]
        );
        // Rate limits apply at once too.
        let limited = parse("[ratelimit]\ndrop_scanners = false\n");
        let e = effective(&running, &limited);
        assert_eq!(e.ratelimit, limited.ratelimit);
        assert!(restart_required(&e, &limited, &trust).is_empty());
        // A routing-only change needs nothing.
        let same = parse(
            "[[trunk]]\nname = \"t\"\nsources = [\"127.0.0.9\"]\naddress = \"127.0.0.9:5061\"\n",
        );
        assert!(restart_required(&effective(&running, &same), &same, &trust).is_empty());
    }

    #[test]
    fn renumbering_is_detected_by_position() {
        let one = parse("");
        let two = parse("[[pool.node]]\nname = \"b\"\naddress = \"127.0.0.1:5071\"\n");
        assert!(
            renumbered_nodes(&one, &two).is_empty(),
            "appending renumbers nothing"
        );
        assert_eq!(renumbered_nodes(&two, &one), Vec::<usize>::new());
        let moved = sbc_config::parse(
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n[[pool]]\nname = \"p\"\n[[pool.node]]\nname = \"b\"\naddress = \"127.0.0.1:5071\"\n[[pool.node]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\n",
            Path::new("/tmp/x.toml"),
        )
        .expect("config");
        assert_eq!(renumbered_nodes(&two, &moved), [0, 1]);
    }

    #[test]
    fn transaction_lifetime_covers_timer_c() {
        let cfg = sbc_config::parse(
            "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n[[pool.node]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\n",
            Path::new("/tmp/x.toml"),
        )
        .expect("config");
        assert!(transaction_lifetime(&cfg) > cfg.timers.timer_c);
        assert!(transaction_lifetime(&cfg) > cfg.timers.t1 * 64);
    }
}
