//! The conservation invariant, as a property: for any mix of calls (with
//! repeated idempotency keys), any sequence of upstream faults, claims left
//! by a crashed process, and duplicates arriving late (during and after the
//! redrive), every invoke ends as exactly one of delivered, dead-lettered
//! (then delivered by redrive, or parked) or refused with a clear error, and
//! claygate never sends a key again once it knew the key was delivered.
//!
//! The fake upstream here models what makes duplicate delivery possible:
//! faults that come *after* the upstream processed the request (the answer
//! is lost: a 503, or a hang until the attempt timeout). claygate cannot
//! tell those from a failure and must resend, always with the same
//! idempotency key, so the upstream can deduplicate (DESIGN.md,
//! "Idempotency"); what it must never do is send a key again after it saw
//! the key delivered, or send one key twice at the same time. The breaker
//! opens for real (a low volume threshold) and calls run into their
//! deadline. The store is real SQLite, wrapped to be safe under the paused
//! clock (see `support::dlq`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use claygate::clock::Clock;
use claygate::compile::{CompileOptions, compile_with};
use claygate::pipeline::http::{Rendered, Transport};
use claygate::pipeline::idempotency::{derive_key, fingerprint};
use claygate::pipeline::{Failure, Reply};
use claygate::policy::{LoadOptions, UnsetEnv, load_str};
use claygate::runtime::{Answer, InvokeRequest, Invoked, Runtime};
use claygate::store::{DeadLetter, DlqFilter, DlqState, PageRequest, Store};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use serde_json::json;

use crate::support::dlq::open_store;
use crate::support::script::UPSTREAM;

const OPS: &str = "operations:
  push:
    upstream: clay
    request: { method: POST, path: \"/rows/{{ params.id }}\", body: { id: \"{{ params.id }}\" } }
    timeout: 1s
    deadline: 1500ms
    retry: { max_attempts: 2, backoff: { initial: 5ms, max: 5ms, jitter: none } }
    idempotency: { key: [id], ttl: 24h, lease: 3s }
    breaker: { volume_threshold: 4, error_threshold_percentage: 50, window: 10s, buckets: 10, reset_timeout: 200ms }
    dlq: { max_attempts: 3, backoff: { initial: 10ms, max: 10ms, jitter: none }, redrive_rate: 1000 }
";

/// What the upstream does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Processed, answered 201.
    Ok,
    /// Connection refused: not processed.
    Refuse,
    /// 503 before processing.
    Unavailable,
    /// 400: refused for good, not processed.
    Rejected,
    /// Processed, then the answer is lost as a 503.
    ProcessedThen503,
    /// Processed, then the answer never comes (the attempt timeout cuts it).
    ProcessedThenHang,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::Ok),
        2 => Just(Fault::Refuse),
        2 => Just(Fault::Unavailable),
        1 => Just(Fault::Rejected),
        1 => Just(Fault::ProcessedThen503),
        1 => Just(Fault::ProcessedThenHang),
    ]
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    key: Option<String>,
    /// A 2xx answer that reached claygate.
    answered_ok: bool,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    log: Vec<Request>,
    /// Requests of a key being answered now.
    in_flight: HashMap<Option<String>, usize>,
    /// Keys sent while another request of theirs was in flight.
    overlaps: Vec<String>,
}

/// The fake upstream: takes the next scripted fault (then `Ok`), records
/// every request, and notices overlapping requests of one key.
#[derive(Clone, Default)]
struct Upstream(Arc<Mutex<State>>);

impl Upstream {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hits(&self) -> usize {
        self.lock().log.len()
    }
}

