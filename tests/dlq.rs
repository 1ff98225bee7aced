//! The dead-letter queue end to end: dead-lettering, redrive through the
//! same pipeline (back-off, breaker, pacing, idempotency), parking with its
//! alerts, admin replay, and orphaned entries; on the scripted in-memory
//! upstream and a real SQLite store, mostly on tokio's paused clock (the
//! store is wrapped so that waiting on SQLite never auto-advances it: see
//! `support::dlq`).

use std::sync::Arc;
use std::time::Duration;

use claygate::clock::{Clock, UnixMillis};
use claygate::dlq::{self, ReplayError};
use claygate::events::Event;
use claygate::runtime::{Answer, InvokeError, InvokeRequest, Invoked, Runtime};
use claygate::store::{DeadLetter, DlqFilter, DlqState};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::support::dlq::open_store;
use crate::support::script::{Script, Step, compile_script, compile_script_env};
use crate::support::tempdir;
use crate::support::upstream::{Behavior, FakeUpstream};

/// One `push_row`-like operation named `name` with these `dlq` settings.
fn push_op(name: &str, dlq: &str) -> String {
    format!(
        "  {name}:
    upstream: clay
    request: {{ method: POST, path: \"/v1/tables/{{{{ params.table_id }}}}/rows\", body: \"{{{{ params.row }}}}\" }}
    params_schema:
      type: object
      required: [table_id, row]
      properties: {{ table_id: {{ type: string }}, row: {{ type: object }} }}
    priority: bulk
    retry: {{ max_attempts: 1 }}
    breaker: {{ volume_threshold: 1000, reset_timeout: 30s }}
    idempotency: {{ key: [table_id, row], ttl: 24h }}
    dlq: {dlq}
"
    )
}

/// Back-off 30s, 60s, 120s… without jitter, so due times are exact.
const DLQ: &str = "{ max_attempts: 3, backoff: { initial: 30s, multiplier: 2, max: 30m, jitter: none }, redrive_rate: 100, retention: 1d }";

fn ops(list: &[String]) -> String {
    format!("operations:\n{}", list.concat())
}

struct Rig {
    runtime: Arc<Runtime>,
    script: Script,
    events: broadcast::Receiver<Event>,
    _dir: tempfile::TempDir,
}

async fn rig(operations: &str) -> Rig {
    let dir = tempdir();
    let script = Script::new();
    let store = open_store(dir.path()).await;
    let compiled = compile_script(operations, &script, None);
    let runtime = Runtime::new(compiled, store, Clock::new());
    let events = runtime.events.subscribe();
    Rig {
        runtime,
        script,
        events,
        _dir: dir,
    }
}

fn row(table: &str, n: u32) -> InvokeRequest {
    InvokeRequest {
        params: json!({"table_id": table, "row": {"email": format!("p{n}@example.com"), "n": n}}),
        ..InvokeRequest::default()
    }
}

fn fail(status: u16) -> Step {
    Step::Reply(status, json!({"error": status}))
}

impl Rig {
    async fn invoke(&self, op: &str, request: InvokeRequest) -> Invoked {
        self.runtime.invoke(op, request).await
    }

    /// Invokes `op`, which must be dead-lettered; answers the entry id.
    async fn dead_letter(&self, op: &str, request: InvokeRequest) -> i64 {
        let invoked = self.invoke(op, request).await;
        match invoked.answer {
            Answer::Queued { dlq_id, .. } => dlq_id,
            other => panic!("expected the call to be queued, got {other:?}"),
        }
    }

    async fn entry(&self, id: i64) -> DeadLetter {
        self.runtime
            .store
            .dlq_get(id)
            .await
            .expect("store readable")
            .unwrap_or_else(|| panic!("dead letter {id} exists"))
    }

    /// Advances the paused clock until `at` (wall time of the runtime's clock).
    async fn advance_to(&self, at: UnixMillis) {
        let now = self.runtime.clock.now();
        if at > now {
            let ms = u64::try_from(at - now).expect("positive");
            tokio::time::advance(Duration::from_millis(ms)).await;
        }
    }

    /// Events emitted so far and not yet seen.
    fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push(e);
        }
        out
    }
}

