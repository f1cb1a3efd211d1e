//! Wiring: config to transports, proxy and timer task, with a clean shutdown.

use crate::admin::{AdminContext, AdminError, AdminServer, ReloadHook};
use crate::proxy::{LocalListener, NodeOutcome, NodeSelector, Proxy, ProxySettings};
use crate::reload::{Reloader, RunningListener};
use crate::transport::{self, ListenerSpec, TransportConfig, Transports};
use sbc_config::Config;
use sbc_health::{HealthMonitor, Outcome};
use sbc_routing::RouteTable;
use sbc_sip::message::ParseLimits;
use sbc_sip::transaction::TimerConfig;
use sbc_sip::Transport;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why the SBC could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS listener {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: transport::TlsError,
    },
    #[error("TLS client roots: {0}")]
    TlsClient(transport::TlsError),
    #[error("binding listeners: {0}")]
    Bind(std::io::Error),
    #[error("media relay: {0}")]
    Media(sbc_media_relay::MediaError),
    #[error("admin endpoint: {0}")]
    Admin(#[from] AdminError),
}

/// How to start: what a config file does not decide.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Serve the admin endpoint (metrics, status, commands) on `admin.listen`. Off in
    /// [`Sbc::start`] because `admin.listen` always has a value (`127.0.0.1:9090` by
    /// default), and tests and embedders run several SBCs in one process; `sbc run` turns it
    /// on. Tests that want it set `admin.listen` to port 0.
    pub admin: bool,
}

/// A running SBC: its proxy and transports. Dropping it does not stop the tasks; call
/// [`Sbc::shutdown`].
pub struct Sbc {
    pub proxy: Arc<Proxy>,
    pub health: Arc<HealthMonitor>,
    pub transports: Arc<Transports>,
    pub locals: Vec<LocalListener>,
    /// Stopping without dropping calls (see [`crate::drain`]).
    pub drain: Arc<crate::drain::Drain>,
    timer_task: tokio::task::JoinHandle<()>,
    /// The re-registration wave, shadow registrations and their progress.
    rereg_task: tokio::task::JoinHandle<()>,
    /// The media relay's event task (media timeouts), when media is anchored.
    media_task: Option<tokio::task::JoinHandle<()>>,
    admin: Option<AdminServer>,
    /// The running config generation: 1 at start; a reload bumps it.
    generation: Arc<AtomicU64>,
    /// What [`Sbc::reload`] and its triggers work with.
    pub(crate) reloader: Arc<Reloader>,
    /// The reload triggers turned on (SIGHUP, file watch), stopped at shutdown.
    pub(crate) triggers: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn sip_transport(t: sbc_config::Transport) -> Transport {
    match t {
        sbc_config::Transport::Udp => Transport::Udp,
        sbc_config::Transport::Tcp => Transport::Tcp,
        sbc_config::Transport::Tls => Transport::Tls,
    }
}

impl Sbc {
    /// Binds every SIP listener and starts serving, without the admin endpoint (see
    /// [`StartOptions::admin`]). Must run inside a tokio runtime.
    pub async fn start(cfg: &Config) -> Result<Sbc, StartError> {
        Sbc::start_with(cfg, StartOptions::default()).await
    }