/// Ends a request's time in flight however its future ends (answered, or
/// dropped by a timeout).
struct InFlight(Upstream, Option<String>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = self.0.lock().in_flight.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Transport for Upstream {
    fn send<'a>(
        &'a self,
        request: &'a Rendered,
        extra: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            let key = extra
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let id = request
                .path_and_query
                .trim_start_matches("/rows/")
                .to_owned();
            let (index, fault) = {
                let mut state = self.lock();
                let fault = state.faults.pop_front().unwrap_or(Fault::Ok);
                let busy = state.in_flight.entry(key.clone()).or_insert(0);
                *busy += 1;
                if *busy > 1 {
                    state.overlaps.push(id.clone());
                }
                state.log.push(Request {
                    id,
                    key: key.clone(),
                    answered_ok: false,
                });
                (state.log.len() - 1, fault)
            };
            let _in_flight = InFlight(self.clone(), key);
            match fault {
                Fault::Ok => {
                    // Nothing can cut the answer off after this point.
                    self.lock().log[index].answered_ok = true;
                    Ok(reply(201, r#"{"stored":true}"#))
                }
                Fault::Refuse => Err(Failure::Connect("connection refused".into())),
                Fault::Unavailable | Fault::ProcessedThen503 => Ok(reply(503, r#"{"busy":1}"#)),
                Fault::Rejected => Ok(reply(400, r#"{"error":"bad row"}"#)),
                Fault::ProcessedThenHang => std::future::pending().await,
            }
        })
    }
}

fn reply(status: u16, body: &'static str) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        body: Bytes::from_static(body.as_bytes()),
    }
}

fn compiled(upstream: &Upstream) -> claygate::compile::Compiled {
    let loaded = load_str(
        "conservation.yaml",
        &format!("{UPSTREAM}{OPS}"),
        LoadOptions {
            unset_env: UnsetEnv::Ignore,
        },
    );
    let set = loaded
        .set
        .unwrap_or_else(|| panic!("the policy is valid: {:#?}", loaded.diagnostics));
    let upstream = upstream.clone();
    let options = CompileOptions {
        env: Box::new(|_| None),
        transport: Some(Box::new(move |_| {
            Arc::new(upstream.clone()) as Arc<dyn Transport>
        })),
    };
    compile_with(&set, None, &options).expect("compiles")
}

fn params(id: &str) -> serde_json::Value {
    json!({ "id": id })
}

fn key_of(id: &str) -> String {
    derive_key("push", &["id".to_owned()], &params(id))
        .expect("derivable")
        .expect("declared")
}

/// How one invoke ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Delivered,
    Queued(i64),
    Refused(&'static str),
}

fn end_of(invoked: &Invoked) -> Result<End, TestCaseError> {
    match &invoked.answer {
        Answer::Ok(_) => Ok(End::Delivered),
        Answer::Queued { dlq_id, .. } => Ok(End::Queued(*dlq_id)),
        Answer::Failed(e) => Ok(End::Refused(e.code())),
        Answer::Fallback { .. } => Err(TestCaseError::fail("no fallback is configured")),
    }
}

async fn invoke(runtime: &Arc<Runtime>, id: &str) -> Invoked {
    runtime
        .invoke(
            "push",
            InvokeRequest {
                params: params(id),
                ..InvokeRequest::default()
            },
        )
        .await
}

async fn entries(store: &Arc<dyn Store>) -> BTreeMap<i64, DeadLetter> {
    store
        .dlq_list(
            &DlqFilter::default(),
            PageRequest {
                after: None,
                limit: 10_000,
            },
        )
        .await
        .expect("list")
        .entries
        .into_iter()
        .map(|e| (e.id, e))
        .collect()
}

/// A duplicate arriving after the first call ended: it must send nothing,
/// and answer what the key's first call came to, as it stands now.
async fn late_duplicate(
    runtime: &Arc<Runtime>,
    upstream: &Upstream,
    store: &Arc<dyn Store>,
    id: &str,
    first: &End,
) -> Result<(), TestCaseError> {
    let before = upstream.hits();
    let late = invoke(runtime, id).await;
    prop_assert_eq!(
        upstream.hits(),
        before,
        "a late duplicate of {} reached the upstream",
        id
    );
    let late = end_of(&late)?;
    match first {
        End::Delivered => prop_assert_eq!(late, End::Delivered, "{}", id),
        End::Refused(code) => prop_assert_eq!(&late, &End::Refused(code), "{}", id),
        End::Queued(dlq_id) => {
            let entry = store
                .dlq_get(*dlq_id)
                .await
                .expect("readable")
                .ok_or_else(|| TestCaseError::fail(format!("{id}: entry {dlq_id} is lost")))?;
            match entry.state {
                DlqState::Pending => prop_assert_eq!(late, End::Queued(*dlq_id), "{}", id),
                DlqState::Delivered => prop_assert_eq!(late, End::Delivered, "{}", id),
                // Parked out of attempts, or by a permanent answer (then
                // that answer replays).
                DlqState::Parked => prop_assert!(
                    late == End::Refused("dead_lettered_parked")
                        || late == End::Refused("upstream_status"),
                    "{}: {:?}",
                    id,
                    late
                ),
            }
        }
    }
    Ok(())
}

async fn run_case(
    keys: Vec<u8>,
    faults: Vec<Fault>,
    crashed: Vec<(u8, bool)>,
    late: Vec<(u8, u8)>,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("dir");
    let upstream = Upstream::default();
    upstream.lock().faults.extend(faults);
    let store = open_store(dir.path()).await;
    let runtime = Runtime::new(compiled(&upstream), Arc::clone(&store), Clock::new());
    let ids: Vec<String> = keys.iter().map(|k| format!("row-{k}")).collect();

    // A process that crashed mid-call left claims (lease 3s), its request
    // perhaps processed upstream, perhaps not.
    let now = runtime.clock.now();
    for (k, processed) in &crashed {
        let id = format!("row-{k}");
        if !ids.contains(&id) {
            continue;
        }
        let claim = store
            .idempotency_claim(
                "push",
                &key_of(&id),
                &fingerprint(&params(&id)),
                now,
                now + 3_000,
                now + 86_400_000,
            )
            .await
            .expect("claim");
        if matches!(claim, claygate::store::Claim::Claimed(_)) && *processed {
            // Processed, but the answer died with the process.
            upstream.lock().log.push(Request {
                id: id.clone(),
                key: Some(key_of(&id)),
                answered_ok: false,
            });
        }
    }

    // Every call at once: duplicates of a key race each other.
    let calls: Vec<_> = ids
        .iter()
        .map(|id| {
            let runtime = Arc::clone(&runtime);
            let id = id.clone();
            tokio::spawn(async move {
                let out = invoke(&runtime, &id).await;
                (id, out)
            })
        })
        .collect();
    let mut ends: Vec<(String, End)> = Vec::new();
    let mut first: BTreeMap<String, End> = BTreeMap::new();
    for c in calls {
        let (id, out) = c.await.expect("call task");
        let end = end_of(&out)?;
        first.entry(id.clone()).or_insert_with(|| end.clone());
        ends.push((id, end));
    }
    // Duplicates of one key end alike: they shared or replayed one call.
    for (id, end) in &ends {
        prop_assert_eq!(Some(end), first.get(id), "{} ended two ways", id);
    }

    // The upstream recovers; redrive until nothing is pending, with late
    // duplicates arriving between passes.
    upstream.lock().faults.clear();
    let known: Vec<&String> = first.keys().collect();
    for round in 0..300u32 {
        tokio::time::advance(Duration::from_millis(20)).await;
        claygate::dlq::redrive_due(&runtime).await;
        for (at, k) in &late {
            if u32::from(*at) == round && !known.is_empty() {
                let id = known[usize::from(*k) % known.len()];
                late_duplicate(&runtime, &upstream, &store, id, &first[id]).await?;
            }
        }
        let pending: u64 = store
            .dlq_counts()
            .await
            .expect("counts")
            .iter()
            .filter(|c| c.state == DlqState::Pending)
            .map(|c| c.count)
            .sum();
        if pending == 0 && round > 20 {
            break;
        }
    }

    let by_id = entries(&store).await;
    let mut parked = BTreeSet::new();
    for (id, end) in &first {
        match end {
            End::Delivered => {}
            End::Queued(dlq_id) => {
                let entry = by_id.get(dlq_id).ok_or_else(|| {
                    TestCaseError::fail(format!("{id}: dead letter {dlq_id} is lost"))
                })?;
                prop_assert!(
                    matches!(entry.state, DlqState::Delivered | DlqState::Parked),
                    "{}: entry {:?}",
                    id,
                    entry
                );
                let key = key_of(id);
                prop_assert_eq!(entry.idempotency_key.as_deref(), Some(key.as_str()));
                if entry.state == DlqState::Parked {
                    parked.insert(id.clone());
                }
            }
            // Only a permanent upstream answer refuses: transient failures
            // of a DLQ operation are queued, not refused.
            End::Refused(code) => prop_assert_eq!(*code, "upstream_status", "{}", id),
        }
    }

    {
        let state = upstream.lock();
        // Every request carried its call's key: the same one on every resend.
        for r in &state.log {
            let key = key_of(&r.id);
            prop_assert_eq!(r.key.as_deref(), Some(key.as_str()), "{:?}", r);
        }
        // One key is never sent twice at once ...
        prop_assert!(
            state.overlaps.is_empty(),
            "overlapping sends: {:?}",
            state.overlaps
        );
        // ... and never again once claygate saw it delivered.
        let mut delivered: BTreeSet<&str> = BTreeSet::new();
        for r in &state.log {
            prop_assert!(
                !delivered.contains(r.id.as_str()),
                "{} was sent again after its delivery",
                r.id
            );
            if r.answered_ok {
                delivered.insert(r.id.as_str());
            }
        }
        // Every accepted call was delivered (processed upstream), unless parked.
        for (id, end) in &first {
            if matches!(end, End::Refused(_)) || parked.contains(id) {
                continue;
            }
            prop_assert!(
                delivered.contains(id.as_str()),
                "{} was accepted ({:?}) but never delivered",
                id,
                end
            );
        }
    }

    // Duplicates after everything settled: none is sent, each answers the
    // outcome of its key.
    for (id, end) in &first {
        late_duplicate(&runtime, &upstream, &store, id, end).await?;
    }
    store.close().await.expect("close");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_invoke_is_delivered_queued_or_refused_and_never_resent_once_delivered(
        keys in prop::collection::vec(0u8..12, 1..40),
        faults in prop::collection::vec(fault(), 0..60),
        crashed in prop::collection::vec((0u8..12, any::<bool>()), 0..4),
        late in prop::collection::vec((0u8..60, any::<u8>()), 0..20),
    ) {
        // CPU-heavy: the timing-sensitive end-to-end tests wait for each case.
        let _exclusive = crate::support::e2e::HEAVY.blocking_write();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(run_case(keys, faults, crashed, late))?;
    }
}
