//! The command line: `claygate serve`, `claygate validate`, `claygate
//! schema`, `claygate explain`, `claygate openapi`.
//!
//! Exit codes are part of the interface: 0 valid (or, for `serve`, a clean
//! shutdown), 1 invalid policies (or warnings with `--strict`), 2 usage,
//! I/O, bind or store error (for `serve`, also a store that cannot be
//! flushed at shutdown).

use std::io::{self, IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use crate::compile::CompileOptions;
use crate::demo::Faults;
use crate::logging::{self, LogFormat};
use crate::policy::diagnostic::{render_github, render_human, render_json};
use crate::policy::{self, LoadOptions, UnsetEnv};
use crate::reload::{Problem, Trigger};
use crate::runtime::Drained;
use crate::serve::{ServeConfig, ServeError, Server, StopError};

/// Exit code: everything checked out.
pub const EXIT_OK: u8 = 0;
/// Exit code: the policies are invalid.
pub const EXIT_INVALID: u8 = 1;
/// Exit code: bad usage or an I/O error.
pub const EXIT_USAGE: u8 = 2;

/// The environment variable holding the admin token (read from the
/// environment only: a command-line flag would show in `ps`).
pub const TOKEN_ENV: &str = "CLAYGATE_ADMIN_TOKEN";

/// claygate: declarative resilience for Clay and any HTTP API.
#[derive(Debug, Parser)]
#[command(name = "claygate", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admin API: invoke operations through their pipelines,
    /// reload on change, redrive the DLQ.
    ///
    /// Prints `listening on http://ADDR` on standard output once bound; logs
    /// go to standard error. With CLAYGATE_ADMIN_TOKEN set (environment
    /// only), every endpoint but /health* and /metrics needs
    /// `Authorization: Bearer <token>`; a non-loopback --listen without a
    /// token is refused. SIGTERM or Ctrl-C drain and stop (exit 0, or 2 when
    /// the store cannot be flushed); SIGHUP reloads the policies. Exit 1
    /// when the policies are invalid, 2 on usage, I/O, bind or store errors.
    Serve(ServeArgs),
    /// Check policy files: YAML, the JSON Schema and the semantic rules.
    ///
    /// Exit 0 when valid, 1 when invalid (or with warnings under --strict),
    /// 2 on usage or I/O errors.
    Validate(ValidateArgs),
    /// Print the JSON Schema of policy files (draft 2020-12).
    Schema,
    /// Show one operation's pipeline, layer by layer, with every effective
    /// value and where it came from.
    Explain(ExplainArgs),
    /// Print the OpenAPI description of the admin API (JSON).
    Openapi,
    /// Start a fake Clay on loopback and serve the bundled policies against
    /// it, with a temporary store; print what to try (SIGHUP reloads the
    /// policies, Ctrl-C stops). `--scenario outage` instead walks through an
    /// outage and its recovery, narrated, and ends with a summary (exit 1 if
    /// anything was lost or delivered twice). `--fake-only` runs the fake
    /// Clay alone, for a `claygate serve` of your own.
    Demo(DemoArgs),
}

