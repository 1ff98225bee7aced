//! Hot reload against a real server with the policy watcher on: edits,
//! refusals, editor-style saves, ConfigMap symlink swaps, bursts, a
//! directory that disappears and comes back, operations removed under
//! load, and dry-run plans. Every wait polls the library (or the event
//! stream) against a deadline; no sleep stands in for synchronisation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use claygate::events::Event;
use claygate::pipeline::breaker::BreakerState;
use claygate::policy::model::Priority;
use claygate::reload::{Problem, ReloadRecord, ReloadResult, Reloader, Trigger, generation_hash};
use claygate::runtime::Runtime;
use claygate::store::DlqState;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::support::server::{Options, TestServer, UPSTREAM, start};
use crate::support::upstream::{Behavior, FakeUpstream};

/// Longest any wait polls: a reload takes the 50 ms debounce plus a few ms.
const PATIENCE: Duration = Duration::from_secs(5);

/// Bound for an edit once the watcher is back: well under the 2 s rescan,
/// so only the watcher's events (not the periodic rescan) can meet it.
const WATCHED: Duration = Duration::from_millis(1500);

/// `lookup` and `steady`, two operations of upstream `clay` with breakers
/// that never open on their own; `lookup`'s volume threshold and
/// description vary.
fn ops(volume: u32, description: &str) -> String {
    format!(
        "version: 1
operations:
  lookup:
    upstream: clay
    description: \"{description}\"
    request: {{ method: GET, path: /v1/lookup }}
    retry: {{ max_attempts: 1 }}
    breaker: {{ volume_threshold: {volume}, reset_timeout: 30s }}
  steady:
    upstream: clay
    request: {{ method: GET, path: /v1/steady }}
    retry: {{ max_attempts: 1 }}
    breaker: {{ volume_threshold: 1000, reset_timeout: 30s }}
"
    )
}

fn watching() -> Options {
    Options {
        watch: true,
        ..Options::default()
    }
}

async fn rig(ops_text: &str) -> (FakeUpstream, TestServer) {
    let fake = FakeUpstream::start().await;
    let server = start(
        &[("clay.yaml", UPSTREAM), ("ops.yaml", ops_text)],
        &fake.url(),
        watching(),
    )
    .await;
    (fake, server)
}

fn runtime(server: &TestServer) -> Arc<Runtime> {
    Arc::clone(server.server.state().runtime())
}

fn reloader(server: &TestServer) -> Arc<Reloader> {
    Arc::clone(
        server
            .server
            .state()
            .shared
            .reloader
            .as_ref()
            .expect("a server on a policy directory has a reloader"),
    )
}

/// The generation hash the files of `dir` make now, as the reloader names it.
fn candidate_hash(dir: &Path) -> String {
    let (sources, _) =
        claygate::policy::read_sources(&[dir.to_path_buf()]).expect("the policy files read");
    generation_hash(&sources)
}

/// Saves like most editors: a temporary file renamed over the target.
fn write_by_rename(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temporary file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename over the target");
}

/// Polls `probe` every few milliseconds until it answers, for at most `within`.
async fn until<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the generation `hash` serves; answers its reload record.
async fn serving(reloader: &Reloader, hash: &str, within: Duration) -> ReloadRecord {
    until(within, &format!("generation {hash} serving"), || {
        if reloader.current().hash != hash {
            return None;
        }
        reloader
            .history()
            .into_iter()
            .find(|r| r.result == ReloadResult::Applied && r.generation == hash)
    })
    .await
}

/// Waits until the candidate `hash` has been refused; answers the record.
async fn refused(reloader: &Reloader, hash: &str) -> ReloadRecord {
    until(PATIENCE, &format!("candidate {hash} refused"), || {
        reloader
            .history()
            .into_iter()
            .find(|r| r.result == ReloadResult::Refused && r.candidate == hash)
    })
    .await
}

/// The next `Reload` event with this `applied`: (generation, errors).
async fn next_reload(
    events: &mut broadcast::Receiver<Event>,
    applied: bool,
) -> (String, Vec<String>) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(Event::Reload {
                    applied: a,
                    generation,
                    errors,
                    ..
                }) if a == applied => return (generation, errors),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the event stream closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no reload event with applied={applied} within {PATIENCE:?}"))
}

/// The value of one Prometheus series (0 when absent).
fn metric(runtime: &Runtime, series: &str) -> f64 {
    runtime
        .metrics
        .encode()
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn count(reloader: &Reloader, result: ReloadResult, trigger: Trigger) -> usize {
    reloader
        .history()
        .iter()
        .filter(|r| r.result == result && r.trigger == trigger)
        .count()
}

/// Invokes `operation` and answers status and body.
async fn call(server: &TestServer, operation: &str) -> (u16, Value) {
    let response = server.invoke(operation, json!({})).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn assert_ok(server: &TestServer, operation: &str) {
    let (status, body) = call(server, operation).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("ok")),
        "{operation}: {body:#}"
    );
}

