//! The diagnostics corpus: policy files that must produce exactly the
//! diagnostics they announce, and valid files that must produce none.
//!
//! Layout (see `tests/corpus/README.md`):
//!
//! - `tests/corpus/invalid/NAME.yaml` is a one-file case; a directory
//!   `tests/corpus/invalid/NAME/` is a case of several files, loaded as one
//!   policy set (for cross-file problems such as a name defined twice).
//! - Every case announces what it must produce with comment lines anywhere in
//!   its files:
//!
//!   ```yaml
//!   # expect: unknown-field 12:5
//!   # expect: empty-file
//!   ```
//!
//!   One line per diagnostic: the code, then the 1-based `line:column`
//!   (column in characters), or nothing for a diagnostic without position.
//!   The diagnostic is expected in the file that holds the line. The
//!   diagnostics produced must equal the expectations exactly, warnings
//!   included, counting duplicates.
//! - `tests/corpus/valid/*.yaml` are complete policy sets, one per file, that
//!   must load with no diagnostic at all. `kitchen-sink.yaml` among them
//!   uses every property the schema defines.
//!
//! Cases that cannot be committed (an empty directory, a file over the size
//! limit) are generated in a temp dir by [`generated_cases`].

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use claygate::policy::diagnostic::{Code, Diagnostic, Severity};
use claygate::policy::{LoadOptions, load, load_paths};
use serde_json::Value;

use crate::support;

/// Codes no committed or generated case triggers, and why.
/// (Read failures are `ReadError`, exit code 2, never a diagnostic.)
const NOT_FROM_FILES: &[(Code, &str)] = &[];

/// Fewest invalid cases the corpus may hold.
const MIN_INVALID_CASES: usize = 40;

/// One expected or produced diagnostic: code, file (relative to the case
/// root) and position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expect {
    file: String,
    position: Option<(u32, u32)>,
    code: String,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{} at {}:{line}:{col}", self.code, self.file),
            None => write!(f, "{} in {} (no position)", self.code, self.file),
        }
    }
}

/// An invalid case: what to load, and what it must produce.
struct Case {
    name: String,
    /// Paths handed to the loader.
    paths: Vec<PathBuf>,
    /// File names in diagnostics are made relative to this directory.
    root: PathBuf,
    expected: Vec<Expect>,
    /// Problems with the case itself (a malformed `expect` line).
    problems: Vec<String>,
}

/// Parses the `# expect:` lines of one file. Returns the expectations and
/// the malformed lines.
fn parse_expectations(file: &str, text: &str) -> (Vec<Expect>, Vec<String>) {
    let mut expected = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line
            .trim_start()
            .strip_prefix('#')
            .map(str::trim_start)
            .and_then(|l| l.strip_prefix("expect:"))
        else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let parsed = match words.as_slice() {
            [code] => Some((code, None)),
            [code, pos] => pos
                .split_once(':')
                .and_then(|(l, c)| Some((l.parse().ok()?, c.parse().ok()?)))
                .map(|p| (code, Some(p))),
            _ => None,
        };
        match parsed {
            Some((code, position)) if Code::ALL.iter().any(|c| c.as_str() == *code) => {
                expected.push(Expect {
                    file: file.to_owned(),
                    position,
                    code: (*code).to_owned(),
                });
            }
            Some((code, _)) => problems.push(format!(
                "{file}:{}: `{code}` is not a diagnostic code",
                i + 1
            )),
            None => problems.push(format!(
                "{file}:{}: malformed expect line, want `# expect: CODE [LINE:COL]`: {line:?}",
                i + 1
            )),
        }
    }
    (expected, problems)
}

/// The `*.yaml` / `*.yml` files of a directory, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    files
}

/// Name of `path` relative to `root`, with `/` separators.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// The committed invalid cases, in name order.
fn committed_cases() -> Vec<Case> {
    let root = support::corpus("invalid");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/corpus/invalid exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.is_dir() || matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|path| {
            let files = if path.is_dir() {
                yaml_files(&path)
            } else {
                vec![path.clone()]
            };
            let mut expected = Vec::new();
            let mut problems = Vec::new();
            for file in &files {
                let bytes = std::fs::read(file).expect("a corpus file reads");
                let text = String::from_utf8_lossy(&bytes);
                let (e, p) = parse_expectations(&relative(&root, file), &text);
                expected.extend(e);
                problems.extend(p);
            }
            if expected.is_empty() {
                problems.push("the case expects nothing; add `# expect:` lines".to_owned());
            }
            Case {
                name: relative(&root, &path),
                paths: vec![path],
                root: root.clone(),
                expected,
                problems,
            }
        })
        .collect()
}