fn body(invoked: &Invoked) -> Value {
    match &invoked.answer {
        Answer::Ok(r) => serde_json::from_slice(&r.body).expect("JSON body"),
        other => panic!("expected an ok answer, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_call_is_dead_lettered_with_its_details() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503));
    let started = rig.runtime.clock.now();

    let invoked = rig.invoke("push_row", row("t1", 1)).await;
    let (id, cause) = match invoked.answer {
        Answer::Queued { dlq_id, cause } => (dlq_id, cause),
        other => panic!("expected queued, got {other:?}"),
    };
    assert_eq!(cause.expect("a cause").code(), "upstream_status");
    assert_eq!(invoked.attempts, 1);

    let entry = rig.entry(id).await;
    assert_eq!(entry.state, DlqState::Pending);
    assert_eq!(entry.operation, "push_row");
    assert_eq!(entry.params, row("t1", 1).params);
    assert_eq!(entry.error_code, "upstream_status");
    assert_eq!(entry.call_attempts, 1);
    assert_eq!(entry.redrive_attempts, 0);
    assert_eq!(entry.priority.as_deref(), Some("bulk"));
    assert!(entry.first_attempt_at >= started && entry.first_attempt_at <= entry.last_attempt_at);
    assert_eq!(
        entry.next_attempt_at,
        entry.last_attempt_at + 30_000,
        "due after the first back-off step"
    );
    assert_eq!(entry.expires_at, None);
    let key = entry
        .idempotency_key
        .clone()
        .expect("a derived key is kept");
    assert_eq!(rig.script.seen()[0].key.as_deref(), Some(key.as_str()));

    let events = rig.events();
    assert!(
        events.iter().any(|e| matches!(e, Event::DeadLettered { id: i, error_code, .. } if *i == id && error_code == "upstream_status")),
        "{events:?}"
    );
    // Not due yet: a pass sends nothing.
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.sent(), 0, "{report:?}");
    assert_eq!(rig.script.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn redrive_delivers_after_the_backoff_and_duplicates_replay_the_answer() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script
        .then(fail(503))
        .then(Step::Reply(201, json!({"row_id": 7})));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    let due = rig.entry(id).await.next_attempt_at;

    rig.advance_to(due - 1_000).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.sent(), 0);
    assert_eq!(rig.script.hits(), 1, "nothing before the back-off");

    rig.advance_to(due).await;
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(rig.script.hits(), 2);

    let entry = rig.entry(id).await;
    assert_eq!(entry.state, DlqState::Delivered);
    assert_eq!(entry.delivered_status, Some(201));
    assert_eq!(entry.redrive_attempts, 1);
    let delivered_at = entry.last_attempt_at;
    assert_eq!(
        entry.expires_at,
        Some(delivered_at + 24 * 3600 * 1000),
        "kept for the retention"
    );
    assert!(
        rig.events()
            .iter()
            .any(|e| matches!(e, Event::Delivered { id: i, redrive_attempts: 1, .. } if *i == id)),
        "a delivered event"
    );
    assert_eq!(rig.runtime.redrive.delivered_total(), 1);

    // A duplicate of the original call replays the delivered answer.
    let again = rig.invoke("push_row", row("t1", 1)).await;
    assert_eq!(body(&again), json!({"row_id": 7}));
    assert_eq!(again.attempts, 0);
    assert!(again.idempotency.as_ref().is_some_and(|m| m.replayed));
    assert_eq!(rig.script.hits(), 2, "the duplicate made no upstream call");

    // Delivered entries are swept once their retention has passed.
    rig.advance_to(delivered_at + 24 * 3600 * 1000).await;
    let swept = dlq::sweep(&rig.runtime).await;
    assert_eq!(swept.dead_letters, 1, "{swept:?}");
    assert_eq!(swept.store_errors, 0);
    assert!(
        rig.runtime
            .store
            .dlq_get(id)
            .await
            .expect("readable")
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn the_same_idempotency_key_is_forwarded_on_every_redrive() {
    let five =
        "{ max_attempts: 5, backoff: { initial: 30s, multiplier: 2, max: 30m, jitter: none } }";
    let rig = rig(&ops(&[push_op("push_row", five)])).await;
    rig.script
        .then(fail(503))
        .then(fail(502))
        .then(Step::Refuse)
        .then(fail(504));
    let mut request = row("t1", 1);
    request.idempotency_key = Some("client-key-1".into());
    let id = rig.dead_letter("push_row", request).await;

    let mut waits = Vec::new();
    for n in 1..=3 {
        let entry = rig.entry(id).await;
        assert_eq!(entry.state, DlqState::Pending);
        assert_eq!(entry.redrive_attempts, n - 1);
        waits.push(entry.next_attempt_at - entry.last_attempt_at);
        rig.advance_to(entry.next_attempt_at).await;
        let report = dlq::redrive_due(&rig.runtime).await;
        assert_eq!(report.retried, 1, "redrive {n}: {report:?}");
    }
    assert_eq!(
        waits,
        [30_000, 60_000, 120_000],
        "back-off grows per redrive"
    );
    let entry = rig.entry(id).await;
    assert_eq!(entry.error_code, "upstream_status");
    rig.advance_to(entry.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.delivered, 1);

    let seen = rig.script.seen();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter()
            .all(|s| s.key.as_deref() == Some("client-key-1")),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.path == "/v1/tables/t1/rows"));
    assert!(
        seen.iter()
            .all(|s| s.body == Some(json!({"email": "p1@example.com", "n": 1})))
    );
}

#[tokio::test(start_paused = true)]
async fn the_worker_waits_while_the_breaker_is_open() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = dlq::spawn_worker(Arc::clone(&rig.runtime), shutdown);

    rig.script.then(fail(503));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    let breaker = Arc::clone(&rig.runtime.compiled().operations["push_row"].breaker);
    breaker.force_open();
    let due = rig.entry(id).await.next_attempt_at;

    // Well past the due time, the worker has looped many times.
    rig.advance_to(due).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rig.script.hits(), 1, "no redrive while the breaker is open");
    let entry = rig.entry(id).await;
    assert_eq!(
        (entry.state, entry.redrive_attempts),
        (DlqState::Pending, 0),
        "no attempt consumed"
    );
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.waiting, ["push_row"]);
    assert_eq!(report.sent(), 0);
    rig.events();

    breaker.reset();
    let delivered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rig.events.recv().await {
                Ok(Event::Delivered { id: i, .. }) if i == id => break,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await;
    assert!(
        delivered.is_ok(),
        "the worker delivers once the breaker lets calls through"
    );
    assert_eq!(rig.script.hits(), 2);
    assert_eq!(rig.entry(id).await.state, DlqState::Delivered);

    stop.send(true).expect("worker listening");
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("the worker stops on shutdown")
        .expect("the worker did not panic");
}

