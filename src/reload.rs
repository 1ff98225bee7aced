//! Reload: read the policy files, validate, compile aside, swap.
//!
//! Build-then-swap: the whole new generation is loaded, validated and
//! compiled next to the serving one (sharing its live breakers, bulkheads
//! and limiters where their policy is unchanged); only a generation without
//! errors is activated and published with one `ArcSwap::store`. Any error
//! keeps the old generation serving and is reported (log, history, metric,
//! event). Calls in flight hold an `Arc` of the generation they started on
//! and finish on it.
//!
//! A generation is named by sha256 over its files (sorted paths, lengths and
//! contents): a change that leaves every byte the same is not a reload.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::clock::UnixMillis;
use crate::compile::{CarriedOver, CompileError, CompileOptions, Compiled, compile_plan_owned};
use crate::events::Event;
use crate::pipeline::compose::Pipeline;
use crate::pipeline::idempotency::hex;
use crate::policy::diagnostic::{Diagnostic, Severity};
use crate::policy::{self, LoadOptions, Loaded, SourceFile, Sources, UnsetEnv};
use crate::runtime::Runtime;
use crate::store::{DlqCount, DlqState};

/// Reload attempts kept in the history.
pub const HISTORY: usize = 50;

/// The generation serving now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Generation {
    /// sha256 (hex) over the sorted files.
    pub hash: String,
    /// The files, as read.
    pub files: Vec<String>,
    /// When it started serving.
    pub loaded_at: UnixMillis,
    /// How long loading, validating and compiling it took, in milliseconds.
    pub duration_ms: u64,
    /// Warnings it was applied with.
    pub warnings: Vec<Diagnostic>,
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The first load at start.
    Startup,
    /// The file watcher saw a change.
    Watch,
    /// The periodic rescan (or a watch set up again) reread the files.
    Rescan,
    /// `SIGHUP`.
    Signal,
    /// `POST /v1/policies/reload`.
    Api,
}

/// How a reload attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    /// A new generation serves.
    Applied,
    /// The files are byte-for-byte those serving: nothing to do.
    Unchanged,
    /// The new set has errors: the previous generation keeps serving.
    Refused,
}

impl ReloadResult {
    /// The reported name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Refused => "refused",
        }
    }
}

/// One reload attempt, as the history shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    /// When it started.
    pub at: UnixMillis,
    /// What started it.
    pub trigger: Trigger,
    /// How it ended.
    pub result: ReloadResult,
    /// The generation serving afterwards.
    pub generation: String,
    /// The generation the files would make (differs from `generation` when refused).
    pub candidate: String,
    /// Milliseconds from reading the files to serving (or refusing).
    pub duration_ms: u64,
    /// Why it was refused.
    pub errors: Vec<Problem>,
    /// Warnings (applied anyway).
    pub warnings: Vec<Problem>,
    /// Per operation: what changed (empty when refused or unchanged).
    pub changes: BTreeMap<String, Change>,
    /// Dead letters (pending or parked) kept for operations that no longer
    /// exist (or lost their `dlq`): nothing redrives them.
    pub orphaned_dead_letters: BTreeMap<String, u64>,
}

/// A reload problem: a diagnostic or a compile error.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Problem {
    /// A validation diagnostic with its place.
    Diagnostic(Diagnostic),
    /// A compile error (e.g. an unset environment variable).
    Compile {
        /// What is wrong and where.
        message: String,
    },
    /// The files cannot be read.
    Io {
        /// What is wrong and where.
        message: String,
    },
}

/// What a reload does to one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `added`, `removed`, `changed` or `unchanged`.
    pub status: &'static str,
    /// Which live state carries over (absent for removed operations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carried: Option<CarriedOver>,
}

/// A generation built aside, ready to serve.
pub struct Prepared {
    /// The pipelines.
    pub compiled: Compiled,
    /// Its name and files.
    pub generation: Generation,
}

/// Why a set cannot serve.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The candidate's hash (empty when the files could not be read).
    pub candidate: String,
    /// The problems.
    pub errors: Vec<Problem>,
    /// Warnings found along the way.
    pub warnings: Vec<Problem>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for e in &self.errors {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            f.write_str(&problem_text(e))?;
        }
        Ok(())
    }
}

