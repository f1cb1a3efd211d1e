//! Stream framing (placeholder until written).
