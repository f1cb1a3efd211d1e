//! The admin HTTP endpoint: Prometheus metrics, a JSON status, and the operator's commands
//! (manual failover, failback, maintenance, reload, drain).
//!
//! Plain HTTP/1.1 on hyper, no framework: six routes do not need one, and hyper is already
//! in the build for the health crate's probes. The endpoint binds `admin.listen` (loopback by
//! default). When `admin.token` is set, every request, `/metrics` included, must carry
//! `Authorization: Bearer <token>`; configuration validation insists on a token whenever the
//! listener is not a loopback address, so the commands are never open to the network.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/metrics` | Prometheus text exposition format |
//! | GET | `/status` | [`StatusReport`] as JSON |
//! | POST | `/pools/{pool}/failover` | moves the pool to its next ready node (`?reason=` optional) |
//! | POST | `/pools/{pool}/failback` | moves the pool back to its highest-priority Up node |
//! | POST | `/nodes/{node}/maintenance` | `?state=on` / `?state=off`, or a JSON body `{"on": true}` |
//! | POST | `/reload` | reloads the config file: 200 with the [`ReloadReport`], 422 with the error; 501 unless enabled ([`crate::Sbc::enable_reload_api`]) |
//! | POST | `/drain` | starts draining (see [`crate::drain`]; `?timeout_secs=` optional) and answers the [`crate::drain::DrainReport`]; `?state=off` calls it off (409 when none runs or it is a shutdown's) |
//!
//! Errors are JSON `{"error": "..."}`: 401 bad or missing token, 404 unknown path, pool or
//! node, 405 wrong method, 400 bad arguments, 409 a command the pool's state refuses (no
//! ready standby, nothing to fail back to), 422 a reload refused (the error names file:line),
//! 501 reload not available.

use crate::metrics::CertExpiry;
use crate::proxy::Proxy;
use crate::reload::ReloadReport;
use crate::transport::Transports;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;
use sbc_health::{HealthError, HealthMonitor, NodeStatus, PoolStatus};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// At most this many admin connections are served at once; more wait in the accept queue.
/// The admin endpoint serves a few operators and one scraper, never the SIP load.
const MAX_CONNECTIONS: usize = 32;
/// A client that does not finish sending its headers in this time is dropped, so a stalled
/// connection cannot hold one of the slots above forever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies are tiny JSON objects; anything bigger is refused.
const MAX_BODY: usize = 4096;
/// How long shutdown waits for a request in progress.
const DRAIN: Duration = Duration::from_secs(2);