/// Arguments of `claygate demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run a narrated scenario and exit (known: outage); without it, serve
    /// until Ctrl-C.
    #[arg(long, value_name = "NAME")]
    pub scenario: Option<String>,
    /// The policy directory.
    #[arg(long, value_name = "DIR", default_value = "policies")]
    pub policies: PathBuf,
    /// Keep the store in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Address of claygate's admin API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Address of the fake Clay (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0", value_parser = parse_listen)]
    pub fake_listen: SocketAddr,
    /// Seeds the scenario's traffic and the fake's random faults.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Faults the fake Clay starts with, as its control API takes them
    /// (`PUT /_fake/faults`), e.g. '{"error_rate":0.3,"latency_ms":200}'.
    /// Fields: outage (none, refuse, hang), error_rate, error_statuses,
    /// recovery {step, every_ms}, latency_ms, jitter_ms, slow_rate, slow_ms,
    /// storm_429, retry_after_s, rate_limit {enabled, per_second, burst},
    /// seed (default --seed).
    #[arg(long, value_name = "JSON", value_parser = parse_faults, conflicts_with = "scenario")]
    pub faults: Option<FaultsArg>,
    /// Run only the fake Clay (no claygate): print its URLs, serve until Ctrl-C.
    #[arg(long, conflicts_with = "scenario")]
    pub fake_only: bool,
    /// The scenario's pace: `demo` (about a minute) or `quick` (seconds, for tests).
    #[arg(long, value_enum, default_value_t = Pace::Demo, hide = true)]
    pub pace: Pace,
    /// Log format (standard error). The level comes from RUST_LOG (default
    /// `info`, or `error` during a scenario so the narration stays readable).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// The pace of a demo scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pace {
    /// About a minute, to watch.
    Demo,
    /// Seconds, for tests.
    Quick,
}

/// `--faults`: checked faults, and whether they set their own seed.
#[derive(Debug, Clone)]
pub struct FaultsArg {
    /// The faults.
    pub faults: Faults,
    /// True when the JSON gave `seed` (else `--seed` seeds them).
    pub seeded: bool,
}

/// Parses `--faults`: JSON, then the fake's own checks, naming the field.
fn parse_faults(text: &str) -> Result<FaultsArg, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let seeded = value.get("seed").is_some();
    let faults = Faults::from_json(value).map_err(|e| e.to_string())?;
    Ok(FaultsArg { faults, seeded })
}

/// Arguments of `claygate serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The policy directory.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "policies",
        env = "CLAYGATE_POLICIES"
    )]
    pub policies: PathBuf,
    /// The data directory (the SQLite store: dead letters, idempotency
    /// records, the fallback cache); created if missing.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "data",
        env = "CLAYGATE_DATA"
    )]
    pub data: PathBuf,
    /// Address of the admin API (port 0 picks a free port).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7700",
        env = "CLAYGATE_LISTEN",
        value_parser = parse_listen
    )]
    pub listen: SocketAddr,
    /// How long calls in flight get to finish at shutdown (e.g. 30s, 500ms);
    /// calls still running then are interrupted, and dead-lettered when
    /// their operation has a DLQ.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        env = "CLAYGATE_DRAIN_TIMEOUT",
        value_parser = parse_duration
    )]
    pub drain_timeout: Duration,
    /// Do not watch the policy directory (reload with SIGHUP or the API).
    #[arg(long)]
    pub no_watch: bool,
    /// Log format (on standard error); the level comes from RUST_LOG
    /// (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "CLAYGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// `host:port`: an IP address, or a name resolved once (its first address).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("`{s}` is not an address such as 127.0.0.1:7700 ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

/// A duration as policies write them: `500ms`, `30s`, `5m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    policy::model::Duration::parse(s.trim())
        .map(policy::model::Duration::to_std)
        .map_err(|e| e.to_string())
}

/// Arguments of `claygate explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The operation to explain.
    pub operation: String,
    /// Policy files or directories.
    #[arg(long, default_value = "policies", env = "CLAYGATE_POLICIES")]
    pub policies: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExplainFormat::Text)]
    pub format: ExplainFormat,
}

/// Output formats of `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExplainFormat {
    /// Aligned text.
    Text,
    /// JSON, for tools.
    Json,
}

/// Arguments of `claygate validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Policy files or directories, checked together as one set.
    #[arg(default_value = "policies")]
    pub paths: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// Fail on warnings too.
    #[arg(long)]
    pub strict: bool,
    /// Treat an unset `${env:NAME}` without default as an error, as `serve` does.
    #[arg(long)]
    pub require_env: bool,
    /// When to colour human output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

/// Output formats of `validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Compiler-style text with the source line and a caret.
    Human,
    /// One JSON document, for tools.
    Json,
    /// GitHub Actions annotations.
    Github,
}

