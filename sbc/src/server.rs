//! Wiring: config to transports, proxy and timer task, with a clean shutdown.

use crate::proxy::{LocalListener, NodeOutcome, NodeSelector, Proxy, ProxySettings};
use crate::transport::{self, ListenerSpec, TransportConfig, Transports};
use sbc_config::Config;
use sbc_health::{HealthMonitor, Outcome};
use sbc_routing::RouteTable;
use sbc_sip::message::ParseLimits;
use sbc_sip::transaction::TimerConfig;
use sbc_sip::Transport;
use smallvec::SmallVec;
use std::net::SocketAddr;
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
}

/// A running SBC: its proxy and transports. Dropping it does not stop the tasks; call
/// [`Sbc::shutdown`].
pub struct Sbc {
    pub proxy: Arc<Proxy>,
    pub health: Arc<HealthMonitor>,
    pub transports: Arc<Transports>,
    pub locals: Vec<LocalListener>,
    timer_task: tokio::task::JoinHandle<()>,
}

fn sip_transport(t: sbc_config::Transport) -> Transport {
    match t {
        sbc_config::Transport::Udp => Transport::Udp,
        sbc_config::Transport::Tcp => Transport::Tcp,
        sbc_config::Transport::Tls => Transport::Tls,
    }
}

impl Sbc {
    /// Binds every listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(cfg: &Config) -> Result<Sbc, StartError> {
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
        };
        let proxy = Proxy::new(settings, RouteTable::new(cfg));
        let health = HealthMonitor::start(cfg);
        proxy.set_selector(Arc::new(HealthSelector(health.clone())));
        let mut specs = Vec::new();
        for l in &cfg.listen {
            let tls = match (l.transport, &l.cert, &l.key) {
                (sbc_config::Transport::Tls, Some(c), Some(k)) => Some(
                    transport::load_server_tls(c, k).map_err(|source| StartError::Tls {
                        addr: l.addr,
                        source,
                    })?,
                ),
                _ => None,
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
        for l in &locals {
            tracing::info!(transport = %l.transport, addr = %l.addr, advertised = %format!("{}:{}", l.host, l.port), "listening");
        }
        Ok(Sbc {
            proxy,
            health,
            transports,
            locals,
            timer_task,
        })
    }

    /// The bound address of the first listener of a transport (tests bind port 0).
    pub fn addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.locals
            .iter()
            .find(|l| l.transport == transport)
            .map(|l| l.addr)
    }

    pub fn shutdown(&self) {
        self.timer_task.abort();
        self.health.shutdown();
        self.transports.shutdown();
    }
}

/// The health monitor as the proxy's node selector.
struct HealthSelector(Arc<HealthMonitor>);

impl NodeSelector for HealthSelector {
    fn candidates(&self, pool: usize) -> SmallVec<[usize; 4]> {
        self.0.candidates(pool)
    }

    fn observe(&self, node: usize, outcome: NodeOutcome) {
        self.0.observe(
            node,
            match outcome {
                NodeOutcome::Answered(s) => Outcome::Answered(s),
                NodeOutcome::Timeout => Outcome::Timeout,
                NodeOutcome::TransportError => Outcome::TransportError,
            },
        );
    }
}