/// What `POST /reload` runs: builds and swaps in the new configuration, and returns what it
/// did, or the error (with file:line) that left the running config in place.
/// The hook counts `sbc_reloads_total` itself, because reloads also come from SIGHUP.
pub type ReloadHook = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<ReloadReport, String>> + Send>> + Send + Sync,
>;

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("binding the admin listener {addr}: {source}")]
    Bind {
        /// `admin.listen`.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Everything the handlers read. Built by [`crate::Sbc::start_with`].
pub struct AdminContext {
    /// `general.name`, echoed in `/status`.
    pub name: String,
    /// `admin.token`; `None` leaves the endpoint open (loopback only, per validation).
    pub token: Option<String>,
    /// Node states and the operator commands.
    pub health: Arc<HealthMonitor>,
    /// Transaction and registration counts.
    pub proxy: Arc<Proxy>,
    /// Connection count.
    pub transports: Arc<Transports>,
    /// The running config generation, shared with the SBC (reload bumps it).
    pub generation: Arc<AtomicU64>,
    /// TLS listeners' certificate expiry, republished at every scrape (a reload that renews
    /// a certificate updates it).
    pub certs: Arc<RwLock<Vec<CertExpiry>>>,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// `POST /drain` and the drain in `/status`.
    pub drain: Arc<crate::drain::Drain>,
    /// `general.drain_secs`: a `POST /drain` without `timeout_secs` drains this long (600 s
    /// when it is zero).
    pub drain_default: Duration,
}

struct State {
    ctx: AdminContext,
    /// SHA-256 of the token: compared in constant time and of fixed length, so neither the
    /// token's bytes nor its length leak through response timing.
    token_digest: Option<[u8; 32]>,
    started: Instant,
    reload: RwLock<Option<ReloadHook>>,
}

/// A bound, not yet serving, admin socket.
#[derive(Debug)]
pub struct AdminListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

/// The running admin endpoint. [`AdminServer::shutdown`] stops it (the SBC does so in
/// [`crate::Sbc::shutdown`]).
pub struct AdminServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("addr", &self.addr)
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl AdminServer {
    /// Binds `listen` (port 0 picks a free port, for tests). Separate from
    /// [`AdminServer::serve`] so the SBC can fail on a taken port before it starts anything.
    pub async fn bind(listen: SocketAddr) -> Result<AdminListener, AdminError> {
        let err = |source| AdminError::Bind {
            addr: listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(AdminListener { listener, addr })
    }

    /// Starts serving on a listener from [`AdminServer::bind`].
    pub fn serve(bound: AdminListener, ctx: AdminContext) -> AdminServer {
        let AdminListener { listener, addr } = bound;
        let state = Arc::new(State {
            token_digest: ctx.token.as_deref().map(|t| digest(t.as_bytes())),
            ctx,
            started: Instant::now(),
            reload: RwLock::new(None),
        });
        let (shutdown, _) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state.clone(), shutdown.subscribe()));
        tracing::info!(%addr, auth = state.token_digest.is_some(), "admin endpoint listening");
        AdminServer {
            addr,
            state,
            shutdown,
            task,
        }
    }

    /// The bound address (with port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Installs what `POST /reload` runs; until then it answers 501.
    pub fn set_reload_hook(&self, hook: ReloadHook) {
        *self.state.reload.write() = Some(hook);
    }

    /// Stops accepting and closes connections once their request in progress is answered.
    /// Idempotent.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.task.abort();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(DRAIN, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Resolves once shutdown is signalled (or its sender is gone); the guard `wait_for` returns
/// is dropped here, so callers' futures stay `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// `GET /status`: the SBC's state in one JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `general.name`.
    pub name: String,
    /// The build's version.
    pub version: String,
    /// The running config generation: 1 at start, +1 per successful reload.
    pub generation: u64,
    /// Seconds since the SBC started.
    pub uptime_seconds: u64,
    /// Every pool, in configuration order.
    pub pools: Vec<PoolReport>,
    /// Phone flows with a live registration.
    pub registrations: usize,
    /// Proxy transactions in the table.
    pub transactions: usize,
    /// Open TCP/TLS connections.
    pub connections: usize,
    /// Established dialogs whose media the SBC anchors (see `call_list`).
    pub calls: usize,
    /// Media relay sessions.
    pub media_sessions: usize,
    /// The registration cache and how phones follow a failover.
    #[serde(default)]
    pub registration: RegistrationReport,
    /// Each established call (dialog) whose media the SBC anchors: the node that set it up
    /// and whether it outlived that node.
    #[serde(default)]
    pub call_list: Vec<CallReport>,
    /// The drain in progress (new calls refused until the calls left end), if any.
    #[serde(default)]
    pub drain: Option<crate::drain::DrainReport>,
    /// Every trunk with its calls in progress and its limit.
    #[serde(default)]
    pub trunks: Vec<TrunkReport>,
    /// Ended calls with anchored media by how their media went (see
    /// [`crate::media::MediaFlow`]): both ways, one way, none.
    #[serde(default)]
    pub ended_calls: EndedCallsReport,
}

/// One trunk in [`StatusReport::trunks`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrunkReport {
    pub name: String,
    /// Calls in and out now, being set up or established.
    pub calls: usize,
    /// `trunk.max_calls`; `None`: no limit.
    pub max_calls: Option<u32>,
}

/// [`StatusReport::ended_calls`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedCallsReport {
    pub both_ways: u64,
    pub one_way: u64,
    pub no_media: u64,
}

/// One dialog in [`StatusReport::call_list`]. A call the PBX bridged (two dialogs) or
/// proxied (one Call-ID through the SBC twice) shows as two entries naming each other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallReport {
    pub call_id: String,
    /// `p`: the caller is a phone or trunk; `i`: the caller is the PBX.
    pub pass: String,
    /// The PBX node that set the call up.
    pub node: Option<String>,
    /// The other dialog of the call (Call-ID/pass).
    pub peer: Option<String>,
    /// Media runs end to end through the relay (true), through the PBX (false), unknown.
    pub saveable: Option<bool>,
    /// The call outlived its node.
    pub outlived: bool,
}