#[tokio::test]
async fn an_edited_breaker_serves_and_an_untouched_breaker_keeps_its_state() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let before = reloader.current().hash.clone();
    let old = runtime.compiled();
    let steady = Arc::clone(&old.operations["steady"].breaker);
    let lookup = Arc::clone(&old.operations["lookup"].breaker);
    steady.force_open();
    assert_ok(&server, "lookup").await;

    std::fs::write(server.policies.join("ops.yaml"), ops(20, "v0")).expect("edit ops.yaml");
    let hash = candidate_hash(&server.policies);
    assert_ne!(hash, before);
    let record = serving(&reloader, &hash, PATIENCE).await;

    let now = runtime.compiled();
    assert_eq!(
        now.operations["lookup"].breaker.config().volume_threshold,
        20
    );
    assert!(
        !Arc::ptr_eq(&now.operations["lookup"].breaker, &lookup),
        "a changed breaker is a new one"
    );
    assert!(
        Arc::ptr_eq(&now.operations["steady"].breaker, &steady),
        "an unchanged breaker is carried over"
    );
    assert_eq!(steady.state(), BreakerState::ForcedOpen);
    assert_eq!(reloader.current().hash, hash);
    assert_eq!(record.trigger, Trigger::Watch);
    assert_eq!(record.candidate, hash);
    assert_eq!(record.changes["lookup"].status, "changed");
    assert_eq!(
        record.changes["lookup"].carried.map(|c| c.breaker),
        Some(false)
    );
    assert_eq!(record.changes["steady"].status, "unchanged");
    assert_eq!(
        record.changes["steady"].carried.map(|c| c.breaker),
        Some(true)
    );
    assert!(record.errors.is_empty(), "{record:?}");

    let (status, body) = call(&server, "steady").await;
    assert_eq!(status, 503, "still forced open: {body:#}");
    assert_ok(&server, "lookup").await;
    // Over HTTP too, and published with the pipelines that serve.
    let (status, body) = server.get_json("/v1/policies").await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["generation"]["hash"], json!(hash), "{body:#}");
    assert_eq!(
        now.generation().map(|g| g.hash.clone()),
        Some(hash.clone()),
        "the serving pipelines carry their generation"
    );
}

#[tokio::test]
async fn an_invalid_file_is_refused_with_its_place_and_the_old_generation_serves_on() {
    let good = ops(1000, "v0");
    let (_fake, server) = rig(&good).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let mut events = runtime.events.subscribe();
    let before = reloader.current().hash.clone();
    let refused_series = "claygate_reloads_total{result=\"refused\"}";
    let applied_series = "claygate_reloads_total{result=\"applied\"}";
    assert_eq!(metric(&runtime, refused_series), 0.0);

    let broken = good.replace("    description:", "    descripton:");
    assert_ne!(broken, good);
    let line = broken
        .lines()
        .position(|l| l.contains("descripton"))
        .expect("the typo")
        + 1;
    std::fs::write(server.policies.join("ops.yaml"), &broken).expect("break ops.yaml");
    let hash = candidate_hash(&server.policies);
    let record = refused(&reloader, &hash).await;

    assert_eq!(record.trigger, Trigger::Watch);
    assert_eq!(record.generation, before, "the serving generation is named");
    assert!(record.changes.is_empty());
    let place = record
        .errors
        .iter()
        .find_map(|e| match e {
            Problem::Diagnostic(d) if d.file.ends_with("ops.yaml") => {
                d.span.as_ref().map(|s| (s.line, s.column))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("a diagnostic with its place: {record:?}"));
    assert_eq!(
        place,
        (u32::try_from(line).expect("small"), 5),
        "{record:?}"
    );
    assert_eq!(
        reloader.current().hash,
        before,
        "the old generation serves on"
    );
    assert_ok(&server, "lookup").await;
    assert_ok(&server, "steady").await;
    assert_eq!(metric(&runtime, refused_series), 1.0);
    let (generation, errors) = next_reload(&mut events, false).await;
    assert_eq!(generation, before);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&format!("ops.yaml:{line}:5"))),
        "file:line:col in the event: {errors:?}"
    );

    // The periodic rescan reloads the same broken files again: that is the
    // same refusal, not a new one for the history, the metric and the log.
    let again = reloader.reload(Trigger::Watch, false).await;
    assert_eq!(again.result, ReloadResult::Refused);
    assert_eq!(again.candidate, hash);
    assert_eq!(count(&reloader, ReloadResult::Refused, Trigger::Watch), 1);
    assert_eq!(metric(&runtime, refused_series), 1.0);
    // An explicit reload (API, SIGHUP) reports it again.
    let forced = reloader.reload(Trigger::Api, true).await;
    assert_eq!(forced.result, ReloadResult::Refused);
    assert_eq!(metric(&runtime, refused_series), 2.0);

    let fixed = ops(1000, "v1");
    std::fs::write(server.policies.join("ops.yaml"), &fixed).expect("fix ops.yaml");
    let hash = candidate_hash(&server.policies);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert!(record.errors.is_empty());
    assert_eq!(next_reload(&mut events, true).await.0, hash);
    assert_eq!(metric(&runtime, applied_series), 1.0);
    assert_ok(&server, "lookup").await;

    // Broken the same way again after a fix: a new refusal.
    std::fs::write(
        server.policies.join("ops.yaml"),
        fixed.replace("    description:", "    descripton:"),
    )
    .expect("break ops.yaml again");
    let hash = candidate_hash(&server.policies);
    refused(&reloader, &hash).await;
    assert_eq!(metric(&runtime, refused_series), 3.0);
}

