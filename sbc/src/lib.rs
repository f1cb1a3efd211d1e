//! The SBC: transports, the stateful proxy core, and the wiring that runs them from a config.
//!
//! Layout:
//! - [`transport`]: UDP/TCP/TLS listeners and outbound connections, handing bytes and a
//!   [`transport::Flow`] to a synchronous handler.
//! - [`proxy`]: RFC 3261 section 16 proxy over the `sbc_sip` transaction machines: routing
//!   policy (phones, trunks, PBX), Via/Record-Route/Path, CANCEL, ACK.
//! - [`flow_token`]: HMAC-protected flow tokens carried in Path and Record-Route.
//! - [`ratelimit`]: per-source rate limits, blocking, scanner filtering, transaction caps.
//! - [`registrations`]: which public flows belong to registered phones.
//! - [`server`]: start-up from a [`sbc_config::Config`].
//! - [`admin`]: the admin HTTP endpoint (metrics, status, operator commands).
//! - [`metrics`]: the Prometheus recorder and the catalogue of exported metrics.
//! - [`reload`]: hot reload of the configuration (SIGHUP, file change, `POST /reload`).

pub mod admin;
pub mod drain;
pub mod flow_token;
pub mod limits;
pub mod media;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod registrations;
pub mod reload;
pub mod rereg;
pub mod server;
pub mod timer_wheel;
pub mod topology;
pub mod transport;
pub mod trunk_calls;

pub use reload::{ReloadError, ReloadReport};
pub use server::{Sbc, StartOptions};