#[tokio::test(start_paused = true)]
async fn a_breaker_that_opens_mid_pass_stops_the_pass() {
    let op = push_op("push_row", DLQ).replace(
        "breaker: { volume_threshold: 1000, reset_timeout: 30s }",
        "breaker: { volume_threshold: 2, error_threshold_percentage: 50, reset_timeout: 30s }",
    );
    let rig = rig(&ops(&[op])).await;
    // Two calls fail and open the breaker; later calls are refused, but the
    // first two entries are still dead-lettered (breaker_open is transient).
    rig.script.always(fail(503));
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(rig.dead_letter("push_row", row("t1", n)).await);
    }
    assert_eq!(rig.script.hits(), 2);
    let breaker = Arc::clone(&rig.runtime.compiled().operations["push_row"].breaker);
    breaker.reset();
    let latest = rig.entry(ids[3]).await.next_attempt_at;
    rig.advance_to(latest).await;

    // The first redrive fails (one call in the window: below the volume
    // threshold); the second opens the breaker, and the pass stops there.
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.retried, 2, "{report:?}");
    assert_eq!(report.waiting, ["push_row"], "{report:?}");
    assert_eq!(
        rig.script.hits(),
        4,
        "the pass stopped when the breaker opened"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_parks_at_once() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503)).then(fail(400));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    rig.advance_to(rig.entry(id).await.next_attempt_at).await;

    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.parked, 1, "{report:?}");
    let entry = rig.entry(id).await;
    assert_eq!(entry.state, DlqState::Parked);
    assert_eq!(
        entry.redrive_attempts, 1,
        "parked at once, with attempts left"
    );
    assert_eq!(entry.error_code, "upstream_status");
    assert!(
        entry.error_message.contains("400"),
        "{}",
        entry.error_message
    );
    assert_eq!(
        entry.expires_at,
        Some(entry.last_attempt_at + 24 * 3600 * 1000)
    );
    assert!(
        rig.events()
            .iter()
            .any(|e| matches!(e, Event::Parked { id: i, .. } if *i == id)),
        "a parked event"
    );
    assert_eq!(rig.runtime.redrive.parked_total(), 1);
    assert_eq!(
        rig.runtime.redrive.alerts_in_flight(),
        0,
        "no webhook configured"
    );

    // The 4xx is the call's result: a duplicate replays it without a call.
    let again = rig.invoke("push_row", row("t1", 1)).await;
    match &again.answer {
        Answer::Failed(InvokeError::Failure(claygate::pipeline::Failure::Status(reply))) => {
            assert_eq!(reply.status.as_u16(), 400);
        }
        other => panic!("expected the stored 400, got {other:?}"),
    }
    assert_eq!(rig.script.hits(), 2);

    // Nothing redrives a parked entry by itself.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.sent(), 0);
    assert_eq!(rig.script.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn redrives_are_paced_at_the_redrive_rate() {
    let paced = "{ max_attempts: 3, backoff: { initial: 30s, multiplier: 2, max: 30m, jitter: none }, redrive_rate: 2 }";
    let rig = rig(&ops(&[push_op("push_row", paced)])).await;
    for _ in 0..6 {
        rig.script.then(fail(503));
    }
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(rig.dead_letter("push_row", row("t1", n)).await);
    }
    rig.advance_to(rig.entry(ids[5]).await.next_attempt_at)
        .await;

    let started = tokio::time::Instant::now();
    let report = dlq::redrive_due(&rig.runtime).await;
    let took = started.elapsed();
    assert_eq!(report.delivered, 6, "{report:?}");
    assert!(
        took >= Duration::from_millis(2500),
        "6 redrives at 2/s take at least 2.5s, took {took:?}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    // Oldest due first.
    let delivered: Vec<i64> = {
        let mut all = Vec::new();
        for id in &ids {
            all.push((rig.entry(*id).await.last_attempt_at, *id));
        }
        all.sort();
        all.into_iter().map(|(_, id)| id).collect()
    };
    assert_eq!(delivered, ids);
}

#[tokio::test(start_paused = true)]
async fn replay_one_runs_a_parked_entry_now() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script
        .then(fail(503))
        .then(fail(409))
        .then(fail(503))
        .then(Step::Reply(200, json!({"row_id": 9})));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    rig.advance_to(rig.entry(id).await.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 1);
    rig.events();

    // A failed replay of a parked entry leaves it parked, with the new error,
    // and raises no new alert.
    let replayed = dlq::replay_one(&rig.runtime, id).await.expect("replayed");
    assert_eq!(replayed.state, DlqState::Parked);
    assert_eq!(replayed.error_code, "upstream_status");
    assert!(
        replayed.error_message.contains("503"),
        "{}",
        replayed.error_message
    );
    assert_eq!(rig.runtime.redrive.parked_total(), 1);
    assert!(
        !rig.events()
            .iter()
            .any(|e| matches!(e, Event::Parked { .. }))
    );

    let delivered = dlq::replay_one(&rig.runtime, id).await.expect("replayed");
    assert_eq!(delivered.state, DlqState::Delivered);
    assert_eq!(delivered.delivered_status, Some(200));
    assert_eq!(rig.script.hits(), 4);
    assert!(
        rig.events()
            .iter()
            .any(|e| matches!(e, Event::Delivered { id: i, .. } if *i == id))
    );
    let again = rig.invoke("push_row", row("t1", 1)).await;
    assert_eq!(
        body(&again),
        json!({"row_id": 9}),
        "the delivered answer replaces the stored 409"
    );

    assert_eq!(
        dlq::replay_one(&rig.runtime, id).await,
        Err(ReplayError::AlreadyDelivered(id))
    );
    assert_eq!(
        dlq::replay_one(&rig.runtime, id + 1000).await,
        Err(ReplayError::NotFound(id + 1000))
    );
    assert_eq!(rig.script.hits(), 4);
}

