//! Transports (placeholder until written).