/// Colour choice for human output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    /// Colour when writing to a terminal and NO_COLOR is unset.
    Auto,
    /// Always colour.
    Always,
    /// Never colour.
    Never,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    ExitCode::from(run(cli))
}

/// Runs a parsed command; returns the exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Openapi => match serde_json::to_string_pretty(&crate::admin::openapi()) {
            Ok(json) => print_or_usage(&(json + "\n")),
            Err(e) => {
                eprintln!("claygate: cannot render the OpenAPI description: {e}");
                EXIT_USAGE
            }
        },
        Command::Demo(args) => demo(args),
        Command::Validate(args) => validate(&args),
        Command::Explain(args) => explain(&args),
        Command::Schema => match policy::schema::schema() {
            Ok(_) => print_or_usage(policy::schema::SCHEMA_TEXT),
            Err(e) => {
                eprintln!("claygate: the built-in schema does not load: {e}");
                EXIT_USAGE
            }
        },
    }
}

/// The admin token from the environment: `None` when unset; an error when
/// set but blank or not Unicode (a token that can never match would lock
/// every client out, a blank one would protect nothing).
fn admin_token() -> Result<Option<String>, String> {
    match std::env::var(TOKEN_ENV) {
        Ok(t) if t.trim().is_empty() => Err(format!(
            "{TOKEN_ENV} is set but empty: set a token, or unset it to serve without auth on loopback"
        )),
        // Clients' tokens are trimmed before comparison; so is ours.
        Ok(t) => Ok(Some(t.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{TOKEN_ENV} is not valid UTF-8")),
    }
}

/// What `serve` and `demo` need first: logging, the admin token and the
/// async runtime; an error is printed and answered as the exit code.
fn server_setup(
    format: LogFormat,
    default_level: &str,
) -> Result<(Option<String>, tokio::runtime::Runtime), u8> {
    let fail = |e: String| {
        eprintln!("claygate: {e}");
        EXIT_USAGE
    };
    logging::init_or(format, default_level).map_err(|e| fail(e.to_string()))?;
    let token = admin_token().map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the async runtime: {e}")))?;
    Ok((token, runtime))
}

fn demo(args: DemoArgs) -> u8 {
    let quiet = if args.scenario.is_some() {
        "error"
    } else {
        logging::DEFAULT_FILTER
    };
    let (token, runtime) = match server_setup(args.log_format, quiet) {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let seed = args.seed;
    let options = crate::demo::DemoOptions {
        listen: args.listen,
        fake_listen: args.fake_listen,
        data: args.data,
        policies: args.policies,
        scenario: args.scenario,
        seed,
        token,
        timings: match args.pace {
            Pace::Demo => crate::demo::Timings::demo(),
            Pace::Quick => crate::demo::Timings::quick(),
        },
        faults: args.faults.map(|f| {
            if f.seeded {
                f.faults
            } else {
                Faults { seed, ..f.faults }
            }
        }),
        fake_only: args.fake_only,
        ..crate::demo::DemoOptions::default()
    };
    let result = runtime.block_on(crate::demo::run(options));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(summary) if summary.rows.lost > 0 || summary.rows.duplicate_deliveries > 0 => {
            eprintln!(
                "claygate: the demo lost {} rows and delivered {} twice",
                summary.rows.lost, summary.rows.duplicate_deliveries
            );
            EXIT_INVALID
        }
        Ok(_) => EXIT_OK,
        Err(e) => {
            eprintln!("claygate: {e}");
            EXIT_USAGE
        }
    }
}

fn serve(args: ServeArgs) -> u8 {
    let (token, runtime) = match server_setup(args.log_format, logging::DEFAULT_FILTER) {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let code = runtime.block_on(serve_until_signalled(args, token));
    // Blocking tasks (a reload reading files) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve_until_signalled(args: ServeArgs, token: Option<String>) -> u8 {
    use tokio::signal::unix::{SignalKind, signal};

    // Handlers first: a signal sent as soon as the address is printed must
    // find them installed, not the default action (which would kill us).
    let handlers = signal(SignalKind::terminate()).and_then(|term| {
        Ok((
            term,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    });
    let (mut term, mut int, mut hup) = match handlers {
        Ok(h) => h,
        Err(e) => {
            eprintln!("claygate: cannot install signal handlers: {e}");
            return EXIT_USAGE;
        }
    };
    let policies = args.policies.clone();
    let config = ServeConfig {
        policies: vec![args.policies],
        data: args.data,
        listen: args.listen,
        token,
        drain: args.drain_timeout,
        compile: CompileOptions::default(),
        watch: !args.no_watch,
    };
    let server = match Server::start(config).await {
        Ok(server) => server,
        Err(e) => return start_failed(&e, &policies),
    };
    {
        // Ignore write errors: a closed stdout must not stop the server.
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening on http://{}", server.addr());
        let _ = out.flush();
    }
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received: shutting down");
                break;
            }
            _ = int.recv() => {
                tracing::info!("interrupt received: shutting down");
                break;
            }
            _ = hup.recv() => {
                let Some(reloader) = server.state().shared.reloader.clone() else {
                    tracing::warn!("SIGHUP received, but this server has no reloader");
                    continue;
                };
                tracing::info!("SIGHUP received: reloading the policies");
                // Off the signal loop, so a SIGTERM during a reload is heard
                // at once; reloads serialise themselves.
                tokio::spawn(async move {
                    let record = reloader.reload(Trigger::Signal, true).await;
                    tracing::info!(
                        result = record.result.as_str(),
                        generation = %record.generation,
                        "reload on SIGHUP finished"
                    );
                });
            }
        }
    }
    server.stop();
    let drain = args.drain_timeout;
    let repeat = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            tracing::warn!(
                drain = ?drain,
                "already shutting down: calls in flight get up to the drain timeout; send SIGKILL to stop at once (calls running then may be lost)"
            );
        }
    });
    let stopped = server.stopped().await;
    repeat.abort();
    stop_code(stopped)
}

