//! Load generator (placeholder until written).