#[tokio::test]
async fn rename_saves_and_sed_in_place_are_picked_up() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let dir = server.policies.clone();

    // An editor's save: `ops.yaml.tmp` (not a policy file) renamed over.
    write_by_rename(&dir, "ops.yaml", &ops(500, "renamed"));
    let hash = candidate_hash(&dir);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(
        record.trigger,
        Trigger::Watch,
        "seen by the watcher: {record:?}"
    );
    assert_eq!(
        runtime.compiled().operations["lookup"]
            .breaker
            .config()
            .volume_threshold,
        500
    );

    // `sed -i`: a `sedXXXXXX` file in the same directory, written, its mode
    // copied, renamed over the original.
    let text = std::fs::read_to_string(dir.join("ops.yaml")).expect("read ops.yaml");
    let replaced = text.replace("volume_threshold: 500", "volume_threshold: 600");
    assert_ne!(replaced, text);
    let tmp = dir.join("sedq3Xr9a");
    std::fs::write(&tmp, &replaced).expect("write sed's file");
    let mode = std::fs::metadata(dir.join("ops.yaml"))
        .expect("metadata")
        .permissions();
    std::fs::set_permissions(&tmp, mode).expect("chmod");
    std::fs::rename(&tmp, dir.join("ops.yaml")).expect("rename");
    let hash = candidate_hash(&dir);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(
        record.trigger,
        Trigger::Watch,
        "seen by the watcher: {record:?}"
    );
    assert_eq!(
        runtime.compiled().operations["lookup"]
            .breaker
            .config()
            .volume_threshold,
        600
    );

    let files = &reloader.current().files;
    assert_eq!(
        files.len(),
        2,
        "temporary files are not policy files: {files:?}"
    );
    assert_eq!(count(&reloader, ReloadResult::Refused, Trigger::Watch), 0);
    assert_ok(&server, "lookup").await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;

    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let dir = server.policies.clone();
    let before = reloader.current().hash.clone();
    let clay = std::fs::read_to_string(dir.join("clay.yaml")).expect("read clay.yaml");
    let ops_v1 = std::fs::read_to_string(dir.join("ops.yaml")).expect("read ops.yaml");

    // Lay the directory out as the kubelet does, with the same contents:
    // `..2026_v1/`, `..data -> ..2026_v1`, `clay.yaml -> ..data/clay.yaml`.
    let v1 = dir.join("..2026_v1");
    std::fs::create_dir(&v1).expect("mkdir v1");
    std::fs::write(v1.join("clay.yaml"), &clay).expect("write");
    std::fs::write(v1.join("ops.yaml"), &ops_v1).expect("write");
    symlink("..2026_v1", dir.join("..data")).expect("..data");
    for name in ["clay.yaml", "ops.yaml"] {
        let link = dir.join(format!("{name}.link"));
        symlink(format!("..data/{name}"), &link).expect("link");
        std::fs::rename(&link, dir.join(name)).expect("replace the file by the link");
    }
    assert_eq!(candidate_hash(&dir), before, "same names, same contents");

    // The update: a new timestamped directory, `..data` swapped atomically.
    let v2 = dir.join("..2026_v2");
    std::fs::create_dir(&v2).expect("mkdir v2");
    std::fs::write(v2.join("clay.yaml"), &clay).expect("write");
    std::fs::write(v2.join("ops.yaml"), ops(300, "configmap v2")).expect("write");
    symlink("..2026_v2", dir.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    std::fs::remove_dir_all(&v1).expect("the kubelet removes the old version");
    let hash = candidate_hash(&dir);
    assert_ne!(hash, before);

    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(record.trigger, Trigger::Watch);
    assert_eq!(
        runtime.compiled().operations["lookup"]
            .breaker
            .config()
            .volume_threshold,
        300
    );
    let files = &reloader.current().files;
    assert_eq!(files.len(), 2, "dot-entries are skipped: {files:?}");
    assert!(files.iter().all(|f| !f.contains("..")), "{files:?}");
    assert_eq!(count(&reloader, ReloadResult::Refused, Trigger::Watch), 0);
    assert_ok(&server, "lookup").await;
}

#[tokio::test]
async fn a_burst_of_writes_is_one_reload() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let path = server.policies.join("ops.yaml");
    // Twenty writes, each a whole file (temporary + rename, so no reload can
    // read half of one), as a tool rewriting a file in steps would.
    let mut longest_gap = Duration::ZERO;
    let mut last = Instant::now();
    for n in 0..20 {
        write_by_rename(
            &server.policies,
            "ops.yaml",
            &ops(100 + n, &format!("burst {n}")),
        );
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
    }
    let hash = candidate_hash(&server.policies);
    assert!(path.exists());
    serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(
        runtime.compiled().operations["lookup"]
            .breaker
            .config()
            .volume_threshold,
        119
    );
    let applied = reloader
        .history()
        .iter()
        .filter(|r| r.result == ReloadResult::Applied && r.trigger != Trigger::Startup)
        .count();
    // Writes less than the debounce apart make one reload; only a write that
    // came later than that (a stalled test thread) may make another.
    assert!(
        applied == 1 || longest_gap >= claygate::watch::DEBOUNCE,
        "20 writes at most {longest_gap:?} apart made {applied} reloads: {:?}",
        reloader.history()
    );
}

