//! relay.rs's end-to-end tests once more, with the workers on io_uring
//! (`RelayConfig::io = IoBackend::Uring`; the module name tells `backend()` there).
//! Same ports as relay.rs: cargo runs test binaries one after the other.

#[path = "relay.rs"]
mod on_uring;
