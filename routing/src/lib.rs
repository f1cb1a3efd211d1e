//! Who may talk to the SBC and where a request may go, built once from the config.
//!
//! The proxy asks two questions of every request: who sent it (a PBX node, a trunk, or a
//! phone on the public side), and is the next hop one we may send to at all (a configured
//! node, a configured trunk, or a phone whose flow we hold: never an open relay). Both are
//! answered here from an immutable [`RouteTable`], so a reload can build a new table and swap
//! it in one step while transactions in flight keep the table they started with.
//!
//! Layout: [`RouteTable`] (sources, trunks, pools, allowed destinations).

use ipnet::IpNet;
use sbc_config::{Config, Transport as CfgTransport};
use std::net::{IpAddr, SocketAddr};

/// The transport of a peer, as the routing layer names it (mirrors the config).
pub use sbc_config::Transport;

/// A PBX node as the proxy needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoute {
    pub name: String,
    pub pool: usize,
    pub address: SocketAddr,
    pub transport: Transport,
    pub tls_server_name: Option<String>,
}

/// A trunk as the proxy needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrunkRoute {
    pub name: String,
    pub sources: Vec<IpNet>,
    pub address: SocketAddr,
    pub transport: Transport,
    pub tls_server_name: Option<String>,
    /// Request-URI hosts (lowercase) that mean this trunk on calls from the PBX.
    pub domains: Vec<String>,
    pub pool: usize,
    /// Calls with this trunk at once (see `sbc_config::Trunk::max_calls`).
    pub max_calls: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRoute {
    pub name: String,
    /// Node indices in priority order.
    pub nodes: Vec<usize>,
    /// How long a new INVITE/REGISTER waits for any response from a node before the next
    /// node is tried.
    pub branch_timeout: std::time::Duration,
    /// How long a new INVITE/REGISTER may go without any response before its node is made
    /// Suspect (new transactions then try the next ready node first); `None` = never.
    pub suspect_after: Option<std::time::Duration>,
    /// Register phones on the other nodes too (see `sbc_config::Pool::shadow_registration`).
    pub shadow_registration: bool,
}

/// Who sent a request, decided by source address alone (RFC 3261 gives no better
/// authenticator to a proxy; trunks are configured by address for this reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Node(usize),
    Trunk(usize),
    /// Anyone else within the phones' allowed sources: phones, and scanners.
    Public,
    /// Outside every allowed source range.
    Denied,
}

#[derive(Clone, Debug)]
pub struct RouteTable {
    pub nodes: Vec<NodeRoute>,
    pub trunks: Vec<TrunkRoute>,
    pub pools: Vec<PoolRoute>,
    pub phone_pool: usize,
    /// Lowercase phone domains; empty = any.
    pub phone_domains: Vec<String>,
    pub phone_sources: Vec<IpNet>,
    /// Split expiry and the re-registration wave (see `sbc_config::Phones`).
    pub phone_expires: Option<std::time::Duration>,
    pub phone_expires_spread_percent: u32,
    pub reregister_rate: u32,
    /// Topology hiding toward PBXs and trunks (see `sbc_config::Phones::hide_topology`).
    pub hide_topology: bool,
}

impl RouteTable {
    /// Builds the table. The config is already validated, so this cannot fail on references;
    /// unknown pool names fall back to the first pool.
    pub fn new(cfg: &Config) -> RouteTable {
        let pool_index = |name: &str| cfg.pools.iter().position(|p| p.name == name).unwrap_or(0);
        let mut nodes = Vec::new();
        let mut pools = Vec::new();
        for (pi, p) in cfg.pools.iter().enumerate() {
            let mut idx = Vec::new();
            for n in &p.nodes {
                idx.push(nodes.len());
                nodes.push(NodeRoute {
                    name: n.name.clone(),
                    pool: pi,
                    address: n.address,
                    transport: n.transport,
                    tls_server_name: n.tls_server_name.clone(),
                });
            }
            pools.push(PoolRoute {
                name: p.name.clone(),
                nodes: idx,
                branch_timeout: p.branch_timeout,
                suspect_after: p.suspect_after,
                shadow_registration: p.shadow_registration,
            });
        }
        let trunks = cfg
            .trunks
            .iter()
            .map(|t| TrunkRoute {
                name: t.name.clone(),
                sources: t.sources.clone(),
                address: t.address,
                transport: t.transport,
                tls_server_name: t.tls_server_name.clone(),
                domains: t.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                pool: pool_index(&t.pool),
                max_calls: t.max_calls,
            })
            .collect();
        RouteTable {
            nodes,
            trunks,
            pools,
            phone_pool: pool_index(&cfg.phones.pool),
            phone_domains: cfg
                .phones
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            phone_sources: cfg.phones.sources.clone(),
            phone_expires: cfg.phones.expires,
            phone_expires_spread_percent: cfg.phones.expires_spread_percent,
            reregister_rate: cfg.phones.reregister_rate,
            hide_topology: cfg.phones.hide_topology,
        }
    }

