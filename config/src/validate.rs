//! Turns the file as written ([`crate::raw`]) into the resolved
//! [`Config`], checking every rule the schema states and pointing errors at
//! the offending key.
//!
//! Checks run in file-schema order (general, listen, limits, timers, pool,
//! trunk, phones, admin, media, ratelimit) and stop at the first error.

use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::error::ConfigError;
use crate::locate::Index;
use crate::net::{self, Host};
use crate::raw::{
    Bool, Int, RawAdmin, RawConfig, RawGeneral, RawLimits, RawListener, RawMedia, RawMediaSide,
    RawNode, RawPhones, RawPool, RawProbe, RawRateLimit, RawTimers, RawTrunk, RawWebhook, Text,
    TextList,
};
use crate::types::{
    next_placeholder, Admin, Advertise, Config, Failback, General, HttpUrl, Limits, Listener,
    Media, MediaIo, MediaSide, Node, Phones, Pool, Probe, Rate, RateLimit, Side, Timers, Transport,
    Trunk, Webhook, WebhookEvent, TEMPLATE_PLACEHOLDERS,
};

/// Minimum length of `general.secret` and `admin.token`: shorter keys are
/// guessable and would let an attacker forge flow tokens or admin calls.
const MIN_SECRET_LEN: usize = 16;

/// Longest accepted name (`general.name`, pools, nodes, trunks), so names
/// stay readable in logs, headers and metric labels.
const MAX_NAME_LEN: usize = 64;

/// Builds the resolved configuration from the deserialized file.
pub(crate) fn build(
    raw: RawConfig,
    text: &str,
    origin: &Path,
    index: Option<Index>,
) -> Result<Config, ConfigError> {
    let base = origin
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let cx = Ctx {
        file: origin,
        text,
        base: absolute(base),
        index,
    };
    let general = cx.general(&raw.general)?;
    let listen = cx.listeners(&raw.listen)?;
    let limits = cx.limits(&raw.limits)?;
    let timers = cx.timers(&raw.timers)?;
    let pools = cx.pools(&raw.pool)?;
    let trunks = cx.trunks(&raw.trunk, &pools)?;
    let phones = cx.phones(&raw.phones, &pools)?;
    let admin = cx.admin(&raw.admin)?;
    let media = cx.media(&raw.media, &listen)?;
    let ratelimit = cx.ratelimit(&raw.ratelimit)?;
    Ok(Config {
        general,
        listen,
        limits,
        timers,
        pools,
        trunks,
        phones,
        admin,
        media,
        ratelimit,
        source: absolute(origin),
    })
}

/// Makes `path` absolute against the current directory without touching
/// the file system (no symlink resolution), keeping it as is if that fails.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    base: PathBuf,
    index: Option<Index>,
}