#[tokio::test]
async fn watching_resumes_when_the_directory_is_removed_and_created_again() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let dir = server.policies.clone();
    let clay = std::fs::read_to_string(dir.join("clay.yaml")).expect("read clay.yaml");

    // Removed and created again (as `rm -rf && mkdir` or a volume remount);
    // then renamed away with a new directory put in its place.
    for (round, moved_away) in [(0_u32, false), (1, true)] {
        if moved_away {
            let old = dir.with_extension("old");
            std::fs::rename(&dir, &old).expect("move the directory away");
            std::fs::remove_dir_all(&old).expect("remove it");
        } else {
            std::fs::remove_dir_all(&dir).expect("remove the policy directory");
        }
        std::fs::create_dir(&dir).expect("create it again");
        std::fs::write(dir.join("clay.yaml"), &clay).expect("write clay.yaml");
        std::fs::write(dir.join("ops.yaml"), ops(700 + round, "recreated"))
            .expect("write ops.yaml");
        let hash = candidate_hash(&dir);
        serving(&reloader, &hash, PATIENCE).await;
        assert_ok(&server, "lookup").await;

        // Edits in the new directory are seen by the watcher again: each
        // applies well within the 2 s rescan period.
        for n in 0..3 {
            let volume = 800 + 10 * round + n;
            std::fs::write(dir.join("ops.yaml"), ops(volume, "edited")).expect("edit");
            let hash = candidate_hash(&dir);
            let record = serving(&reloader, &hash, WATCHED).await;
            assert_eq!(
                record.trigger,
                Trigger::Watch,
                "seen by the watcher: {record:?}"
            );
            assert_eq!(
                runtime.compiled().operations["lookup"]
                    .breaker
                    .config()
                    .volume_threshold,
                volume
            );
        }
    }
    assert_ok(&server, "lookup").await;
}

/// `lookup`, and `slow`, which has a DLQ whose first redrive is an hour away.
fn with_slow(include_slow: bool) -> String {
    let mut text = ops(1000, "v0");
    if include_slow {
        text.push_str(
            "  slow:
    upstream: clay
    request: { method: POST, path: /v1/slow, body: \"{{ params.event }}\" }
    timeout: 10s
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
    dlq: { max_attempts: 3, backoff: { initial: 1h, max: 2h, jitter: none } }
",
        );
    }
    text
}

#[tokio::test]
async fn calls_in_flight_finish_when_their_operation_is_removed() {
    let (fake, server) = rig(&with_slow(true)).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);

    fake.then([Behavior::status(503, "{}")]);
    let response = server.invoke("slow", json!({"event": {"n": 0}})).await;
    assert_eq!(response.status().as_u16(), 202, "dead-lettered");
    let body: Value = response.json().await.expect("a body");
    let id = body["meta"]["dlq_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("a dlq id: {body:#}"));

    fake.always(Behavior::Respond {
        status: 200,
        headers: Vec::new(),
        body: "{\"done\":true}".into(),
        // Longer than the watcher's reload can take on a loaded machine.
        delay: Duration::from_secs(6),
    });
    let url = server.url("/v1/operations/slow/invoke");
    let in_flight: Vec<_> = (1..=4)
        .map(|n| {
            let request = server.client.post(&url).json(&json!({"event": {"n": n}}));
            tokio::spawn(async move {
                let response = request.send().await.expect("an answer");
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                )
            })
        })
        .collect();
    until(PATIENCE, "4 calls at the upstream", || {
        (fake.hits() >= 5).then_some(())
    })
    .await;

    std::fs::write(server.policies.join("ops.yaml"), with_slow(false)).expect("remove slow");
    let hash = candidate_hash(&server.policies);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert!(
        in_flight.iter().all(|t| !t.is_finished()),
        "the calls were still in flight when the new generation started serving"
    );
    assert_eq!(record.changes["slow"].status, "removed");
    assert_eq!(record.changes["slow"].carried, None);
    assert_eq!(
        record.orphaned_dead_letters,
        BTreeMap::from([("slow".to_owned(), 1)]),
        "{record:?}"
    );

    let (status, body) = call(&server, "slow").await;
    assert_eq!(
        (status, &body["code"]),
        (404, &json!("unknown_operation")),
        "{body:#}"
    );
    for task in in_flight {
        let (status, body) = task.await.expect("the call task");
        assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body:#}");
        assert_eq!(body["data"], json!({"done": true}), "{body:#}");
    }
    let counts = runtime.store.dlq_counts().await.expect("dlq counts");
    assert!(
        counts
            .iter()
            .any(|c| c.operation == "slow" && c.state == DlqState::Pending && c.count == 1),
        "the dead letter is kept: {counts:?}"
    );
    let (status, entry) = server.get_json(&format!("/v1/dlq/{id}")).await;
    assert_eq!(
        (status, &entry["operation"]),
        (200, &json!("slow")),
        "{entry:#}"
    );

    // And it stays visible, not only in the one reload record: after
    // another reload too, in /v1/policies, /health and /metrics.
    std::fs::write(
        server.policies.join("ops.yaml"),
        with_slow(false).replace("\"v0\"", "\"v1\""),
    )
    .expect("edit");
    let hash = candidate_hash(&server.policies);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(
        record.orphaned_dead_letters,
        BTreeMap::from([("slow".to_owned(), 1)])
    );
    let (status, policies) = server.get_json("/v1/policies").await;
    assert_eq!(status, 200);
    assert_eq!(
        policies["orphaned_dead_letters"],
        json!({"slow": 1}),
        "{policies:#}"
    );
    let (status, health) = server.get_json("/health").await;
    assert_eq!(status, 200, "degraded still answers 200: {health:#}");
    assert_eq!(health["status"], "degraded", "{health:#}");
    let check = &health["checks"]["orphaned:slow"][0];
    assert_eq!(check["status"], "degraded", "{health:#}");
    assert_eq!(check["dlqEntries"], 1, "{check}");
    assert!(
        check["output"]
            .as_str()
            .is_some_and(|o| o.contains("no longer define")),
        "{check}"
    );
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l == "claygate_dlq_entries{operation=\"slow\",state=\"pending\"} 1"),
        "{metrics}"
    );
}

