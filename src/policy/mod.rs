//! The policy language: from a directory of YAML files to a checked [`PolicySet`].
//!
//! Loading runs in phases, each collecting every problem it finds rather than
//! stopping at the first:
//!
//! 1. [`load`]: YAML text to JSON with the source span of every node;
//! 2. [`schema`]: the JSON Schema (`schemas/policy.schema.json`), per file;
//! 3. [`model`]: typed values, merged into one set (a name defined twice is an error);
//! 4. [`semantic`]: meaning across files (references, budgets, templates, env).
//!
//! A [`PolicySet`] exists only when no phase found an error.

pub mod diagnostic;
pub mod effective;
pub mod load;
pub mod model;
pub mod schema;
pub mod semantic;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diagnostic::{Code, Diagnostic, Severity, SourceLookup, Span, Summary};
use load::SpanIndex;
use model::{Defaults, Duration, HealthPolicy, Operation, PolicyFile, Upstream};
use serde_json::Value;

/// A checked policy set: every file of a directory merged, with every
/// reference resolved and every rule holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Timeout classes by name.
    pub timeouts: BTreeMap<String, Duration>,
    /// Settings merged under every operation.
    pub defaults: Defaults,
    /// Health thresholds.
    pub health: HealthPolicy,
    /// Operations by name.
    pub operations: BTreeMap<String, Operation>,
    /// Where each named thing was defined.
    pub origins: Origins,
    /// The validators of the operations' `params_schema`s, built while
    /// checking them, for compile to take rather than build again.
    pub params_validators: ParamsValidators,
}

/// The validator of a `params_schema`, as validation checks it and
/// pipelines use it: draft 2020-12, formats asserted.
pub fn params_validator(
    schema: &Value,
) -> Result<jsonschema::Validator, jsonschema::ValidationError<'static>> {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
}

/// A hash of a JSON value's structure and contents: equal values hash
/// equal (objects iterate in key order), without serializing them.
pub fn value_hash(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn feed(value: &Value, h: &mut std::hash::DefaultHasher) {
        match value {
            Value::Null => h.write_u8(0),
            Value::Bool(b) => {
                h.write_u8(1);
                b.hash(h);
            }
            Value::Number(n) => {
                h.write_u8(2);
                n.hash(h);
            }
            Value::String(s) => {
                h.write_u8(3);
                s.hash(h);
            }
            Value::Array(items) => {
                h.write_u8(4);
                h.write_usize(items.len());
                for item in items {
                    feed(item, h);
                }
            }
            Value::Object(map) => {
                h.write_u8(5);
                h.write_usize(map.len());
                for (k, v) in map {
                    k.hash(h);
                    feed(v, h);
                }
            }
        }
    }
    let mut h = std::hash::DefaultHasher::new();
    feed(value, &mut h);
    h.finish()
}

/// Params validators built while checking a set: by [`value_hash`] of the
/// schema, the operation whose schema it is and the validator. A cache, not
/// part of what a set says: any two compare equal.
#[derive(Clone, Default)]
pub struct ParamsValidators(Arc<HashMap<u64, Vec<NamedValidator>>>);

/// An operation's name and the validator built from its `params_schema`.
type NamedValidator = (String, Arc<jsonschema::Validator>);

impl ParamsValidators {
    /// How many distinct schemas have one.
    pub fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    /// True when none were built.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<HashMap<u64, Vec<NamedValidator>>> for ParamsValidators {
    fn from(map: HashMap<u64, Vec<NamedValidator>>) -> Self {
        ParamsValidators(Arc::new(map))
    }
}

impl PartialEq for ParamsValidators {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ParamsValidators {}

impl std::fmt::Debug for ParamsValidators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamsValidators({} schemas)", self.len())
    }
}