impl Ctx<'_> {
    /// An error at a value's span.
    fn at(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file.to_path_buf(), self.text, span, field, message)
    }

    /// An error about a table or a missing key: points at the table `path`
    /// (its header), or the top of the file when it is not in the file.
    fn at_table(&self, path: &str, field: &str, message: impl Into<String>) -> ConfigError {
        let span = self
            .index
            .as_ref()
            .and_then(|i| i.span_of(path))
            .unwrap_or(0..0);
        self.at(span, field, message)
    }

    fn name(&self, value: &Text, field: &str, what: &str) -> Result<String, ConfigError> {
        let name = value.get_ref();
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(name.clone())
        } else {
            Err(self.at(
                value.span(),
                field,
                format!(
                    "{what} name \"{name}\" must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
                ),
            ))
        }
    }

    fn transport(&self, value: Option<&Text>, field: &str) -> Result<Transport, ConfigError> {
        let Some(value) = value else {
            return Ok(Transport::default());
        };
        match value.get_ref().to_ascii_lowercase().as_str() {
            "udp" => Ok(Transport::Udp),
            "tcp" => Ok(Transport::Tcp),
            "tls" => Ok(Transport::Tls),
            other => Err(self.at(
                value.span(),
                field,
                format!("\"{other}\" is not a transport; expected \"udp\", \"tcp\" or \"tls\""),
            )),
        }
    }

    fn socket_addr(&self, value: &Text, field: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().map_err(|_| {
            self.at(
                value.span(),
                field,
                format!(
                    "\"{}\" is not an IP address with a port, e.g. \"0.0.0.0:5060\" or \"[::]:5060\"",
                    value.get_ref()
                ),
            )
        })
    }

    /// An integer in `range` (or `default` when absent).
    fn int(
        &self,
        value: Option<&Int>,
        field: &str,
        range: RangeInclusive<i64>,
        default: u64,
        unit: &str,
    ) -> Result<u64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        if !range.contains(&n) {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            return Err(self.at(
                value.span(),
                field,
                format!(
                    "must be from {} to {}{unit}, got {n}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(n.unsigned_abs())
    }

    /// A file path relative to the config file's directory, made absolute;
    /// the file must exist and be readable now, so a typo fails at load
    /// instead of at the first TLS handshake.
    fn file(&self, value: &Text, field: &str) -> Result<PathBuf, ConfigError> {
        let written = value.get_ref();
        if written.is_empty() {
            return Err(self.at(value.span(), field, "file path is empty"));
        }
        let path = absolute(&self.base.join(written));
        let fail = |message: String| self.at(value.span(), field, message);
        match std::fs::metadata(&path) {
            Err(e) => Err(fail(format!("cannot read \"{}\": {e}", path.display()))),
            Ok(meta) if !meta.is_file() => Err(fail(format!(
                "\"{}\" is not a regular file",
                path.display()
            ))),
            Ok(_) => match std::fs::File::open(&path) {
                Ok(_) => Ok(path),
                Err(e) => Err(fail(format!("cannot open \"{}\": {e}", path.display()))),
            },
        }
    }

    fn general(&self, raw: &RawGeneral) -> Result<General, ConfigError> {
        let mut general = General::default();
        if let Some(name) = &raw.name {
            let text = name.get_ref();
            if text.trim().is_empty() || text.chars().count() > MAX_NAME_LEN {
                return Err(self.at(
                    name.span(),
                    "general.name",
                    format!("must be 1 to {MAX_NAME_LEN} characters"),
                ));
            }
            if text.chars().any(char::is_control) {
                return Err(self.at(
                    name.span(),
                    "general.name",
                    "must not contain control characters (it is written into SIP headers)",
                ));
            }
            general.name = text.clone();
        }
        if let Some(secret) = &raw.secret {
            let len = secret.get_ref().chars().count();
            if len < MIN_SECRET_LEN {
                return Err(self.at(
                    secret.span(),
                    "general.secret",
                    format!(
                        "must be at least {MIN_SECRET_LEN} characters (it keys the HMAC of flow tokens), got {len}"
                    ),
                ));
            }
            general.secret = Some(secret.get_ref().clone());
        }
        general.drain = std::time::Duration::from_secs(self.int(
            raw.drain_secs.as_ref(),
            "general.drain_secs",
            0..=86_400,
            0,
            "seconds",
        )?);
        Ok(general)
    }

    fn listeners(&self, raw: &[RawListener]) -> Result<Vec<Listener>, ConfigError> {
        if raw.is_empty() {
            return Err(self.at_table(
                "listen",
                "listen",
                "at least one [[listen]] table is required",
            ));
        }
        let mut out: Vec<Listener> = Vec::with_capacity(raw.len());
        for (i, l) in raw.iter().enumerate() {
            let p = format!("listen[{i}]");
            let transport = self.transport(Some(&l.transport), &format!("{p}.transport"))?;
            let addr = self.socket_addr(&l.addr, &format!("{p}.addr"))?;

            let advertise = match &l.advertise {
                None => None,
                Some(a) => {
                    let field = format!("{p}.advertise");
                    let (host, port) = net::parse_host_port(a.get_ref())
                        .map_err(|m| self.at(a.span(), &field, m))?;
                    if host.ip().is_some_and(|ip| ip.is_unspecified()) {
                        return Err(self.at(
                            a.span(),
                            &field,
                            "must be an address peers can reach, not a wildcard address",
                        ));
                    }
                    Some(Advertise {
                        host: host.header_text(),
                        port,
                    })
                }
            };
            if advertise.is_none() && addr.ip().is_unspecified() {
                return Err(self.at(
                    l.addr.span(),
                    &format!("{p}.advertise"),
                    format!(
                        "required because addr {addr} is a wildcard address: peers need a reachable host:port for Via, Record-Route and Path"
                    ),
                ));
            }

            let side = match &l.side {
                None => Side::default(),
                Some(s) => match s.get_ref().to_ascii_lowercase().as_str() {
                    "public" => Side::Public,
                    "internal" => Side::Internal,
                    "both" => Side::Both,
                    other => {
                        return Err(self.at(
                            s.span(),
                            &format!("{p}.side"),
                            format!(
                                "\"{other}\" is not a side; expected \"public\", \"internal\" or \"both\""
                            ),
                        ))
                    }
                },
            };

            let (cert, key) = if transport == Transport::Tls {
                let cert = self.tls_file(l.cert.as_ref(), &p, "cert")?;
                let key = self.tls_file(l.key.as_ref(), &p, "key")?;
                (Some(cert), Some(key))
            } else {
                for (name, value) in [("cert", &l.cert), ("key", &l.key)] {
                    if let Some(value) = value {
                        return Err(self.at(
                            value.span(),
                            &format!("{p}.{name}"),
                            format!("only a tls listener takes a {name}; this one is {transport}"),
                        ));
                    }
                }
                (None, None)
            };

            // Two sockets of the same kind cannot bind one address (port 0
            // gets a fresh port each time, so it never clashes).
            if addr.port() != 0 {
                if let Some((j, other)) = out.iter().enumerate().find(|(_, o)| {
                    o.addr == addr && o.transport.is_stream() == transport.is_stream()
                }) {
                    return Err(self.at(
                        l.addr.span(),
                        &format!("{p}.addr"),
                        if other.transport == transport {
                            format!("{addr} is already used by listen[{j}] ({transport})")
                        } else {
                            format!(
                                "{addr} is already used by listen[{j}] ({}); tcp and tls listeners both need the TCP port",
                                other.transport
                            )
                        },
                    ));
                }
            }

            out.push(Listener {
                transport,
                addr,
                advertise,
                side,
                cert,
                key,
            });
        }
        Ok(out)
    }

    fn tls_file(
        &self,
        value: Option<&Text>,
        listener: &str,
        name: &str,
    ) -> Result<PathBuf, ConfigError> {
        let field = format!("{listener}.{name}");
        match value {
            Some(value) => self.file(value, &field),
            None => Err(self.at_table(
                listener,
                &field,
                format!(
                    "required for a tls listener (PEM {})",
                    if name == "cert" {
                        "certificate chain"
                    } else {
                        "private key"
                    }
                ),
            )),
        }
    }

    fn limits(&self, raw: &RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let int = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: usize, unit| {
            let n = self.int(
                v.as_ref(),
                &format!("limits.{key}"),
                range,
                to_u64(default),
                unit,
            )?;
            Ok::<usize, ConfigError>(usize::try_from(n).unwrap_or(usize::MAX))
        };
        let secs = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: Duration| {
            let n = self.int(
                v.as_ref(),
                &format!("limits.{key}"),
                range,
                default.as_secs(),
                "seconds",
            )?;
            Ok::<Duration, ConfigError>(Duration::from_secs(n))
        };
        let ms = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: Duration| {
            let n = self.int(
                v.as_ref(),
                &format!("limits.{key}"),
                range,
                millis(default),
                "milliseconds",
            )?;
            Ok::<Duration, ConfigError>(Duration::from_millis(n))
        };
        let max_connections = int(
            &raw.max_connections,
            "max_connections",
            1..=1_000_000,
            d.max_connections,
            "",
        )?;
        // The default per-source cap follows a smaller max_connections, so
        // lowering only max_connections is not an error.
        let max_connections_per_source = int(
            &raw.max_connections_per_source,
            "max_connections_per_source",
            1..=i64::try_from(max_connections).unwrap_or(i64::MAX),
            d.max_connections_per_source.min(max_connections),
            "(at most max_connections)",
        )?;
        Ok(Limits {
            max_message_size: int(
                &raw.max_message_size,
                "max_message_size",
                1024..=1_048_576,
                d.max_message_size,
                "bytes",
            )?,
            max_headers: int(&raw.max_headers, "max_headers", 8..=1024, d.max_headers, "")?,
            max_via: int(&raw.max_via, "max_via", 2..=256, d.max_via, "")?,
            idle_timeout: secs(
                &raw.idle_timeout_secs,
                "idle_timeout_secs",
                10..=86_400,
                d.idle_timeout,
            )?,
            message_timeout: ms(
                &raw.message_timeout_ms,
                "message_timeout_ms",
                1000..=60_000,
                d.message_timeout,
            )?,
            tcp_connect_timeout: ms(
                &raw.tcp_connect_timeout_ms,
                "tcp_connect_timeout_ms",
                100..=60_000,
                d.tcp_connect_timeout,
            )?,
            tls_handshake_timeout: ms(
                &raw.tls_handshake_timeout_ms,
                "tls_handshake_timeout_ms",
                100..=60_000,
                d.tls_handshake_timeout,
            )?,
            max_connections,
            max_connections_per_source,
            max_transactions_per_source: int(
                &raw.max_transactions_per_source,
                "max_transactions_per_source",
                1..=1_000_000,
                d.max_transactions_per_source,
                "",
            )?,
            overload_queue: ms(
                &raw.overload_queue_ms,
                "overload_queue_ms",
                0..=60_000,
                d.overload_queue,
            )?,
        })
    }

    fn timers(&self, raw: &RawTimers) -> Result<Timers, ConfigError> {
        let d = Timers::default();
        let ms = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: u64| {
            self.int(
                v.as_ref(),
                &format!("timers.{key}"),
                range,
                default,
                "milliseconds",
            )
        };
        let t1 = ms(&raw.t1_ms, "t1_ms", 1..=10_000, millis(d.t1))?;
        // T2 caps intervals that start at T1, so it may not be below T1; its
        // default follows a raised T1.
        let t2 = ms(
            &raw.t2_ms,
            "t2_ms",
            i64::try_from(t1).unwrap_or(i64::MAX)..=60_000,
            millis(d.t2).max(t1),
        )
        .map_err(|mut e| {
            e.message.push_str(" (t2_ms may not be below t1_ms)");
            e
        })?;
        let t4 = ms(&raw.t4_ms, "t4_ms", 0..=60_000, millis(d.t4))?;
        let timer_c = self.int(
            raw.timer_c_secs.as_ref(),
            "timers.timer_c_secs",
            10..=86_400,
            d.timer_c.as_secs(),
            "seconds",
        )?;
        Ok(Timers {
            t1: Duration::from_millis(t1),
            t2: Duration::from_millis(t2),
            t4: Duration::from_millis(t4),
            timer_c: Duration::from_secs(timer_c),
        })
    }

    fn pools(&self, raw: &[RawPool]) -> Result<Vec<Pool>, ConfigError> {
        if raw.is_empty() {
            return Err(self.at_table("pool", "pool", "at least one [[pool]] table is required"));
        }
        let mut pools: Vec<Pool> = Vec::with_capacity(raw.len());
        // (name, path) of every node so far, for the cross-pool uniqueness check.
        let mut node_names: Vec<(String, String)> = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let path = format!("pool[{i}]");
            let name = self.name(&p.name, &format!("{path}.name"), "pool")?;
            if let Some(j) = pools.iter().position(|q| q.name == name) {
                return Err(self.at(
                    p.name.span(),
                    &format!("{path}.name"),
                    format!("pool name \"{name}\" is already used by pool[{j}]"),
                ));
            }
            if p.node.is_empty() {
                return Err(self.at_table(
                    &path,
                    &format!("{path}.node"),
                    format!("pool \"{name}\" needs at least one [[pool.node]]"),
                ));
            }
            let mut nodes = Vec::with_capacity(p.node.len());
            for (k, n) in p.node.iter().enumerate() {
                let np = format!("{path}.node[{k}]");
                let node_name = self.name(&n.name, &format!("{np}.name"), "node")?;
                if let Some((_, other)) = node_names.iter().find(|(m, _)| *m == node_name) {
                    return Err(self.at(
                        n.name.span(),
                        &format!("{np}.name"),
                        format!(
                            "node name \"{node_name}\" is already used by {other} (node names are unique across all pools)"
                        ),
                    ));
                }
                node_names.push((node_name.clone(), np.clone()));
                let peer = self.peer(
                    &np,
                    &n.address,
                    n.transport.as_ref(),
                    n.tls_server_name.as_ref(),
                    n.tls_ca.as_ref(),
                )?;
                let (options, http_url) = self.node_probes(n, &np)?;
                nodes.push(Node {
                    name: node_name,
                    address: peer.address,
                    address_text: n.address.get_ref().clone(),
                    transport: peer.transport,
                    tls_server_name: peer.tls_server_name,
                    tls_ca: peer.tls_ca,
                    options,
                    http_url,
                });
            }
            let failback = match &p.failback {
                None => Failback::default(),
                Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
                    "manual" => Failback::Manual,
                    "auto" => Failback::Auto,
                    other => {
                        return Err(self.at(
                            v.span(),
                            &format!("{path}.failback"),
                            format!(
                            "\"{other}\" is not a failback policy; expected \"manual\" or \"auto\""
                        ),
                        ))
                    }
                },
            };
            let failback_hold = self.int(
                p.failback_hold_secs.as_ref(),
                &format!("{path}.failback_hold_secs"),
                1..=86_400,
                300,
                "seconds",
            )?;
            // Below Timer B (64 x T1 = 32 s by default): past that the
            // transaction has failed anyway and there is nothing to retry.
            let branch_timeout = self.int(
                p.branch_timeout_ms.as_ref(),
                &format!("{path}.branch_timeout_ms"),
                50..=32_000,
                1000,
                "milliseconds",
            )?;
            let suspect_after = self
                .int(
                    p.suspect_after_ms.as_ref(),
                    &format!("{path}.suspect_after_ms"),
                    0..=i64::try_from(branch_timeout.saturating_sub(1)).unwrap_or(0),
                    250.min(branch_timeout.saturating_sub(1)),
                    "milliseconds",
                )
                .map_err(|mut e| {
                    e.message
                        .push_str(" (suspect_after_ms must stay below branch_timeout_ms)");
                    e
                })?;
            let shadow_registration = p.shadow_registration.as_ref().is_some_and(|b| *b.get_ref());
            let probe = self.probe(p.probe.as_ref(), &format!("{path}.probe"))?;
            let webhooks = p
                .webhook
                .iter()
                .enumerate()
                .map(|(k, w)| self.webhook(w, &format!("{path}.webhook[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            pools.push(Pool {
                name,
                nodes,
                failback,
                failback_hold: Duration::from_secs(failback_hold),
                branch_timeout: Duration::from_millis(branch_timeout),
                suspect_after: (suspect_after > 0).then(|| Duration::from_millis(suspect_after)),
                shadow_registration,
                probe,
                webhooks,
            });
        }
        Ok(pools)
    }

    /// A node's `options` / `http_url` probes; at least one must be on, or
    /// nothing would ever tell whether the node is alive.
    fn node_probes(&self, n: &RawNode, np: &str) -> Result<(bool, Option<String>), ConfigError> {
        let options = !matches!(&n.options, Some(o) if !*o.get_ref());
        let http_url = match &n.http_url {
            Some(v) => {
                self.http_url(v, &format!("{np}.http_url"))?;
                Some(v.get_ref().clone())
            }
            None => None,
        };
        if let (false, None, Some(o)) = (options, &http_url, &n.options) {
            return Err(self.at(
                o.span(),
                &format!("{np}.options"),
                "a node needs at least one probe: with options = false, set http_url",
            ));
        }
        Ok((options, http_url))
    }

    fn http_url(&self, value: &Text, field: &str) -> Result<HttpUrl, ConfigError> {
        HttpUrl::parse(value.get_ref()).map_err(|m| self.at(value.span(), field, m))
    }

    fn probe(&self, raw: Option<&RawProbe>, path: &str) -> Result<Probe, ConfigError> {
        let d = Probe::default();
        let empty = RawProbe::default();
        let raw = raw.unwrap_or(&empty);
        let field = |key: &str| format!("{path}.{key}");
        let count = |v: &Option<Int>, key: &str, default: u32| {
            self.int(v.as_ref(), &field(key), 1..=100, u64::from(default), "")
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let interval = self.int(
            raw.interval_ms.as_ref(),
            &field("interval_ms"),
            100..=600_000,
            millis(d.interval),
            "milliseconds",
        )?;
        // The default follows a shortened interval, so setting only
        // interval_ms never makes the file invalid.
        let timeout = self
            .int(
                raw.timeout_ms.as_ref(),
                &field("timeout_ms"),
                10..=i64::try_from(interval).unwrap_or(i64::MAX) - 1,
                millis(d.timeout).min(interval * 4 / 5),
                "milliseconds",
            )
            .map_err(|mut e| {
                e.message
                    .push_str(" (timeout_ms must be below interval_ms, so probes never overlap)");
                e
            })?;
        let failures = count(&raw.failures, "failures", d.failures)?;
        let successes = count(&raw.successes, "successes", d.successes)?;
        let mut alive_codes: Vec<u16> = Vec::new();
        if let Some(list) = &raw.alive_codes {
            for (k, code) in list.get_ref().iter().enumerate() {
                let f = format!("{path}.alive_codes[{k}]");
                let n = self.int(Some(code), &f, 200..=699, 0, "(a final SIP response code)")?;
                let n = u16::try_from(n).unwrap_or(u16::MAX);
                if let Some(j) = alive_codes.iter().position(|c| *c == n) {
                    return Err(self.at(
                        code.span(),
                        &f,
                        format!("{n} is already listed as alive_codes[{j}]"),
                    ));
                }
                alive_codes.push(n);
            }
        }
        let start_grace = self.int(
            raw.start_grace_secs.as_ref(),
            &field("start_grace_secs"),
            0..=3600,
            d.start_grace.as_secs(),
            "seconds",
        )?;
        let mut witnesses: Vec<String> = Vec::new();
        if let Some(list) = &raw.witnesses {
            for (k, w) in list.get_ref().iter().enumerate() {
                let f = format!("{path}.witnesses[{k}]");
                self.http_url(w, &f)?;
                if let Some(j) = witnesses.iter().position(|o| o == w.get_ref()) {
                    return Err(self.at(
                        w.span(),
                        &f,
                        format!("\"{}\" is already listed as witnesses[{j}]", w.get_ref()),
                    ));
                }
                witnesses.push(w.get_ref().clone());
            }
        }
        Ok(Probe {
            interval: Duration::from_millis(interval),
            timeout: Duration::from_millis(timeout),
            failures,
            successes,
            alive_codes,
            start_grace: Duration::from_secs(start_grace),
            witnesses,
        })
    }

    fn webhook(&self, raw: &RawWebhook, path: &str) -> Result<Webhook, ConfigError> {
        let on = match &raw.on {
            None => vec![WebhookEvent::Failover, WebhookEvent::Failback],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.at(
                        list.span(),
                        &format!("{path}.on"),
                        "must name at least one event (\"failover\", \"failback\"); remove the webhook to disable it",
                    ));
                }
                let mut on = Vec::with_capacity(2);
                for (k, e) in list.get_ref().iter().enumerate() {
                    let f = format!("{path}.on[{k}]");
                    let event = match e.get_ref().to_ascii_lowercase().as_str() {
                        "failover" => WebhookEvent::Failover,
                        "failback" => WebhookEvent::Failback,
                        other => {
                            return Err(self.at(
                                e.span(),
                                &f,
                                format!("\"{other}\" is not an event; expected \"failover\" or \"failback\""),
                            ))
                        }
                    };
                    if on.contains(&event) {
                        return Err(self.at(e.span(), &f, format!("\"{event}\" is listed twice")));
                    }
                    on.push(event);
                }
                on
            }
        };
        let method = match &raw.method {
            None => "POST".to_string(),
            Some(m) => {
                let upper = m.get_ref().to_ascii_uppercase();
                if !matches!(upper.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
                    return Err(self.at(
                        m.span(),
                        &format!("{path}.method"),
                        format!(
                            "\"{}\" is not a supported method; expected GET, POST, PUT, PATCH or DELETE",
                            m.get_ref()
                        ),
                    ));
                }
                upper
            }
        };
        self.http_url(&raw.url, &format!("{path}.url"))?;
        let mut headers = Vec::new();
        for (name, value) in raw.headers.iter().flatten() {
            let f = format!("{path}.headers.{name}");
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err(self.at(
                    value.span(),
                    &f,
                    format!("\"{name}\" is not a valid HTTP header name"),
                ));
            }
            let lower = name.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "host" | "content-length" | "transfer-encoding" | "connection"
            ) {
                return Err(self.at(
                    value.span(),
                    &f,
                    format!("\"{name}\" is set by the SBC itself and may not be configured"),
                ));
            }
            if value.get_ref().chars().any(|c| c.is_control() && c != '\t') {
                return Err(self.at(
                    value.span(),
                    &f,
                    "header values may not contain line breaks or control characters",
                ));
            }
            headers.push((name.clone(), value.get_ref().clone()));
        }
        let body = match &raw.body {
            None => Webhook::DEFAULT_BODY.to_string(),
            Some(b) => {
                let mut rest = b.get_ref().as_str();
                while let Some((_, name, after)) = next_placeholder(rest) {
                    if !TEMPLATE_PLACEHOLDERS.contains(&name) {
                        let known: Vec<String> = TEMPLATE_PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect();
                        return Err(self.at(
                            b.span(),
                            &format!("{path}.body"),
                            format!(
                                "unknown placeholder {{{name}}}; known placeholders: {}",
                                known.join(", ")
                            ),
                        ));
                    }
                    rest = after;
                }
                b.get_ref().clone()
            }
        };
        let timeout = self.int(
            raw.timeout_ms.as_ref(),
            &format!("{path}.timeout_ms"),
            100..=60_000,
            2000,
            "milliseconds",
        )?;
        let retries = self.int(
            raw.retries.as_ref(),
            &format!("{path}.retries"),
            0..=10,
            2,
            "",
        )?;
        Ok(Webhook {
            on,
            method,
            url: raw.url.get_ref().clone(),
            headers,
            body,
            timeout: Duration::from_millis(timeout),
            retries: u32::try_from(retries).unwrap_or(u32::MAX),
        })
    }

    /// The address/transport/TLS keys shared by nodes and trunks.
    fn peer(
        &self,
        path: &str,
        address: &Text,
        transport: Option<&Text>,
        tls_server_name: Option<&Text>,
        tls_ca: Option<&Text>,
    ) -> Result<Peer, ConfigError> {
        let transport = self.transport(transport, &format!("{path}.transport"))?;
        let field = format!("{path}.address");
        let (host, port) = net::parse_host_port(address.get_ref())
            .map_err(|m| self.at(address.span(), &field, m))?;
        if host.ip().is_some_and(|ip| ip.is_unspecified()) {
            return Err(self.at(
                address.span(),
                &field,
                "cannot send to a wildcard address; give the peer's real address",
            ));
        }
        let port = port.unwrap_or_else(|| transport.default_port());
        let resolved = net::resolve(&host, port).map_err(|m| self.at(address.span(), &field, m))?;

        for (name, value) in [("tls_server_name", tls_server_name), ("tls_ca", tls_ca)] {
            if let (Some(value), false) = (value, transport == Transport::Tls) {
                return Err(self.at(
                    value.span(),
                    &format!("{path}.{name}"),
                    format!("only used with transport = \"tls\"; this peer is {transport}"),
                ));
            }
        }
        let tls_server_name = match tls_server_name {
            Some(v) => {
                let name = v.get_ref();
                if !net::is_hostname(name) && name.parse::<std::net::IpAddr>().is_err() {
                    return Err(self.at(
                        v.span(),
                        &format!("{path}.tls_server_name"),
                        format!("\"{name}\" is not a DNS name or IP address"),
                    ));
                }
                Some(name.clone())
            }
            None if transport == Transport::Tls => match &host {
                Host::Name(name) => Some(name.clone()),
                Host::V4(_) | Host::V6(_) => None,
            },
            None => None,
        };
        let tls_ca = match tls_ca {
            Some(v) => Some(self.file(v, &format!("{path}.tls_ca"))?),
            None => None,
        };
        Ok(Peer {
            address: resolved,
            transport,
            tls_server_name,
            tls_ca,
        })
    }

    fn sources(&self, list: &TextList, path: &str) -> Result<Vec<IpNet>, ConfigError> {
        let mut out: Vec<IpNet> = Vec::with_capacity(list.get_ref().len());
        for (k, s) in list.get_ref().iter().enumerate() {
            let field = format!("{path}[{k}]");
            let net = net::parse_source(s.get_ref()).map_err(|m| self.at(s.span(), &field, m))?;
            if let Some(j) = out.iter().position(|o| *o == net) {
                return Err(self.at(
                    s.span(),
                    &field,
                    format!("{net} is already listed as {path}[{j}]"),
                ));
            }
            out.push(net);
        }
        Ok(out)
    }

    fn domains(&self, list: Option<&TextList>, path: &str) -> Result<Vec<String>, ConfigError> {
        let Some(list) = list else {
            return Ok(Vec::new());
        };
        let mut out: Vec<String> = Vec::with_capacity(list.get_ref().len());
        for (k, d) in list.get_ref().iter().enumerate() {
            let field = format!("{path}[{k}]");
            let host = net::parse_host(d.get_ref()).map_err(|m| self.at(d.span(), &field, m))?;
            let domain = host.header_text().to_ascii_lowercase();
            if let Some(j) = out.iter().position(|o| *o == domain) {
                return Err(self.at(
                    d.span(),
                    &field,
                    format!("\"{domain}\" is already listed as {path}[{j}]"),
                ));
            }
            out.push(domain);
        }
        Ok(out)
    }

    /// A `pool = "..."` reference, defaulting to the first pool.
    fn pool_ref(
        &self,
        value: Option<&Text>,
        field: &str,
        pools: &[Pool],
    ) -> Result<String, ConfigError> {
        match value {
            None => Ok(pools.first().map(|p| p.name.clone()).unwrap_or_default()),
            Some(v) if pools.iter().any(|p| p.name == *v.get_ref()) => Ok(v.get_ref().clone()),
            Some(v) => {
                let known: Vec<String> = pools.iter().map(|p| format!("\"{}\"", p.name)).collect();
                Err(self.at(
                    v.span(),
                    field,
                    format!(
                        "no pool named \"{}\"; defined pools: {}",
                        v.get_ref(),
                        known.join(", ")
                    ),
                ))
            }
        }
    }

    fn trunks(&self, raw: &[RawTrunk], pools: &[Pool]) -> Result<Vec<Trunk>, ConfigError> {
        let mut trunks: Vec<Trunk> = Vec::with_capacity(raw.len());
        for (i, t) in raw.iter().enumerate() {
            let path = format!("trunk[{i}]");
            let name = self.name(&t.name, &format!("{path}.name"), "trunk")?;
            if let Some(j) = trunks.iter().position(|o| o.name == name) {
                return Err(self.at(
                    t.name.span(),
                    &format!("{path}.name"),
                    format!("trunk name \"{name}\" is already used by trunk[{j}]"),
                ));
            }

            let sources_path = format!("{path}.sources");
            if t.sources.get_ref().is_empty() {
                return Err(self.at(
                    t.sources.span(),
                    &sources_path,
                    "must list at least one IP address or network the trunk sends from",
                ));
            }
            let sources = self.sources(&t.sources, &sources_path)?;
            // The same network on two trunks makes inbound calls ambiguous.
            for (k, net) in sources.iter().enumerate() {
                if let Some((j, other)) = trunks
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.sources.contains(net))
                {
                    let span = t.sources.get_ref().get(k).map_or(0..0, |s| s.span());
                    return Err(self.at(
                        span,
                        &format!("{sources_path}[{k}]"),
                        format!(
                            "{net} is already a source of trunk[{j}] \"{}\"; inbound calls from it would be ambiguous",
                            other.name
                        ),
                    ));
                }
            }

            let peer = self.peer(
                &path,
                &t.address,
                t.transport.as_ref(),
                t.tls_server_name.as_ref(),
                t.tls_ca.as_ref(),
            )?;

            let domains_path = format!("{path}.domains");
            let domains = self.domains(t.domains.as_ref(), &domains_path)?;
            for (k, domain) in domains.iter().enumerate() {
                if let Some((j, other)) = trunks
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.domains.contains(domain))
                {
                    let span = t
                        .domains
                        .as_ref()
                        .and_then(|list| list.get_ref().get(k))
                        .map_or(0..0, |d| d.span());
                    return Err(self.at(
                        span,
                        &format!("{domains_path}[{k}]"),
                        format!(
                            "\"{domain}\" is already a domain of trunk[{j}] \"{}\"; calls to it would be ambiguous",
                            other.name
                        ),
                    ));
                }
            }

            let pool = self.pool_ref(t.pool.as_ref(), &format!("{path}.pool"), pools)?;
            let max_calls = t
                .max_calls
                .as_ref()
                .map(|v| {
                    let field = format!("{path}.max_calls");
                    // Range-checked: the value fits a u32.
                    self.int(Some(v), &field, 1..=1_000_000, 0, "calls")
                        .map(|n| n as u32)
                })
                .transpose()?;
            trunks.push(Trunk {
                name,
                sources,
                address: peer.address,
                address_text: t.address.get_ref().clone(),
                transport: peer.transport,
                tls_server_name: peer.tls_server_name,
                tls_ca: peer.tls_ca,
                domains,
                pool,
                max_calls,
            });
        }
        Ok(trunks)
    }

    fn phones(&self, raw: &RawPhones, pools: &[Pool]) -> Result<Phones, ConfigError> {
        let domains = self.domains(raw.domains.as_ref(), "phones.domains")?;
        let pool = self.pool_ref(raw.pool.as_ref(), "phones.pool", pools)?;
        let sources =
            match &raw.sources {
                None => Phones::default().sources,
                Some(list) if list.get_ref().is_empty() => return Err(self.at(
                    list.span(),
                    "phones.sources",
                    "an empty list would refuse every phone; leave the key out to allow any source",
                )),
                Some(list) => self.sources(list, "phones.sources")?,
            };
        let d = Phones::default();
        let expires = self.int(
            raw.expires_secs.as_ref(),
            "phones.expires_secs",
            0..=86_400,
            120,
            "seconds (0 turns split expiry off)",
        )?;
        if (1..10).contains(&expires) {
            if let Some(v) = &raw.expires_secs {
                return Err(self.at(
                    v.span(),
                    "phones.expires_secs",
                    "must be 0 (off) or at least 10 seconds",
                ));
            }
        }
        let spread = self.int(
            raw.expires_spread_percent.as_ref(),
            "phones.expires_spread_percent",
            0..=50,
            u64::from(d.expires_spread_percent),
            "percent",
        )?;
        let rate = self.int(
            raw.reregister_rate.as_ref(),
            "phones.reregister_rate",
            0..=100_000,
            u64::from(d.reregister_rate),
            "flows per second",
        )?;
        Ok(Phones {
            domains,
            pool,
            sources,
            expires: (expires > 0).then(|| Duration::from_secs(expires)),
            expires_spread_percent: u32::try_from(spread).unwrap_or(10),
            reregister_rate: u32::try_from(rate).unwrap_or(50),
            hide_topology: raw
                .hide_topology
                .as_ref()
                .map_or(d.hide_topology, |b| *b.get_ref()),
        })
    }

    fn admin(&self, raw: &RawAdmin) -> Result<Admin, ConfigError> {
        let mut admin = Admin::default();
        if let Some(listen) = &raw.listen {
            admin.listen = self.socket_addr(listen, "admin.listen")?;
        }
        if let Some(token) = &raw.token {
            let len = token.get_ref().chars().count();
            if len < MIN_SECRET_LEN {
                return Err(self.at(
                    token.span(),
                    "admin.token",
                    format!("must be at least {MIN_SECRET_LEN} characters, got {len}"),
                ));
            }
            admin.token = Some(token.get_ref().clone());
        }
        if admin.token.is_none() && !admin.listen.ip().is_loopback() {
            let span = raw.listen.as_ref().map_or(0..0, |l| l.span());
            return Err(self.at(
                span,
                "admin.token",
                format!(
                    "required because admin.listen {} is not a loopback address; without it anyone who can reach the port could administer the SBC",
                    admin.listen
                ),
            ));
        }
        Ok(admin)
    }
}

