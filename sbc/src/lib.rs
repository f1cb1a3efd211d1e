//! The SBC (placeholder until written).
pub mod transport;
