//! The file as written: serde structs mirroring the TOML keys one to one.
//!
//! Leaf values are kept as `Spanned` text/integers so validation can point
//! at them; tables are never wrapped in `Spanned` (it fails on implicit
//! tables such as `general.name = "x"` at the top level) — their positions
//! come from [`crate::locate::Index`] instead. Enumerations, addresses and
//! numbers are parsed in [`crate::validate`], so every message is ours and
//! names the accepted values and ranges.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) type Text = Spanned<String>;
pub(crate) type Int = Spanned<i64>;
pub(crate) type Bool = Spanned<bool>;
pub(crate) type TextList = Spanned<Vec<Text>>;
pub(crate) type IntList = Spanned<Vec<Int>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub general: RawGeneral,
    #[serde(default)]
    pub listen: Vec<RawListener>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub timers: RawTimers,
    #[serde(default)]
    pub pool: Vec<RawPool>,
    #[serde(default)]
    pub trunk: Vec<RawTrunk>,
    #[serde(default)]
    pub phones: RawPhones,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub media: RawMedia,
    #[serde(default)]
    pub ratelimit: RawRateLimit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGeneral {
    pub name: Option<Text>,
    pub secret: Option<Text>,
    pub drain_secs: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub transport: Text,
    pub addr: Text,
    pub advertise: Option<Text>,
    pub side: Option<Text>,
    pub cert: Option<Text>,
    pub key: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_message_size: Option<Int>,
    pub max_headers: Option<Int>,
    pub max_via: Option<Int>,
    pub idle_timeout_secs: Option<Int>,
    pub message_timeout_ms: Option<Int>,
    pub tcp_connect_timeout_ms: Option<Int>,
    pub tls_handshake_timeout_ms: Option<Int>,
    pub max_connections: Option<Int>,
    pub max_connections_per_source: Option<Int>,
    pub max_transactions_per_source: Option<Int>,
    pub overload_queue_ms: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimers {
    pub t1_ms: Option<Int>,
    pub t2_ms: Option<Int>,
    pub t4_ms: Option<Int>,
    pub timer_c_secs: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub name: Text,
    pub failback: Option<Text>,
    pub failback_hold_secs: Option<Int>,
    pub branch_timeout_ms: Option<Int>,
    pub suspect_after_ms: Option<Int>,
    pub shadow_registration: Option<Bool>,
    pub probe: Option<RawProbe>,
    #[serde(default)]
    pub node: Vec<RawNode>,
    #[serde(default)]
    pub webhook: Vec<RawWebhook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProbe {
    pub interval_ms: Option<Int>,
    pub timeout_ms: Option<Int>,
    pub failures: Option<Int>,
    pub successes: Option<Int>,
    pub alive_codes: Option<IntList>,
    pub start_grace_secs: Option<Int>,
    pub witnesses: Option<TextList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub name: Text,
    pub address: Text,
    pub transport: Option<Text>,
    pub tls_server_name: Option<Text>,
    pub tls_ca: Option<Text>,
    pub options: Option<Bool>,
    pub http_url: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    pub on: Option<TextList>,
    pub method: Option<Text>,
    pub url: Text,
    /// A table, so not `Spanned` (see the module comment); header names
    /// are located through the index.
    pub headers: Option<BTreeMap<String, Text>>,
    pub body: Option<Text>,
    pub timeout_ms: Option<Int>,
    pub retries: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrunk {
    pub name: Text,
    pub sources: TextList,
    pub address: Text,
    pub transport: Option<Text>,
    pub tls_server_name: Option<Text>,
    pub tls_ca: Option<Text>,
    pub domains: Option<TextList>,
    pub pool: Option<Text>,
    pub max_calls: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPhones {
    pub domains: Option<TextList>,
    pub pool: Option<Text>,
    pub sources: Option<TextList>,
    pub expires_secs: Option<Int>,
    pub expires_spread_percent: Option<Int>,
    pub reregister_rate: Option<Int>,
    pub hide_topology: Option<Bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: Option<Text>,
    pub token: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMedia {
    pub enabled: Option<Bool>,
    pub port_min: Option<Int>,
    pub port_max: Option<Int>,
    pub timeout_secs: Option<Int>,
    pub hold_timeout_secs: Option<Int>,
    pub unsaveable_timeout_secs: Option<Int>,
    pub relatch_quiet_ms: Option<Int>,
    pub workers: Option<Int>,
    pub io: Option<Text>,
    pub public: Option<RawMediaSide>,
    pub internal: Option<RawMediaSide>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMediaSide {
    pub address: Option<Text>,
    pub advertise: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub enabled: Option<Bool>,
    pub register_rate: Option<Int>,
    pub register_burst: Option<Int>,
    pub invite_rate: Option<Int>,
    pub invite_burst: Option<Int>,
    pub options_rate: Option<Int>,
    pub options_burst: Option<Int>,
    pub block_after: Option<Int>,
    pub block_secs: Option<Int>,
    pub max_sources: Option<Int>,
    pub exempt_trunks: Option<Bool>,
    pub exempt_nodes: Option<Bool>,
    pub drop_scanners: Option<Bool>,
    pub scanner_agents: Option<TextList>,
}