#[tokio::test(start_paused = true)]
async fn replay_one_of_a_pending_entry_consumes_an_attempt_unless_refused() {
    let rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503)).then(fail(503));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;

    // Run now, long before it is due.
    let entry = dlq::replay_one(&rig.runtime, id).await.expect("replayed");
    assert_eq!(
        (entry.state, entry.redrive_attempts),
        (DlqState::Pending, 1)
    );
    assert_eq!(entry.next_attempt_at, entry.last_attempt_at + 60_000);

    let breaker = Arc::clone(&rig.runtime.compiled().operations["push_row"].breaker);
    breaker.force_open();
    let refused = dlq::replay_one(&rig.runtime, id).await;
    assert!(
        matches!(&refused, Err(ReplayError::Refused { id: i, failure }) if *i == id && failure.code() == "breaker_open"),
        "{refused:?}"
    );
    assert_eq!(
        rig.entry(id).await,
        entry,
        "a refusal leaves the entry as it was"
    );
    assert_eq!(rig.script.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn replay_matching_requeues_by_filter() {
    let rig = rig(&ops(&[
        push_op("push_row", DLQ),
        push_op("push_other", DLQ),
    ]))
    .await;
    rig.script
        .then(fail(503))
        .then(fail(503))
        .then(fail(422))
        .then(fail(422));
    let a = rig.dead_letter("push_row", row("t1", 1)).await;
    let b = rig.dead_letter("push_other", row("t1", 2)).await;
    rig.advance_to(rig.entry(b).await.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 2);

    let delivered_only = DlqFilter {
        state: Some(DlqState::Delivered),
        ..DlqFilter::default()
    };
    assert_eq!(
        dlq::replay_matching(&rig.runtime, &delivered_only).await,
        Ok(0)
    );

    let filter = DlqFilter {
        operation: Some("push_row".into()),
        ..DlqFilter::default()
    };
    assert_eq!(dlq::replay_matching(&rig.runtime, &filter).await, Ok(1));
    let now = rig.runtime.clock.now();
    let requeued = rig.entry(a).await;
    assert_eq!(requeued.state, DlqState::Pending);
    assert_eq!(requeued.redrive_attempts, 0, "a fresh count of attempts");
    assert!(requeued.next_attempt_at <= now, "due now");
    assert_eq!(
        rig.entry(b).await.state,
        DlqState::Parked,
        "the other operation is untouched"
    );

    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(rig.entry(a).await.state, DlqState::Delivered);
    assert_eq!(rig.entry(b).await.state, DlqState::Parked);

    // Delivered entries are never requeued, even by an unfiltered replay.
    assert_eq!(
        dlq::replay_matching(&rig.runtime, &DlqFilter::default()).await,
        Ok(1)
    );
    assert_eq!(rig.entry(a).await.state, DlqState::Delivered);
    assert_eq!(rig.entry(b).await.state, DlqState::Pending);
}

#[tokio::test(start_paused = true)]
async fn entries_of_a_removed_operation_stay_stored() {
    let both = ops(&[push_op("push_row", DLQ), push_op("push_other", DLQ)]);
    let rig = rig(&both).await;
    rig.script.then(fail(503));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    let due = rig.entry(id).await.next_attempt_at;

    let current = rig.runtime.compiled();
    let without = compile_script(
        &ops(&[push_op("push_other", DLQ)]),
        &rig.script,
        Some(current.as_ref()),
    );
    rig.runtime.swap(without);
    rig.advance_to(due + 3_600_000).await;
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!(report.orphaned, 1, "{report:?}");
    assert_eq!(report.sent(), 0);
    assert_eq!(
        dlq::replay_one(&rig.runtime, id).await,
        Err(ReplayError::UnknownOperation("push_row".into()))
    );
    let swept = dlq::sweep(&rig.runtime).await;
    assert_eq!(swept.dead_letters, 0);
    let entry = rig.entry(id).await;
    assert_eq!(
        (entry.state, entry.redrive_attempts),
        (DlqState::Pending, 0)
    );
    assert_eq!(rig.script.hits(), 1);

    // Restoring the operation resumes the redrive.
    let current = rig.runtime.compiled();
    let restored = compile_script(&both, &rig.script, Some(current.as_ref()));
    rig.runtime.swap(restored);
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!((report.delivered, report.orphaned), (1, 0), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn an_entry_being_replayed_is_not_redriven_twice() {
    let rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    // The replay's request hangs until the attempt timeout (5s) cuts it.
    rig.script.then(fail(503)).then(Step::Hang);
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    rig.advance_to(rig.entry(id).await.next_attempt_at).await;

    let runtime = Arc::clone(&rig.runtime);
    let replay = tokio::spawn(async move { dlq::replay_one(&runtime, id).await });
    // Spinning keeps the runtime busy, so the paused clock stays put. The
    // spin is bounded so a stuck replay fails the test instead of hanging it.
    let mut spins: u64 = 0;
    while !rig.runtime.redrive.is_running(id) || rig.script.hits() < 2 {
        assert!(
            !replay.is_finished(),
            "the replay ended early: {:?}",
            replay.await
        );
        spins += 1;
        assert!(
            spins < 50_000_000,
            "the replay never reached the upstream (running: {}, hits: {})",
            rig.runtime.redrive.is_running(id),
            rig.script.hits()
        );
        tokio::task::yield_now().await;
    }
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!((report.busy, report.sent()), (1, 0), "{report:?}");
    assert_eq!(
        dlq::replay_one(&rig.runtime, id).await,
        Err(ReplayError::Busy(id))
    );
    assert_eq!(rig.script.hits(), 2, "the due entry was sent once");

    let entry = replay.await.expect("replay task").expect("replayed");
    assert_eq!(entry.state, DlqState::Pending);
    assert_eq!(entry.error_code, "attempt_timeout");
    assert_eq!(entry.redrive_attempts, 1);
    assert!(!rig.runtime.redrive.is_running(id), "the mark is gone");
}

// Real clock with short back-offs: the webhook goes over a real socket, and
// reqwest's timeouts must not fire under an auto-advancing paused clock.
// The alert's log line is checked through the binary's stderr, in
// `e2e::dlq_redrives_after_recovery_and_parks_with_an_alert` (a thread's
// capturing subscriber misses events while other tests run in parallel).
#[tokio::test]
async fn out_of_attempts_parks_and_posts_the_alert_webhook() {
    let hook = FakeUpstream::start().await;
    hook.then([Behavior::status(503, "")])
        .always(Behavior::status(204, ""));
    let webhook = format!("{}/hooks/dlq?token=s3cret", hook.url());
    let dlq = format!(
        "{{ max_attempts: 2, backoff: {{ initial: 10ms, multiplier: 1, max: 10ms, jitter: none }}, alert: {{ webhook: \"{webhook}\" }} }}"
    );
    let mut rig = rig(&ops(&[push_op("push_row", &dlq)])).await;
    rig.script.always(fail(503));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = dlq::spawn_worker(Arc::clone(&rig.runtime), shutdown);
    let id = rig.dead_letter("push_row", row("t1", 1)).await;

    let parked = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rig.events.recv().await {
                Ok(Event::Parked {
                    id: i, error_code, ..
                }) if i == id => break error_code,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("parked within the time");
    assert_eq!(parked, "upstream_status");
    let entry = rig.entry(id).await;
    assert_eq!((entry.state, entry.redrive_attempts), (DlqState::Parked, 2));
    assert_eq!(rig.script.hits(), 3, "the call and two redrives");

    tokio::time::timeout(
        Duration::from_secs(20),
        rig.runtime.redrive.alerts_settled(),
    )
    .await
    .expect("the webhook settles");
    assert_eq!(rig.runtime.redrive.alerts_sent(), 1);
    assert_eq!(rig.runtime.redrive.alerts_failed(), 0);
    assert_eq!(rig.runtime.redrive.parked_total(), 1);
    // The metric, beside the event and the webhook.
    assert!(
        rig.runtime
            .metrics
            .encode()
            .lines()
            .any(|l| l == "claygate_dlq_parked_total{operation=\"push_row\"} 1"),
        "{}",
        rig.runtime.metrics.encode()
    );
    let seen = hook.seen();
    assert_eq!(seen.len(), 2, "a 503 from the receiver is retried");
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path_and_query, "/hooks/dlq?token=s3cret");
        assert_eq!(s.headers["content-type"], "application/json");
        let alert: Value = serde_json::from_slice(&s.body).expect("JSON alert");
        assert_eq!(alert["event"], "dead_letter_parked");
        assert_eq!(alert["entry"]["id"], id);
        assert_eq!(alert["entry"]["operation"], "push_row");
        assert_eq!(alert["entry"]["state"], "parked");
        assert_eq!(alert["entry"]["redrive_attempts"], 2);
        assert_eq!(alert["entry"]["error_code"], "upstream_status");
    }

    stop.send(true).expect("worker listening");
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("the worker stops")
        .expect("no panic");
}

fn keyed(table: &str, n: u32, key: &str) -> InvokeRequest {
    InvokeRequest {
        idempotency_key: Some(key.into()),
        ..row(table, n)
    }
}

fn failure_code(invoked: &Invoked) -> &'static str {
    match &invoked.answer {
        Answer::Failed(e) => e.code(),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Parks entry `id` by running out its attempts (every redrive answers 503).
async fn park(rig: &Rig, id: i64) {
    for _ in 0..3 {
        rig.script.then(fail(503));
        rig.advance_to(rig.entry(id).await.next_attempt_at).await;
        dlq::redrive_due(&rig.runtime).await;
    }
    assert_eq!(rig.entry(id).await.state, DlqState::Parked);
}

/// Review finding 3: a duplicate of a call whose dead letter was parked
/// hears `dead_lettered_parked` with the entry, not "queued" for work that
/// will never run; requeued it is queued again; deleted, the key is free
/// and a retry runs afresh.
#[tokio::test(start_paused = true)]
async fn a_duplicate_of_a_parked_or_deleted_entry_hears_the_truth() {
    let rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    let queued = rig.invoke("push_row", row("t1", 1)).await;
    assert!(
        matches!(queued.answer, Answer::Queued { dlq_id, .. } if dlq_id == id),
        "pending: queued with the entry"
    );

    park(&rig, id).await;
    let hits = rig.script.hits();
    let dup = rig.invoke("push_row", row("t1", 1)).await;
    assert_eq!(failure_code(&dup), "dead_lettered_parked");
    match &dup.answer {
        Answer::Failed(e @ InvokeError::DeadLetterParked { dlq_id }) => {
            assert_eq!(*dlq_id, id);
            assert!(e.to_string().contains(&format!("entry {id}")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(dup.idempotency.as_ref().is_some_and(|m| m.replayed));

    let filter = DlqFilter {
        state: Some(DlqState::Parked),
        ..DlqFilter::default()
    };
    assert_eq!(dlq::replay_matching(&rig.runtime, &filter).await, Ok(1));
    let requeued = rig.invoke("push_row", row("t1", 1)).await;
    assert!(matches!(requeued.answer, Answer::Queued { dlq_id, .. } if dlq_id == id));

    assert!(rig.runtime.store.dlq_delete(id).await.expect("delete"));
    assert_eq!(rig.script.hits(), hits, "no duplicate reached the upstream");
    rig.script.then(Step::Reply(201, json!({"row_id": 3})));
    let fresh = rig.invoke("push_row", row("t1", 1)).await;
    assert_eq!(body(&fresh), json!({"row_id": 3}), "the work runs afresh");
    assert_eq!(rig.script.hits(), hits + 1);
}

/// Review finding 1, end to end: an entry parked with a permanent answer
/// outlives that answer's key; a new call reuses the caller's key with
/// other params and completes; replaying the old entry must not put its
/// answer under the new call's key.
#[tokio::test(start_paused = true)]
async fn replaying_an_old_entry_never_overwrites_a_reused_key() {
    let rig = rig(&ops(&[push_op("push_row", DLQ_14D)])).await;
    rig.script
        .then(fail(503))
        .then(Step::Reply(409, json!({"error": "locked"})));
    let old = rig
        .dead_letter("push_row", keyed("t1", 1, "order-42"))
        .await;
    rig.advance_to(rig.entry(old).await.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 1);

    // The permanent answer replays for the key's ttl (24h), then frees it.
    tokio::time::advance(Duration::from_secs(25 * 3600)).await;
    rig.script.then(Step::Reply(201, json!({"call": "new"})));
    let new = rig.invoke("push_row", keyed("t1", 2, "order-42")).await;
    assert_eq!(body(&new), json!({"call": "new"}));

    rig.script.then(Step::Reply(201, json!({"call": "old"})));
    let replayed = dlq::replay_one(&rig.runtime, old).await.expect("replayed");
    assert_eq!(replayed.state, DlqState::Delivered);
    let dup = rig.invoke("push_row", keyed("t1", 2, "order-42")).await;
    assert_eq!(
        body(&dup),
        json!({"call": "new"}),
        "the new call's duplicate replays the new call's answer"
    );
    let other = rig.invoke("push_row", keyed("t1", 1, "order-42")).await;
    assert_eq!(failure_code(&other), "idempotency_conflict");
}

/// Like [`DLQ`], but parking at the first failed redrive and keeping
/// entries 14 days (the default), longer than the key's 24h ttl.
const DLQ_14D: &str = "{ max_attempts: 1, backoff: { initial: 30s, max: 30s, jitter: none }, redrive_rate: 100, retention: 14d }";

/// Round 2, item 2: a parked key lasts as long as its entry, not the key's
/// ttl. Parked on day 0, a duplicate on day 2 must not claim the key and
/// send the work, or an admin's replay on day 3 delivers it twice; the
/// same for a requeue after the sweep. At retention end both go.
#[tokio::test(start_paused = true)]
async fn a_parked_key_lasts_as_long_as_its_entry() {
    let rig = rig(&ops(&[push_op("push_row", DLQ_14D)])).await;
    rig.script
        .then(fail(503))
        .then(fail(503))
        .then(fail(503))
        .then(fail(503));
    let a = rig.dead_letter("push_row", row("t1", 1)).await;
    let b = rig.dead_letter("push_row", row("t1", 2)).await;
    rig.advance_to(rig.entry(b).await.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 2);
    assert_eq!(rig.script.hits(), 4);

    // Day 2: far past the key's ttl; the sweep runs.
    tokio::time::advance(Duration::from_secs(2 * 24 * 3600)).await;
    let swept = dlq::sweep(&rig.runtime).await;
    assert_eq!((swept.idempotency_records, swept.dead_letters), (0, 0));
    for (id, n) in [(a, 1), (b, 2)] {
        let dup = rig.invoke("push_row", row("t1", n)).await;
        match &dup.answer {
            Answer::Failed(InvokeError::DeadLetterParked { dlq_id }) => assert_eq!(*dlq_id, id),
            other => panic!("the parked key still holds: {other:?}"),
        }
    }
    assert_eq!(rig.script.hits(), 4, "no duplicate reached the upstream");

    // Day 3: an admin replays one and requeues the other; each is sent
    // once, by the redrive only.
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    rig.script.then(Step::Reply(201, json!({"row": 1})));
    let replayed = dlq::replay_one(&rig.runtime, a).await.expect("replayed");
    assert_eq!(replayed.state, DlqState::Delivered);
    let by_code = DlqFilter {
        state: Some(DlqState::Parked),
        ..DlqFilter::default()
    };
    assert_eq!(dlq::replay_matching(&rig.runtime, &by_code).await, Ok(1));
    let dup_b = rig.invoke("push_row", row("t1", 2)).await;
    assert!(
        matches!(dup_b.answer, Answer::Queued { dlq_id, .. } if dlq_id == b),
        "requeued: queued with its entry, {dup_b:?}"
    );
    let dup_a = rig.invoke("push_row", row("t1", 1)).await;
    assert_eq!(body(&dup_a), json!({"row": 1}), "replays the delivery");
    assert_eq!(rig.script.hits(), 5);

    // Parked again, then past its retention: entry and key go together.
    rig.script.then(fail(503));
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 1);
    tokio::time::advance(Duration::from_secs(14 * 24 * 3600)).await;
    let swept = dlq::sweep(&rig.runtime).await;
    assert_eq!(swept.store_errors, 0, "{swept:?}");
    assert_eq!(rig.runtime.store.dlq_get(b).await.expect("read"), None);
    rig.script.then(Step::Reply(201, json!({"row": 2})));
    let fresh = rig.invoke("push_row", row("t1", 2)).await;
    assert_eq!(body(&fresh), json!({"row": 2}), "the work runs afresh");
}

/// Review finding 5: a row damaged by SQL neither stops its operation's
/// redrive nor panics: the others are delivered, it is parked with an
/// alert, listed as a stub, and can be deleted.
#[tokio::test(start_paused = true)]
async fn a_damaged_row_is_parked_and_the_rest_are_redriven() {
    let mut rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503)).then(fail(503)).then(fail(503));
    let first = rig.dead_letter("push_row", row("t1", 1)).await;
    let bad = rig.dead_letter("push_row", row("t1", 2)).await;
    let last = rig.dead_letter("push_row", row("t1", 3)).await;
    let path = rig._dir.path().join("claygate.db");
    {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("a raw connection");
        sqlx::query("UPDATE dlq SET params = 'not json{' WHERE id = ?1")
            .bind(bad)
            .execute(&mut conn)
            .await
            .expect("damage the row");
        conn.close().await.expect("close");
    }
    rig.events();
    rig.advance_to(rig.entry(last).await.next_attempt_at).await;
    let report = dlq::redrive_due(&rig.runtime).await;
    assert_eq!((report.delivered, report.parked), (2, 1), "{report:?}");
    assert_eq!(rig.entry(first).await.state, DlqState::Delivered);
    assert_eq!(rig.entry(last).await.state, DlqState::Delivered);
    assert!(
        rig.events().iter().any(|e| matches!(e, Event::Parked { id, error_code, .. } if *id == bad && error_code == "unreadable_record")),
        "the park raised its event"
    );
    assert_eq!(rig.runtime.redrive.parked_total(), 1);
    // Next passes leave it alone; the listing shows it.
    assert_eq!(
        dlq::redrive_due(&rig.runtime).await,
        dlq::RedriveReport::default()
    );
    let page = rig
        .runtime
        .store
        .dlq_list(
            &DlqFilter::default(),
            claygate::store::PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("a listing, not an error");
    assert_eq!(page.entries.len(), 2);
    assert_eq!(page.unreadable.len(), 1);
    assert_eq!(page.unreadable[0].id, bad);
    assert!(rig.runtime.store.dlq_delete(bad).await.expect("delete"));
}

/// Review finding 14: cache rows of an operation a reload removed are swept
/// once older than the orphan retention; a serving operation's are not.
#[tokio::test(start_paused = true)]
async fn cache_rows_of_a_removed_operation_are_swept_in_time() {
    let cached = "  lookup:
    upstream: clay
    request: { method: GET, path: \"/v1/lookup/{{ params.id }}\" }
    retry: { max_attempts: 1 }
    fallback: { cache: { fresh: 1m, stale: 1h, very_stale: 30d } }
";
    let both = ops(&[cached.to_owned(), push_op("push_row", DLQ)]);
    let rig = rig(&both).await;
    rig.script.then(Step::Reply(200, json!({"name": "Acme"})));
    let ok = rig
        .invoke(
            "lookup",
            InvokeRequest {
                params: json!({"id": "a"}),
                ..InvokeRequest::default()
            },
        )
        .await;
    assert!(matches!(ok.answer, Answer::Ok(_)));
    let key = rig.runtime.compiled().operations["lookup"]
        .fallback
        .as_ref()
        .and_then(|f| f.cache.as_ref())
        .expect("a cache")
        .key_of(&json!({"id": "a"}));
    let stored = || async {
        rig.runtime
            .store
            .cache_get("lookup", &key)
            .await
            .expect("readable")
            .is_some()
    };
    // Written behind: wait for it with a bound.
    for _ in 0..1000 {
        if stored().await {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(stored().await, "the answer reached the store");

    let without = compile_script(
        &ops(&[push_op("push_row", DLQ)]),
        &rig.script,
        Some(rig.runtime.compiled().as_ref()),
    );
    rig.runtime.swap(without);
    tokio::time::advance(Duration::from_secs(13 * 24 * 3600)).await;
    assert_eq!(
        dlq::sweep(&rig.runtime).await.cache_entries,
        0,
        "kept a while"
    );
    assert!(stored().await);
    tokio::time::advance(Duration::from_secs(2 * 24 * 3600)).await;
    let swept = dlq::sweep(&rig.runtime).await;
    assert_eq!((swept.cache_entries, swept.store_errors), (1, 0));
    assert!(!stored().await);
}

/// Review finding 17, on the redrive path: a permanent answer that echoes
/// an operation header's `${env:…}` secret is stored for replay scrubbed;
/// literal header text (round 2, item 4) is no secret and stays.
#[tokio::test(start_paused = true)]
async fn a_redrives_echoed_secret_is_scrubbed_before_it_is_stored() {
    const SECRET: &str = "op-secret-0123456789";
    let op = push_op("push_row", DLQ).replace(
        "body: \"{{ params.row }}\" }",
        "body: \"{{ params.row }}\", headers: { X-Op-Key: \"${env:TEST_OP_SECRET}\", X-Api-Version: \"20240101\" } }",
    );
    assert!(op.contains("TEST_OP_SECRET"), "{op}");
    let dir = tempdir();
    let script = Script::new();
    let compiled = compile_script_env(&ops(&[op]), &script, None, |name| {
        (name == "TEST_OP_SECRET").then(|| SECRET.to_owned())
    });
    let runtime = Runtime::new(compiled, open_store(dir.path()).await, Clock::new());
    let rig = Rig {
        events: runtime.events.subscribe(),
        runtime,
        script,
        _dir: dir,
    };
    rig.script.then(fail(503)).then(Step::Reply(
        409,
        json!({"error": "duplicate", "echo": SECRET, "version": "20240101", "id": 20240101}),
    ));
    let id = rig.dead_letter("push_row", row("t1", 1)).await;
    rig.advance_to(rig.entry(id).await.next_attempt_at).await;
    assert_eq!(dlq::redrive_due(&rig.runtime).await.parked, 1);
    let dup = rig.invoke("push_row", row("t1", 1)).await;
    match &dup.answer {
        Answer::Failed(InvokeError::Failure(claygate::pipeline::Failure::Status(reply))) => {
            assert_eq!(reply.status.as_u16(), 409);
            let stored: Value = serde_json::from_slice(&reply.body).expect("still JSON");
            assert_eq!(
                stored,
                json!({"error": "duplicate", "echo": "[redacted]", "version": "20240101", "id": 20240101})
            );
        }
        other => panic!("expected the stored 409, got {other:?}"),
    }
}

/// Review finding 13: `POST /v1/dlq/purge` needs a filter (or `all: true`
/// alone), deletes what matches, and frees the entries' keys.
#[tokio::test]
async fn the_purge_route_deletes_by_filter_and_frees_keys() {
    use crate::support::server::{Options, UPSTREAM, start};
    let operations = "version: 1
operations:
  push_row:
    upstream: clay
    request: { method: POST, path: \"/v1/tables/{{ params.table_id }}/rows\", body: \"{{ params.row }}\" }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    idempotency: { key: [table_id, row] }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
  push_event:
    upstream: clay
    request: { method: POST, path: /v1/events, body: \"{{ params.event }}\" }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
";
    let fake = FakeUpstream::start().await;
    fake.always(Behavior::status(503, "{}"));
    let server = start(
        &[("clay.yaml", UPSTREAM), ("ops.yaml", operations)],
        &fake.url(),
        Options::default(),
    )
    .await;
    let row = json!({"table_id": "t1", "row": {"n": 1}});
    let queued = server.invoke("push_row", row.clone()).await;
    assert_eq!(queued.status().as_u16(), 202);
    for n in 0..2 {
        let r = server
            .invoke("push_event", json!({"event": {"n": n}}))
            .await;
        assert_eq!(r.status().as_u16(), 202);
    }
    let purge = |body: Value| {
        server
            .client
            .post(server.url("/v1/dlq/purge"))
            .json(&body)
            .send()
    };
    for (body, code) in [
        (json!({}), "bad_filter"),
        (json!({"all": false}), "bad_filter"),
        (json!({"all": true, "operation": "push_row"}), "bad_filter"),
        (json!({"state": "lost"}), "bad_filter"),
        (json!({"operation": "  "}), "bad_filter"),
        (json!({"opration": "push_row"}), "bad_filter"),
    ] {
        let r = purge(body.clone()).await.expect("sent");
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let problem: Value = r.json().await.expect("a problem");
        assert_eq!(problem["code"], code, "{body}: {problem}");
    }
    let text = server
        .client
        .post(server.url("/v1/dlq/purge"))
        .body("operation=push_row")
        .send()
        .await
        .expect("sent");
    assert_eq!(text.status().as_u16(), 415);

    let r = purge(json!({"operation": "push_row"})).await.expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("JSON"),
        json!({"purged": 1, "skipped": 0})
    );
    let (_, page) = server.get_json("/v1/dlq").await;
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["unreadable"], json!([]));

    // The purged call's key is free: its retry runs (and is queued anew).
    let hits = fake.hits();
    let retry = server.invoke("push_row", row).await;
    assert_eq!(retry.status().as_u16(), 202);
    assert_eq!(fake.hits(), hits + 1, "the retry was sent, not replayed");

    let r = purge(json!({"all": true})).await.expect("sent");
    assert_eq!(
        r.json::<Value>().await.expect("JSON"),
        json!({"purged": 3, "skipped": 0})
    );
    let (_, page) = server.get_json("/v1/dlq").await;
    assert_eq!(page["entries"], json!([]));
    server.server.shutdown().await;
}

/// Lets the other tasks run until `done`, for at most five seconds of
/// real time: a bounded poll that never moves the paused clock.
async fn until(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert!(done(), "the condition did not come true in time");
}

/// Round 2, item 5: deleting or purging an entry while the worker sends it
/// would free its key with its request in flight, and a retry of the
/// original call would then send the work a second time. Delete answers
/// 409 `dlq_busy`; purge leaves it and says so; a retry meanwhile still
/// hears `queued`. Once the redrive is done the entry can be deleted.
#[tokio::test(start_paused = true)]
async fn an_entry_being_redriven_is_neither_deleted_nor_purged() {
    use axum::body::Body;
    use claygate::admin::{AppState, router};
    use tower::ServiceExt;

    let rig = rig(&ops(&[push_op("push_row", DLQ)])).await;
    rig.script.then(fail(503)).then(fail(503));
    let sending = rig.dead_letter("push_row", row("t1", 1)).await;
    let other = rig.dead_letter("push_row", row("t1", 2)).await;
    rig.advance_to(rig.entry(other).await.next_attempt_at).await;

    // The worker sends `sending` first; its request is held upstream.
    rig.script.hold();
    rig.script.then(Step::Reply(201, json!({"row": 1})));
    let runtime = Arc::clone(&rig.runtime);
    let worker = tokio::spawn(async move { dlq::redrive_due(&runtime).await });
    until(|| rig.script.hits() == 3).await;
    assert!(rig.runtime.redrive.is_running(sending));

    let app = router(AppState::new(
        Arc::clone(&rig.runtime),
        None,
        Arc::new(claygate::health::Probes::default()),
        None,
    ));
    let answer = |request: http::Request<Body>| {
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
            let status = response.status().as_u16();
            let retry_after = response.headers().get(http::header::RETRY_AFTER).cloned();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("a body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, retry_after, body)
        }
    };
    let delete = || {
        http::Request::delete(format!("/v1/dlq/{sending}"))
            .body(Body::empty())
            .expect("a request")
    };
    let (status, retry_after, body) = answer(delete()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("dlq_busy")),
        "{body}"
    );
    assert!(retry_after.is_some(), "says when to try again");

    let purge = http::Request::post("/v1/dlq/purge")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"operation": "push_row"}"#))
        .expect("a request");
    let (status, _, body) = answer(purge).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"purged": 1, "skipped": 1}));
    assert_eq!(rig.runtime.store.dlq_get(other).await.expect("read"), None);
    assert_eq!(rig.entry(sending).await.state, DlqState::Pending);

    // A retry of the original call while the redrive is in flight.
    let dup = rig.invoke("push_row", row("t1", 1)).await;
    assert!(
        matches!(dup.answer, Answer::Queued { dlq_id, .. } if dlq_id == sending),
        "the key still holds: {dup:?}"
    );
    assert_eq!(rig.script.hits(), 3, "not sent beside the redrive");

    rig.script.release(1);
    let report = worker.await.expect("the pass ends");
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(rig.script.delivered_per_key().values().max(), Some(&1));
    let (status, _, _) = answer(delete()).await;
    assert_eq!(status, 204, "deleted once the redrive is done");
}