/// One file: two upstreams, a default priority, five operations.
fn plan_set(clay_normal: u32, default_priority: &str, tuned_volume: u32, last: &str) -> String {
    format!(
        "version: 1
upstreams:
  clay:
    base_url: \"{{{{UPSTREAM}}}}\"
    priorities:
      normal: {{ concurrency: {clay_normal}, queue: 10, queue_timeout: 1s }}
      critical: {{ concurrency: 2, queue: 5, queue_timeout: 1s }}
  other:
    base_url: \"{{{{UPSTREAM}}}}\"
    priorities:
      normal: {{ concurrency: 3, queue: 3, queue_timeout: 1s }}
      critical: {{ concurrency: 2, queue: 2, queue_timeout: 1s }}
timeouts: {{ connect: 1s, request: 2s }}
defaults: {{ priority: {default_priority} }}
operations:
  kept: {{ upstream: other, priority: normal, request: {{ method: GET, path: /kept }} }}
  inherits: {{ upstream: other, request: {{ method: GET, path: /inherits }} }}
  tuned:
    upstream: other
    priority: normal
    request: {{ method: GET, path: /tuned }}
    breaker: {{ volume_threshold: {tuned_volume} }}
  on_clay: {{ upstream: clay, priority: normal, request: {{ method: GET, path: /on_clay }} }}
  {last}: {{ upstream: other, priority: normal, request: {{ method: GET, path: /{last} }} }}
"
    )
}

#[tokio::test]
async fn a_dry_run_plan_reports_every_change_and_changes_nothing() {
    let fake = FakeUpstream::start().await;
    // Not watching: only the plan and the explicit reload below read the files.
    let server = start(
        &[("set.yaml", &plan_set(4, "normal", 10, "gone"))],
        &fake.url(),
        Options::default(),
    )
    .await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let before = reloader.current();
    let serving_before = runtime.compiled();
    let history = reloader.history().len();
    let clay_bulkhead = Arc::clone(
        serving_before.upstreams["clay"]
            .bulkhead
            .as_ref()
            .expect("clay has a bulkhead"),
    );
    let limits = |b: &claygate::pipeline::bulkhead::Bulkhead| {
        let s = b.snapshot();
        (
            s.classes[&Priority::Normal].concurrency,
            s.classes[&Priority::Critical].queue,
        )
    };
    assert_eq!(limits(&clay_bulkhead), (4, 5));

    let edited = plan_set(8, "critical", 20, "added").replace(
        "critical: { concurrency: 2, queue: 5,",
        "critical: { concurrency: 2, queue: 6,",
    );
    std::fs::write(
        server.policies.join("set.yaml"),
        edited.replace("{{UPSTREAM}}", &fake.url()),
    )
    .expect("edit set.yaml");
    let (generation, changes) = reloader.plan().await.expect("the edited set is valid");
    assert_eq!(generation.hash, candidate_hash(&server.policies));
    assert_ne!(generation.hash, before.hash);

    let status: BTreeMap<&str, &str> = changes
        .iter()
        .map(|(name, change)| (name.as_str(), change.status))
        .collect();
    assert_eq!(
        status,
        BTreeMap::from([
            ("added", "added"),
            ("gone", "removed"),
            ("inherits", "changed"),
            ("kept", "unchanged"),
            ("on_clay", "changed"),
            ("tuned", "changed"),
        ]),
        "{changes:#?}"
    );
    let carried = |name: &str| changes[name].carried.expect("carried state");
    let kept = carried("kept");
    assert!(
        kept.breaker && kept.retry_budget && kept.bulkhead && kept.rate_limiter && kept.http_client,
        "{kept:?}"
    );
    assert!(!carried("tuned").breaker);
    assert!(carried("tuned").bulkhead);
    assert!(carried("inherits").breaker, "its breaker did not change");
    assert!(
        carried("on_clay").bulkhead,
        "the bulkhead carries over with new limits"
    );
    assert!(!carried("added").breaker);

    // Nothing applied: same generation, same pipelines, same limits, no record.
    assert_eq!(reloader.current().hash, before.hash);
    assert!(Arc::ptr_eq(&runtime.compiled(), &serving_before));
    assert_eq!(reloader.history().len(), history, "a plan is not a reload");
    assert_eq!(
        limits(&clay_bulkhead),
        (4, 5),
        "the serving limits are untouched"
    );
    assert_eq!(
        runtime.compiled().operations["inherits"].priority,
        Priority::Normal
    );
    assert_ok(&server, "gone").await;

    // A broken set plans to a refusal, and changes nothing either.
    let path = server.policies.join("set.yaml");
    let good = std::fs::read_to_string(&path).expect("read set.yaml");
    std::fs::write(
        &path,
        good.replace("  tuned:\n", "  tuned:\n    retyr: 1\n"),
    )
    .expect("break");
    let refusal = reloader.plan().await.expect_err("a refusal");
    assert!(!refusal.errors.is_empty());
    assert_eq!(refusal.candidate, candidate_hash(&server.policies));
    assert_eq!(reloader.history().len(), history);
    std::fs::write(&path, &good).expect("restore");

    // Applying it does what the plan said.
    let record = reloader.reload(Trigger::Api, false).await;
    assert_eq!(record.result, ReloadResult::Applied, "{record:?}");
    assert_eq!(record.generation, generation.hash);
    assert_eq!(record.changes, changes);
    assert_eq!(
        limits(&clay_bulkhead),
        (8, 6),
        "the limits change in place on apply"
    );
    assert_eq!(
        runtime.compiled().operations["inherits"].priority,
        Priority::Critical
    );
}

