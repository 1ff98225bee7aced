//! Diagnostics: what is wrong with a policy set, where, and how to fix it.
//!
//! Every problem found while loading or checking policies becomes one
//! [`Diagnostic`] with a stable [`Code`], a severity, a file position, the key
//! path and, where we can guess, a hint. Rendering (compiler-style text, JSON,
//! GitHub annotations) lives here too so every front end shows the same thing.

use std::fmt;
use std::io::{self, Write};

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;
use serde::Serialize;

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy set cannot be applied.
    Error,
    /// The set works, but probably not as meant; fails only with `--strict`.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

macro_rules! codes {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// A stable identifier of a kind of problem, for tools and documentation.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $( $(#[$doc])* $variant, )*
        }

        impl Code {
            /// Every code, in documentation order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as written in output and docs, e.g. `unknown-field`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Code::$variant => $name, )*
                }
            }
        }
    };
}

codes! {
    /// A file is larger than a policy file may be.
    FileTooLarge = "file-too-large",
    /// The file is not valid YAML.
    YamlSyntax = "yaml-syntax",
    /// A mapping has the same key twice.
    DuplicateKey = "duplicate-key",
    /// The file holds more than one YAML document.
    MultipleDocuments = "multiple-documents",
    /// Aliases, nesting or size went past the parser's limits (an alias bomb, say).
    YamlLimit = "yaml-limit",
    /// A mapping key is not a string.
    NonStringKey = "non-string-key",
    /// A value YAML allows but JSON cannot hold (NaN, infinity).
    UnrepresentableValue = "unrepresentable-value",
    /// The file is empty or holds only comments.
    EmptyFile = "empty-file",
    /// `version` is not a version this claygate knows.
    UnsupportedVersion = "unsupported-version",
    /// A key the language does not define.
    UnknownField = "unknown-field",
    /// A required key is absent.
    MissingField = "missing-field",
    /// A value of the wrong type.
    InvalidType = "invalid-type",
    /// A value outside its allowed set or shape.
    InvalidValue = "invalid-value",
    /// A duration that is not `<number><ms|s|m|h|d>`.
    InvalidDuration = "invalid-duration",
    /// A number or list outside its allowed range.
    OutOfRange = "out-of-range",
    /// A name that breaks the naming rules.
    InvalidName = "invalid-name",
    /// A name (upstream, operation, timeout class, section) defined twice.
    DuplicateName = "duplicate-name",
    /// An operation names an upstream that does not exist.
    UnknownUpstream = "unknown-upstream",
    /// A timeout names a class that `timeouts` does not define.
    UnknownTimeoutClass = "unknown-timeout-class",
    /// An operation's priority is not a class of its upstream.
    UnknownPriority = "unknown-priority",
    /// The deadline is shorter than one attempt's timeout.
    DeadlineShorterThanTimeout = "deadline-shorter-than-timeout",
    /// A bulkhead queue may hold a call longer than its deadline.
    QueueTimeoutExceedsDeadline = "queue-timeout-exceeds-deadline",
    /// A template placeholder is malformed.
    BadTemplate = "bad-template",
    /// A template names a param `params_schema` does not declare.
    UnknownTemplateParam = "unknown-template-param",
    /// Templates use params but the operation declares no `params_schema`.
    MissingParamsSchema = "missing-params-schema",
    /// `params_schema` is not a valid JSON Schema.
    InvalidParamsSchema = "invalid-params-schema",
    /// An idempotency or cache key names a param `params_schema` does not declare.
    UnknownKeyParam = "unknown-key-param",
    /// A non-idempotent method is retried without an idempotency key.
    RetryWithoutIdempotency = "retry-without-idempotency",
    /// A `${env:…}` reference is malformed.
    BadEnvReference = "bad-env-reference",
    /// A `${env:…}` reference where the language does not expand them.
    EnvReferenceNotAllowed = "env-reference-not-allowed",
    /// A `${env:NAME}` reference without default whose variable is unset.
    UnsetEnv = "unset-env",
    /// A URL that does not parse or is not http(s).
    InvalidUrl = "invalid-url",
    /// A header name that HTTP does not allow.
    InvalidHeaderName = "invalid-header-name",
    /// Fallback staleness limits out of order (`fresh` <= `stale` <= `very_stale`).
    StalenessOrder = "staleness-order",
    /// A lower bound above its upper bound (back-off, reset timeout).
    BoundsOrder = "bounds-order",
    /// `volume_threshold: 0` opens the breaker on the first failure.
    VolumeThresholdZero = "volume-threshold-zero",
    /// A window that does not divide into its buckets evenly.
    UnevenBuckets = "uneven-buckets",
    /// A bulkhead class larger than the upstream's `max_concurrency`.
    ClassExceedsMaxConcurrency = "class-exceeds-max-concurrency",
    /// An upstream no operation uses.
    UnusedUpstream = "unused-upstream",
    /// A timeout class no operation uses.
    UnusedTimeoutClass = "unused-timeout-class",
    /// The directory holds no policy files.
    NoPolicyFiles = "no-policy-files",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A place in a source file: 1-based line and column (in characters), and a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Span {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, counted in characters.
    pub column: u32,
    /// Byte offset of the start.
    #[serde(skip)]
    pub offset: usize,
    /// Length in bytes; 0 for a point.
    #[serde(skip)]
    pub len: usize,
}

/// Another place a diagnostic refers to, e.g. the first definition of a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Related {
    /// File of the other place.
    pub file: String,
    /// Position in that file.
    #[serde(flatten)]
    pub span: Option<Span>,
    /// What the other place is.
    pub message: String,
}

