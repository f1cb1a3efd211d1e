//! Transactions (placeholder until written).