/// `stable`, forced open for the whole load test and never rewritten.
const STABLE: &str = "version: 1
operations:
  stable:
    upstream: clay
    request: { method: GET, path: /v1/stable }
    retry: { max_attempts: 1 }
    breaker: { volume_threshold: 1000 }
";

/// `busy_a` and `busy_b`, rewritten by the load test: version `n`, valid or
/// not (a misspelt key), with a description and a back-off that change.
fn busy(n: u32, valid: bool) -> String {
    let retry_key = if valid { "retry" } else { "retyr" };
    let initial = 100 + 10 * n;
    format!(
        "version: 1
operations:
  busy_a:
    upstream: clay
    description: \"revision {n}\"
    request: {{ method: GET, path: /v1/a }}
    retry: {{ max_attempts: 1 }}
    breaker: {{ volume_threshold: 1000 }}
  busy_b:
    upstream: clay
    request: {{ method: GET, path: /v1/b }}
    {retry_key}: {{ max_attempts: 2, backoff: {{ initial: {initial}ms, max: 1s }} }}
    breaker: {{ volume_threshold: 1000 }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_call_is_answered_while_policies_are_rewritten() {
    const REWRITES: u32 = 24;
    const CALLERS: usize = 3;
    // CPU-heavy: the timing-sensitive end-to-end tests wait for it.
    let _exclusive = crate::support::e2e::HEAVY.write().await;
    let fake = FakeUpstream::start().await;
    let server = start(
        &[
            ("clay.yaml", UPSTREAM),
            ("stable.yaml", STABLE),
            ("ops.yaml", &busy(0, true)),
        ],
        &fake.url(),
        watching(),
    )
    .await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let dir = server.policies.clone();
    let first = runtime.compiled();
    let stable = Arc::clone(&first.operations["stable"].breaker);
    let busy_a = Arc::clone(&first.operations["busy_a"].breaker);
    stable.force_open();
    drop(first);

    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let client = server.client.clone();
            let base = server.base.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut answered, mut failures) = (0_u64, Vec::new());
                let mut n = caller;
                while !stop.load(Ordering::Acquire) {
                    let operation = if n % 2 == 0 { "busy_a" } else { "busy_b" };
                    n += 1;
                    let sent = client
                        .post(format!("{base}/v1/operations/{operation}/invoke"))
                        .json(&json!({}))
                        .send()
                        .await;
                    match sent {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let body = response.json::<Value>().await.unwrap_or(Value::Null);
                            if status == 200 && body["status"] == "ok" {
                                answered += 1;
                            } else {
                                failures.push(format!("{operation}: {status} {body}"));
                            }
                        }
                        Err(e) => failures.push(format!("{operation}: no answer: {e}")),
                    }
                }
                (answered, failures)
            })
        })
        .collect();
    until(PATIENCE, "calls flowing", || {
        (fake.hits() >= 10).then_some(())
    })
    .await;

    let (mut valid, mut invalid) = (Vec::new(), Vec::new());
    for n in 1..=REWRITES {
        let is_valid = n % 2 == 1;
        write_by_rename(&dir, "ops.yaml", &busy(n, is_valid));
        let hash = candidate_hash(&dir);
        if is_valid {
            serving(&reloader, &hash, PATIENCE).await;
            valid.push(hash);
        } else {
            refused(&reloader, &hash).await;
            invalid.push(hash);
        }
    }
    let hits = fake.hits();
    stop.store(true, Ordering::Release);
    let (mut answered, mut failures) = (0, Vec::new());
    for caller in callers {
        let (a, mut f) = caller.await.expect("a caller task");
        answered += a;
        failures.append(&mut f);
    }

    assert!(
        failures.is_empty(),
        "{} failed calls: {failures:#?}",
        failures.len()
    );
    assert!(answered >= 50, "only {answered} calls were made");
    assert_eq!(
        answered,
        fake.hits() as u64,
        "every call reached the upstream once"
    );
    assert!(hits > 10);
    let history = reloader.history();
    let applied: BTreeSet<&str> = history
        .iter()
        .filter(|r| r.result == ReloadResult::Applied && r.trigger != Trigger::Startup)
        .map(|r| r.generation.as_str())
        .collect();
    let refusals: Vec<&str> = history
        .iter()
        .filter(|r| r.result == ReloadResult::Refused)
        .map(|r| r.candidate.as_str())
        .collect();
    assert_eq!(
        applied,
        valid.iter().map(String::as_str).collect(),
        "every valid rewrite applied"
    );
    assert_eq!(
        refusals.iter().copied().collect::<BTreeSet<_>>(),
        invalid.iter().map(String::as_str).collect(),
        "every invalid rewrite refused"
    );
    assert_eq!(refusals.len(), invalid.len(), "each refused once");
    assert_eq!(
        metric(&runtime, "claygate_reloads_total{result=\"refused\"}"),
        f64::from(REWRITES / 2)
    );
    assert_eq!(
        metric(&runtime, "claygate_reloads_total{result=\"applied\"}"),
        f64::from(REWRITES / 2)
    );

    let last = runtime.compiled();
    assert_eq!(
        last.set.operations["busy_a"].description.as_deref(),
        Some("revision 23")
    );
    assert!(Arc::ptr_eq(&last.operations["stable"].breaker, &stable));
    assert_eq!(
        stable.state(),
        BreakerState::ForcedOpen,
        "still forced open"
    );
    assert!(
        Arc::ptr_eq(&last.operations["busy_a"].breaker, &busy_a),
        "a description change keeps the breaker"
    );
    let (status, body) = call(&server, "stable").await;
    assert_eq!(status, 503, "{body:#}");
}