/// The registration cache in [`StatusReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistrationReport {
    /// Bindings phones keep fresh.
    pub live: usize,
    /// The phone pool's active node.
    pub active: Option<String>,
    /// Of the live bindings, those the active node can reach (directly or by a shadow).
    pub on_active: usize,
    /// Live bindings with a live shadow registration on another node.
    pub shadowed: usize,
    /// Seconds since the active node last changed, if it did since start.
    pub since_failover_seconds: Option<f64>,
    /// After that change: seconds until 50%, 95% and 100% of the phones were reachable on
    /// the new active node.
    pub to_50_seconds: Option<f64>,
    pub to_95_seconds: Option<f64>,
    pub to_100_seconds: Option<f64>,
    /// TCP/TLS flows the re-registration wave closed since then.
    pub wave_closed: u64,
}

/// One binding in `GET /registrations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingReport {
    pub aor: String,
    pub contact: String,
    pub flow: String,
    /// The node that granted the binding.
    pub node: Option<String>,
    pub pbx_expires_in: u64,
    pub phone_expires_in: u64,
    /// Shadow registrations: node, seconds left (None until granted), last status.
    pub shadows: Vec<ShadowReport>,
}

/// A shadow registration in [`BindingReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub node: String,
    pub expires_in: Option<u64>,
    pub last_status: u16,
}

/// A pool in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolReport {
    /// The pool's name.
    pub name: String,
    /// The node new transactions go to.
    pub active: Option<String>,
    /// `manual` or `auto`.
    pub failback: String,
    /// A manual failover is in force: automatic failback will not undo it.
    pub pinned: bool,
    /// The nodes in priority order.
    pub nodes: Vec<NodeReport>,
}

/// A node in [`PoolReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node's name (what `/nodes/{node}/maintenance` takes).
    pub name: String,
    /// Its address as configured.
    pub address: String,
    /// `starting`, `up`, `suspect`, `down` or `maintenance`.
    pub state: String,
    /// When it entered that state, Unix seconds.
    pub since: u64,
    /// How long ago that was, in seconds (saves the reader a clock).
    pub since_seconds_ago: u64,
    /// Whether it is the pool's active node.
    pub active: bool,
}

/// Seconds since the Unix epoch: the times `/status` reports.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn node_report(n: &NodeStatus, now: u64) -> NodeReport {
    NodeReport {
        name: n.name.clone(),
        address: n.address.clone(),
        state: n.state.as_str().to_string(),
        since: n.since,
        since_seconds_ago: now.saturating_sub(n.since),
        active: n.active,
    }
}

fn pool_report(p: &PoolStatus, now: u64) -> PoolReport {
    PoolReport {
        name: p.name.clone(),
        active: p.active.clone(),
        failback: p.failback.to_string(),
        pinned: p.pinned,
        nodes: p.nodes.iter().map(|n| node_report(n, now)).collect(),
    }
}