/// One problem as one line: `file:line:col: message` where it has a place.
pub fn problem_text(problem: &Problem) -> String {
    match problem {
        Problem::Diagnostic(d) => match &d.span {
            Some(s) => format!("{}:{}:{}: {}", d.file, s.line, s.column, d.message),
            None => format!("{}: {}", d.file, d.message),
        },
        Problem::Compile { message } | Problem::Io { message } => message.clone(),
    }
}

/// sha256 over every file found, sorted by path: path, length, bytes. Files
/// that are not UTF-8 count with their raw bytes, so a broken file names
/// another generation than the same set without it.
pub fn generation_hash(sources: &Sources) -> String {
    let mut files: Vec<(&str, &[u8])> = sources
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.text.as_bytes()))
        .chain(
            sources
                .undecoded
                .iter()
                .map(|f| (f.name.as_str(), f.bytes.as_slice())),
        )
        .collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, bytes) in files {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex(&hasher.finalize())
}

/// Reads, validates and compiles `paths` next to `previous`, without
/// activating anything. Unset `${env:…}` without default is an error here.
pub fn prepare(
    paths: &[PathBuf],
    previous: Option<&Compiled>,
    options: &CompileOptions,
    now: UnixMillis,
) -> Result<Prepared, Refusal> {
    let started = std::time::Instant::now();
    let (sources, read_diags) = policy::read_sources(paths).map_err(|e| Refusal {
        candidate: String::new(),
        errors: vec![Problem::Io {
            message: e.to_string(),
        }],
        warnings: Vec::new(),
    })?;
    let hash = generation_hash(&sources);
    let loaded = policy::load_sources(
        sources,
        read_diags,
        LoadOptions {
            unset_env: UnsetEnv::Error,
        },
    );
    prepare_loaded(loaded, hash, previous, options, now, started)
}

fn prepare_loaded(
    loaded: Loaded,
    hash: String,
    previous: Option<&Compiled>,
    options: &CompileOptions,
    now: UnixMillis,
    started: std::time::Instant,
) -> Result<Prepared, Refusal> {
    let (errors, warnings): (Vec<Diagnostic>, Vec<Diagnostic>) = loaded
        .diagnostics
        .iter()
        .cloned()
        .partition(|d| d.severity == Severity::Error);
    let warning_problems: Vec<Problem> =
        warnings.iter().cloned().map(Problem::Diagnostic).collect();
    let set = match loaded.set {
        Some(set) if errors.is_empty() => set,
        _ => {
            return Err(Refusal {
                candidate: hash,
                errors: errors.into_iter().map(Problem::Diagnostic).collect(),
                warnings: warning_problems,
            });
        }
    };
    let compiled =
        compile_plan_owned(set, previous, options).map_err(|errs: Vec<CompileError>| Refusal {
            candidate: hash.clone(),
            errors: errs
                .into_iter()
                .map(|e| Problem::Compile {
                    message: e.to_string(),
                })
                .collect(),
            warnings: warning_problems.clone(),
        })?;
    Ok(Prepared {
        compiled,
        generation: Generation {
            hash,
            files: loaded
                .sources
                .files
                .iter()
                .map(|f| f.name.clone())
                .collect(),
            loaded_at: now,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            warnings,
        },
    })
}

/// Per operation, what `next` changes relative to `previous`.
pub fn changes(previous: &Compiled, next: &Compiled) -> BTreeMap<String, Change> {
    let mut out = BTreeMap::new();
    for (name, op) in &next.set.operations {
        let status = match previous.set.operations.get(name) {
            None => "added",
            Some(old)
                if old == op
                    && previous.set.upstreams.get(&op.upstream)
                        == next.set.upstreams.get(&op.upstream)
                    && same_effective(previous.operations.get(name), next.operations.get(name)) =>
            {
                "unchanged"
            }
            Some(_) => "changed",
        };
        out.insert(
            name.clone(),
            Change {
                status,
                carried: next.carried.get(name).copied(),
            },
        );
    }
    for name in previous.set.operations.keys() {
        if !next.set.operations.contains_key(name) {
            out.insert(
                name.clone(),
                Change {
                    status: "removed",
                    carried: None,
                },
            );
        }
    }
    out
}

/// Whether two pipelines of an operation whose definition is the same in
/// both sets still behave the same: `defaults`, `timeouts` and the
/// environment decide part of what an operation does without appearing in it.
fn same_effective(previous: Option<&Arc<Pipeline>>, next: Option<&Arc<Pipeline>>) -> bool {
    match (previous, next) {
        (Some(a), Some(b)) => {
            a.priority == b.priority
                && a.attempt_timeout == b.attempt_timeout
                && a.deadline == b.deadline
                && a.retry == b.retry
                && a.breaker.config() == b.breaker.config()
                && a.failure_on == b.failure_on
                && a.upstream.http == b.upstream.http
        }
        _ => false,
    }
}

