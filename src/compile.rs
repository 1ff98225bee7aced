//! `PolicySet` -> `Compiled`: one executable [`Pipeline`] per operation.
//!
//! Compiling resolves what validation only checked: defaults are merged,
//! templates parsed once, `${env:…}` references expanded (an unset variable
//! without default is an error naming the variable, never a value), and one
//! HTTP client, bulkhead and rate limiter is built per upstream.
//!
//! Live state carries over from the previous generation wherever that part
//! of the policy is unchanged, which is what lets hot reload swap pipelines
//! without resetting breakers or dropping bulkhead permits:
//!
//! | state | carried over when |
//! | --- | --- |
//! | breaker (window, state) | the operation's effective breaker is equal |
//! | retry budget | window, buckets and budget percent are equal |
//! | bulkhead | always (limits are updated in place; held permits stay honoured) |
//! | rate limiter (tokens, quota gate) | the upstream's `rate_limit` is equal (an upstream without one gets an unlimited limiter, for its quota gate); a closed quota gate carries over to a new limiter too |
//! | HTTP client (connection pool) | base URL, headers, connect timeout and body limit are equal |
//! | params validator | the operation's `params_schema` is equal |
//!
//! Operations whose `params_schema`s are equal share one validator.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::dlq::DlqConfig;
use crate::pipeline::breaker::{Breaker, BreakerConfig};
use crate::pipeline::bulkhead::{Bulkhead, BulkheadConfig};
use crate::pipeline::compose::{Pipeline, UpstreamRuntime};
use crate::pipeline::fallback::{CacheConfig, Fallback, MemoryCache};
use crate::pipeline::http::{CompiledRequest, HttpConfig, ReqwestTransport, Transport};
use crate::pipeline::idempotency::IdempotencyConfig;
use crate::pipeline::rate_limit::{RateLimitConfig, RateLimiter};
use crate::pipeline::retry::{RetryBudget, RetryConfig};
use crate::policy::effective::{EffectiveBreaker, EffectiveRetry};
use crate::policy::model::{Priority, Upstream};
use crate::policy::template::EnvString;
use crate::policy::{PolicySet, params_validator, value_hash};
use crate::scrub::Secrets;

/// Largest response body when an upstream does not say (8 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Header that forwards idempotency keys when the policy does not name one.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Every operation's pipeline and every upstream's shared parts.
pub struct Compiled {
    /// The policy set this was compiled from.
    pub set: Arc<PolicySet>,
    /// Pipelines by operation name.
    pub operations: BTreeMap<String, Arc<Pipeline>>,
    /// Upstream runtimes by name.
    pub upstreams: BTreeMap<String, Arc<UpstreamRuntime>>,
    /// What was carried over from the previous generation, by operation.
    pub carried: BTreeMap<String, CarriedOver>,
    // Bulkhead limits to apply on activation.
    pending: std::sync::Mutex<Vec<(Arc<Bulkhead>, BulkheadConfig)>>,
    // The generation these pipelines are, once published by the reloader:
    // swapped in with them, so the two are never seen apart.
    generation: std::sync::OnceLock<Arc<crate::reload::Generation>>,
}

/// Which live state of an operation came from the previous generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CarriedOver {
    /// The breaker (its window and state).
    pub breaker: bool,
    /// The retry budget's window.
    pub retry_budget: bool,
    /// The upstream's bulkhead (always, when the upstream existed before).
    pub bulkhead: bool,
    /// The upstream's rate limiter.
    pub rate_limiter: bool,
    /// The upstream's HTTP client and its pooled connections.
    pub http_client: bool,
}

/// Why a policy set cannot be compiled (it passed validation, but the
/// environment or the machine cannot supply what it needs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// An `${env:NAME}` without default whose variable is unset.
    #[error("{place}: environment variable `{variable}` is not set and has no default")]
    UnsetVariable {
        /// Where it is used, e.g. `upstream clay, header Authorization`.
        place: String,
        /// The variable's name.
        variable: String,
    },
    /// A value that is invalid once expanded.
    #[error("{place}: {reason}")]
    Invalid {
        /// Where.
        place: String,
        /// What is wrong (never the value of a secret).
        reason: String,
    },
}

