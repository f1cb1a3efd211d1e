//! Route table (placeholder until written).