impl PolicySet {
    /// The validator validation built for a schema equal to `schema`
    /// (whose [`value_hash`] is `hash`), if any: the operation it was built
    /// for must still have an equal schema.
    pub fn checked_params_validator(
        &self,
        schema: &Value,
        hash: u64,
    ) -> Option<Arc<jsonschema::Validator>> {
        self.params_validators
            .0
            .get(&hash)?
            .iter()
            .find(|(op, _)| {
                self.operations
                    .get(op)
                    .and_then(|o| o.params_schema.as_ref())
                    == Some(schema)
            })
            .map(|(_, v)| Arc::clone(v))
    }
}

/// Where a named thing of a policy set was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file, as given to the loader.
    pub file: String,
    /// The position of its name.
    pub span: Option<Span>,
}

/// Definition sites of a policy set's names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// Upstreams.
    pub upstreams: BTreeMap<String, Origin>,
    /// Timeout classes.
    pub timeouts: BTreeMap<String, Origin>,
    /// Operations.
    pub operations: BTreeMap<String, Origin>,
    /// The `defaults` section, if any.
    pub defaults: Option<Origin>,
    /// The `health` section, if any.
    pub health: Option<Origin>,
}

/// One policy file's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The path as given (or as found in a directory), used in diagnostics.
    pub name: String,
    /// The file's contents.
    pub text: String,
}

/// The policy files of one set, in the order they are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The files.
    pub files: Vec<SourceFile>,
    /// Files found but not decoded (not UTF-8), with their bytes: they are
    /// reported as diagnostics and still name the set, so a generation hash
    /// tells a broken file from a missing one.
    pub undecoded: Vec<RawFile>,
}

/// A policy file that could not be decoded as text, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFile {
    /// The path as given (or as found in a directory).
    pub name: String,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

impl SourceLookup for Sources {
    fn text(&self, file: &str) -> Option<&str> {
        self.files
            .iter()
            .find(|f| f.name == file)
            .map(|f| f.text.as_str())
    }
}

/// How an unset `${env:NAME}` without default is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnsetEnv {
    /// A warning: `claygate validate`, where the environment is not the server's.
    #[default]
    Warn,
    /// An error: `claygate serve`, which would send a broken request.
    Error,
    /// Not checked.
    Ignore,
}

/// Settings of a load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How unset environment references are reported.
    pub unset_env: UnsetEnv,
}

/// The result of loading a policy set: the sources read, every diagnostic,
/// and the set itself when there was no error.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The files read.
    pub sources: Sources,
    /// Problems, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// The checked set; `None` when any diagnostic is an error.
    pub set: Option<PolicySet>,
}

impl Loaded {
    /// Error and warning counts.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.diagnostics)
    }

    /// True when the set has no errors (and, with `strict`, no warnings).
    pub fn is_valid(&self, strict: bool) -> bool {
        let s = self.summary();
        s.errors == 0 && (!strict || s.warnings == 0)
    }
}