/// Cases git cannot hold: an empty directory, and a file over the size
/// limit. They live in `dir`, which the caller keeps alive.
fn generated_cases(dir: &Path) -> Vec<Case> {
    let empty = dir.join("empty-policies");
    std::fs::create_dir(&empty).expect("create an empty dir");
    // A directory of non-policy files is as empty as one with no files.
    let notes = dir.join("notes-only");
    std::fs::create_dir(&notes).expect("create a dir");
    support::write(&notes, "README.md", "policies go here\n");
    support::write(&notes, ".hidden.yaml", "version: 1\n");

    let mut big = String::from(
        "version: 1\nupstreams:\n  clay:\n    base_url: https://api.clay.com\n\
         operations:\n  get_person:\n    upstream: clay\n    request: { method: GET, path: /v1/people }\n",
    );
    let pad = format!("# {}\n", "x".repeat(78));
    while big.len() <= load::MAX_FILE_BYTES {
        big.push_str(&pad);
    }
    let large = support::write(dir, "too-large.yaml", &big);

    let case = |name: &str, path: PathBuf, code: Code| Case {
        name: format!("(generated) {name}"),
        expected: vec![Expect {
            file: relative(dir, &path),
            position: None,
            code: code.as_str().to_owned(),
        }],
        paths: vec![path],
        root: dir.to_owned(),
        problems: Vec::new(),
    };
    vec![
        case("empty directory", empty, Code::NoPolicyFiles),
        case("directory without policy files", notes, Code::NoPolicyFiles),
        case("file over the size limit", large, Code::FileTooLarge),
    ]
}

fn produced(case: &Case, diagnostics: &[Diagnostic]) -> Vec<(Expect, String)> {
    diagnostics
        .iter()
        .map(|d| {
            (
                Expect {
                    file: relative(&case.root, Path::new(&d.file)),
                    position: d.span.map(|s| (s.line, s.column)),
                    code: d.code.as_str().to_owned(),
                },
                format!("{}: {}", d.severity, d.message),
            )
        })
        .collect()
}

/// Runs a case; `None` when it produced exactly what it expects, else a report.
fn run_case(case: &Case) -> Option<String> {
    let mut report = String::new();
    for p in &case.problems {
        report.push_str(&format!("    bad case: {p}\n"));
    }
    let loaded = match load_paths(&case.paths, LoadOptions::default()) {
        Ok(l) => l,
        Err(e) => return Some(format!("  {}:\n    load failed: {e}\n", case.name)),
    };
    let got = produced(case, &loaded.diagnostics);
    let mut missing = case.expected.clone();
    let mut unexpected = Vec::new();
    for (g, message) in got {
        match missing.iter().position(|e| *e == g) {
            Some(i) => {
                missing.remove(i);
            }
            None => unexpected.push((g, message)),
        }
    }
    for m in &missing {
        report.push_str(&format!("    missing:    {m}\n"));
    }
    for (u, message) in &unexpected {
        report.push_str(&format!("    unexpected: {u} -- {message}\n"));
    }
    if loaded.set.is_some()
        && loaded
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    {
        report.push_str("    a set was produced despite errors\n");
    }
    (!report.is_empty()).then(|| format!("  {}:\n{report}", case.name))
}

#[test]
fn every_invalid_case_produces_exactly_its_expected_diagnostics() {
    let dir = support::tempdir();
    let mut cases = committed_cases();
    cases.extend(generated_cases(dir.path()));
    let failures: Vec<String> = cases.iter().filter_map(run_case).collect();
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases do not produce what they expect:\n{}",
        failures.len(),
        cases.len(),
        failures.concat()
    );
}

fn valid_files() -> Vec<PathBuf> {
    yaml_files(&support::corpus("valid"))
}

#[test]
fn every_valid_file_loads_without_any_diagnostic() {
    let files = valid_files();
    assert!(files.len() >= 6, "only {} valid corpus files", files.len());
    let mut failures = String::new();
    for file in &files {
        let loaded = load_paths(std::slice::from_ref(file), LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for d in &loaded.diagnostics {
            failures.push_str(&format!(
                "  {}: {}[{}]: {} (at {})\n",
                d.location(),
                d.severity,
                d.code,
                d.message,
                d.path
            ));
        }
        if loaded.set.is_none() {
            failures.push_str(&format!("  {}: no policy set\n", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "valid corpus files are not clean:\n{failures}"
    );
}

/// Resolves local `$ref`s (`#/$defs/…`).
fn resolve<'s>(root: &'s Value, mut node: &'s Value) -> &'s Value {
    for _ in 0..32 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("non-local $ref {r}"));
                node = root
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
            }
            None => return node,
        }
    }
    panic!("$ref chain too long");
}

