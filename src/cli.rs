//! The command line: `claygate validate`, `claygate schema`, `claygate explain`.
//!
//! Exit codes are part of the interface: 0 valid, 1 invalid policies (or
//! warnings with `--strict`), 2 usage or I/O error.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use crate::policy::diagnostic::{render_github, render_human, render_json};
use crate::policy::{self, LoadOptions, UnsetEnv};

/// Exit code: everything checked out.
pub const EXIT_OK: u8 = 0;
/// Exit code: the policies are invalid.
pub const EXIT_INVALID: u8 = 1;
/// Exit code: bad usage or an I/O error.
pub const EXIT_USAGE: u8 = 2;

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