impl State {
    fn status(&self) -> StatusReport {
        let now = unix_now();
        let ctx = &self.ctx;
        StatusReport {
            name: ctx.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: ctx.generation.load(Ordering::Relaxed),
            uptime_seconds: self.started.elapsed().as_secs(),
            pools: ctx
                .health
                .status()
                .iter()
                .map(|p| pool_report(p, now))
                .collect(),
            registrations: ctx.proxy.registrations.len(),
            transactions: ctx.proxy.transaction_count(),
            connections: ctx.transports.connection_count(),
            calls: ctx.proxy.media().map_or(0, |m| m.dialogs()),
            media_sessions: ctx.proxy.media().map_or(0, |m| m.sessions()),
            drain: ctx.drain.report(),
            trunks: ctx
                .proxy
                .trunks()
                .into_iter()
                .map(|(name, calls, max_calls)| TrunkReport {
                    name,
                    calls,
                    max_calls,
                })
                .collect(),
            ended_calls: ctx
                .proxy
                .media()
                .map(|m| {
                    let [both_ways, one_way, no_media] = m.ended_calls();
                    EndedCallsReport {
                        both_ways,
                        one_way,
                        no_media,
                    }
                })
                .unwrap_or_default(),
            call_list: ctx
                .proxy
                .media()
                .map(|m| m.calls())
                .unwrap_or_default()
                .into_iter()
                .map(|c| CallReport {
                    node: c.node.and_then(|n| ctx.proxy.node_name(n)),
                    call_id: c.call_id,
                    pass: c.pass,
                    peer: c.peer,
                    saveable: c.saveable,
                    outlived: c.outlived,
                })
                .collect(),
            registration: {
                let p = ctx.proxy.rereg.progress();
                RegistrationReport {
                    live: p.live,
                    active: p.active,
                    on_active: p.on_active,
                    shadowed: p.shadowed,
                    since_failover_seconds: p.since_failover_secs,
                    to_50_seconds: p.to_50_secs,
                    to_95_seconds: p.to_95_secs,
                    to_100_seconds: p.to_100_secs,
                    wave_closed: p.wave_closed,
                }
            },
        }
    }

    /// `GET /registrations[?limit=N]`: the cached bindings (at most N, default 1000).
    fn registrations(&self, query: &str) -> Reply {
        let limit = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("limit="))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1000);
        let list: Vec<BindingReport> = self
            .ctx
            .proxy
            .registrations
            .view(limit, std::time::Instant::now())
            .into_iter()
            .map(|b| BindingReport {
                aor: b.aor,
                contact: b.contact,
                flow: b.flow,
                node: b.node,
                pbx_expires_in: b.pbx_expires_in,
                phone_expires_in: b.phone_expires_in,
                shadows: b
                    .shadows
                    .into_iter()
                    .map(|(node, expires_in, last_status)| ShadowReport {
                        node,
                        expires_in,
                        last_status,
                    })
                    .collect(),
            })
            .collect();
        Reply::json(StatusCode::OK, &list)
    }

    fn pool(&self, name: &str) -> Result<(usize, PoolStatus), Reply> {
        let idx =
            self.ctx.health.pool_index(name).ok_or_else(|| {
                Reply::error(StatusCode::NOT_FOUND, format!("no pool named {name}"))
            })?;
        let status = self
            .ctx
            .health
            .status()
            .into_iter()
            .nth(idx)
            .ok_or_else(|| Reply::error(StatusCode::NOT_FOUND, format!("no pool named {name}")))?;
        Ok((idx, status))
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token_digest else {
            return true;
        };
        let Some(given) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return false;
        };
        bool::from(digest(given.as_bytes()).ct_eq(expected))
    }
}

/// A response on its way out.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    allow: Option<&'static str>,
}

