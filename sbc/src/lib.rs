//! The SBC: transports, the stateful proxy core, and the wiring that runs them from a config.
//!
//! Layout:
//! - [`transport`]: UDP/TCP/TLS listeners and outbound connections, handing bytes and a
//!   [`transport::Flow`] to a synchronous handler.
//! - [`proxy`]: RFC 3261 section 16 proxy over the `sbc_sip` transaction machines: routing
//!   policy (phones, trunks, PBX), Via/Record-Route/Path, CANCEL, ACK.
//! - [`flow_token`]: HMAC-protected flow tokens carried in Path and Record-Route.
//! - [`registrations`]: which public flows belong to registered phones.
//! - [`server`]: start-up from a [`sbc_config::Config`].

pub mod flow_token;
pub mod proxy;
pub mod registrations;
pub mod server;
pub mod timer_wheel;
pub mod transport;

pub use server::Sbc;