/// Every property path the schema defines, `*` standing for a map's keys and
/// `[]` for a sequence's items.
fn schema_paths(root: &Value, node: &Value, path: &[String], out: &mut BTreeSet<Vec<String>>) {
    assert!(path.len() < 24, "schema nests too deep at {path:?}");
    let node = resolve(root, node);
    let child = |seg: &str| {
        let mut p = path.to_vec();
        p.push(seg.to_owned());
        p
    };
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let p = child(key);
            out.insert(p.clone());
            schema_paths(root, sub, &p, out);
        }
    }
    if let Some(sub) = node.get("additionalProperties").filter(|a| a.is_object()) {
        let p = child("*");
        out.insert(p.clone());
        schema_paths(root, sub, &p, out);
    }
    if let Some(sub) = node.get("items").filter(|a| a.is_object()) {
        schema_paths(root, sub, &child("[]"), out);
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        for sub in node
            .get(combinator)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            schema_paths(root, sub, path, out);
        }
    }
}

/// True when some node of `value` lies at `path` (any key for `*`, any item for `[]`).
fn present(value: &Value, path: &[String]) -> bool {
    let Some((seg, rest)) = path.split_first() else {
        return true;
    };
    match (seg.as_str(), value) {
        ("*", Value::Object(map)) => map.values().any(|v| present(v, rest)),
        ("[]", Value::Array(items)) => items.iter().any(|v| present(v, rest)),
        (key, Value::Object(map)) => map.get(key).is_some_and(|v| present(v, rest)),
        _ => false,
    }
}

#[test]
fn the_kitchen_sink_uses_every_property_of_the_schema() {
    let schema_path = support::repo().join("schemas").join("policy.schema.json");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).expect("the schema reads"))
            .expect("the schema is JSON");
    let mut paths = BTreeSet::new();
    schema_paths(&schema, &schema, &[], &mut paths);
    assert!(paths.len() > 50, "suspiciously few schema paths: {paths:?}");

    let sink = support::corpus("valid").join("kitchen-sink.yaml");
    let text = std::fs::read_to_string(&sink).expect("kitchen-sink.yaml reads");
    let doc = match load::parse_yaml("kitchen-sink.yaml", &text) {
        Ok(Some(doc)) => doc,
        other => panic!("kitchen-sink.yaml does not parse: {other:?}"),
    };
    let absent: Vec<String> = paths
        .iter()
        .filter(|p| !present(&doc.value, p))
        .map(|p| p.join("."))
        .collect();
    assert!(
        absent.is_empty(),
        "kitchen-sink.yaml lacks {} schema properties:\n  {}",
        absent.len(),
        absent.join("\n  ")
    );
    // And it is clean, so the serde model (deny_unknown_fields) knows them all.
    let loaded = load_paths(&[sink], LoadOptions::default()).expect("loads");
    assert!(
        loaded.diagnostics.is_empty() && loaded.set.is_some(),
        "kitchen-sink.yaml is not clean: {:#?}",
        loaded.diagnostics
    );
}

#[test]
fn every_code_a_file_can_trigger_has_a_case() {
    let dir = support::tempdir();
    let mut cases = committed_cases();
    cases.extend(generated_cases(dir.path()));
    let covered: BTreeSet<&str> = cases
        .iter()
        .flat_map(|c| c.expected.iter().map(|e| e.code.as_str()))
        .collect();
    let excluded: BTreeSet<&str> = NOT_FROM_FILES.iter().map(|(c, _)| c.as_str()).collect();
    let uncovered: Vec<&str> = Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !covered.contains(c) && !excluded.contains(c))
        .collect();
    assert!(
        uncovered.is_empty(),
        "codes without a corpus case: {uncovered:?}"
    );
    let stale: Vec<&str> = excluded.intersection(&covered).copied().collect();
    assert!(
        stale.is_empty(),
        "codes listed as unreachable from files but covered by a case: {stale:?}"
    );
}

#[test]
fn the_corpus_has_enough_invalid_cases() {
    let n = committed_cases().len();
    assert!(
        n >= MIN_INVALID_CASES,
        "only {n} invalid cases; the corpus keeps at least {MIN_INVALID_CASES}"
    );
}

#[test]
fn expect_lines_parse() {
    let (e, p) = parse_expectations(
        "f.yaml",
        "# expect: unknown-field 12:5\n  #expect: empty-file\nversion: 1 # expect: nothing\n# expect: bogus-code 1:1\n# expect: unknown-field 3\n",
    );
    assert_eq!(
        e,
        vec![
            Expect {
                file: "f.yaml".into(),
                position: Some((12, 5)),
                code: "unknown-field".into()
            },
            Expect {
                file: "f.yaml".into(),
                position: None,
                code: "empty-file".into()
            },
        ]
    );
    assert_eq!(p.len(), 2, "{p:?}");
}
