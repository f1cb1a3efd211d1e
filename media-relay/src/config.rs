//! Relay configuration: the two sides, their addresses and port ranges, worker threads and the
//! timers of latching and media timeouts.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::error::MediaError;

/// Which network the relay faces for one leg of a call. The SBC sits between phones/trunks on
/// one network and PBX nodes on another; each leg's sockets live on the side its endpoint is
/// on, so a PBX only ever sees internal addresses and a phone only public ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Toward phones and SIP trunks.
    Public,
    /// Toward PBX nodes.
    Internal,
}

impl Side {
    /// Both sides, for iteration in a fixed order.
    pub const ALL: [Side; 2] = [Side::Public, Side::Internal];

    pub(crate) fn index(self) -> usize {
        match self {
            Side::Public => 0,
            Side::Internal => 1,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Public => "public",
            Side::Internal => "internal",
        })
    }
}

/// Where one side's sockets live and what address the SDP names for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideConfig {
    /// Local address the RTP/RTCP sockets bind to. A concrete address, not a wildcard, so
    /// replies leave from the address the peer sent to.
    pub bind: IpAddr,
    /// Address written into SDP when it differs from `bind` (1:1 NAT in front of the SBC, as
    /// in most clouds). `None` advertises `bind`.
    pub advertise: Option<IpAddr>,
    /// Inclusive UDP port range. RTP takes even ports, RTCP the odd port above; an odd start or
    /// an even end loses one port. Two sides on the same `bind` address may share one range
    /// (one pool) or use disjoint ranges.
    pub ports: RangeInclusive<u16>,
}

impl SideConfig {
    /// A side advertising its bind address.
    pub fn new(bind: IpAddr, ports: RangeInclusive<u16>) -> Self {
        SideConfig {
            bind,
            advertise: None,
            ports,
        }
    }

    /// The address SDP toward this side names.
    pub fn advertised(&self) -> IpAddr {
        self.advertise.unwrap_or(self.bind)
    }
}

/// Everything the relay needs to start. Timers have production defaults (see
/// [`RelayConfig::new`]); tests shorten them.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Toward phones and trunks.
    pub public: SideConfig,
    /// Toward PBX nodes. May equal `public` on a single-homed host.
    pub internal: SideConfig,
    /// Forwarding threads. `0` means one per available core: each thread owns whole calls, so
    /// more threads than cores only adds context switches.
    pub workers: usize,
    /// Silence after which an answered call's media is declared dead (no packet from either
    /// leg and no signalling). rtpengine's `timeout`, same default.
    pub timeout: Duration,
    /// Silence allowed while a call is on hold (a=inactive/sendonly/recvonly or c=0.0.0.0 on
    /// every stream of a leg): phones on hold often send nothing at all.
    pub hold_timeout: Duration,
    /// Silence allowed before the first answer: ringing without early media sends nothing, and
    /// the proxy's own INVITE timer (Timer C, 3 minutes) bounds that phase anyway.
    pub setup_timeout: Duration,
    /// How long the latched source must have been quiet before valid RTP from another source
    /// may take over. Long enough that a stray or hostile sender cannot hijack a live stream,
    /// short enough that a phone whose NAT binding changed is heard again quickly.
    pub relatch_after: Duration,
    /// Interrupt moderation for the forwarding threads: after a pass that forwarded packets, a
    /// worker waits this long before it looks at its sockets again, so that what arrives
    /// meanwhile is handled in one pass instead of one wake-up (a context switch and a
    /// cross-core interrupt) per packet. An idle worker still wakes at once for the first
    /// packet; the cost is at most this much added latency for packets arriving during the
    /// wait. Zero turns it off.
    pub coalesce: Duration,
    /// How the forwarding threads receive and send: epoll with recvmmsg/sendmmsg (default) or
    /// io_uring. Both apply the same latching, counters and timeouts to every packet.
    pub io: IoBackend,
    /// Send latched RTP through a connected socket. Each RTP port gets a second socket on the
    /// same address and port; once a source is latched, that socket is `connect`ed to it, so
    /// the kernel keeps the route of the stream (no route lookup per packet: 7% of the
    /// relay's CPU per packet at 1,000 streams) and delivers the latched source's packets to
    /// it, while every other source still reaches the first socket and is judged (and counted)
    /// by the latching rules as before. Costs one more descriptor per RTP port; where the
    /// second socket cannot be had (descriptor limit), that stream simply sends unconnected.
    pub connect_latched: bool,
}

/// The forwarding threads' way of receiving and sending packets (`RelayConfig::io`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoBackend {
    /// Edge-triggered epoll; a ready socket is drained with `recvmmsg`, what it held leaves
    /// through the partner socket in one `sendmmsg`. Per packet at RTP rates (one packet per
    /// socket per pass): a receive and a send system call.
    #[default]
    Epoll,
    /// io_uring (Linux 6.0+, best on 6.12+): a multishot receive per socket into a ring of
    /// provided buffers, sends queued as requests, one `io_uring_enter` per pass for all of
    /// them. Falls back to [`IoBackend::Epoll`] with a warning where the kernel refuses
    /// (io_uring disabled by sysctl or seccomp, an older kernel).
    Uring,
}

