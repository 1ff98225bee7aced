//! The loader never panics and never hangs, whatever the bytes: arbitrary
//! text, YAML-ish noise, and random mutations of the bundled policies.
//!
//! Each input runs on a worker thread with a generous watchdog, so a hang
//! fails the test instead of stalling CI; the bound is a safety net, not a
//! speed target (speed lives in `benches/validate.rs`).

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use claygate::policy::{LoadOptions, load_str};
use proptest::prelude::*;

use crate::support::repo;

/// Loads `text` on a worker thread; fails if it panics or takes over the watchdog.
fn load_survives(text: String) -> Result<(), TestCaseError> {
    // CPU-heavy: the timing-sensitive end-to-end tests wait for each case.
    let _exclusive = crate::support::e2e::HEAVY.blocking_write();
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let loaded = load_str("fuzz.yaml", &text, LoadOptions::default());
        // Rendering must not panic either (carets at odd offsets, odd text).
        let mut sink = codespan_reporting::term::termcolor::NoColor::new(Vec::new());
        let rendered = claygate::policy::diagnostic::render_human(
            &mut sink,
            &loaded.sources,
            &loaded.diagnostics,
        );
        let _ = tx.send(rendered.is_ok());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(true) => Ok(()),
        Ok(false) => Err(TestCaseError::fail("rendering diagnostics failed")),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TestCaseError::fail("loader hung")),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            Err(TestCaseError::fail("loader panicked"))
        }
    }
}

fn seeds() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("policies")).expect("policies dir") {
        out.push(std::fs::read_to_string(entry.expect("entry").path()).expect("policy file"));
    }
    out.sort();
    out
}

/// A random edit of a text: insert, delete or replace a slice with YAML-significant noise.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, usize, String),
    DuplicateLine(usize),
    Indent(usize, usize),
}

fn noise() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(":".to_owned()),
        Just(": ".to_owned()),
        Just("- ".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("<<: *a".to_owned()),
        Just("!!binary ".to_owned()),
        Just("!tag ".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("\n".to_owned()),
        Just("\t".to_owned()),
        Just("#".to_owned()),
        Just("|\n".to_owned()),
        Just("---\n".to_owned()),
        Just("${env:".to_owned()),
        Just("{{ params.".to_owned()),
        Just("}}".to_owned()),
        Just("999999999999999999999999".to_owned()),
        Just("-1".to_owned()),
        Just(".nan".to_owned()),
        Just("0s".to_owned()),
        Just("ü€𝄞".to_owned()),
        Just("\u{feff}".to_owned()),
        "[a-z_]{1,12}",
        any::<String>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), noise()).prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), 1usize..40).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), 1usize..12, noise()).prop_map(|(at, n, s)| Edit::Replace(at, n, s)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), 0usize..6).prop_map(|(at, n)| Edit::Indent(at, n)),
    ]
}

fn floor_char(text: &str, at: usize) -> usize {
    let mut i = at.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &mut String, e: &Edit) {
    let len = text.len().max(1);
    match e {
        Edit::Insert(at, s) => {
            let i = floor_char(text, at % len);
            text.insert_str(i, s);
        }
        Edit::Delete(at, n) | Edit::Replace(at, n, _) => {
            let start = floor_char(text, at % len);
            let end = floor_char(text, start + n);
            let with = match e {
                Edit::Replace(_, _, s) => s.as_str(),
                _ => "",
            };
            text.replace_range(start..end, with);
        }
        Edit::DuplicateLine(at) => {
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let i = at % lines.len();
                let mut out: String = lines[..=i].concat();
                out.push_str(lines[i]);
                out.push_str(&lines[i + 1..].concat());
                *text = out;
            }
        }
        Edit::Indent(at, n) => {
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let i = at % lines.len();
                let mut out: String = lines[..i].concat();
                out.push_str(&" ".repeat(*n));
                out.push_str(lines[i].trim_start());
                out.push_str(&lines[i + 1..].concat());
                *text = out;
            }
        }
    }
}

/// Vocabulary of the policy language, so generated documents reach the
/// schema and semantic phases instead of dying in the YAML parser.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("version"),
        Just("upstreams"),
        Just("operations"),
        Just("timeouts"),
        Just("defaults"),
        Just("health"),
        Just("clay"),
        Just("base_url"),
        Just("headers"),
        Just("priorities"),
        Just("critical"),
        Just("normal"),
        Just("bulk"),
        Just("request"),
        Just("method"),
        Just("path"),
        Just("body"),
        Just("params_schema"),
        Just("properties"),
        Just("upstream"),
        Just("timeout"),
        Just("deadline"),
        Just("priority"),
        Just("breaker"),
        Just("retry"),
        Just("backoff"),
        Just("idempotency"),
        Just("key"),
        Just("fallback"),
        Just("cache"),
        Just("fresh"),
        Just("stale"),
        Just("very_stale"),
        Just("dlq"),
        Just("alert"),
        Just("webhook"),
        Just("concurrency"),
        Just("queue"),
        Just("queue_timeout"),
    ]
    .prop_map(str::to_owned)
}

fn scalar() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::json!(1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-5)),
        Just(serde_json::json!(2.5)),
        Just(serde_json::json!(true)),
        Just(serde_json::Value::Null),
        Just(serde_json::json!("30s")),
        Just(serde_json::json!("POST")),
        Just(serde_json::json!("GET")),
        Just(serde_json::json!("/v1/{{ params.email }}")),
        Just(serde_json::json!("${env:CLAY_API_KEY}")),
        Just(serde_json::json!("https://api.clay.com")),
        Just(serde_json::json!("clay")),
        Just(serde_json::json!("normal")),
        "[a-z{}$:/ ]{0,16}".prop_map(serde_json::Value::String),
    ]
}

fn document() -> impl Strategy<Value = serde_json::Value> {
    scalar().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        load_survives(text)?;
    }

    #[test]
    fn mutated_policies_never_panic(seed in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..8)) {
        let seeds = seeds();
        let mut text = seed.get(&seeds).clone();
        for e in &edits {
            apply(&mut text, e);
        }
        load_survives(text)?;
    }

    #[test]
    fn generated_documents_never_panic(mut doc in document()) {
        if let serde_json::Value::Object(map) = &mut doc {
            map.insert("version".into(), serde_json::json!(1));
        }
        // JSON is YAML: flow style exercises the same loader.
        load_survives(doc.to_string())?;
    }
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    load_survives(deep).expect("deeply nested flow sequence");
    let mut block = String::from("version: 1\n");
    for depth in 0..5_000 {
        block.push_str(&" ".repeat(depth));
        block.push_str("a:\n");
    }
    load_survives(block).expect("deeply nested block mapping");
}
