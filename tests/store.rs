//! The embedded store survives `kill -9`: every write it acknowledged is
//! there after a restart, and the database passes its integrity check. A
//! dead letter written for a claimed key is there with its key marked
//! queued (one transaction: never one without the other).
//!
//! The parent test re-runs this test binary as a child that hammers the
//! store with concurrent durable writes, printing one line per acknowledged
//! write; the parent SIGKILLs it mid-stream, reopens the store and looks for
//! every acknowledged write.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use claygate::store::sqlite::SqliteStore;
use claygate::store::{Claim, IdempotencyState, NewDeadLetter, Store, StoredResponse};

fn letter(key: String, writer: usize, i: u64) -> NewDeadLetter {
    NewDeadLetter {
        operation: "push_row".into(),
        params: json!({"writer": writer, "i": i, "pad": "x".repeat(200)}),
        idempotency_key: Some(key),
        priority: Some("bulk".into()),
        error_code: "breaker_open".into(),
        error_message: "the breaker is open".into(),
        call_attempts: 3,
        first_attempt_at: 1,
        last_attempt_at: 2,
        next_attempt_at: 3,
    }
}
use serde_json::json;

use crate::support::tempdir;

/// Where the child writes; unset in a normal test run.
const CRASH_DIR: &str = "CLAYGATE_CRASH_DIR";

/// Acknowledged writes the parent waits for before the kill.
const ACKS: usize = 2_000;

/// Concurrent writer tasks in the child (a third dead letters, a third
/// idempotency answers, a third dead letters of claimed keys).
const WRITERS: usize = 18;

fn answer(key: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        content_type: Some("application/json".into()),
        body: Bytes::from(format!("{{\"key\":\"{key}\"}}")),
    }
}

fn acknowledge(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is done reading: stop quietly.
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// The child: concurrent durable writes until killed. Does nothing unless
/// run by `crash_keeps_every_acknowledged_write`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the child process of crash_keeps_every_acknowledged_write"]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let run = std::env::var("CLAYGATE_CRASH_RUN").unwrap_or_default();
    let store = Arc::new(
        SqliteStore::open(Path::new(&dir))
            .await
            .expect("the child opens the store"),
    );
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("{run}-{writer}-{i}");
                match writer % 3 {
                    0 => {
                        let id = store
                            .dlq_insert(letter(key, writer, i))
                            .await
                            .expect("dlq_insert");
                        acknowledge(&format!("dlq {id}"));
                    }
                    1 => {
                        let Claim::Claimed(token) = store
                            .idempotency_claim("enrich", &key, "fp", 1, 2, i64::MAX)
                            .await
                            .expect("idempotency_claim")
                        else {
                            panic!("a fresh key is claimed");
                        };
                        let held = store
                            .idempotency_complete("enrich", &key, &token, &answer(&key), i64::MAX)
                            .await
                            .expect("idempotency_complete");
                        assert!(held);
                        acknowledge(&format!("idem enrich {key}"));
                    }
                    _ => {
                        let Claim::Claimed(token) = store
                            .idempotency_claim("push_row", &key, "fp", 1, 2, i64::MAX)
                            .await
                            .expect("idempotency_claim")
                        else {
                            panic!("a fresh key is claimed");
                        };
                        let id = store
                            .dlq_insert_holding(letter(key.clone(), writer, i), Some(&token))
                            .await
                            .expect("dlq_insert_holding");
                        acknowledge(&format!("queued {id} {key}"));
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a writer task");
    }
}

/// Acknowledged writes seen on the child's stdout.
#[derive(Default)]
struct Acks {
    dlq: BTreeSet<i64>,
    idem: BTreeSet<(String, String)>,
    queued: BTreeSet<(i64, String)>,
}

impl Acks {
    fn len(&self) -> usize {
        self.dlq.len() + self.idem.len() + self.queued.len()
    }
}

/// Runs the child on `dir`, collects `ACKS` acknowledgements, kills it.
fn crash_once(dir: &Path, run: &str, acks: &mut Acks) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "store::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir)
        .env("CLAYGATE_CRASH_RUN", run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().expect("the child's stdout");

    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut seen = 0;
    while seen < ACKS {
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child stopped acknowledging after {seen} writes: {e}");
            }
        };
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("dlq"), Some(id), None) => {
                acks.dlq.insert(id.parse().expect("a dead letter id"));
                seen += 1;
            }
            (Some("idem"), Some(op), Some(key)) => {
                acks.idem.insert((op.to_owned(), key.to_owned()));
                seen += 1;
            }
            (Some("queued"), Some(id), Some(key)) => {
                acks.queued
                    .insert((id.parse().expect("a dead letter id"), key.to_owned()));
                seen += 1;
            }
            _ => {} // the test harness's own lines
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("the child is reaped");
    assert!(
        !status.success(),
        "the child was killed, not finished: {status}"
    );
    drop(rx);
    let _ = reader.join();
}

/// Reopens the store after a crash and checks every acknowledged write.
async fn verify(dir: &Path, acks: &Acks) {
    let store = SqliteStore::open(dir)
        .await
        .expect("the store reopens after kill -9");
    store
        .integrity_check()
        .await
        .expect("integrity_check answers ok");
    for &id in &acks.dlq {
        let entry = store
            .dlq_get(id)
            .await
            .expect("dlq_get")
            .unwrap_or_else(|| panic!("acknowledged dead letter {id} is lost"));
        assert_eq!(entry.operation, "push_row");
    }
    for (op, key) in &acks.idem {
        let record = store
            .idempotency_get(op, key)
            .await
            .expect("idempotency_get")
            .unwrap_or_else(|| panic!("acknowledged idempotency record {op}/{key} is lost"));
        assert_eq!(
            record.state,
            IdempotencyState::Completed(answer(key)),
            "{op}/{key}"
        );
    }
    for (id, key) in &acks.queued {
        let entry = store
            .dlq_get(*id)
            .await
            .expect("dlq_get")
            .unwrap_or_else(|| panic!("acknowledged dead letter {id} is lost"));
        assert_eq!(entry.idempotency_key.as_deref(), Some(key.as_str()));
        let record = store
            .idempotency_get("push_row", key)
            .await
            .expect("idempotency_get")
            .unwrap_or_else(|| panic!("the key of dead letter {id} is lost"));
        assert_eq!(
            record.state,
            IdempotencyState::Queued { dlq_id: *id },
            "{key}"
        );
    }
    store.close().await.expect("close");
}

#[test]
fn crash_keeps_every_acknowledged_write() {
    let dir = tempdir();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut acks = Acks::default();
    // Twice: the second run starts from a store recovered after a crash.
    for run in ["first", "second"] {
        crash_once(dir.path(), run, &mut acks);
        rt.block_on(verify(dir.path(), &acks));
    }
    assert!(acks.len() >= 2 * ACKS, "{}", acks.len());
    assert!(!acks.dlq.is_empty() && !acks.idem.is_empty() && !acks.queued.is_empty());
}