/// Looks up an environment variable.
pub type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds the transport of an upstream from its HTTP settings.
pub type TransportFactory = Box<dyn Fn(&HttpConfig) -> Arc<dyn Transport> + Send + Sync>;

/// Where compile gets what lies outside the policy files.
pub struct CompileOptions {
    /// Looks up environment variables.
    pub env: EnvLookup,
    /// Builds an upstream's transport; `None` uses reqwest. Tests and
    /// benchmarks answer in memory through this.
    pub transport: Option<TransportFactory>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            env: Box::new(|name| std::env::var(name).ok()),
            transport: None,
        }
    }
}

/// Compiles with the process environment and real HTTP clients.
pub fn compile(
    set: &PolicySet,
    previous: Option<&Compiled>,
) -> Result<Compiled, Vec<CompileError>> {
    compile_with(set, previous, &CompileOptions::default())
}

/// Compiles `set`, carrying live state over from `previous` where
/// unchanged, and activates it (see [`Compiled::activate`]).
pub fn compile_with(
    set: &PolicySet,
    previous: Option<&Compiled>,
    options: &CompileOptions,
) -> Result<Compiled, Vec<CompileError>> {
    let compiled = compile_plan(set, previous, options)?;
    compiled.activate();
    Ok(compiled)
}

/// Compiles `set` aside: shares live state with `previous` but changes none
/// of it until [`Compiled::activate`], so a dry run or a failed reload
/// leaves the serving generation exactly as it was.
pub fn compile_plan(
    set: &PolicySet,
    previous: Option<&Compiled>,
    options: &CompileOptions,
) -> Result<Compiled, Vec<CompileError>> {
    compile_plan_owned(set.clone(), previous, options)
}