    /// As [`Sbc::start`], with the admin endpoint if `opts.admin`. The metrics recorder is
    /// installed first, so the gauges components set as they start are recorded.
    pub async fn start_with(cfg: &Config, opts: StartOptions) -> Result<Sbc, StartError> {
        // Bind the admin port first: a taken port fails the start before anything runs.
        let admin_start = if opts.admin {
            Some(AdminServer::bind(cfg.admin.listen).await?)
        } else {
            None
        };
        // The recorder is process-wide and always on, with or without the admin endpoint: the
        // proxy registers its per-message counters once, at first use, and a handle taken
        // before a recorder exists would count into nothing for the life of the process.
        let prometheus = crate::metrics::install().map_err(AdminError::from)?;
        let admin_start = admin_start.map(|listener| (listener, prometheus));
        let settings = ProxySettings {
            name: cfg.general.name.clone(),
            secret: cfg.general.secret.clone(),
            limits: ParseLimits {
                max_headers: cfg.limits.max_headers,
                max_vias: cfg.limits.max_via,
            },
            timers: TimerConfig {
                t1: cfg.timers.t1,
                t2: cfg.timers.t2,
                t4: cfg.timers.t4,
            },
            timer_c: cfg.timers.timer_c,
            overload_queue: cfg.limits.overload_queue,
        };
        let proxy = Proxy::new(settings, RouteTable::new(cfg));
        proxy.set_limiter(Arc::new(crate::ratelimit::Limiter::new(
            cfg,
            &RouteTable::new(cfg),
        )));
        let media_task = if cfg.media.enabled {
            let (relay, events) =
                sbc_media_relay::Relay::start(crate::media::relay_config(&cfg.media))
                    .map_err(StartError::Media)?;
            let anchor = Arc::new(crate::media::MediaAnchor::new(relay));
            anchor.set_unsaveable_after(cfg.media.unsaveable_timeout);
            proxy.set_media(anchor.clone());
            Some(tokio::spawn(crate::media::run_events(
                proxy.clone(),
                anchor,
                events,
            )))
        } else {
            None
        };
        let health = HealthMonitor::start(cfg);
        let selector = Arc::new(HealthSelector::new(health.clone()));
        proxy.set_selector(selector.clone());
        let mut specs = Vec::new();
        // Each TLS listener's certificate, which a reload can replace.
        let mut server_certs = Vec::new();
        for l in &cfg.listen {
            let tls = match (l.transport, &l.cert, &l.key) {
                (sbc_config::Transport::Tls, Some(c), Some(k)) => {
                    let (server, cert) =
                        transport::load_reloadable_server_tls(c, k).map_err(|source| {
                            StartError::Tls {
                                addr: l.addr,
                                source,
                            }
                        })?;
                    server_certs.push(Some(cert));
                    Some(server)
                }
                _ => {
                    server_certs.push(None);
                    None
                }
            };
            specs.push(ListenerSpec {
                transport: sip_transport(l.transport),
                addr: l.addr,
                tls,
            });
        }
        let cas: Vec<_> = cfg
            .pools
            .iter()
            .flat_map(|p| p.nodes.iter().filter_map(|n| n.tls_ca.clone()))
            .chain(cfg.trunks.iter().filter_map(|t| t.tls_ca.clone()))
            .collect();
        let tls_client = transport::client_tls(&cas).map_err(StartError::TlsClient)?;
        let tcfg = TransportConfig {
            max_message_size: cfg.limits.max_message_size,
            idle_timeout: cfg.limits.idle_timeout,
            message_timeout: cfg.limits.message_timeout,
            connect_timeout: cfg.limits.tcp_connect_timeout,
            tls_handshake_timeout: cfg.limits.tls_handshake_timeout,
            max_connections: cfg.limits.max_connections,
            max_connections_per_source: cfg.limits.max_connections_per_source,
            tls_client,
        };
        let transports = Transports::start(specs, tcfg, proxy.clone())
            .await
            .map_err(StartError::Bind)?;
        // local_addrs() lists listeners in config order, with port 0 resolved.
        let locals: Vec<LocalListener> = transports
            .local_addrs()
            .into_iter()
            .zip(cfg.listen.iter())
            .map(|((transport, addr), l)| {
                let adv = l.advertise.clone();
                let host = match &adv {
                    Some(a) => a.host.clone(),
                    None if addr.is_ipv6() => format!("[{}]", addr.ip()),
                    None => addr.ip().to_string(),
                };
                LocalListener {
                    transport,
                    addr,
                    host,
                    port: adv.and_then(|a| a.port).unwrap_or(addr.port()),
                    side: l.side,
                }
            })
            .collect();
        proxy.attach(transports.clone(), locals.clone());
        let timer_task = tokio::spawn(proxy.clone().run_timers());
        let rereg_task = tokio::spawn(crate::rereg::Rereg::run(proxy.clone()));
        for l in &locals {
            tracing::info!(transport = %l.transport, addr = %l.addr, advertised = %format!("{}:{}", l.host, l.port), "listening");
        }
        let generation = Arc::new(AtomicU64::new(1));
        let certs = Arc::new(parking_lot::RwLock::new(cert_expiries(cfg, &locals)));
        let running = cfg
            .listen
            .iter()
            .zip(&locals)
            .zip(server_certs)
            .map(|((l, local), cert)| RunningListener {
                transport: l.transport,
                configured: l.addr,
                bound: local.addr,
                cert,
            })
            .collect();
        let reloader = Arc::new(Reloader::new(
            cfg,
            running,
            proxy.clone(),
            health.clone(),
            selector,
            generation.clone(),
            certs.clone(),
        ));
        let drain = crate::drain::Drain::new(proxy.clone());
        let admin = admin_start.map(|(listener, prometheus)| {
            crate::metrics::set_generation(1);
            let ctx = AdminContext {
                drain: drain.clone(),
                drain_default: cfg.general.drain,
                name: cfg.general.name.clone(),
                token: cfg.admin.token.clone(),
                health: health.clone(),
                proxy: proxy.clone(),
                transports: transports.clone(),
                generation: generation.clone(),
                certs,
                prometheus,
            };
            AdminServer::serve(listener, ctx)
        });
        Ok(Sbc {
            proxy,
            health,
            transports,
            locals,
            drain,
            timer_task,
            rereg_task,
            media_task,
            admin,
            generation,
            reloader,
            triggers: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// The admin endpoint's bound address, if it runs (tests bind port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
    }

    /// The running config generation (1 until a reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Wires `POST /reload` to the reload implementation; until then it answers 501.
    /// No-op without an admin endpoint.
    pub fn set_reload_hook(&self, hook: ReloadHook) {
        if let Some(a) = &self.admin {
            a.set_reload_hook(hook);
        }
    }

    /// The bound address of the first listener of a transport (tests bind port 0).
    pub fn addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.locals
            .iter()
            .find(|l| l.transport == transport)
            .map(|l| l.addr)
    }

    pub fn shutdown(&self) {
        for t in self.triggers.lock().drain(..) {
            t.abort();
        }
        if let Some(a) = &self.admin {
            a.shutdown();
        }
        self.timer_task.abort();
        self.rereg_task.abort();
        if let Some(t) = &self.media_task {
            t.abort();
        }
        if let Some(m) = self.proxy.media() {
            m.relay().shutdown();
        }
        self.health.shutdown();
        self.transports.shutdown();
    }
}

/// The certificate expiry of every TLS listener, labelled with its bound address. A
/// certificate the parser cannot read is logged and left out: rustls accepted it, so serving
/// goes on, only the expiry gauge is missing.
fn cert_expiries(cfg: &Config, locals: &[LocalListener]) -> Vec<crate::metrics::CertExpiry> {
    cfg.listen
        .iter()
        .zip(locals)
        .filter_map(|(l, local)| {
            let cert = l.cert.as_ref().filter(|_| l.transport == sbc_config::Transport::Tls)?;
            match crate::metrics::certificate_not_after(cert) {
                Ok(not_after) => {
                    let c = crate::metrics::CertExpiry {
                        listener: local.addr.to_string(),
                        not_after,
                    };
                    c.publish();
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(listener = %local.addr, error = %e, "cannot read the certificate's expiry");
                    None
                }
            }
        })
        .collect()
}

/// The health monitor as the proxy's node selector.
pub(crate) struct HealthSelector {
    health: Arc<HealthMonitor>,
    /// After a reload that renumbered nodes: the global indices that now name another node,
    /// and until when failures reported on them are ignored. A transaction in flight reports
    /// the index of the table it started with, which could blame the wrong node; probes still
    /// judge these nodes meanwhile.
    renumbered: parking_lot::RwLock<Option<(std::time::Instant, Vec<usize>)>>,
}

impl HealthSelector {
    fn new(health: Arc<HealthMonitor>) -> HealthSelector {
        HealthSelector {
            health,
            renumbered: parking_lot::RwLock::new(None),
        }
    }