/// The last refusal, remembered so that rereading the same refused files
/// (the periodic rescan, an attribute change) does not report it again.
struct KnownRefusal {
    /// The generation that was serving when it was refused.
    serving: String,
    /// The candidate's hash, or the read error when the files could not be read.
    key: String,
    /// The record reported then.
    record: ReloadRecord,
}

/// What identifies a refusal: the candidate, or the error when there is none.
fn refusal_key(refusal: &Refusal) -> String {
    if refusal.candidate.is_empty() {
        refusal.to_string()
    } else {
        refusal.candidate.clone()
    }
}

/// What the reading step of a reload found.
enum Candidate {
    /// The files are those serving.
    Unchanged,
    /// The files are those last refused.
    Refused,
    /// A new generation, built aside.
    Ready(Box<Prepared>),
}

/// Serialises reloads of one policy directory into one runtime and keeps
/// their history.
pub struct Reloader {
    runtime: Arc<Runtime>,
    paths: Vec<PathBuf>,
    options: Arc<CompileOptions>,
    /// The generation last applied; [`Reloader::current`] reads the one
    /// published with the serving pipelines and falls back to this.
    last: ArcSwap<Generation>,
    history: Mutex<VecDeque<ReloadRecord>>,
    refused: Mutex<Option<KnownRefusal>>,
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for `runtime`, which serves `generation` (from `paths`).
    pub fn new(
        runtime: Arc<Runtime>,
        paths: Vec<PathBuf>,
        options: CompileOptions,
        generation: Generation,
    ) -> Arc<Reloader> {
        runtime
            .metrics
            .generation_loaded
            .set(generation.loaded_at as f64 / 1000.0);
        let generation = Arc::new(generation);
        runtime.compiled().publish(Arc::clone(&generation));
        let record = ReloadRecord {
            at: generation.loaded_at,
            trigger: Trigger::Startup,
            result: ReloadResult::Applied,
            generation: generation.hash.clone(),
            candidate: generation.hash.clone(),
            duration_ms: generation.duration_ms,
            errors: Vec::new(),
            warnings: generation
                .warnings
                .iter()
                .cloned()
                .map(Problem::Diagnostic)
                .collect(),
            changes: BTreeMap::new(),
            orphaned_dead_letters: BTreeMap::new(),
        };
        Arc::new(Reloader {
            runtime,
            paths,
            options: Arc::new(options),
            last: ArcSwap::new(generation),
            history: Mutex::new(VecDeque::from([record])),
            refused: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// The policy paths watched.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The generation serving now: the one published with the pipelines
    /// that serve, so it never names another generation than they are.
    pub fn current(&self) -> Arc<Generation> {
        self.runtime
            .compiled()
            .generation()
            .unwrap_or_else(|| self.last.load_full())
    }

    /// The latest attempts, newest first.
    pub fn history(&self) -> Vec<ReloadRecord> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// Reads the files and, when they differ from the serving generation (or
    /// `force`), builds and swaps in the new one. Never fails: a refusal is
    /// a record with errors, and the old generation keeps serving.
    ///
    /// Without `force`, files identical to those last refused (while the
    /// same generation serves) are not built again nor reported again: the
    /// answer is that refusal's record. `force` always builds and reports.
    pub async fn reload(&self, trigger: Trigger, force: bool) -> ReloadRecord {
        let _one_at_a_time = self.running.lock().await;
        let at = self.runtime.clock.now();
        let started = tokio::time::Instant::now();
        let previous = self.runtime.compiled();
        let current = self.current();
        let paths = self.paths.clone();
        let options = Arc::clone(&self.options);
        let prev = Arc::clone(&previous);
        let serving = Arc::clone(&current);
        let known = if force {
            None
        } else {
            self.refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .filter(|k| k.serving == current.hash)
                .map(|k| (k.key.clone(), k.record.clone()))
        };
        let known_key = known.as_ref().map(|(key, _)| key.clone());
        // Reading and compiling thousands of operations is CPU work: keep it
        // off the async workers that serve calls.
        let prepared = tokio::task::spawn_blocking(move || {
            let (sources, read_diags) = match policy::read_sources(&paths) {
                Ok(s) => s,
                Err(e) => {
                    return Err(Refusal {
                        candidate: String::new(),
                        errors: vec![Problem::Io {
                            message: e.to_string(),
                        }],
                        warnings: Vec::new(),
                    });
                }
            };
            let hash = generation_hash(&sources);
            if hash == serving.hash && !force {
                return Ok(Candidate::Unchanged);
            }
            if known_key.as_deref() == Some(hash.as_str()) {
                return Ok(Candidate::Refused);
            }
            let loaded = policy::load_sources(
                sources,
                read_diags,
                LoadOptions {
                    unset_env: UnsetEnv::Error,
                },
            );
            prepare_loaded(
                loaded,
                hash,
                Some(&prev),
                &options,
                at,
                std::time::Instant::now(),
            )
            .map(|p| Candidate::Ready(Box::new(p)))
        })
        .await
        .unwrap_or_else(|e| {
            Err(Refusal {
                candidate: String::new(),
                errors: vec![Problem::Compile {
                    message: format!("reload task failed: {e}"),
                }],
                warnings: Vec::new(),
            })
        });
        if let Some((key, record)) = known {
            let same = match &prepared {
                Ok(Candidate::Refused) => true,
                Err(refusal) => refusal_key(refusal) == key,
                Ok(_) => false,
            };
            if same {
                tracing::debug!(
                    generation = %short(&current.hash),
                    ?trigger,
                    "the policy files are still those refused; the previous generation keeps serving"
                );
                return record;
            }
        }
        let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let metrics = &self.runtime.metrics;
        let mut refusal_seen = None;
        let record = match prepared {
            // `Refused` only comes with a known refusal, answered above.
            Ok(Candidate::Unchanged | Candidate::Refused) => ReloadRecord {
                at,
                trigger,
                result: ReloadResult::Unchanged,
                generation: current.hash.clone(),
                candidate: current.hash.clone(),
                duration_ms: elapsed_ms(),
                errors: Vec::new(),
                warnings: Vec::new(),
                changes: BTreeMap::new(),
                orphaned_dead_letters: BTreeMap::new(),
            },
            Ok(Candidate::Ready(prepared)) => {
                let Prepared {
                    compiled,
                    mut generation,
                } = *prepared;
                let changes = changes(&previous, &compiled);
                let orphaned = self.orphaned(&compiled).await;
                compiled.activate();
                // Measured up to the swap, which is one pointer store: the
                // generation and its pipelines are published together.
                let duration_ms = elapsed_ms();
                generation.duration_ms = duration_ms;
                generation.loaded_at = self.runtime.clock.now();
                let generation = Arc::new(generation);
                compiled.publish(Arc::clone(&generation));
                self.last.store(Arc::clone(&generation));
                self.runtime.swap(compiled);
                metrics
                    .generation_loaded
                    .set(generation.loaded_at as f64 / 1000.0);
                let warnings: Vec<Problem> = generation
                    .warnings
                    .iter()
                    .cloned()
                    .map(Problem::Diagnostic)
                    .collect();
                for w in &warnings {
                    tracing::warn!(generation = %short(&generation.hash), ?trigger, warning = %problem_text(w), "policy warning (applied anyway)");
                }
                tracing::info!(
                    generation = %short(&generation.hash),
                    ?trigger,
                    duration_ms,
                    warnings = warnings.len(),
                    "policies reloaded"
                );
                ReloadRecord {
                    at,
                    trigger,
                    result: ReloadResult::Applied,
                    generation: generation.hash.clone(),
                    candidate: generation.hash.clone(),
                    duration_ms,
                    errors: Vec::new(),
                    warnings,
                    changes,
                    orphaned_dead_letters: orphaned,
                }
            }
            Err(refusal) => {
                refusal_seen = Some(refusal_key(&refusal));
                tracing::error!(
                    generation = %short(&current.hash),
                    ?trigger,
                    errors = %refusal,
                    "policy reload refused; the previous generation keeps serving"
                );
                ReloadRecord {
                    at,
                    trigger,
                    result: ReloadResult::Refused,
                    generation: current.hash.clone(),
                    candidate: refusal.candidate,
                    duration_ms: elapsed_ms(),
                    errors: refusal.errors,
                    warnings: refusal.warnings,
                    changes: BTreeMap::new(),
                    orphaned_dead_letters: BTreeMap::new(),
                }
            }
        };
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner) =
            refusal_seen.map(|key| KnownRefusal {
                serving: current.hash.clone(),
                key,
                record: record.clone(),
            });
        if record.result != ReloadResult::Unchanged {
            metrics
                .reloads
                .get_or_create(&crate::metrics::ReloadLabels {
                    result: record.result.as_str().to_owned(),
                })
                .inc();
            metrics
                .reload_seconds
                .observe(Duration::from_millis(record.duration_ms).as_secs_f64());
            let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            history.push_back(record.clone());
            while history.len() > HISTORY {
                history.pop_front();
            }
            drop(history);
            self.runtime.events.emit(Event::Reload {
                applied: record.result == ReloadResult::Applied,
                generation: record.generation.clone(),
                errors: record.errors.iter().map(problem_text).collect(),
                warnings: record.warnings.iter().map(problem_text).collect(),
                at,
            });
        }
        record
    }

    /// What a reload would do now, without doing it.
    pub async fn plan(&self) -> Result<(Generation, BTreeMap<String, Change>), Refusal> {
        let _one_at_a_time = self.running.lock().await;
        let previous = self.runtime.compiled();
        let paths = self.paths.clone();
        let options = Arc::clone(&self.options);
        let now = self.runtime.clock.now();
        let prev = Arc::clone(&previous);
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&paths, Some(&prev), &options, now))
                .await
                .map_err(|e| Refusal {
                    candidate: String::new(),
                    errors: vec![Problem::Compile {
                        message: format!("plan task failed: {e}"),
                    }],
                    warnings: Vec::new(),
                })??;
        // Dropped without `activate`: shared bulkheads keep their limits.
        let changes = changes(&previous, &prepared.compiled);
        Ok((prepared.generation, changes))
    }