impl std::str::FromStr for IoBackend {
    type Err = MediaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "epoll" => Ok(IoBackend::Epoll),
            "uring" | "io_uring" | "io-uring" => Ok(IoBackend::Uring),
            _ => Err(MediaError::Config(format!(
                "io backend {s:?}: expected \"epoll\" or \"uring\""
            ))),
        }
    }
}

impl RelayConfig {
    /// Production defaults: workers per core, 60 s media timeout, 1 h on hold, 3 min before an
    /// answer, re-latch after 2 s of silence from the latched source, 200 us coalescing, epoll,
    /// latched RTP sent through connected sockets.
    pub fn new(public: SideConfig, internal: SideConfig) -> Self {
        RelayConfig {
            public,
            internal,
            workers: 0,
            timeout: Duration::from_secs(60),
            hold_timeout: Duration::from_secs(3600),
            setup_timeout: Duration::from_secs(180),
            relatch_after: Duration::from_secs(2),
            coalesce: Duration::from_micros(200),
            io: IoBackend::Epoll,
            connect_latched: true,
        }
    }

    /// The configuration of one side.
    pub fn side(&self, side: Side) -> &SideConfig {
        match side {
            Side::Public => &self.public,
            Side::Internal => &self.internal,
        }
    }

    /// Descriptors the relay holds with every port pair of every pool in use: RTP and RTCP,
    /// plus the RTP port's twin with `connect_latched`, for each pair of each distinct
    /// (address, range) pool, plus a worker's eventfd and ring. A process descriptor limit
    /// below this (and the signalling's own needs) refuses calls with 503 while ports are
    /// still free, so the SBC checks its limit against it at start.
    pub fn max_descriptors(&self) -> u64 {
        let per_pair = if self.connect_latched { 3 } else { 2 };
        let pools =
            if self.public.bind == self.internal.bind && self.public.ports == self.internal.ports {
                1
            } else {
                2
            };
        let pairs: u64 = Side::ALL
            .iter()
            .take(pools)
            .map(|&side| crate::ports::pair_count(&self.side(side).ports) as u64)
            .sum();
        pairs * per_pair + 2 * self.worker_count() as u64
    }

    pub(crate) fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// Checks what would otherwise fail later and less clearly: ranges without a single pair,
    /// wildcard binds, overlapping ranges on one address that are not the same range.
    pub fn validate(&self) -> Result<(), MediaError> {
        for side in Side::ALL {
            let s = self.side(side);
            if s.bind.is_unspecified() {
                return Err(MediaError::Config(format!(
                    "{side} side: bind address {} is a wildcard; name the interface address",
                    s.bind
                )));
            }
            if s.advertised().is_unspecified() {
                return Err(MediaError::Config(format!(
                    "{side} side: advertised address is a wildcard"
                )));
            }
            if s.bind.is_ipv4() != s.advertised().is_ipv4() {
                return Err(MediaError::Config(format!(
                    "{side} side: bind {} and advertise {} differ in address family",
                    s.bind,
                    s.advertised()
                )));
            }
            if crate::ports::pair_count(&s.ports) == 0 {
                return Err(MediaError::Config(format!(
                    "{side} side: port range {}-{} holds no even/odd RTP/RTCP pair",
                    s.ports.start(),
                    s.ports.end()
                )));
            }
        }
        let (p, i) = (&self.public, &self.internal);
        if p.bind == i.bind
            && p.ports != i.ports
            && p.ports.start() <= i.ports.end()
            && i.ports.start() <= p.ports.end()
        {
            return Err(MediaError::Config(format!(
                "public and internal sides share {} with overlapping but different port ranges; \
                 use one range (shared pool) or disjoint ranges",
                p.bind
            )));
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("hold_timeout", self.hold_timeout),
            ("setup_timeout", self.setup_timeout),
        ] {
            if d.is_zero() {
                return Err(MediaError::Config(format!("{name} must be above zero")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(ip: &str, ports: RangeInclusive<u16>) -> SideConfig {
        SideConfig::new(ip.parse().unwrap(), ports)
    }

    #[test]
    fn max_descriptors_counts_pools_pairs_and_twins() {
        // One shared pool of 50 pairs, one worker: 50 x (RTP, twin, RTCP) + eventfd and ring.
        let mut c = RelayConfig::new(
            side("127.0.0.1", 20000..=20099),
            side("127.0.0.1", 20000..=20099),
        );
        c.workers = 1;
        assert_eq!(c.max_descriptors(), 50 * 3 + 2);
        c.connect_latched = false;
        assert_eq!(c.max_descriptors(), 50 * 2 + 2);
        // Two addresses: two pools.
        let mut c = RelayConfig::new(
            side("127.0.0.1", 20000..=20099),
            side("127.0.0.2", 20000..=20019),
        );
        c.workers = 2;
        assert_eq!(c.max_descriptors(), (50 + 10) * 3 + 4);
    }

    #[test]
    fn rejects_wildcard_and_empty_and_overlap() {
        let ok = RelayConfig::new(
            side("127.0.0.1", 20000..=20099),
            side("127.0.0.1", 20000..=20099),
        );
        ok.validate().unwrap();
        let mut c = ok.clone();
        c.public.bind = "0.0.0.0".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.internal.ports = 20001..=20001;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.internal.ports = 20050..=20199;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.internal.ports = 20100..=20199;
        c.validate().unwrap();
        let mut c = ok;
        c.public.advertise = Some("::1".parse().unwrap());
        assert!(c.validate().is_err());
    }
}
