//! Test peers (placeholder until written).