impl Ctx<'_> {
    fn media(&self, raw: &RawMedia, listen: &[Listener]) -> Result<Media, ConfigError> {
        let enabled = raw.enabled.as_ref().is_none_or(|b| *b.get_ref());
        let port = |v: &Option<Int>, key: &str, default: u16| {
            self.int(
                v.as_ref(),
                &format!("media.{key}"),
                1024..=65_535,
                u64::from(default),
                "",
            )
            .map(|n| u16::try_from(n).unwrap_or(u16::MAX))
        };
        let port_min = port(&raw.port_min, "port_min", 30_000)?;
        let port_max = port(&raw.port_max, "port_max", 39_999)?;
        if port_min % 2 != 0 {
            let span = raw.port_min.as_ref().map_or(0..0, |v| v.span());
            return Err(self.at(
                span,
                "media.port_min",
                format!(
                    "must be even (RTP takes even ports, RTCP the odd one above), got {port_min}"
                ),
            ));
        }
        if u32::from(port_max) < u32::from(port_min) + 1 {
            let span = raw.port_max.as_ref().map_or(0..0, |v| v.span());
            return Err(self.at(
                span,
                "media.port_max",
                format!("must be above media.port_min ({port_min}) to hold at least one RTP/RTCP pair, got {port_max}"),
            ));
        }
        let secs = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: u64| {
            self.int(
                v.as_ref(),
                &format!("media.{key}"),
                range,
                default,
                "seconds",
            )
            .map(Duration::from_secs)
        };
        let timeout = secs(&raw.timeout_secs, "timeout_secs", 1..=86_400, 60)?;
        let hold_timeout = secs(
            &raw.hold_timeout_secs,
            "hold_timeout_secs",
            1..=86_400,
            3600,
        )?;
        let unsaveable_timeout = secs(
            &raw.unsaveable_timeout_secs,
            "unsaveable_timeout_secs",
            1..=3600,
            5,
        )?;
        let relatch_quiet = Duration::from_millis(self.int(
            raw.relatch_quiet_ms.as_ref(),
            "media.relatch_quiet_ms",
            0..=60_000,
            2000,
            "milliseconds",
        )?);
        let workers = self.int(raw.workers.as_ref(), "media.workers", 0..=256, 0, "")?;
        let io = self.media_io(raw.io.as_ref())?;
        let public = self.media_side(raw.public.as_ref(), "public", listen, Side::faces_public)?;
        let internal = self.media_side(
            raw.internal.as_ref(),
            "internal",
            listen,
            Side::faces_internal,
        )?;
        Ok(Media {
            enabled,
            public,
            internal,
            port_min,
            port_max,
            timeout,
            hold_timeout,
            unsaveable_timeout,
            relatch_quiet,
            workers: usize::try_from(workers).unwrap_or(0),
            io,
        })
    }

    fn media_io(&self, value: Option<&Text>) -> Result<MediaIo, ConfigError> {
        let Some(value) = value else {
            return Ok(MediaIo::default());
        };
        match value.get_ref().to_ascii_lowercase().as_str() {
            "epoll" => Ok(MediaIo::Epoll),
            "uring" | "io_uring" => Ok(MediaIo::Uring),
            other => Err(self.at(
                value.span(),
                "media.io",
                format!(
                    "\"{other}\" is not a media I/O interface; expected \"uring\" or \"epoll\""
                ),
            )),
        }
    }

    /// A side's addresses: as configured, or those of the first SIP listener serving that side
    /// (its advertised address when it binds a wildcard), so a small setup needs no `[media]`.
    fn media_side(
        &self,
        raw: Option<&RawMediaSide>,
        side: &str,
        listen: &[Listener],
        serves: fn(Side) -> bool,
    ) -> Result<MediaSide, ConfigError> {
        let ip = |v: &Text, key: &str| -> Result<IpAddr, ConfigError> {
            let t = v.get_ref();
            t.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| {
                    self.at(
                        v.span(),
                        &format!("media.{side}.{key}"),
                        format!("\"{t}\" is not an IP address"),
                    )
                })
        };
        let address = match raw.and_then(|r| r.address.as_ref()) {
            // A wildcard bind is fine when the advertised address says what SDP names.
            Some(a) => ip(a, "address")?,
            None => {
                let l = listen.iter().find(|l| serves(l.side)).ok_or_else(|| {
                    self.at_table(
                        "media",
                        &format!("media.{side}.address"),
                        format!("no SIP listener serves the {side} side to take the relay address from; set media.{side}.address"),
                    )
                })?;
                l.addr.ip()
            }
        };
        let advertise = match raw.and_then(|r| r.advertise.as_ref()) {
            Some(a) => ip(a, "advertise")?,
            None if !address.is_unspecified() => address,
            None => {
                // Inherit the SIP listener's advertised address when it is an IP.
                let from_listener = listen
                    .iter()
                    .filter(|l| serves(l.side))
                    .filter_map(|l| l.advertise.as_ref())
                    .find_map(|a| {
                        a.host
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<IpAddr>()
                            .ok()
                    });
                from_listener.ok_or_else(|| {
                    self.at_table(
                        &format!("media.{side}"),
                        &format!("media.{side}.advertise"),
                        format!("the relay binds a wildcard address ({address}) on the {side} side, so SDP needs an address to name; set media.{side}.advertise (or media.{side}.address)"),
                    )
                })?
            }
        };
        Ok(MediaSide { address, advertise })
    }
}