/// Reading the files failed (not a problem of their contents).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A path could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Reads policy files: each path is a file, or a directory whose `*.yaml` and
/// `*.yml` files (not recursive, dot-files skipped) are read in name order.
pub fn read_sources(paths: &[PathBuf]) -> Result<(Sources, Vec<Diagnostic>), ReadError> {
    let mut sources = Sources::default();
    let mut diagnostics = Vec::new();
    for path in paths {
        let io_err = |source| ReadError::Io {
            path: path.clone(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let files = if meta.is_dir() {
            let found = policy_files_in(path).map_err(io_err)?;
            if found.is_empty() {
                diagnostics.push(
                    Diagnostic::error(
                        Code::NoPolicyFiles,
                        &path.display().to_string(),
                        None,
                        "directory holds no policy files",
                    )
                    .hint("policy files end in .yaml or .yml"),
                );
            }
            found
        } else {
            vec![path.clone()]
        };
        for file in files {
            let name = file.display().to_string();
            if sources.files.iter().any(|f| f.name == name)
                || sources.undecoded.iter().any(|f| f.name == name)
            {
                continue;
            }
            let bytes = fs::read(&file).map_err(|source| ReadError::Io {
                path: file.clone(),
                source,
            })?;
            match String::from_utf8(bytes) {
                Ok(text) => sources.files.push(SourceFile { name, text }),
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    let valid = String::from_utf8_lossy(&e.as_bytes()[..at]).into_owned();
                    let span = load::point_at(&valid, at).map(|s| Span { len: 0, ..s });
                    diagnostics.push(
                        Diagnostic::error(
                            Code::YamlSyntax,
                            &name,
                            span,
                            format!("file is not UTF-8 text (invalid byte at offset {at})"),
                        )
                        .hint("policy files are UTF-8 YAML"),
                    );
                    sources.undecoded.push(RawFile {
                        name,
                        bytes: e.into_bytes(),
                    });
                }
            }
        }
    }
    Ok((sources, diagnostics))
}

/// The `*.yaml` and `*.yml` files of a directory, dot-entries skipped, sorted.
pub fn policy_files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && entry.path().is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and checks the policy files at `paths` as one set.
pub fn load_paths(paths: &[PathBuf], options: LoadOptions) -> Result<Loaded, ReadError> {
    let (sources, diagnostics) = read_sources(paths)?;
    Ok(load_sources(sources, diagnostics, options))
}

/// Checks one in-memory file as a whole set; for tests and the validate API.
///
/// ```
/// use claygate::policy::{LoadOptions, load_str};
///
/// let loaded = load_str("p.yaml", "version: 1\noperations:\n  x:\n    upstream: nope\n    request: { method: GET, path: /x }\n", LoadOptions::default());
/// assert!(loaded.set.is_none());
/// let d = &loaded.diagnostics[0];
/// assert_eq!(d.code.as_str(), "unknown-upstream");
/// assert_eq!(d.location(), "p.yaml:4:15");
/// ```
pub fn load_str(name: &str, text: &str, options: LoadOptions) -> Loaded {
    let sources = Sources {
        files: vec![SourceFile {
            name: name.to_owned(),
            text: text.to_owned(),
        }],
        undecoded: Vec::new(),
    };
    load_sources(sources, Vec::new(), options)
}

/// A file that parsed and passed the schema.
pub(crate) struct Parsed {
    pub(crate) name: String,
    /// Where its nodes stand (its JSON value is not kept: the model and
    /// the environment references were read from it on the file's thread).
    pub(crate) spans: SpanIndex,
    pub(crate) policy: PolicyFile,
    /// Problems with its `${env:…}` references, found on the file's thread.
    pub(crate) env: Vec<Diagnostic>,
}

/// What the per-file phases (parse, schema, typed model) made of one file.
enum FileOutcome {
    /// Nothing but comments.
    Empty,
    /// It does not parse.
    Unparsed(Vec<Diagnostic>),
    /// It parsed, but breaks the schema or does not read as the model.
    Invalid(Value, Vec<Diagnostic>),
    /// It passed (boxed: far larger than the other outcomes).
    Parsed(Box<Parsed>),
}

/// Parses one file and checks it against the schema and the model, and
/// its environment references.
fn check_file(file: &SourceFile, options: LoadOptions) -> FileOutcome {
    let doc = match load::parse_yaml(&file.name, &file.text) {
        Ok(Some(doc)) => doc,
        Ok(None) => return FileOutcome::Empty,
        Err(problems) => return FileOutcome::Unparsed(problems),
    };
    let problems = schema::check(&file.name, &doc.value, &doc.spans);
    if !problems.is_empty() {
        return FileOutcome::Invalid(doc.value, problems);
    }
    match <PolicyFile as serde::Deserialize>::deserialize(&doc.value) {
        Ok(policy) => {
            let mut parsed = Parsed {
                name: file.name.clone(),
                spans: doc.spans,
                policy,
                env: Vec::new(),
            };
            parsed.env = semantic::env_references(&parsed, &doc.value, options.unset_env);
            FileOutcome::Parsed(Box::new(parsed))
        }
        // The schema and the model are tested to agree; should they ever
        // drift, the user still gets a diagnostic, never a panic.
        Err(e) => {
            let d = Diagnostic::error(
                Code::InvalidValue,
                &file.name,
                None,
                format!("policy does not read as version 1: {e}"),
            );
            FileOutcome::Invalid(doc.value, vec![d])
        }
    }
}

/// Below this many bytes of policy text, files are checked on the calling
/// thread: starting threads would cost more than they save.
const PARALLEL_BYTES: usize = 256 * 1024;

/// How many threads check `files`: one for small sets, else as many as
/// the machine runs at once (files are independent until they are merged).
fn threads_for(files: &[SourceFile]) -> usize {
    let bytes: usize = files.iter().map(|f| f.text.len()).sum();
    if bytes < PARALLEL_BYTES {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// [`check_file`] for every file, in order, on up to `threads` threads.
fn check_files(files: &[SourceFile], options: LoadOptions, threads: usize) -> Vec<FileOutcome> {
    let threads = threads.min(files.len());
    if threads <= 1 {
        return files.iter().map(|f| check_file(f, options)).collect();
    }
    let mut slots: Vec<Option<FileOutcome>> = Vec::new();
    slots.resize_with(files.len(), || None);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..files.len())
                        .step_by(threads)
                        .map(|i| (i, check_file(&files[i], options)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for worker in workers {
            // A worker panics only if check_file does, which it would on
            // this thread too: pass it on.
            let done = worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (i, outcome) in done {
                slots[i] = Some(outcome);
            }
        }
    });
    slots.into_iter().flatten().collect()
}

/// Checks already-read sources as one set; `diagnostics` are problems found while reading.
pub fn load_sources(
    sources: Sources,
    diagnostics: Vec<Diagnostic>,
    options: LoadOptions,
) -> Loaded {
    let threads = threads_for(&sources.files);
    load_sources_on(sources, diagnostics, options, threads)
}

/// [`load_sources`], checking files on up to `threads` threads.
fn load_sources_on(
    sources: Sources,
    mut diagnostics: Vec<Diagnostic>,
    options: LoadOptions,
    threads: usize,
) -> Loaded {
    let mut parsed = Vec::new();
    let mut known = semantic::Elsewhere::default();
    let outcomes = check_files(&sources.files, options, threads);
    for (file, outcome) in sources.files.iter().zip(outcomes) {
        match outcome {
            FileOutcome::Empty => diagnostics.push(
                Diagnostic::warning(Code::EmptyFile, &file.name, None, "file is empty")
                    .hint("add `version: 1`, or remove the file"),
            ),
            FileOutcome::Unparsed(problems) => {
                diagnostics.extend(problems);
                known.complete = false;
            }
            FileOutcome::Invalid(value, problems) => {
                diagnostics.extend(problems);
                known.add_names_of(&value);
            }
            FileOutcome::Parsed(p) => parsed.push(*p),
        }
    }
    let (set, problems) = semantic::check(parsed, &known);
    diagnostics.extend(problems);
    sort_diagnostics(&mut diagnostics, &sources);
    let has_errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    Loaded {
        sources,
        set: if has_errors { None } else { set },
        diagnostics,
    }
}

fn sort_diagnostics(diagnostics: &mut [Diagnostic], sources: &Sources) {
    let file_rank = |name: &str| {
        sources
            .files
            .iter()
            .position(|f| f.name == name)
            .unwrap_or(usize::MAX)
    };
    diagnostics.sort_by(|a, b| {
        let key = |d: &Diagnostic| {
            (
                file_rank(&d.file),
                d.file.clone(),
                d.span.map_or((0, 0), |s| (s.line, s.column)),
                d.code,
            )
        };
        key(a).cmp(&key(b))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: String) -> SourceFile {
        SourceFile {
            name: name.to_owned(),
            text,
        }
    }

    fn ops(first: usize, count: usize) -> String {
        let mut text = String::from("version: 1\noperations:\n");
        for n in first..first + count {
            text.push_str(&format!(
                "  op_{n}:\n    upstream: up\n    request: {{ method: GET, path: \"/v1/{{{{ params.id }}}}\" }}\n    params_schema: {{ type: object, properties: {{ id: {{ type: string }} }} }}\n"
            ));
        }
        text
    }

    fn sources(broken: bool) -> Sources {
        let mut files = vec![file(
            "00-up.yaml",
            "version: 1\nupstreams:\n  up: { base_url: \"http://127.0.0.1:9\" }\n".into(),
        )];
        for f in 0..6 {
            files.push(file(&format!("{:02}-ops.yaml", f + 1), ops(f * 50, 50)));
        }
        if broken {
            files.push(file("10-syntax.yaml", "version: 1\noperations: [\n".into()));
            files.push(file(
                "11-schema.yaml",
                "version: 1\noperations:\n  bad:\n    upstream: up\n    request: { method: GET, path: /x }\n    retries: 3\n".into(),
            ));
            files.push(file("12-twice.yaml", ops(10, 2)));
            files.push(file("13-empty.yaml", "# nothing yet\n".into()));
            files.push(file(
                "14-hasty.yaml",
                "version: 1\noperations:\n  hasty:\n    upstream: up\n    request: { method: GET, path: /x }\n    timeout: 5s\n    deadline: 1s\n".into(),
            ));
        }
        Sources {
            files,
            undecoded: Vec::new(),
        }
    }

    #[test]
    fn files_checked_on_several_threads_give_what_one_thread_gives() {
        for broken in [false, true] {
            let one = load_sources_on(sources(broken), Vec::new(), LoadOptions::default(), 1);
            let many = load_sources_on(sources(broken), Vec::new(), LoadOptions::default(), 4);
            assert_eq!(one.diagnostics, many.diagnostics, "broken: {broken}");
            assert_eq!(one.set, many.set, "broken: {broken}");
            assert_eq!(one.set.is_some(), !broken, "{:#?}", one.diagnostics);
            if broken {
                let codes: Vec<&str> = many.diagnostics.iter().map(|d| d.code.as_str()).collect();
                for code in [
                    "yaml-syntax",
                    "unknown-field",
                    "duplicate-name",
                    "empty-file",
                    "deadline-shorter-than-timeout",
                ] {
                    assert!(codes.contains(&code), "{code} missing from {codes:?}");
                }
            }
        }
    }

    #[test]
    fn small_sets_are_checked_on_the_calling_thread() {
        assert_eq!(threads_for(&sources(true).files), 1);
        let big = vec![file("big.yaml", ops(0, 3000))];
        assert!(big[0].text.len() >= PARALLEL_BYTES);
        assert_eq!(
            threads_for(&big),
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        );
    }

    #[test]
    fn equal_values_hash_equal_and_unequal_ones_apart() {
        let a = serde_json::json!({"type": "object", "properties": {"id": {"type": "string", "maxLength": 3}}});
        let b: Value = serde_json::from_str(
            r#"{"properties": {"id": {"maxLength": 3, "type": "string"}}, "type": "object"}"#,
        )
        .expect("json");
        assert_eq!(a, b);
        assert_eq!(value_hash(&a), value_hash(&b));
        for other in [
            serde_json::json!({"type": "object", "properties": {"id": {"type": "string", "maxLength": 4}}}),
            serde_json::json!({"type": "object", "properties": {"id": {"type": "string"}}}),
            serde_json::json!({"type": "object", "properties": {"ID": {"type": "string", "maxLength": 3}}}),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!(null),
        ] {
            assert_ne!(value_hash(&a), value_hash(&other), "{other}");
        }
        assert_ne!(
            value_hash(&serde_json::json!([[], 1])),
            value_hash(&serde_json::json!([[1]]))
        );
    }
}