/// An operation of its own, in a file of its own.
const EXTRA: &str = "version: 1
operations:
  extra:
    upstream: clay
    request: { method: GET, path: /v1/extra }
    retry: { max_attempts: 1 }
";

#[tokio::test]
async fn files_added_and_removed_while_watching_are_picked_up_by_the_watcher() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let reloader = reloader(&server);
    let dir = server.policies.clone();

    write_by_rename(&dir, "extra.yaml", EXTRA);
    let hash = candidate_hash(&dir);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(record.trigger, Trigger::Watch, "{record:?}");
    assert_eq!(record.changes["extra"].status, "added");
    assert_eq!(reloader.current().files.len(), 3);
    assert_ok(&server, "extra").await;

    std::fs::remove_file(dir.join("extra.yaml")).expect("remove extra.yaml");
    let hash = candidate_hash(&dir);
    let record = serving(&reloader, &hash, PATIENCE).await;
    assert_eq!(record.trigger, Trigger::Watch, "{record:?}");
    assert_eq!(record.changes["extra"].status, "removed");
    let (status, body) = call(&server, "extra").await;
    assert_eq!(status, 404, "{body:#}");
    assert_ok(&server, "lookup").await;
}

#[tokio::test]
async fn a_file_that_is_not_utf8_names_its_own_generation() {
    let fake = FakeUpstream::start().await;
    // Not watching: each reload below is the rescan's (never forced).
    let server = start(
        &[
            ("clay.yaml", UPSTREAM),
            ("ops.yaml", &ops(1000, "v0")),
            ("extra.yaml", EXTRA),
        ],
        &fake.url(),
        Options::default(),
    )
    .await;
    let reloader = reloader(&server);
    let dir = server.policies.clone();
    let serving_hash = reloader.current().hash.clone();
    let not_utf8 = |record: &ReloadRecord, file: &str| {
        record.errors.iter().any(|e| match e {
            Problem::Diagnostic(d) => d.file.ends_with(file) && d.message.contains("not UTF-8"),
            _ => false,
        })
    };

    // A new file that is not UTF-8 is a change, refused, not "unchanged".
    std::fs::write(dir.join("bad.yaml"), b"version: 1\n# caf\xe9\n").expect("write");
    let record = reloader.reload(Trigger::Rescan, false).await;
    assert_eq!(record.result, ReloadResult::Refused, "{record:?}");
    assert!(not_utf8(&record, "bad.yaml"), "{record:?}");
    assert_ne!(record.candidate, serving_hash);
    assert_eq!(record.candidate, candidate_hash(&dir));
    std::fs::remove_file(dir.join("bad.yaml")).expect("remove");
    let record = reloader.reload(Trigger::Rescan, false).await;
    assert_eq!(record.result, ReloadResult::Unchanged, "{record:?}");

    // A serving file corrupted: refused. Deleted next: a set that is valid
    // without it, which the stale refusal must not hide.
    std::fs::write(dir.join("extra.yaml"), b"\xff\xfe\x00v\x00e\x00r").expect("corrupt");
    let refused = reloader.reload(Trigger::Rescan, false).await;
    assert_eq!(refused.result, ReloadResult::Refused, "{refused:?}");
    assert!(not_utf8(&refused, "extra.yaml"), "{refused:?}");
    assert_eq!(
        reloader.current().hash,
        serving_hash,
        "the old generation serves"
    );
    assert_ok(&server, "extra").await;
    std::fs::remove_file(dir.join("extra.yaml")).expect("remove");
    let record = reloader.reload(Trigger::Rescan, false).await;
    assert_eq!(record.result, ReloadResult::Applied, "{record:?}");
    assert_ne!(record.generation, refused.candidate);
    assert_eq!(record.changes["extra"].status, "removed");
    assert_eq!(reloader.current().hash, candidate_hash(&dir));
}