impl Reply {
    fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Reply {
                    status,
                    content_type: "application/json",
                    body: body.into(),
                    allow: None,
                }
            }
            Err(e) => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the response: {e}"),
            ),
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        #[derive(Serialize)]
        struct Error {
            error: String,
        }
        let body = serde_json::to_vec(&Error {
            error: message.into(),
        })
        .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
        Reply {
            status,
            content_type: "application/json",
            body: body.into(),
            allow: None,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(allow) = self.allow {
            h.insert(ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

fn health_error(e: HealthError) -> Reply {
    let status = match e {
        HealthError::UnknownPool(_) | HealthError::UnknownNode(_) => StatusCode::NOT_FOUND,
        HealthError::NoStandby { .. } | HealthError::NothingToFailBackTo { .. } => {
            StatusCode::CONFLICT
        }
    };
    Reply::error(status, e.to_string())
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !state.authorized(&req) {
        tracing::warn!(
            path = req.uri().path(),
            "admin request with a missing or wrong token"
        );
        return Reply::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <admin.token>)",
        )
        .into_response();
    }
    let reply = match route(state, req).await {
        Ok(r) | Err(r) => r,
    };
    reply.into_response()
}

async fn route(state: &State, req: Request<Incoming>) -> Result<Reply, Reply> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let (allow, target) = match segments.as_slice() {
        ["metrics"] => ("GET", Route::Metrics),
        ["status"] => ("GET", Route::Status),
        ["registrations"] => ("GET", Route::Registrations),
        ["reload"] => ("POST", Route::Reload),
        ["drain"] => ("POST", Route::Drain),
        ["pools", pool, "failover"] => ("POST", Route::Failover(pool)),
        ["pools", pool, "failback"] => ("POST", Route::Failback(pool)),
        ["nodes", node, "maintenance"] => ("POST", Route::Maintenance(node)),
        _ => {
            return Err(Reply::error(
                StatusCode::NOT_FOUND,
                format!(
                    "no such endpoint {path}; try GET /status, GET /registrations, GET /metrics, POST /pools/{{pool}}/failover, POST /pools/{{pool}}/failback, POST /nodes/{{node}}/maintenance, POST /reload, POST /drain"
                ),
            ))
        }
    };
    if method.as_str() != allow {
        let mut r = Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}; use {allow}"),
        );
        r.allow = Some(allow);
        return Err(r);
    }
    match target {
        Route::Metrics => Ok(metrics(state)),
        Route::Status => Ok(Reply::json(StatusCode::OK, &state.status())),
        Route::Registrations => Ok(state.registrations(&query)),
        Route::Reload => reload(state).await,
        Route::Drain => drain(state, &query),
        Route::Failover(pool) => failover(state, pool, &query),
        Route::Failback(pool) => failback(state, pool),
        Route::Maintenance(node) => {
            let body = read_body(req).await?;
            maintenance(state, node, &query, &body)
        }
    }
}

enum Route<'a> {
    Metrics,
    Status,
    Registrations,
    Reload,
    Drain,
    Failover(&'a str),
    Failback(&'a str),
    Maintenance(&'a str),
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("reading the request body (at most {MAX_BODY} bytes): {e}"),
        )),
    }
}

fn metrics(state: &State) -> Reply {
    for c in state.ctx.certs.read().iter() {
        c.publish();
    }
    let p = &state.ctx.prometheus;
    // Histogram upkeep is normally a background thread's job; a scrape is a fine moment.
    p.run_upkeep();
    Reply {
        status: StatusCode::OK,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: p.render().into(),
        allow: None,
    }
}

async fn reload(state: &State) -> Result<Reply, Reply> {
    // Clone the hook out: the lock is never held across the await.
    let hook = state.reload.read().clone();
    let Some(hook) = hook else {
        return Err(Reply::error(
            StatusCode::NOT_IMPLEMENTED,
            "hot reload is not available in this version: restart the SBC to apply a changed config (validate it first with `sbc check-config FILE`)",
        ));
    };
    tracing::info!("admin: reload requested");
    match hook().await {
        Ok(report) => Ok(Reply::json(StatusCode::OK, &report)),
        Err(e) => Err(Reply::error(StatusCode::UNPROCESSABLE_ENTITY, e)),
    }
}

/// What a failover or failback did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReport {
    /// The pool.
    pub pool: String,
    /// Active node before the command.
    pub previous: Option<String>,
    /// Active node after it.
    pub active: Option<String>,
    /// Whether the active node moved (a failback with the primary active is a no-op).
    pub changed: bool,
}

/// Drain timeouts an operator may ask for: up to a day.
const MAX_DRAIN: Duration = Duration::from_secs(86_400);

/// `POST /drain[?timeout_secs=N]` starts draining (or moves the deadline of the drain in
/// progress) and answers the drain's state; `?state=off` calls it off (409 when there is
/// none, or it is a shutdown's).
fn drain(state: &State, query: &str) -> Result<Reply, Reply> {
    if let Some(v) = query_param(query, "state") {
        match parse_on_off(&v) {
            Some(true) => {}
            Some(false) => {
                return match state.ctx.drain.cancel() {
                    Ok(()) => Ok(Reply::json(
                        StatusCode::OK,
                        &serde_json::json!({ "draining": false }),
                    )),
                    Err(e) => Err(Reply::error(StatusCode::CONFLICT, e.to_string())),
                };
            }
            None => {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("state must be on or off, got {v:?}"),
                ))
            }
        }
    }
    let timeout = match query_param(query, "timeout_secs") {
        None if state.ctx.drain_default.is_zero() => Duration::from_secs(600),
        None => state.ctx.drain_default,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=MAX_DRAIN.as_secs()).contains(&n) => Duration::from_secs(n),
            _ => {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "timeout_secs must be a whole number from 1 to {}, got {v:?}",
                        MAX_DRAIN.as_secs()
                    ),
                ))
            }
        },
    };
    let report = state.ctx.drain.start(timeout, false);
    Ok(Reply::json(StatusCode::OK, &report))
}

