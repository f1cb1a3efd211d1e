//! SBC configuration (placeholder until written).