/// One problem in a policy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Stable kind of the problem.
    pub code: Code,
    /// File the problem is in, as given on the command line.
    pub file: String,
    /// Position in the file, when the problem has one.
    #[serde(flatten)]
    pub span: Option<Span>,
    /// Key path of the node, e.g. `operations.enrich_person.breaker`.
    pub path: String,
    /// What is wrong, in lowercase, naming the thing.
    pub message: String,
    /// How to fix it, when we can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Other places involved.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
}

impl Diagnostic {
    /// An error diagnostic.
    pub fn error(code: Code, file: &str, span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            file: file.to_owned(),
            span,
            path: String::new(),
            message: message.into(),
            hint: None,
            related: Vec::new(),
        }
    }

    /// A warning diagnostic.
    pub fn warning(code: Code, file: &str, span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, file, span, message)
        }
    }

    /// Sets the key path, given as a JSON pointer.
    pub fn at(mut self, pointer: &str) -> Self {
        self.path = display_path(pointer);
        self
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a related place.
    pub fn related(mut self, file: &str, span: Option<Span>, message: impl Into<String>) -> Self {
        self.related.push(Related {
            file: file.to_owned(),
            span,
            message: message.into(),
        });
        self
    }

    /// `file:line:col`, or just the file when there is no position.
    pub fn location(&self) -> String {
        match self.span {
            Some(s) => format!("{}:{}:{}", self.file, s.line, s.column),
            None => self.file.clone(),
        }
    }
}

/// Turns a JSON pointer (`/operations/a.b/retry`) into a readable key path
/// (`operations."a.b".retry`); sequence indices read `[0]`.
pub fn display_path(pointer: &str) -> String {
    let mut out = String::new();
    if pointer.is_empty() {
        return out;
    }
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        let plain = !seg.is_empty()
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if plain {
            out.push_str(&seg);
        } else {
            out.push_str(&format!("{seg:?}"));
        }
    }
    out
}

/// Counts of a diagnostic list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Number of errors.
    pub errors: usize,
    /// Number of warnings.
    pub warnings: usize,
}

impl Summary {
    /// Counts `diagnostics` by severity.
    pub fn of(diagnostics: &[Diagnostic]) -> Summary {
        let errors = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        Summary {
            errors,
            warnings: diagnostics.len() - errors,
        }
    }
}

/// The text of each source file, for rendering snippets.
pub trait SourceLookup {
    /// The text of `file`, if it was read.
    fn text(&self, file: &str) -> Option<&str>;
}