/// The exit code of a stop: 0 when clean, 2 (with the reason on stderr)
/// when the store could not be flushed or the server failed, so a
/// supervisor sees that acknowledged work may be at risk.
fn stop_code(stopped: Result<Drained, StopError>) -> u8 {
    match stopped {
        Ok(drained) => {
            tracing::info!(
                finished = drained.finished,
                interrupted = drained.interrupted,
                "claygate stopped"
            );
            EXIT_OK
        }
        Err(e) => {
            tracing::error!(error = %e, "claygate stopped with an error");
            eprintln!("claygate: {e}");
            EXIT_USAGE
        }
    }
}

/// One clear message for a server that cannot start; answers the exit code.
fn start_failed(error: &ServeError, policies: &std::path::Path) -> u8 {
    match error {
        ServeError::Policies(refusal)
            if !refusal
                .errors
                .iter()
                .all(|p| matches!(p, Problem::Io { .. })) =>
        {
            let mut text = format!(
                "claygate: the policies in {} are invalid and cannot be served:",
                policies.display()
            );
            for problem in &refusal.errors {
                let line = match problem {
                    Problem::Diagnostic(d) => {
                        let mut line = match &d.span {
                            Some(s) => format!("{}:{}:{}: {}", d.file, s.line, s.column, d.message),
                            None => format!("{}: {}", d.file, d.message),
                        };
                        if let Some(hint) = &d.hint {
                            line.push_str(&format!(" ({hint})"));
                        }
                        line
                    }
                    Problem::Compile { message } | Problem::Io { message } => message.clone(),
                };
                text.push_str("\n  ");
                text.push_str(&line);
            }
            text.push_str(&format!(
                "\n(run `claygate validate {}` for details)",
                policies.display()
            ));
            eprintln!("{text}");
            EXIT_INVALID
        }
        // Unreadable policies, a refused address, the store, binding.
        other => {
            eprintln!("claygate: {other}");
            EXIT_USAGE
        }
    }
}