    /// Ignores traffic failures on `nodes` until `until` (see `renumbered`).
    pub(crate) fn ignore_failures(&self, nodes: Vec<usize>, until: std::time::Instant) {
        let mut slot = self.renumbered.write();
        let now = std::time::Instant::now();
        let mut all = match slot.take() {
            Some((t, old)) if t > now => old,
            _ => Vec::new(),
        };
        all.extend(nodes);
        all.sort_unstable();
        all.dedup();
        *slot = Some((until, all));
    }
}

impl NodeSelector for HealthSelector {
    fn candidates(&self, pool: usize) -> SmallVec<[usize; 4]> {
        self.health.candidates(pool)
    }

    fn active(&self, pool: usize) -> Option<usize> {
        self.health.active(pool)
    }

    fn observe(&self, node: usize, outcome: NodeOutcome) {
        let outcome = match outcome {
            NodeOutcome::Answered(s) => Outcome::Answered(s),
            NodeOutcome::Timeout => Outcome::Timeout,
            NodeOutcome::TransportError => Outcome::TransportError,
            NodeOutcome::Slow => Outcome::Slow,
        };
        if !outcome.is_evidence() {
            return;
        }
        if let Some((until, nodes)) = &*self.renumbered.read() {
            if std::time::Instant::now() < *until && nodes.binary_search(&node).is_ok() {
                return;
            }
        }
        self.health.observe(node, outcome);
    }

    fn is_down(&self, node: usize) -> bool {
        matches!(
            self.health.node_state(node),
            Some(sbc_health::NodeState::Down)
        )
    }
}