    /// Classifies a source. A node is matched by IP and port (a PBX sends from its SIP port;
    /// a phone on the PBX's host must not pass as the PBX), or by IP alone for stream
    /// transports whose source port is ephemeral.
    pub fn classify(&self, src: SocketAddr, stream: bool) -> Source {
        if let Some(i) = self.nodes.iter().position(|n| {
            same_ip(n.address.ip(), src.ip()) && (stream || n.address.port() == src.port())
        }) {
            return Source::Node(i);
        }
        if let Some(i) = self
            .trunks
            .iter()
            .position(|t| t.sources.iter().any(|net| net_contains(net, src.ip())))
        {
            return Source::Trunk(i);
        }
        if self
            .phone_sources
            .iter()
            .any(|net| net_contains(net, src.ip()))
        {
            Source::Public
        } else {
            Source::Denied
        }
    }

    /// The trunk a Request-URI host names: one of its domains, or its address.
    /// The trunk whose `address` this is (a call sent there is that trunk's).
    pub fn trunk_at(&self, addr: SocketAddr) -> Option<usize> {
        self.trunks
            .iter()
            .position(|t| same_ip(t.address.ip(), addr.ip()) && t.address.port() == addr.port())
    }

    pub fn trunk_for_host(&self, host: &[u8], port: Option<u16>) -> Option<usize> {
        let host = std::str::from_utf8(host).ok()?;
        let host_l = host.to_ascii_lowercase();
        let ip = sbc_ip(host);
        self.trunks.iter().position(|t| {
            t.domains.contains(&host_l)
                || (ip == Some(t.address.ip()) && port.is_none_or(|p| p == t.address.port()))
        })
    }

    /// A node by address (for Route/Request-URI targets naming a node).
    pub fn node_by_addr(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.address == addr)
    }

    /// A trunk whose configured address or source ranges cover `addr`: in-dialog requests go
    /// to the Contact a carrier gave, which may be another host of the carrier's.
    pub fn trunk_by_addr(&self, addr: SocketAddr) -> Option<usize> {
        self.trunks
            .iter()
            .position(|t| t.address == addr || t.sources.iter().any(|n| net_contains(n, addr.ip())))
    }

    /// The node new dialogs and registrations of `pool` go to. One node per pool today; the
    /// health crate will choose among several (issue 4).
    pub fn active_node(&self, pool: usize) -> Option<usize> {
        self.pools.get(pool)?.nodes.first().copied()
    }

    /// Whether a phone domain is served (empty list = any).
    pub fn serves_domain(&self, host: &[u8]) -> bool {
        self.phone_domains.is_empty()
            || self
                .phone_domains
                .iter()
                .any(|d| d.as_bytes().eq_ignore_ascii_case(host))
    }
}

fn sbc_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// IPv4-mapped IPv6 sources compare equal to their IPv4 form.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&canonical(ip))
}

/// Whether the config transport is a stream transport.
pub fn is_stream(t: CfgTransport) -> bool {
    !matches!(t, CfgTransport::Udp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = r#"
[[listen]]
transport = "udp"
addr = "127.0.0.1:5060"

[[pool]]
name = "pbx"
[[pool.node]]
name = "a"
address = "127.0.0.2:5070"

[[trunk]]
name = "carrier"
sources = ["127.0.0.20", "10.9.0.0/16"]
address = "127.0.0.20:5060"
domains = ["Carrier.Example"]

[phones]
sources = ["127.0.0.0/8"]
"#;

    fn table() -> RouteTable {
        let cfg = sbc_config::parse(CFG, Path::new("t.toml")).expect("config");
        RouteTable::new(&cfg)
    }

    #[test]
    fn classify_sources() {
        let t = table();
        assert_eq!(
            t.classify("127.0.0.2:5070".parse().unwrap(), false),
            Source::Node(0)
        );
        assert_eq!(
            t.classify("127.0.0.2:40000".parse().unwrap(), false),
            Source::Public
        );
        assert_eq!(
            t.classify("127.0.0.2:40000".parse().unwrap(), true),
            Source::Node(0)
        );
        assert_eq!(
            t.classify("127.0.0.20:5060".parse().unwrap(), false),
            Source::Trunk(0)
        );
        assert_eq!(
            t.classify("127.0.0.9:5060".parse().unwrap(), false),
            Source::Public
        );
        assert_eq!(
            t.classify("192.0.2.1:5060".parse().unwrap(), false),
            Source::Denied
        );
        assert_eq!(
            t.classify("[::ffff:127.0.0.20]:5060".parse().unwrap(), false),
            Source::Trunk(0)
        );
    }

    #[test]
    fn trunk_lookup() {
        let t = table();
        assert_eq!(t.trunk_for_host(b"carrier.example", None), Some(0));
        assert_eq!(t.trunk_for_host(b"127.0.0.20", Some(5060)), Some(0));
        assert_eq!(t.trunk_for_host(b"127.0.0.20", Some(5999)), None);
        assert_eq!(t.trunk_for_host(b"other.example", None), None);
        assert_eq!(t.trunk_by_addr("10.9.1.1:5080".parse().unwrap()), Some(0));
        assert_eq!(t.active_node(0), Some(0));
    }
}