/// [`compile_plan`], keeping `set` itself rather than a copy: what serve
/// and reload use, since they are done with the set they loaded (copying
/// 10,000 operations costs about a quarter of compiling them).
pub fn compile_plan_owned(
    set: PolicySet,
    previous: Option<&Compiled>,
    options: &CompileOptions,
) -> Result<Compiled, Vec<CompileError>> {
    let shared = Arc::new(set);
    let set: &PolicySet = &shared;
    let mut errors = Vec::new();
    let mut upstreams = BTreeMap::new();
    let mut upstream_carry = BTreeMap::new();
    // Bulkheads shared with the previous generation get their new limits
    // only once the whole set compiled, so a failed compile changes nothing.
    let mut pending = Vec::new();
    for (name, upstream) in &set.upstreams {
        let before = previous.and_then(|p| p.upstreams.get(name));
        match build_upstream(set, name, upstream, before, options, &mut pending) {
            Ok((runtime, carry)) => {
                upstreams.insert(name.clone(), Arc::new(runtime));
                upstream_carry.insert(name.clone(), carry);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    let mut operations = BTreeMap::new();
    let mut carried = BTreeMap::new();
    let mut validators = Validators {
        set,
        taken: HashMap::new(),
    };
    for (name, op) in &set.operations {
        // Built only for an error: most operations have none.
        let place = || format!("operation {name}");
        // Operation headers may hold `${env:…}` (secrets) as well as
        // `{{ params }}`; text without `${` expands to itself. A credential
        // written into the policy is a secret too; one filled from params is
        // the caller's own.
        let mut template = Cow::Borrowed(&op.request);
        let mut secret_values = Vec::new();
        if op.request.headers.iter().any(|(h, v)| {
            v.contains("${") || (crate::scrub::is_credential_header(h) && !v.contains("{{"))
        }) {
            let mut header_errors = Vec::new();
            for (header, value) in &mut template.to_mut().headers {
                let here = || format!("{}, header {header}", place());
                match expand_collecting(value, &here, options, &mut secret_values) {
                    Ok(expanded) => {
                        if crate::scrub::is_credential_header(header) && !expanded.contains("{{") {
                            secret_values.push(expanded.clone());
                        }
                        *value = expanded;
                    }
                    Err(e) => header_errors.push(e),
                }
            }
            if !header_errors.is_empty() {
                errors.append(&mut header_errors);
                continue;
            }
        }
        let Some(upstream) = upstreams.get(&op.upstream) else {
            if !set.upstreams.contains_key(&op.upstream) {
                errors.push(CompileError::Invalid {
                    place: place(),
                    reason: format!("unknown upstream `{}`", op.upstream),
                });
            }
            // Otherwise the upstream's own errors are reported above.
            continue;
        };
        let Some(attempt_timeout) = set.attempt_timeout(op) else {
            errors.push(CompileError::Invalid {
                place: place(),
                reason: "its timeout names an unknown timeout class".into(),
            });
            continue;
        };
        let request = match CompiledRequest::compile(&template, &[]) {
            Ok(r) => r,
            Err(reason) => {
                errors.push(CompileError::Invalid {
                    place: place(),
                    reason,
                });
                continue;
            }
        };
        let before = previous.and_then(|p| p.operations.get(name));
        let breaker_config = BreakerConfig::from(&EffectiveBreaker::resolve(
            op.breaker.as_ref(),
            set.defaults.breaker.as_ref(),
        ));
        // A breaker judges one upstream: moving the operation elsewhere starts afresh.
        let (breaker, breaker_carried) = match before {
            Some(b) if *b.breaker.config() == breaker_config && b.upstream.name == op.upstream => {
                (Arc::clone(&b.breaker), true)
            }
            _ => (Arc::new(Breaker::new(breaker_config.clone())), false),
        };
        let retry = RetryConfig::from(&EffectiveRetry::resolve(
            op.retry.as_ref(),
            set.defaults.retry.as_ref(),
        ));
        let budget_key = (
            breaker_config.window,
            breaker_config.buckets,
            retry.budget_percent,
        );
        let (budget, budget_carried) = match before {
            Some(b) if budget_key_of(b) == budget_key => (Arc::clone(&b.budget), true),
            _ => (
                Arc::new(RetryBudget::new(budget_key.0, budget_key.1, budget_key.2)),
                false,
            ),
        };
        let idempotency_header = match &op.idempotency {
            Some(i) => {
                let text = i.header.as_deref().unwrap_or(DEFAULT_IDEMPOTENCY_HEADER);
                match HeaderName::try_from(text) {
                    Ok(h) => Some(h),
                    Err(_) => {
                        errors.push(CompileError::Invalid {
                            place: format!("{}, idempotency.header", place()),
                            reason: format!("`{text}` is not a valid header name"),
                        });
                        continue;
                    }
                }
            }
            None => None,
        };
        let params_schema = match &op.params_schema {
            Some(schema) => {
                let unchanged = previous
                    .and_then(|p| p.set.operations.get(name)?.params_schema.as_ref())
                    .filter(|old| *old == schema)
                    .and(before)
                    .and_then(|b| b.params_schema.clone());
                match validators.get(schema, unchanged) {
                    Ok(v) => Some(v),
                    Err(reason) => {
                        errors.push(CompileError::Invalid {
                            place: format!("{}, params_schema", place()),
                            reason,
                        });
                        continue;
                    }
                }
            }
            None => None,
        };
        let idempotency = idempotency_config(op, idempotency_header.clone());
        let idempotency_header = Some(idempotency.header.clone());
        let fallback = fallback_of(op, before);
        let dlq = match &op.dlq {
            Some(d) => match DlqConfig::from_policy(d, &|t, p| {
                expand(t, &|| format!("{}, {p}", place()), options)
            }) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            },
            None => None,
        };
        let attempt_timeout = attempt_timeout.to_std();
        let pipeline = Pipeline {
            name: name.clone(),
            secrets: upstream.secrets.merge(&Secrets::new(secret_values)),
            upstream: Arc::clone(upstream),
            request,
            priority: op
                .priority
                .or(set.defaults.priority)
                .unwrap_or(Priority::Normal),
            attempt_timeout,
            deadline: op.deadline.map(|d| d.to_std()),
            retry,
            budget,
            failure_on: breaker_failure_on(op, set),
            breaker,
            idempotency_header,
            params_schema,
            idempotency,
            fallback,
            dlq,
        };
        let up = upstream_carry
            .get(&op.upstream)
            .copied()
            .unwrap_or_default();
        carried.insert(
            name.clone(),
            CarriedOver {
                breaker: breaker_carried,
                retry_budget: budget_carried,
                ..up
            },
        );
        operations.insert(name.clone(), Arc::new(pipeline));
    }
    if errors.is_empty() {
        Ok(Compiled {
            set: shared,
            operations,
            upstreams,
            carried,
            pending: std::sync::Mutex::new(pending),
            generation: std::sync::OnceLock::new(),
        })
    } else {
        Err(errors)
    }
}

impl Compiled {
    /// Names these pipelines as `generation` (once; later calls are
    /// ignored), before they are swapped in.
    pub fn publish(&self, generation: Arc<crate::reload::Generation>) {
        let _ = self.generation.set(generation);
    }

    /// The generation these pipelines were published as, if any.
    pub fn generation(&self) -> Option<Arc<crate::reload::Generation>> {
        self.generation.get().cloned()
    }

    /// Applies what this generation changes in state it shares with the
    /// previous one (new bulkhead limits), once it is about to serve. A plan
    /// that is never activated (a dry run) changes nothing. Idempotent.
    pub fn activate(&self) {
        let pending = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (bulkhead, config) in pending {
            bulkhead.reconfigure(config);
        }
    }
}

/// The params validators of one compile: operations with equal
/// `params_schema`s share one validator (it is immutable), built once.
/// Building one (regexes, formats, the schema checked against its
/// meta-schema) costs far more per operation than the rest of its pipeline,
/// so compile takes the ones validation built.
struct Validators<'s> {
    set: &'s PolicySet,
    /// By [`value_hash`] of the schema, with the schema.
    taken: HashMap<u64, Vec<(&'s serde_json::Value, Arc<jsonschema::Validator>)>>,
}

impl<'s> Validators<'s> {
    /// The validator of `schema`: one already taken for an equal schema,
    /// `unchanged` (the previous generation's, when the operation's schema
    /// is the same), validation's, or a new one.
    fn get(
        &mut self,
        schema: &'s serde_json::Value,
        unchanged: Option<Arc<jsonschema::Validator>>,
    ) -> Result<Arc<jsonschema::Validator>, String> {
        let hash = value_hash(schema);
        let taken = self.taken.entry(hash).or_default();
        if let Some((_, v)) = taken.iter().find(|(s, _)| *s == schema) {
            return Ok(Arc::clone(v));
        }
        let validator = match unchanged.or_else(|| self.set.checked_params_validator(schema, hash))
        {
            Some(v) => v,
            None => Arc::new(params_validator(schema).map_err(|e| e.to_string())?),
        };
        taken.push((schema, Arc::clone(&validator)));
        Ok(validator)
    }
}

/// Lease of an in-flight idempotency claim without a deadline or a `lease`.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long completed idempotency records replay without a `ttl`.
pub const DEFAULT_IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Every operation accepts a caller's `Idempotency-Key`; only a declared
/// `idempotency` derives keys from params.
fn idempotency_config(
    op: &crate::policy::model::Operation,
    header: Option<HeaderName>,
) -> IdempotencyConfig {
    let policy = op.idempotency.as_ref();
    IdempotencyConfig {
        key_params: policy.map(|i| i.key.clone()).unwrap_or_default(),
        ttl: policy
            .and_then(|i| i.ttl)
            .map_or(DEFAULT_IDEMPOTENCY_TTL, |d| d.to_std()),
        lease: policy
            .and_then(|i| i.lease)
            .or(op.deadline)
            .map_or(DEFAULT_LEASE, |d| d.to_std()),
        on_concurrent: policy
            .and_then(|i| i.on_concurrent)
            .unwrap_or(crate::policy::model::OnConcurrent::Wait),
        header: header.unwrap_or(HeaderName::from_static("idempotency-key")),
    }
}

/// The operation's fallback; the in-memory cache carries over while the
/// cache settings are unchanged.
fn fallback_of(
    op: &crate::policy::model::Operation,
    before: Option<&Arc<Pipeline>>,
) -> Option<Fallback> {
    let policy = op.fallback.as_ref()?;
    let cache = policy.cache.as_ref().map(CacheConfig::from_policy);
    let memory = match (before.and_then(|b| b.fallback.as_ref()), &cache) {
        (Some(old), Some(new)) if old.cache.as_ref() == Some(new) => Arc::clone(&old.memory),
        (_, Some(new)) => MemoryCache::for_config(new),
        (_, None) => MemoryCache::new(1, 0),
    };
    Some(Fallback {
        cache,
        memory,
        static_value: policy.static_value.clone(),
    })
}

/// A limiter that never runs out of tokens: only its quota gate acts.
fn unlimited() -> RateLimitConfig {
    RateLimitConfig {
        per_second: u32::MAX,
        burst: u32::MAX,
        critical_reserve_percent: 0,
    }
}

fn budget_key_of(p: &Pipeline) -> (std::time::Duration, u32, u8) {
    let b = p.breaker.config();
    (b.window, b.buckets, p.retry.budget_percent)
}

fn breaker_failure_on(
    op: &crate::policy::model::Operation,
    set: &PolicySet,
) -> Vec<crate::policy::model::Condition> {
    EffectiveBreaker::resolve(op.breaker.as_ref(), set.defaults.breaker.as_ref())
        .failure_on
        .value
}

/// Expands `${env:…}` in `text`; `place` names where, for an error.
fn expand(
    text: &str,
    place: &dyn Fn() -> String,
    options: &CompileOptions,
) -> Result<String, CompileError> {
    expand_collecting(text, place, options, &mut Vec::new())
}

/// [`expand`], adding the values the environment gave to `found` (where
/// secrets live: see [`crate::scrub`]). Defaults are policy text, not
/// secrets.
fn expand_collecting(
    text: &str,
    place: &dyn Fn() -> String,
    options: &CompileOptions,
    found: &mut Vec<String>,
) -> Result<String, CompileError> {
    let parsed = EnvString::parse(text).map_err(|e| CompileError::Invalid {
        place: place(),
        reason: e.message,
    })?;
    let given = std::cell::RefCell::new(Vec::new());
    let expanded = parsed.expand(|name| {
        let value = (options.env)(name);
        if let Some(v) = value.as_ref().filter(|v| !v.is_empty()) {
            given.borrow_mut().push(v.clone());
        }
        value
    });
    found.append(&mut given.into_inner());
    expanded.map_err(|e| CompileError::UnsetVariable {
        place: place(),
        variable: e.0,
    })
}

fn build_upstream(
    set: &PolicySet,
    name: &str,
    upstream: &Upstream,
    before: Option<&Arc<UpstreamRuntime>>,
    options: &CompileOptions,
    pending: &mut Vec<(Arc<Bulkhead>, BulkheadConfig)>,
) -> Result<(UpstreamRuntime, CarriedOver), Vec<CompileError>> {
    let mut errors = Vec::new();
    let place = format!("upstream {name}");
    let mut secret_values = Vec::new();
    let base_url = match expand_collecting(
        &upstream.base_url,
        &|| format!("{place}, base_url"),
        options,
        &mut secret_values,
    ) {
        Ok(text) => match url::Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            _ => {
                errors.push(CompileError::Invalid {
                    place: format!("{place}, base_url"),
                    reason: "expands to something that is not an http(s) URL".into(),
                });
                None
            }
        },
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let mut headers = HeaderMap::new();
    for (header, value) in &upstream.headers {
        let here = format!("{place}, header {header}");
        match expand_collecting(value, &|| here.clone(), options, &mut secret_values) {
            Ok(text) => match (
                HeaderName::try_from(header.as_str()),
                HeaderValue::try_from(text),
            ) {
                (Ok(n), Ok(mut v)) => {
                    // A credential written into the policy is a secret too.
                    if crate::scrub::is_credential_header(header) {
                        secret_values.extend(v.to_str().ok().map(str::to_owned));
                    }
                    v.set_sensitive(true);
                    headers.insert(n, v);
                }
                _ => errors.push(CompileError::Invalid {
                    place: here,
                    reason: "is not a valid header once expanded".into(),
                }),
            },
            Err(e) => errors.push(e),
        }
    }
    let Some(base_url) = base_url.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    // A URL's password is a credential whatever wrote it.
    let secrets = Secrets::new(
        secret_values
            .into_iter()
            .chain(base_url.password().map(str::to_owned)),
    );
    let http = HttpConfig {
        base_url,
        headers,
        connect_timeout: set.connect_timeout().to_std(),
        max_response_bytes: upstream
            .max_response_bytes
            .and_then(|b| usize::try_from(b).ok())
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
    };
    let mut carry = CarriedOver::default();
    let transport: Arc<dyn Transport> = match before {
        Some(b) if b.http == http => {
            carry.http_client = true;
            Arc::clone(&b.transport)
        }
        _ => match &options.transport {
            Some(make) => make(&http),
            None => match ReqwestTransport::new(http.clone()) {
                Ok(t) => Arc::new(t),
                Err(reason) => return Err(vec![CompileError::Invalid { place, reason }]),
            },
        },
    };
    let bulkhead_config = BulkheadConfig::from(upstream);
    let bulkhead = if bulkhead_config.classes.is_empty() {
        None
    } else {
        match before.and_then(|b| b.bulkhead.as_ref()) {
            Some(existing) => {
                carry.bulkhead = true;
                if existing.config() != bulkhead_config {
                    pending.push((Arc::clone(existing), bulkhead_config));
                }
                Some(Arc::clone(existing))
            }
            None => Some(Bulkhead::new(bulkhead_config)),
        }
    };
    // Every upstream gets a limiter, unlimited without `rate_limit`, because
    // its quota gate is what a 429 closes for all the upstream's operations.
    let config = upstream
        .rate_limit
        .as_ref()
        .map_or_else(unlimited, RateLimitConfig::from);
    let limiter = Some(match before.and_then(|b| b.limiter.as_ref()) {
        Some(existing) if *existing.config() == config => {
            carry.rate_limiter = true;
            Arc::clone(existing)
        }
        Some(existing) => {
            // New limits, a fresh bucket; but a quota gate a 429 closed
            // stays closed: Clay refuses those calls whatever our limits say.
            let limiter = RateLimiter::new(config);
            if let Some(ms) = existing.snapshot().gate_closed_for_ms {
                limiter.close_until(
                    tokio::time::Instant::now() + std::time::Duration::from_millis(ms),
                );
            }
            Arc::new(limiter)
        }
        None => Arc::new(RateLimiter::new(config)),
    });
    Ok((
        UpstreamRuntime {
            name: name.to_owned(),
            http,
            secrets,
            transport,
            bulkhead,
            limiter,
        },
        carry,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{LoadOptions, UnsetEnv, load_str};

    fn set(per_second: u32) -> PolicySet {
        let text = format!(
            "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
    rate_limit: {{ per_second: {per_second}, burst: 5 }}
operations:
  op:
    upstream: clay
    request: {{ method: GET, path: /x }}
"
        );
        let loaded = load_str(
            "p.yaml",
            &text,
            LoadOptions {
                unset_env: UnsetEnv::Ignore,
            },
        );
        loaded
            .set
            .unwrap_or_else(|| panic!("valid: {:#?}", loaded.diagnostics))
    }

    fn limiter(compiled: &Compiled) -> Arc<RateLimiter> {
        compiled.upstreams["clay"]
            .limiter
            .clone()
            .expect("every upstream has a limiter")
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_quota_gate_outlives_a_new_rate_limit() {
        let options = CompileOptions::default();
        let first = compile_with(&set(10), None, &options).expect("compiles");
        // A 429 with a 30s reset hint closed the gate.
        limiter(&first).close_until(tokio::time::Instant::now() + Duration::from_secs(30));

        let same = compile_with(&set(10), Some(&first), &options).expect("compiles");
        assert!(Arc::ptr_eq(&limiter(&same), &limiter(&first)));

        let next = compile_with(&set(20), Some(&same), &options).expect("compiles");
        let new = limiter(&next);
        assert!(
            !Arc::ptr_eq(&new, &limiter(&first)),
            "new limits, a new bucket"
        );
        assert_eq!(new.config().per_second, 20);
        assert!(!next.carried["op"].rate_limiter);
        assert_eq!(
            new.snapshot().gate_closed_for_ms,
            Some(30_000),
            "the quota gate stays closed until Clay's reset"
        );

        tokio::time::advance(Duration::from_secs(31)).await;
        let later = compile_with(&set(30), Some(&next), &options).expect("compiles");
        assert_eq!(limiter(&later).snapshot().gate_closed_for_ms, None);
    }

    fn schemas(b_max: u32) -> PolicySet {
        let text = format!(
            "version: 1
upstreams:
  clay: {{ base_url: \"http://127.0.0.1:9\" }}
operations:
  a:
    upstream: clay
    request: {{ method: GET, path: \"/a/{{{{ params.id }}}}\" }}
    params_schema: {{ type: object, properties: {{ id: {{ type: string, maxLength: 3 }} }} }}
  b:
    upstream: clay
    request: {{ method: GET, path: \"/b/{{{{ params.id }}}}\" }}
    params_schema: {{ type: object, properties: {{ id: {{ type: string, maxLength: {b_max} }} }} }}
  c:
    upstream: clay
    request: {{ method: GET, path: \"/c/{{{{ params.id }}}}\" }}
    params_schema: {{ type: object, properties: {{ id: {{ type: string, maxLength: 3 }} }} }}
"
        );
        let loaded = load_str("p.yaml", &text, LoadOptions::default());
        loaded
            .set
            .unwrap_or_else(|| panic!("valid: {:#?}", loaded.diagnostics))
    }

    fn validator(compiled: &Compiled, op: &str) -> Arc<jsonschema::Validator> {
        compiled.operations[op]
            .params_schema
            .clone()
            .expect("a params validator")
    }

    #[test]
    fn equal_params_schemas_share_one_validator_and_unchanged_ones_carry_over() {
        let options = CompileOptions::default();
        let set = schemas(3);
        assert_eq!(set.params_validators.len(), 1, "validation built one");
        let first = compile_with(&set, None, &options).expect("compiles");
        let schema = set.operations["a"]
            .params_schema
            .as_ref()
            .expect("a schema");
        let checked = set
            .checked_params_validator(schema, crate::policy::value_hash(schema))
            .expect("validation's");
        assert!(
            Arc::ptr_eq(&validator(&first, "a"), &checked),
            "compile takes validation's validator"
        );
        assert!(Arc::ptr_eq(
            &validator(&first, "a"),
            &validator(&first, "c")
        ));
        assert!(Arc::ptr_eq(
            &validator(&first, "a"),
            &validator(&first, "b")
        ));
        let long = serde_json::json!({"id": "abcd"});
        for op in ["a", "b", "c"] {
            assert!(!validator(&first, op).is_valid(&long), "{op}");
            assert!(validator(&first, op).is_valid(&serde_json::json!({"id": "abc"})));
        }

        let next = compile_with(&schemas(5), Some(&first), &options).expect("compiles");
        assert!(Arc::ptr_eq(&validator(&next, "a"), &validator(&first, "a")));
        assert!(Arc::ptr_eq(&validator(&next, "c"), &validator(&first, "c")));
        assert!(!Arc::ptr_eq(
            &validator(&next, "b"),
            &validator(&first, "b")
        ));
        assert!(
            validator(&next, "b").is_valid(&long),
            "b's new schema serves"
        );
        assert!(!validator(&next, "a").is_valid(&long));
    }

    #[test]
    fn a_schema_changed_after_validation_gets_its_own_validator() {
        let mut set = schemas(3);
        set.operations.get_mut("a").expect("a").params_schema =
            Some(serde_json::json!({"type": "object", "required": ["id"]}));
        let compiled = compile_with(&set, None, &CompileOptions::default()).expect("compiles");
        assert!(!validator(&compiled, "a").is_valid(&serde_json::json!({})));
        assert!(validator(&compiled, "a").is_valid(&serde_json::json!({"id": "abcdef"})));
        assert!(!validator(&compiled, "c").is_valid(&serde_json::json!({"id": "abcdef"})));
    }
}