impl Ctx<'_> {
    fn ratelimit(&self, raw: &RawRateLimit) -> Result<RateLimit, ConfigError> {
        let d = RateLimit::default();
        let flag = |v: &Option<Bool>, default: bool| v.as_ref().map_or(default, |b| *b.get_ref());
        let count = |v: &Option<Int>, key: &str, range: RangeInclusive<i64>, default: u32, unit| {
            self.int(
                v.as_ref(),
                &format!("ratelimit.{key}"),
                range,
                u64::from(default),
                unit,
            )
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        };
        let rate = |per: &Option<Int>, burst: &Option<Int>, method: &str, default: Rate| {
            Ok::<Rate, ConfigError>(Rate {
                per_second: count(
                    per,
                    &format!("{method}_rate"),
                    1..=100_000,
                    default.per_second,
                    "requests per second",
                )?,
                burst: count(
                    burst,
                    &format!("{method}_burst"),
                    1..=100_000,
                    default.burst,
                    "requests",
                )?,
            })
        };
        let register = rate(
            &raw.register_rate,
            &raw.register_burst,
            "register",
            d.register,
        )?;
        let invite = rate(&raw.invite_rate, &raw.invite_burst, "invite", d.invite)?;
        let options = rate(&raw.options_rate, &raw.options_burst, "options", d.options)?;
        let block_after = count(
            &raw.block_after,
            "block_after",
            1..=100_000,
            d.block_after,
            "",
        )?;
        let block_secs = self.int(
            raw.block_secs.as_ref(),
            "ratelimit.block_secs",
            1..=86_400,
            d.block_time.as_secs(),
            "seconds",
        )?;
        let max_sources = self.int(
            raw.max_sources.as_ref(),
            "ratelimit.max_sources",
            1024..=10_000_000,
            to_u64(d.max_sources),
            "",
        )?;
        let scanner_agents = match &raw.scanner_agents {
            None => d.scanner_agents,
            Some(list) => {
                let mut out: Vec<String> = Vec::with_capacity(list.get_ref().len());
                for (k, agent) in list.get_ref().iter().enumerate() {
                    let field = format!("ratelimit.scanner_agents[{k}]");
                    let text = agent.get_ref().trim();
                    if text.is_empty() || text.len() > 128 || text.chars().any(char::is_control) {
                        return Err(self.at(
                            agent.span(),
                            &field,
                            "must be 1 to 128 characters without control characters (an empty pattern would match every User-Agent)",
                        ));
                    }
                    let lower = text.to_ascii_lowercase();
                    if let Some(j) = out.iter().position(|o| *o == lower) {
                        return Err(self.at(
                            agent.span(),
                            &field,
                            format!(
                                "\"{text}\" is already listed as ratelimit.scanner_agents[{j}]"
                            ),
                        ));
                    }
                    out.push(lower);
                }
                out
            }
        };
        Ok(RateLimit {
            enabled: flag(&raw.enabled, d.enabled),
            register,
            invite,
            options,
            block_after,
            block_time: Duration::from_secs(block_secs),
            max_sources: usize::try_from(max_sources).unwrap_or(usize::MAX),
            exempt_trunks: flag(&raw.exempt_trunks, d.exempt_trunks),
            exempt_nodes: flag(&raw.exempt_nodes, d.exempt_nodes),
            drop_scanners: flag(&raw.drop_scanners, d.drop_scanners),
            scanner_agents,
        })
    }
}

struct Peer {
    address: SocketAddr,
    transport: Transport,
    tls_server_name: Option<String>,
    tls_ca: Option<PathBuf>,
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