/// Writes diagnostics like a compiler: `error[code]: message`, the
/// `file:line:col`, the source line with a caret, the key path and the hint.
pub fn render_human(
    out: &mut dyn term::termcolor::WriteColor,
    sources: &dyn SourceLookup,
    diagnostics: &[Diagnostic],
) -> io::Result<()> {
    let mut files = SimpleFiles::new();
    let mut ids: Vec<(String, usize)> = Vec::new();
    let mut id_of = |name: &str| -> Option<usize> {
        if let Some((_, id)) = ids.iter().find(|(n, _)| n == name) {
            return Some(*id);
        }
        let text = sources.text(name)?;
        let id = files.add(name.to_owned(), text.to_owned());
        ids.push((name.to_owned(), id));
        Some(id)
    };
    let mut prepared = Vec::with_capacity(diagnostics.len());
    for d in diagnostics {
        let primary = d.span.and_then(|s| Some((id_of(&d.file)?, s)));
        let related: Vec<_> = d
            .related
            .iter()
            .map(|r| (r.span.and_then(|s| Some((id_of(&r.file)?, s))), r))
            .collect();
        prepared.push((d, primary, related));
    }
    let config = term::Config {
        chars: term::Chars::ascii(),
        ..term::Config::default()
    };
    for (d, primary, related) in prepared {
        let severity = match d.severity {
            Severity::Error => cs::Severity::Error,
            Severity::Warning => cs::Severity::Warning,
        };
        let mut diag = cs::Diagnostic::new(severity)
            .with_code(d.code.as_str())
            .with_message(&d.message);
        let mut notes = Vec::new();
        match primary {
            Some((id, span)) => {
                let range = caret_range(&files, id, span);
                diag = diag.with_labels(vec![cs::Label::primary(id, range)]);
            }
            None => notes.push(format!("in {}", d.location())),
        }
        for (place, r) in related {
            match place {
                Some((id, span)) => {
                    let range = caret_range(&files, id, span);
                    diag.labels
                        .push(cs::Label::secondary(id, range).with_message(&r.message));
                }
                None => notes.push(format!("{}: {}", r.message, r.file)),
            }
        }
        if !d.path.is_empty() {
            notes.push(format!("at: {}", d.path));
        }
        if let Some(hint) = &d.hint {
            notes.push(format!("hint: {hint}"));
        }
        diag = diag.with_notes(notes);
        term::emit(out, &config, &files, &diag).map_err(io::Error::other)?;
    }
    Ok(())
}

/// A byte range that exists in the file: clamped, widened to one character
/// for points so the caret shows.
fn caret_range(
    files: &SimpleFiles<String, String>,
    id: usize,
    span: Span,
) -> std::ops::Range<usize> {
    let text = files.get(id).map(|f| f.source().as_str()).unwrap_or("");
    let mut start = span.offset.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = start.saturating_add(span.len).min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    if end == start {
        end = text[start..]
            .chars()
            .next()
            .filter(|c| *c != '\n')
            .map_or(start, |c| start + c.len_utf8());
    }
    start..end
}

/// Writes one JSON document: `{ "valid", "errors", "warnings", "diagnostics": [...] }`.
pub fn render_json(out: &mut dyn Write, diagnostics: &[Diagnostic], valid: bool) -> io::Result<()> {
    let summary = Summary::of(diagnostics);
    let doc = serde_json::json!({
        "valid": valid,
        "errors": summary.errors,
        "warnings": summary.warnings,
        "diagnostics": diagnostics,
    });
    serde_json::to_writer_pretty(&mut *out, &doc)?;
    writeln!(out)
}

/// Writes GitHub Actions workflow commands, so problems show on the pull request's diff.
pub fn render_github(out: &mut dyn Write, diagnostics: &[Diagnostic]) -> io::Result<()> {
    for d in diagnostics {
        let level = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut props = format!("file={}", gh_property(&d.file));
        if let Some(s) = d.span {
            props.push_str(&format!(",line={},col={}", s.line, s.column));
        }
        props.push_str(&format!(",title={}", gh_property(d.code.as_str())));
        let mut message = d.message.clone();
        if !d.path.is_empty() {
            message.push_str(&format!(" (at {})", d.path));
        }
        if let Some(hint) = &d.hint {
            message.push_str(&format!("\nhint: {hint}"));
        }
        writeln!(out, "::{level} {props}::{}", gh_data(&message))?;
    }
    Ok(())
}

fn gh_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn gh_property(s: &str) -> String {
    gh_data(s).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_read_as_dotted_paths() {
        assert_eq!(display_path(""), "");
        assert_eq!(
            display_path("/operations/enrich/retry"),
            "operations.enrich.retry"
        );
        assert_eq!(display_path("/retry/on/2"), "retry.on[2]");
        assert_eq!(display_path("/operations/a.b"), "operations.\"a.b\"");
        assert_eq!(display_path("/headers/a~1b"), "headers.\"a/b\"");
    }

    #[test]
    fn codes_are_unique_and_kebab_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            );
        }
    }

    #[test]
    fn github_annotations_escape_their_delimiters() {
        let d =
            Diagnostic::error(Code::UnknownField, "a,b:c.yaml", None, "50% bad\nnext").hint("x");
        let mut out = Vec::new();
        render_github(&mut out, &[d]).expect("write to a vec");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "::error file=a%2Cb%3Ac.yaml,title=unknown-field::50%25 bad%0Anext%0Ahint: x\n"
        );
    }
}
