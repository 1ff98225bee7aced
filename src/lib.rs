//! claygate: a declarative resilience runtime for Clay and any HTTP API.
//!
//! Operators describe outbound operations in YAML policy files (see
//! [`policy`]); claygate validates them, compiles them into one protected
//! pipeline per operation, and serves an admin API.

pub mod cli;
pub mod compile;
pub mod explain;
pub mod pipeline;
pub mod policy;
