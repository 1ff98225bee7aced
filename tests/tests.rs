//! All integration tests, as one binary (one link, one run).

mod support;

mod admin;
mod cli;
mod conservation;
mod corpus;
mod dlq;
mod e2e;
mod fake_clay;
mod fuzz;
mod health;
mod invoke;
mod pipeline;
mod reload;
mod runtime;
mod serve;
mod store;