    /// Validates the serving files with `posted` files added or replacing
    /// those of the same name, without applying anything.
    pub fn validate_with(&self, posted: Vec<SourceFile>) -> Result<Loaded, policy::ReadError> {
        let (mut sources, mut diags) = policy::read_sources(&self.paths)?;
        for file in posted {
            // A posted file replaces a serving one that is not UTF-8, and its
            // "not UTF-8" diagnostic with it.
            if let Some(i) = sources
                .undecoded
                .iter()
                .position(|f| same_file(&f.name, &file.name))
            {
                let gone = sources.undecoded.remove(i);
                diags.retain(|d| d.file != gone.name);
                sources.files.push(SourceFile {
                    name: gone.name,
                    text: file.text,
                });
                continue;
            }
            match sources
                .files
                .iter_mut()
                .find(|f| same_file(&f.name, &file.name))
            {
                Some(existing) => {
                    *existing = SourceFile {
                        name: existing.name.clone(),
                        text: file.text,
                    }
                }
                None => sources.files.push(file),
            }
        }
        Ok(policy::load_sources(
            sources,
            diags,
            LoadOptions {
                unset_env: UnsetEnv::Warn,
            },
        ))
    }

    /// Dead letters (pending or parked) that `next` would leave orphaned.
    async fn orphaned(&self, next: &Compiled) -> BTreeMap<String, u64> {
        let Ok(counts) = self.runtime.store.dlq_counts().await else {
            return BTreeMap::new();
        };
        let out = orphaned_dead_letters(&counts, next);
        if !out.is_empty() {
            tracing::warn!(operations = ?out, "dead letters kept for operations that no longer exist: they cannot be redriven until the operation is back; inspect or delete them with /v1/dlq");
        }
        out
    }
}

/// Pending and parked dead letters of operations `compiled` does not define
/// (or defines without `dlq`), by operation: kept, never deleted, but the
/// redrive worker leaves them alone until the operation is back.
pub fn orphaned_dead_letters(counts: &[DlqCount], compiled: &Compiled) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in counts {
        let served = compiled
            .operations
            .get(&c.operation)
            .is_some_and(|p| p.dlq.is_some());
        if c.state != DlqState::Delivered && c.count > 0 && !served {
            *out.entry(c.operation.clone()).or_insert(0) += c.count;
        }
    }
    out
}

/// A posted `enrichment.yaml` replaces `policies/enrichment.yaml`.
fn same_file(existing: &str, posted: &str) -> bool {
    existing == posted
        || std::path::Path::new(existing)
            .file_name()
            .is_some_and(|n| n.to_string_lossy() == posted)
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
