//! Reusable SIP peers for end-to-end tests of the SBC, all real SIP over real loopback
//! sockets, scriptable step by step so tests can assert on every message:
//!
//! - [`sip_io::Endpoint`]: a UDP socket / TCP or TLS connection / TCP or TLS listener with a
//!   receive backlog (`recv_match` keeps what it does not take), packet-loss simulation and
//!   logs of everything sent and received;
//! - [`phone::Phone`]: a registering, authenticating phone (UAC + UAS), over UDP, TCP or TLS,
//!   with optional NAT simulation (Contact names a port that is not the real one);
//! - [`trunk::Trunk`]: a carrier on its own address (the same UA core, no registration);
//! - [`pbx::Pbx`]: a registrar (digest, Path) and stateless record-routing proxy;
//! - [`b2bua::B2bua`]: a PBX that bridges calls as a B2BUA (direct media or its own);
//! - [`digest`]: MD5 digest, both sides; [`pki`]: throw-away CA and certificates;
//! - [`http_stub`]: a tiny HTTP server (PBX web server, witness URL, webhook receiver);
//! - [`load`]: bounded call and registration load with per-operation records, and a
//!   stateless auto-answering callee, for failover drills.
//!
//! Peers only ever use 127.0.0.0/8 or ::1 addresses.

pub mod b2bua;
pub mod digest;
pub mod http_stub;
pub mod kamailio;
pub mod load;
pub mod net;
pub mod pbx;
pub mod phone;
pub mod pki;
pub mod sip_io;
pub mod trunk;
pub mod ua;

/// Installs a tracing subscriber honouring `RUST_LOG` (once; later calls are no-ops), so a
/// failing test can be rerun with `RUST_LOG=sbc_tests=debug`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
