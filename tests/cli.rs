//! `claygate validate` and `claygate schema` through the real binary: exit
//! codes, the three output formats, and bad input that must not panic.

use crate::support::{repo, run, stderr, stdout, tempdir, write};

const BROKEN: &str = "\
version: 1
upstreams:
  clay: { base_url: \"https://api.clay.com\" }
operations:
  lookup:
    upstream: clay
    request: { method: GET, path: /v1/x }
    breaker: { reset_timout: 30s }
";

#[test]
fn bundled_policies_are_valid() {
    let policies = repo().join("policies");
    let out = run(&["validate", policies.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("ok: 4 files"), "{}", stdout(&out));
}

#[test]
fn human_output_points_at_the_problem_like_a_compiler() {
    let dir = tempdir();
    let file = write(dir.path(), "p.yaml", BROKEN);
    let out = run(&[
        "validate",
        "--color",
        "never",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("error[unknown-field]: unknown field `reset_timout` in `breaker`"),
        "{text}"
    );
    assert!(text.contains(&format!("{}:8:16", file.display())), "{text}");
    assert!(
        text.contains("8 |     breaker: { reset_timout: 30s }"),
        "{text}"
    );
    assert!(text.contains("^^^^^^^^^^^^"), "{text}");
    assert!(
        text.contains("hint: did you mean `reset_timeout`?"),
        "{text}"
    );
    assert!(
        text.contains("invalid: 1 error, 0 warnings in 1 file"),
        "{text}"
    );
}

#[test]
fn json_output_is_one_document_for_tools() {
    let dir = tempdir();
    let file = write(dir.path(), "p.yaml", BROKEN);
    let out = run(&[
        "validate",
        "--format",
        "json",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["errors"], 1);
    let d = &doc["diagnostics"][0];
    assert_eq!(d["code"], "unknown-field");
    assert_eq!(d["severity"], "error");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(8), Some(16))
    );
    assert_eq!(d["path"], "operations.lookup.breaker.reset_timout");
    assert_eq!(d["hint"], "did you mean `reset_timeout`?");
}

#[test]
fn github_output_is_workflow_annotations() {
    let dir = tempdir();
    let file = write(dir.path(), "p.yaml", BROKEN);
    let out = run(&[
        "validate",
        "--format",
        "github",
        file.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let expected = format!(
        "::error file={},line=8,col=16,title=unknown-field::",
        file.display()
    );
    assert!(text.starts_with(&expected), "{text}");
}

#[test]
fn warnings_fail_only_under_strict() {
    let dir = tempdir();
    let file = write(
        dir.path(),
        "p.yaml",
        "version: 1\nupstreams:\n  clay: { base_url: \"https://api.clay.com\" }\n",
    );
    let path = file.to_str().expect("utf-8");
    let relaxed = run(&["validate", path]);
    assert_eq!(relaxed.status.code(), Some(0), "{}", stdout(&relaxed));
    assert!(stdout(&relaxed).contains("warning[unused-upstream]"));
    let strict = run(&["validate", "--strict", path]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(stdout(&strict).contains("(--strict fails on warnings)"));
}

#[test]
fn unset_env_is_a_warning_unless_required() {
    let dir = tempdir();
    let file = write(
        dir.path(),
        "p.yaml",
        "version: 1\nupstreams:\n  clay:\n    base_url: \"https://api.clay.com\"\n    headers: { Authorization: \"Bearer ${env:CLAYGATE_TEST_NEVER_SET_CLI}\" }\noperations:\n  get:\n    upstream: clay\n    request: { method: GET, path: /x }\n",
    );
    let path = file.to_str().expect("utf-8");
    assert_eq!(run(&["validate", path]).status.code(), Some(0));
    let required = run(&["validate", "--require-env", "--format", "json", path]);
    assert_eq!(required.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&required.stdout).expect("json");
    assert_eq!(doc["diagnostics"][0]["code"], "unset-env");
    assert_eq!(doc["diagnostics"][0]["severity"], "error");
    // The message names the variable, never a value.
    assert!(
        doc["diagnostics"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("CLAYGATE_TEST_NEVER_SET_CLI"))
    );
}

#[test]
fn missing_paths_are_usage_errors_not_panics() {
    let out = run(&["validate", "/nonexistent/claygate/policies"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/claygate/policies"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = run(&["validate", "--format", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_empty_directory_is_invalid() {
    let dir = tempdir();
    let out = run(&["validate", dir.path().to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("error[no-policy-files]"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn binary_garbage_gets_a_diagnostic() {
    let dir = tempdir();
    let file = dir.path().join("junk.yaml");
    std::fs::write(&file, [0xff_u8, 0xfe, 0x00, 0x9f, 0x92, 0x96]).expect("write junk");
    let out = run(&["validate", file.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("not UTF-8"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn directories_and_files_combine_into_one_set() {
    // The upstream lives in one file, the operation in another: valid only together.
    let dir = tempdir();
    write(
        dir.path(),
        "up.yaml",
        "version: 1\nupstreams:\n  clay: { base_url: \"https://api.clay.com\" }\n",
    );
    let other = tempdir();
    let op = write(
        other.path(),
        "op.yaml",
        "version: 1\noperations:\n  get:\n    upstream: clay\n    request: { method: GET, path: /x }\n",
    );
    let alone = run(&["validate", op.to_str().expect("utf-8")]);
    assert_eq!(alone.status.code(), Some(1));
    let both = run(&[
        "validate",
        dir.path().to_str().expect("utf-8"),
        op.to_str().expect("utf-8"),
    ]);
    assert_eq!(both.status.code(), Some(0), "{}", stdout(&both));
}

#[test]
fn schema_prints_the_shipped_schema() {
    let out = run(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let shipped =
        std::fs::read_to_string(repo().join("schemas/policy.schema.json")).expect("schema file");
    assert_eq!(stdout(&out), shipped);
}

#[test]
fn example_policies_declare_the_schema_for_editors() {
    for entry in std::fs::read_dir(repo().join("policies")).expect("policies dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("policy file");
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schemas/policy.schema.json\n"),
            "{} lacks the $schema comment",
            path.display()
        );
    }
}

#[test]
fn readme_documents_every_diagnostic_code() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    for code in claygate::policy::diagnostic::Code::ALL {
        assert!(
            readme.contains(&format!("| `{code}` |")),
            "README's code table lacks `{code}`"
        );
    }
}

#[test]
fn explain_shows_each_layer_with_its_source() {
    let policies = repo().join("policies");
    let out = run(&[
        "explain",
        "lookup_company",
        "--policies",
        policies.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("operation lookup_company  ("), "{text}");
    for needle in [
        "max_attempts 2",
        "[operation]",
        "[defaults]",
        "[built-in]",
        "class 8 slots, queue 100, queue_timeout 1s",
        "attempt 800ms",
        "connect 2s",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // Header values (secrets) are never shown, only names.
    assert!(!text.contains("demo-key"), "{text}");

    let json = run(&[
        "explain",
        "push_row",
        "--format",
        "json",
        "--policies",
        policies.to_str().expect("utf-8"),
    ]);
    assert_eq!(json.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let layers: Vec<&str> = doc["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["layer"].as_str())
        .collect();
    assert_eq!(
        layers,
        [
            "idempotency",
            "fallback",
            "deadline",
            "retry",
            "breaker",
            "bulkhead",
            "rate_limit",
            "timeout",
            "http",
            "dlq"
        ]
    );
}

#[test]
fn explain_names_the_known_operations_when_asked_for_another() {
    let policies = repo().join("policies");
    let out = run(&[
        "explain",
        "enrich_persn",
        "--policies",
        policies.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown operation `enrich_persn`"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("enrich_person"));
}
