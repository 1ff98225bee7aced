//! claygate: a declarative resilience runtime for Clay and any HTTP API.
//!
//! Operators describe outbound operations in YAML policy files (see
//! [`policy`]); claygate validates them, compiles them into one protected
//! pipeline per operation, and serves an admin API.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod compile;
pub mod demo;
pub mod dlq;
pub mod events;
pub mod explain;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod reload;
pub mod runtime;
pub mod scrub;
pub mod serve;
pub mod store;
pub mod watch;