#[tokio::test]
async fn warnings_are_applied_and_reported() {
    let (_fake, server) = rig(&ops(1000, "v0")).await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let mut events = runtime.events.subscribe();

    // A file with nothing but a comment: a warning, not an error.
    write_by_rename(&server.policies, "later.yaml", "# operations to come\n");
    let hash = candidate_hash(&server.policies);
    let record = serving(&reloader, &hash, PATIENCE).await;
    let empty = |p: &Problem| {
        matches!(p, Problem::Diagnostic(d)
            if d.file.ends_with("later.yaml") && d.code.as_str() == "empty-file")
    };
    assert!(record.errors.is_empty(), "{record:?}");
    assert!(record.warnings.iter().any(empty), "{record:?}");
    assert!(
        reloader
            .current()
            .warnings
            .iter()
            .any(|d| d.file.ends_with("later.yaml")),
        "the serving generation keeps its warnings"
    );
    let event = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(Event::Reload {
                    applied: true,
                    generation,
                    warnings,
                    ..
                }) if generation == hash => return warnings,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the event stream closed"),
            }
        }
    })
    .await
    .expect("the reload event");
    assert!(
        event
            .iter()
            .any(|w| w.contains("later.yaml") && w.contains("file is empty")),
        "warnings in the event: {event:?}"
    );
    let (status, body) = server.get_json("/v1/policies").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["generation"]["warnings"][0]["code"], "empty-file",
        "{body:#}"
    );
    assert_eq!(body["history"][0]["warnings"][0]["code"], "empty-file");
    assert_ok(&server, "lookup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_shrunk_by_a_reload_honours_the_permits_held() {
    let upstream = |concurrency: u32| {
        format!(
            "version: 1
upstreams:
  clay:
    base_url: \"{{{{UPSTREAM}}}}\"
    priorities:
      normal: {{ concurrency: {concurrency}, queue: 10, queue_timeout: 20s }}
timeouts: {{ connect: 1s, request: 10s }}
"
        )
    };
    let fake = FakeUpstream::start().await;
    let server = start(
        &[("clay.yaml", &upstream(2)), ("ops.yaml", &ops(1000, "v0"))],
        &fake.url(),
        Options::default(),
    )
    .await;
    let runtime = runtime(&server);
    let reloader = reloader(&server);
    let slow = |secs: u64| Behavior::Respond {
        status: 200,
        headers: Vec::new(),
        body: "{}".into(),
        delay: Duration::from_secs(secs),
    };
    // Two calls hold both permits: one for 3s, one for 8s (seconds, so a
    // stall of the test cannot end the first before the checks below).
    fake.then([slow(3), slow(8)]);
    let url = server.url("/v1/operations/lookup/invoke");
    let spawn = || {
        let request = server.client.post(&url).json(&json!({}));
        tokio::spawn(async move {
            let response = request.send().await.expect("an answer");
            (response.status().as_u16(), Instant::now())
        })
    };
    let first = spawn();
    until(PATIENCE, "the first call at the upstream", || {
        (fake.hits() == 1).then_some(())
    })
    .await;
    let second = spawn();
    until(PATIENCE, "both calls at the upstream", || {
        (fake.hits() == 2).then_some(())
    })
    .await;
    let normal = || {
        runtime.compiled().upstreams["clay"]
            .bulkhead
            .as_ref()
            .expect("a bulkhead")
            .snapshot()
            .classes[&Priority::Normal]
            .clone()
    };
    assert_eq!((normal().concurrency, normal().in_use), (2, 2));

    // The limit drops to 1 while both permits are held.
    std::fs::write(
        server.policies.join("clay.yaml"),
        upstream(1).replace("{{UPSTREAM}}", &fake.url()),
    )
    .expect("edit clay.yaml");
    let record = reloader.reload(Trigger::Api, false).await;
    assert_eq!(record.result, ReloadResult::Applied, "{record:?}");
    assert_eq!(
        record.changes["lookup"].carried.map(|c| c.bulkhead),
        Some(true)
    );
    let now = normal();
    assert_eq!(
        (now.concurrency, now.in_use),
        (1, 2),
        "held permits stay held"
    );

    // A new call waits until in use drops below the new limit: not when
    // the first call ends (one still held), only when both have.
    let third = spawn();
    until(PATIENCE, "the third call queues", || {
        (normal().queued == 1).then_some(())
    })
    .await;
    let (status, first_done) = first.await.expect("the first call");
    assert_eq!(status, 200);
    let after_first = normal();
    assert_eq!(
        (after_first.in_use, after_first.queued, fake.hits()),
        (1, 1, 2),
        "one permit held under a limit of one: the third still waits"
    );
    let (status, second_done) = second.await.expect("the second call");
    assert_eq!(status, 200);
    let (status, _) = third.await.expect("the third call");
    assert_eq!(status, 200);
    assert!(
        first_done < second_done,
        "the 3s call ends before the 8s one"
    );
    assert_eq!(fake.hits(), 3);
    let done = normal();
    assert_eq!((done.concurrency, done.in_use, done.queued), (1, 0, 0));
}
