//! All integration tests, as one binary (one link, one run).

mod support;

mod cli;
mod corpus;
mod fuzz;
mod pipeline;
