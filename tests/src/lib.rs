//! Test peers (placeholder until written).
pub mod kamailio;