fn failover(state: &State, pool: &str, query: &str) -> Result<Reply, Reply> {
    let (idx, before) = state.pool(pool)?;
    let reason = query_param(query, "reason").unwrap_or_else(|| "manual".to_string());
    tracing::info!(pool = %pool, %reason, "admin: failover requested");
    state
        .ctx
        .health
        .failover(idx, &reason)
        .map_err(health_error)?;
    Ok(switch_report(state, pool, before))
}

fn failback(state: &State, pool: &str) -> Result<Reply, Reply> {
    let (idx, before) = state.pool(pool)?;
    tracing::info!(pool = %pool, "admin: failback requested");
    state.ctx.health.failback(idx).map_err(health_error)?;
    Ok(switch_report(state, pool, before))
}

fn switch_report(state: &State, pool: &str, before: PoolStatus) -> Reply {
    let after = state.pool(pool).map(|(_, p)| p.active).unwrap_or_default();
    Reply::json(
        StatusCode::OK,
        &SwitchReport {
            pool: pool.to_string(),
            changed: after != before.active,
            previous: before.active,
            active: after,
        },
    )
}

/// What a maintenance command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceReport {
    /// The node.
    pub node: String,
    /// Its pool.
    pub pool: String,
    /// Its state afterwards.
    pub state: String,
    /// The pool's active node afterwards.
    pub active: Option<String>,
}

fn parse_on_off(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Some(true),
        "off" | "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn maintenance(state: &State, node: &str, query: &str, body: &[u8]) -> Result<Reply, Reply> {
    #[derive(Deserialize)]
    struct Body {
        on: bool,
    }
    let bad = || {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "say on or off: ?state=on, ?state=off, or a JSON body {\"on\": true}",
        )
    };
    let on = match query_param(query, "state") {
        Some(v) => parse_on_off(&v).ok_or_else(bad)?,
        None if !body.iter().all(u8::is_ascii_whitespace) => {
            serde_json::from_slice::<Body>(body).map_err(|_| bad())?.on
        }
        None => return Err(bad()),
    };
    let health = &state.ctx.health;
    let idx = health
        .node_index(node)
        .ok_or_else(|| Reply::error(StatusCode::NOT_FOUND, format!("no node named {node}")))?;
    tracing::info!(node = %node, on, "admin: maintenance requested");
    health.set_maintenance(idx, on).map_err(health_error)?;
    let pool = health
        .status()
        .into_iter()
        .find(|p| p.nodes.iter().any(|n| n.index == idx))
        .ok_or_else(|| Reply::error(StatusCode::NOT_FOUND, format!("no node named {node}")))?;
    let node_state = pool
        .nodes
        .iter()
        .find(|n| n.index == idx)
        .map(|n| n.state.as_str().to_string())
        .unwrap_or_default();
    Ok(Reply::json(
        StatusCode::OK,
        &MaintenanceReport {
            node: node.to_string(),
            pool: pool.name,
            state: node_state,
            active: pool.active,
        },
    ))
}

/// The first value of `key` in a query string, percent-decoded (`+` is a space).
fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let byte = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = byte {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("a=1&reason=planned+work%21&x", "reason").as_deref(),
            Some("planned work!")
        );
        assert_eq!(query_param("x&state=on", "state").as_deref(), Some("on"));
        assert_eq!(query_param("state", "state").as_deref(), Some(""));
        assert_eq!(query_param("", "state"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%e2%82%ac"), "\u{20ac}");
    }

    #[test]
    fn on_off_words() {
        assert_eq!(parse_on_off("ON"), Some(true));
        assert_eq!(parse_on_off("off"), Some(false));
        assert_eq!(parse_on_off("maybe"), None);
    }
}
