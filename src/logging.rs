//! Logging for `claygate serve`: `tracing` events to standard error, as
//! human-readable lines (the default) or as one JSON object per line for log
//! collectors. The level comes from `RUST_LOG` (default `info`).
//!
//! Standard output is left to the few lines meant for people and scripts
//! (such as `listening on http://…`), so a supervisor can parse it while
//! the logs go elsewhere.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Aligned text, coloured on a terminal unless `NO_COLOR` is set.
    #[default]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields at the top level.
    Json,
}

/// Why logging could not be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` does not parse.
    #[error("RUST_LOG is not a valid filter ({0}); use e.g. `info` or `claygate=debug,info`")]
    Filter(String),
    /// A global subscriber is already installed.
    #[error("logging is already set up: {0}")]
    AlreadySet(String),
}

/// The filter from `RUST_LOG`, or [`DEFAULT_FILTER`] when it is unset or empty.
pub fn filter() -> Result<EnvFilter, LoggingError> {
    filter_or(DEFAULT_FILTER)
}

/// The filter from `RUST_LOG`, or `default` when it is unset or empty.
pub fn filter_or(default: &str) -> Result<EnvFilter, LoggingError> {
    match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => {
            EnvFilter::try_new(s.trim()).map_err(|e| LoggingError::Filter(e.to_string()))
        }
        _ => Ok(EnvFilter::new(default)),
    }
}

/// Installs the global subscriber writing to standard error in `format`.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    init_or(format, DEFAULT_FILTER)
}

/// [`init`] with another level than `info` when `RUST_LOG` is unset (the
/// demo's narrated scenario keeps the log quiet).
pub fn init_or(format: LogFormat, default: &str) -> Result<(), LoggingError> {
    let filter = filter_or(default)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .try_init(),
    };
    result.map_err(|e| LoggingError::AlreadySet(e.to_string()))
}