fn print_or_usage(text: &str) -> u8 {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("claygate: cannot write output: {e}");
            EXIT_USAGE
        }
    }
}

fn validate(args: &ValidateArgs) -> u8 {
    let options = LoadOptions {
        unset_env: if args.require_env {
            UnsetEnv::Error
        } else {
            UnsetEnv::Warn
        },
    };
    let loaded = match policy::load_paths(&args.paths, options) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("claygate: {e}");
            return EXIT_USAGE;
        }
    };
    let valid = loaded.is_valid(args.strict);
    let written = match args.format {
        Format::Human => {
            let choice = match args.color {
                Color::Always => ColorChoice::Always,
                Color::Never => ColorChoice::Never,
                Color::Auto
                    if io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() =>
                {
                    ColorChoice::Auto
                }
                Color::Auto => ColorChoice::Never,
            };
            let mut out = StandardStream::stdout(choice);
            render_human(&mut out, &loaded.sources, &loaded.diagnostics)
                .and_then(|()| writeln!(out, "{}", summary_line(&loaded, valid, args.strict)))
        }
        Format::Json => render_json(&mut io::stdout().lock(), &loaded.diagnostics, valid),
        Format::Github => render_github(&mut io::stdout().lock(), &loaded.diagnostics),
    };
    if let Err(e) = written
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        eprintln!("claygate: cannot write output: {e}");
        return EXIT_USAGE;
    }
    if valid { EXIT_OK } else { EXIT_INVALID }
}

fn explain(args: &ExplainArgs) -> u8 {
    let loaded = match policy::load_paths(&args.policies, LoadOptions::default()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("claygate: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(set) = &loaded.set else {
        let mut out = StandardStream::stdout(ColorChoice::Never);
        let _ = render_human(&mut out, &loaded.sources, &loaded.diagnostics);
        eprintln!("claygate: the policies are invalid; run `claygate validate` for details");
        return EXIT_INVALID;
    };
    let Some(explanation) = crate::explain::explain(set, &args.operation) else {
        let known: Vec<&str> = set.operations.keys().map(String::as_str).collect();
        eprintln!(
            "claygate: unknown operation `{}`; the policies define: {}",
            args.operation,
            known.join(", ")
        );
        return EXIT_USAGE;
    };
    let text = match args.format {
        ExplainFormat::Text => crate::explain::render_text(&explanation),
        ExplainFormat::Json => match serde_json::to_string_pretty(&explanation) {
            Ok(json) => json + "\n",
            Err(e) => {
                eprintln!("claygate: {e}");
                return EXIT_USAGE;
            }
        },
    };
    print_or_usage(&text)
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn summary_line(loaded: &policy::Loaded, valid: bool, strict: bool) -> String {
    let s = loaded.summary();
    let files = plural(loaded.sources.files.len(), "file");
    match (&loaded.set, valid) {
        (Some(set), true) => {
            let mut line = format!(
                "ok: {files}, {}, {}",
                plural(set.upstreams.len(), "upstream"),
                plural(set.operations.len(), "operation")
            );
            if s.warnings > 0 {
                line.push_str(&format!(", {}", plural(s.warnings, "warning")));
            }
            line
        }
        _ => {
            let mut line = format!(
                "invalid: {}, {} in {files}",
                plural(s.errors, "error"),
                plural(s.warnings, "warning")
            );
            if strict && s.errors == 0 {
                line.push_str(" (--strict fails on warnings)");
            }
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn a_stop_that_could_not_flush_the_store_exits_2() {
        let drained = Drained {
            finished: 3,
            interrupted: 1,
        };
        assert_eq!(stop_code(Ok(drained)), EXIT_OK);
        assert_eq!(
            stop_code(Err(StopError::StoreFlush {
                drained,
                source: StoreError::Closed,
            })),
            EXIT_USAGE
        );
        assert_eq!(
            stop_code(Err(StopError::Crashed("panicked".into()))),
            EXIT_USAGE
        );
    }
}
