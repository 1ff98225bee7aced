//! Checks of meaning, beyond what the JSON Schema can say: names defined
//! twice, references that resolve, timeouts that fit their deadline,
//! templates that name declared params, retries that cannot duplicate
//! writes, environment references, and values that are legal but suspicious.
//!
//! Every check pushes diagnostics and goes on; none stops the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::diagnostic::{Code, Diagnostic, Severity, Span};
use super::effective::{EffectiveBreaker, EffectiveRetry, resolve_timeout};
use super::load::{append_segment, push_segment};
use super::model::{Backoff, BreakerPolicy, Operation, PolicyFile, Priority, TimeoutRef};
use super::schema::did_you_mean;
use super::template::{EnvString, Template};
use super::{Origin, Origins, Parsed, PolicySet, UnsetEnv, params_validator, value_hash};

/// What is known of files that did not make it to this phase, so their
/// problems are reported once, not again as dangling references elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct Elsewhere {
    /// False when a file did not even parse: nothing is known of its names.
    pub(crate) complete: bool,
    upstreams: BTreeSet<String>,
    timeouts: BTreeSet<String>,
}

impl Default for Elsewhere {
    fn default() -> Self {
        Elsewhere {
            complete: true,
            upstreams: BTreeSet::new(),
            timeouts: BTreeSet::new(),
        }
    }
}

impl Elsewhere {
    /// Notes the names a schema-invalid document defines, and that it uses
    /// names we cannot see (so "unused" warnings would mislead).
    pub(crate) fn add_names_of(&mut self, doc: &Value) {
        let keys = |section: &str| {
            doc.get(section)
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        self.upstreams.extend(keys("upstreams"));
        self.timeouts.extend(keys("timeouts"));
        if doc.get("operations").is_some() {
            self.complete = false;
        }
    }

    fn has_upstream(&self, name: &str) -> bool {
        !self.complete || self.upstreams.contains(name)
    }

    fn has_timeout(&self, name: &str) -> bool {
        !self.complete || self.timeouts.contains(name)
    }
}

/// Merges the parsed files into one set and checks it. The set is returned
/// even when there are errors (callers discard it then); diagnostics say why.
pub(crate) fn check(
    mut files: Vec<Parsed>,
    elsewhere: &Elsewhere,
) -> (Option<PolicySet>, Vec<Diagnostic>) {
    // The set takes the files' definitions over rather than copies of them.
    let policies: Vec<PolicyFile> = files
        .iter_mut()
        .map(|f| {
            std::mem::replace(
                &mut f.policy,
                PolicyFile {
                    version: 1,
                    upstreams: BTreeMap::new(),
                    timeouts: BTreeMap::new(),
                    defaults: None,
                    health: None,
                    operations: BTreeMap::new(),
                },
            )
        })
        .collect();
    let mut cx = Checker {
        files: &files,
        elsewhere,
        out: Vec::new(),
        validators: HashMap::new(),
    };
    let (mut set, homes) = cx.merge(policies);
    for f in &files {
        cx.out.extend(f.env.iter().cloned());
    }
    cx.upstreams(&set, &homes);
    cx.timeouts_and_defaults(&set, &homes);
    for (name, op) in &set.operations {
        let home = homes.operations[name];
        cx.operation(&set, name, op, home);
    }
    set.params_validators = std::mem::take(&mut cx.validators).into();
    (Some(set), cx.out)
}

/// The problems with `${…}` references in one parsed file whose document
/// is `value`.
pub(crate) fn env_references(file: &Parsed, value: &Value, unset: UnsetEnv) -> Vec<Diagnostic> {
    let mut cx = Checker {
        files: std::slice::from_ref(file),
        elsewhere: &Elsewhere::default(),
        out: Vec::new(),
        validators: HashMap::new(),
    };
    cx.env_references(0, value, &mut String::new(), unset);
    cx.out
}

/// Which file each name came from (index into the parsed files).
#[derive(Default)]
struct Homes {
    upstreams: BTreeMap<String, usize>,
    timeouts: BTreeMap<String, usize>,
    operations: BTreeMap<String, usize>,
    defaults: Option<usize>,
}

struct Checker<'a> {
    files: &'a [Parsed],
    elsewhere: &'a Elsewhere,
    out: Vec<Diagnostic>,
    /// Validators of the `params_schema`s found valid, by hash, with the
    /// operation each was built for: building one is the costliest check,
    /// many operations share a schema, and compile takes them over.
    validators: HashMap<u64, Vec<(String, Arc<jsonschema::Validator>)>>,
}

/// The value of a string with `${env:…}` references as the server would see
/// it now; `None` when a reference is malformed or unset (reported elsewhere),
/// so checks of the expanded value only run on values that exist.
fn expand_if_set(text: &str) -> Option<String> {
    EnvString::parse(text)
        .ok()?
        .expand(|name| std::env::var(name).ok())
        .ok()
}

fn ptr(parts: &[&str]) -> String {
    parts.iter().fold(String::new(), |p, s| push_segment(&p, s))
}

impl Checker<'_> {
    fn name(&self, file: usize) -> &str {
        &self.files[file].name
    }

    /// The span to point at for the node at `pointer`: its key when `key`.
    fn span(&self, file: usize, pointer: &str, key: bool) -> Option<Span> {
        let spans = &self.files[file].spans;
        if key {
            spans.key_span(pointer)
        } else {
            spans.value_span(pointer)
        }
    }

    fn push(
        &mut self,
        severity: Severity,
        code: Code,
        file: usize,
        pointer: &str,
        key: bool,
        message: String,
    ) -> &mut Diagnostic {
        let span = self.span(file, pointer, key);
        let name = self.name(file).to_owned();
        let d = match severity {
            Severity::Error => Diagnostic::error(code, &name, span, message),
            Severity::Warning => Diagnostic::warning(code, &name, span, message),
        }
        .at(pointer);
        self.out.push(d);
        let last = self.out.len() - 1;
        &mut self.out[last]
    }

    fn error(
        &mut self,
        code: Code,
        file: usize,
        pointer: &str,
        message: String,
    ) -> &mut Diagnostic {
        self.push(Severity::Error, code, file, pointer, false, message)
    }

    fn warn(&mut self, code: Code, file: usize, pointer: &str, message: String) -> &mut Diagnostic {
        self.push(Severity::Warning, code, file, pointer, false, message)
    }

    fn origin(&self, file: usize, pointer: &str) -> Origin {
        Origin {
            file: self.name(file).to_owned(),
            span: self.span(file, pointer, true),
        }
    }

    // ---- merging -------------------------------------------------------

    fn merge(&mut self, policies: Vec<PolicyFile>) -> (PolicySet, Homes) {
        let mut homes = Homes::default();
        let mut set = PolicySet {
            upstreams: BTreeMap::new(),
            timeouts: BTreeMap::new(),
            defaults: Default::default(),
            health: Default::default(),
            operations: BTreeMap::new(),
            origins: Origins::default(),
            params_validators: Default::default(),
        };
        let mut health_home: Option<usize> = None;
        for (i, p) in policies.into_iter().enumerate() {
            for (name, u) in p.upstreams {
                if self.claim(&mut homes.upstreams, "upstream", "upstreams", &name, i) {
                    let origin = self.origin(i, &ptr(&["upstreams", &name]));
                    set.origins.upstreams.insert(name.clone(), origin);
                    set.upstreams.insert(name, u);
                }
            }
            for (name, t) in p.timeouts {
                if self.claim(&mut homes.timeouts, "timeout class", "timeouts", &name, i) {
                    let origin = self.origin(i, &ptr(&["timeouts", &name]));
                    set.origins.timeouts.insert(name.clone(), origin);
                    set.timeouts.insert(name, t);
                }
            }
            for (name, op) in p.operations {
                if self.claim(&mut homes.operations, "operation", "operations", &name, i) {
                    let origin = self.origin(i, &ptr(&["operations", &name]));
                    set.origins.operations.insert(name.clone(), origin);
                    set.operations.insert(name, op);
                }
            }
            if let Some(d) = p.defaults
                && self.claim_section(&mut homes.defaults, "defaults", i)
            {
                set.defaults = d;
                set.origins.defaults = Some(self.origin(i, "/defaults"));
            }
            if let Some(h) = p.health
                && self.claim_section(&mut health_home, "health", i)
            {
                set.health = h;
                set.origins.health = Some(self.origin(i, "/health"));
            }
        }
        (set, homes)
    }

    /// Records that `name` is defined in `file`; a second definition is an error naming both.
    fn claim(
        &mut self,
        homes: &mut BTreeMap<String, usize>,
        what: &str,
        section: &str,
        name: &str,
        file: usize,
    ) -> bool {
        let pointer = ptr(&[section, name]);
        match homes.get(name) {
            None => {
                homes.insert(name.to_owned(), file);
                true
            }
            Some(&first) => {
                let first_name = self.name(first).to_owned();
                let first_span = self.span(first, &pointer, true);
                let at = first_span.map_or(first_name.clone(), |s| {
                    format!("{first_name}:{}:{}", s.line, s.column)
                });
                let d = self.push(
                    Severity::Error,
                    Code::DuplicateName,
                    file,
                    &pointer,
                    true,
                    format!("{what} `{name}` is defined twice; first at {at}"),
                );
                *d = d.clone().related(&first_name, first_span, "first defined here").hint(
                    "a name may be defined once in the whole policies directory; rename or remove one",
                );
                false
            }
        }
    }

    fn claim_section(&mut self, home: &mut Option<usize>, section: &str, file: usize) -> bool {
        let pointer = format!("/{section}");
        match *home {
            None => {
                *home = Some(file);
                true
            }
            Some(first) => {
                let first_name = self.name(first).to_owned();
                let first_span = self.span(first, &pointer, true);
                let d = self.push(
                    Severity::Error,
                    Code::DuplicateName,
                    file,
                    &pointer,
                    true,
                    format!("section `{section}` is defined in two files; first in {first_name}"),
                );
                *d = d
                    .clone()
                    .related(&first_name, first_span, "first defined here")
                    .hint(format!(
                        "keep one `{section}` section for the whole policies directory"
                    ));
                false
            }
        }
    }

    // ---- environment references ---------------------------------------

    /// Walks a document for `${…}`, reusing one pointer buffer (this runs
    /// over every node of every file, so it allocates only on a hit).
    fn env_references(
        &mut self,
        file: usize,
        value: &Value,
        pointer: &mut String,
        unset: UnsetEnv,
    ) {
        match value {
            Value::String(s) if s.contains("${") => {
                let here = pointer.clone();
                self.env_string(file, s, &here, unset);
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let len = pointer.len();
                    append_segment(pointer, &i.to_string());
                    self.env_references(file, v, pointer, unset);
                    pointer.truncate(len);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    let len = pointer.len();
                    append_segment(pointer, k);
                    if k.contains("${") {
                        let child = pointer.clone();
                        self.push(
                            Severity::Error,
                            Code::EnvReferenceNotAllowed,
                            file,
                            &child,
                            true,
                            format!("environment reference in key `{k}`"),
                        )
                        .hint = Some("only values expand `${env:…}`".into());
                    }
                    self.env_references(file, v, pointer, unset);
                    pointer.truncate(len);
                }
            }
            _ => {}
        }
    }

    fn env_string(&mut self, file: usize, text: &str, pointer: &str, unset: UnsetEnv) {
        // params_schema and bodies are data, not settings: `${` there is literal.
        let segs: Vec<&str> = pointer.split('/').skip(1).collect();
        let literal_zone = matches!(
            segs.as_slice(),
            ["operations", _, "params_schema", ..]
                | ["operations", _, "request", "body", ..]
                | ["operations", _, "fallback", "static", ..]
                | ["operations", _, "description"]
        );
        if literal_zone {
            return;
        }
        let allowed = matches!(
            segs.as_slice(),
            ["upstreams", _, "base_url"]
                | ["upstreams", _, "headers", _]
                | ["operations", _, "request", "headers", _]
                | ["operations", _, "dlq", "alert", "webhook"]
        );
        let parsed = match EnvString::parse(text) {
            Ok(p) => p,
            Err(e) => {
                self.error(Code::BadEnvReference, file, pointer, e.message)
                    .hint = Some("write `${env:NAME}` or `${env:NAME:-default}`".into());
                return;
            }
        };
        if !parsed.has_references() {
            return;
        }
        if !allowed {
            self.error(
                Code::EnvReferenceNotAllowed,
                file,
                pointer,
                "environment references are not expanded here".into(),
            )
            .hint = Some(
                "`${env:…}` works in base_url, headers and dlq.alert.webhook; write `$${` for a literal `${`"
                    .into(),
            );
            return;
        }
        let severity = match unset {
            UnsetEnv::Warn => Severity::Warning,
            UnsetEnv::Error => Severity::Error,
            UnsetEnv::Ignore => return,
        };
        let missing: Vec<String> = parsed
            .required_vars()
            .filter(|name| std::env::var_os(name).is_none_or(|v| v.is_empty()))
            .map(str::to_owned)
            .collect();
        for name in missing {
            self.push(
                severity,
                Code::UnsetEnv,
                file,
                pointer,
                false,
                format!("environment variable `{name}` is not set and has no default"),
            )
            .hint = Some(format!(
                "set `{name}` where claygate serves, or write `${{env:{name}:-default}}`"
            ));
        }
    }

    // ---- upstreams, timeouts, defaults ---------------------------------

    fn upstreams(&mut self, set: &PolicySet, homes: &Homes) {
        let used: BTreeSet<&str> = set
            .operations
            .values()
            .map(|o| o.upstream.as_str())
            .collect();
        for (name, u) in &set.upstreams {
            let file = homes.upstreams[name];
            let base = ptr(&["upstreams", name]);
            if let Some(url) = expand_if_set(&u.base_url) {
                self.url(
                    file,
                    &push_segment(&base, "base_url"),
                    &u.base_url,
                    &url,
                    "base_url",
                );
            }
            for header in u.headers.keys() {
                self.header_name(file, &ptr(&["upstreams", name, "headers", header]), header);
            }
            if let Some(max) = u.max_concurrency {
                for (class, limits) in &u.priorities {
                    if limits.concurrency > max {
                        self.warn(
                            Code::ClassExceedsMaxConcurrency,
                            file,
                            &ptr(&["upstreams", name, "priorities", class.as_str(), "concurrency"]),
                            format!(
                                "class `{class}` allows {} calls but the upstream's max_concurrency is {max}",
                                limits.concurrency
                            ),
                        )
                        .hint = Some("the class can never use more than max_concurrency slots".into());
                    }
                }
            }
            if !used.contains(name.as_str()) && self.elsewhere.complete {
                self.push(
                    Severity::Warning,
                    Code::UnusedUpstream,
                    file,
                    &base,
                    true,
                    format!("upstream `{name}` is not used by any operation"),
                );
            }
        }
    }

    fn timeouts_and_defaults(&mut self, set: &PolicySet, homes: &Homes) {
        let mut used: BTreeSet<&str> = BTreeSet::new();
        used.insert("connect");
        if let Some(TimeoutRef::Class(c)) = &set.defaults.timeout {
            used.insert(c);
        }
        for op in set.operations.values() {
            match op.timeout.as_ref().or(set.defaults.timeout.as_ref()) {
                Some(TimeoutRef::Class(c)) => {
                    used.insert(c);
                }
                Some(TimeoutRef::Literal(_)) => {}
                None => {
                    used.insert("request");
                }
            }
        }
        for name in set.timeouts.keys() {
            if !used.contains(name.as_str()) && self.elsewhere.complete {
                let file = homes.timeouts[name];
                self.push(
                    Severity::Warning,
                    Code::UnusedTimeoutClass,
                    file,
                    &ptr(&["timeouts", name]),
                    true,
                    format!("timeout class `{name}` is not used by any operation"),
                );
            }
        }
        if let Some(file) = homes.defaults {
            if let Some(TimeoutRef::Class(c)) = &set.defaults.timeout {
                self.timeout_class(set, file, "/defaults/timeout", c);
            }
            if let Some(b) = &set.defaults.breaker {
                self.breaker_bounds(
                    file,
                    "/defaults/breaker",
                    &EffectiveBreaker::resolve(Some(b), None),
                    b,
                );
            }
            if let Some(b) = set.defaults.retry.as_ref().and_then(|r| r.backoff.as_ref()) {
                self.backoff_order(file, "/defaults/retry/backoff", b);
            }
        }
    }

    fn timeout_class(&mut self, set: &PolicySet, file: usize, pointer: &str, class: &str) -> bool {
        if set.timeouts.contains_key(class) || self.elsewhere.has_timeout(class) {
            return true;
        }
        let known: Vec<&str> = set.timeouts.keys().map(String::as_str).collect();
        let hint = match did_you_mean(class, known.iter().copied()) {
            Some(best) => format!("did you mean `{best}`?"),
            None if known.is_empty() => {
                "define it under `timeouts`, or write a duration such as 30s".into()
            }
            None => format!(
                "known classes: {}; or write a duration such as 30s",
                known.join(", ")
            ),
        };
        self.error(
            Code::UnknownTimeoutClass,
            file,
            pointer,
            format!("unknown timeout class `{class}`"),
        )
        .hint = Some(hint);
        false
    }

    /// Checks that `expanded` (the policy's `written` text with its
    /// `${env:…}` references filled in) is an http(s) URL with a host. The
    /// expanded text is never echoed when it came from the environment: a
    /// posted `base_url: "${env:CLAY_API_KEY}:"` must not answer the key.
    fn url(&mut self, file: usize, pointer: &str, written: &str, expanded: &str, what: &str) {
        let from_env = EnvString::parse(written)
            .ok()
            .filter(EnvString::has_references);
        let subject = match &from_env {
            // The source form: the references, not their values.
            Some(template) => format!("{what}: the value of `{template}`"),
            None => what.to_owned(),
        };
        match url::Url::parse(expanded) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(u) => {
                let found = if from_env.is_some() {
                    String::new()
                } else if matches!(u.scheme(), "http" | "https") {
                    ", found no host".to_owned()
                } else {
                    format!(", found scheme `{}`", u.scheme())
                };
                self.error(
                    Code::InvalidUrl,
                    file,
                    pointer,
                    format!("{subject} is not an http or https URL with a host{found}"),
                );
            }
            Err(e) => {
                // `url`'s parse errors are fixed texts ("invalid port
                // number"), never the input.
                self.error(
                    Code::InvalidUrl,
                    file,
                    pointer,
                    format!("{subject} is not a URL: {e}"),
                )
                .hint = Some("write it like `https://api.clay.com`".into());
            }
        }
    }

    fn header_name(&mut self, file: usize, pointer: &str, name: &str) {
        if name.contains("${") {
            return; // reported as env-reference-not-allowed
        }
        let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(tchar) {
            self.push(
                Severity::Error,
                Code::InvalidHeaderName,
                file,
                pointer,
                true,
                format!("`{name}` is not a valid HTTP header name"),
            )
            .hint = Some("header names are letters, digits and `-`, e.g. `X-Request-Id`".into());
        }
    }

    /// Checks the merged breaker `b`, judging only what `own` (the section
    /// being checked) writes, so a value inherited from `defaults` is reported
    /// once, where it is written.
    fn breaker_bounds(
        &mut self,
        file: usize,
        base: &str,
        b: &EffectiveBreaker,
        own: &BreakerPolicy,
    ) {
        if let Some(max) = b.max_reset_timeout.value
            && max < b.reset_timeout.value
            && (own.max_reset_timeout.is_some() || own.reset_timeout.is_some())
        {
            let field = if own.max_reset_timeout.is_some() {
                "max_reset_timeout"
            } else {
                "reset_timeout"
            };
            self.error(
                Code::BoundsOrder,
                file,
                &format!("{base}/{field}"),
                format!(
                    "max_reset_timeout {max} is shorter than reset_timeout {}",
                    b.reset_timeout.value
                ),
            );
        }
        if own.volume_threshold == Some(0) {
            self.warn(
                Code::VolumeThresholdZero,
                file,
                &format!("{base}/volume_threshold"),
                "volume_threshold 0 lets the breaker open on the very first failure".into(),
            )
            .hint = Some("a threshold of at least 5-10 calls avoids opening on noise".into());
        }
        if own.window.is_none() && own.buckets.is_none() {
            return;
        }
        let field = if own.buckets.is_some() {
            "buckets"
        } else {
            "window"
        };
        let window = b.window.value.as_millis();
        let buckets = u64::from(b.buckets.value);
        if buckets > window {
            self.warn(
                Code::UnevenBuckets,
                file,
                &format!("{base}/{field}"),
                format!("{buckets} buckets are more than the window's {window} milliseconds"),
            );
        } else if buckets > 0 && !window.is_multiple_of(buckets) {
            self.warn(
                Code::UnevenBuckets,
                file,
                &format!("{base}/{field}"),
                format!(
                    "window {} does not split evenly into {buckets} buckets",
                    b.window.value
                ),
            )
            .hint =
                Some("pick a bucket count that divides the window, e.g. 10s and 10 buckets".into());
        }
    }

    fn backoff_order(&mut self, file: usize, base: &str, b: &Backoff) {
        if b.initial > b.max {
            self.error(
                Code::BoundsOrder,
                file,
                &format!("{base}/initial"),
                format!(
                    "back-off initial {} is longer than its max {}",
                    b.initial, b.max
                ),
            );
        }
    }

    // ---- operations ----------------------------------------------------

    fn operation(&mut self, set: &PolicySet, name: &str, op: &Operation, file: usize) {
        let base = ptr(&["operations", name]);
        let at = |rest: &[&str]| {
            let mut p = base.clone();
            for s in rest {
                p = push_segment(&p, s);
            }
            p
        };

        // Upstream and bulkhead class.
        let upstream = set.upstreams.get(&op.upstream);
        if upstream.is_none() && !self.elsewhere.has_upstream(&op.upstream) {
            let known: Vec<&str> = set.upstreams.keys().map(String::as_str).collect();
            let hint = match did_you_mean(&op.upstream, known.iter().copied()) {
                Some(best) => format!("did you mean `{best}`?"),
                None if known.is_empty() => "define it under `upstreams`".into(),
                None => format!("known upstreams: {}", known.join(", ")),
            };
            self.error(
                Code::UnknownUpstream,
                file,
                &at(&["upstream"]),
                format!("unknown upstream `{}`", op.upstream),
            )
            .hint = Some(hint);
        }
        let priority = op
            .priority
            .or(set.defaults.priority)
            .unwrap_or(Priority::Normal);
        if let Some(u) = upstream {
            let explicit = op.priority.is_some();
            if u.priorities.is_empty() {
                if explicit {
                    self.error(
                        Code::UnknownPriority,
                        file,
                        &at(&["priority"]),
                        format!(
                            "priority `{priority}` but upstream `{}` defines no bulkhead classes",
                            op.upstream
                        ),
                    )
                    .hint = Some(format!(
                        "add `priorities` to upstream `{}`, or remove `priority`",
                        op.upstream
                    ));
                }
            } else if !u.priorities.contains_key(&priority) {
                let known: Vec<&str> = u.priorities.keys().map(|p| p.as_str()).collect();
                let pointer = if explicit {
                    at(&["priority"])
                } else {
                    base.clone()
                };
                let how = if explicit { "" } else { " (the default)" };
                self.push(
                    Severity::Error,
                    Code::UnknownPriority,
                    file,
                    &pointer,
                    !explicit,
                    format!(
                        "priority `{priority}`{how} is not a class of upstream `{}`",
                        op.upstream
                    ),
                )
                .hint = Some(format!("the upstream's classes are {}", known.join(", ")));
            }
        }

        // Timeouts and deadline.
        if let Some(TimeoutRef::Class(c)) = &op.timeout {
            self.timeout_class(set, file, &at(&["timeout"]), c);
        }
        let attempt = resolve_timeout(&set.timeouts, op, &set.defaults);
        if let (Some(deadline), Some(attempt)) = (op.deadline, attempt) {
            if deadline < attempt {
                self.error(
                    Code::DeadlineShorterThanTimeout,
                    file,
                    &at(&["deadline"]),
                    format!("deadline {deadline} is shorter than the attempt timeout {attempt}"),
                )
                .hint = Some(
                    "the deadline bounds every attempt together; make it at least one attempt long"
                        .into(),
                );
            }
            if let Some(class) = upstream.and_then(|u| u.priorities.get(&priority))
                && class.queue_timeout > deadline
            {
                self.warn(
                        Code::QueueTimeoutExceedsDeadline,
                        file,
                        &at(&["deadline"]),
                        format!(
                            "class `{priority}` of upstream `{}` may queue a call for {}, longer than this deadline {deadline}",
                            op.upstream, class.queue_timeout
                        ),
                    )
                    .hint = Some("the deadline will cut queueing short; lower queue_timeout or raise the deadline".into());
            }
        }

        // Params: the schema itself, templates and keys that name params.
        let declared = self.params_schema(
            set,
            name,
            file,
            &at(&["params_schema"]),
            op.params_schema.as_ref(),
        );
        let mut used_params: Vec<(String, String)> = Vec::new();
        self.template(
            file,
            &at(&["request", "path"]),
            &op.request.path,
            &mut used_params,
        );
        for (k, v) in &op.request.query {
            self.template(file, &at(&["request", "query", k]), v, &mut used_params);
        }
        for (k, v) in &op.request.headers {
            self.header_name(file, &at(&["request", "headers", k]), k);
            self.template(file, &at(&["request", "headers", k]), v, &mut used_params);
        }
        if let Some(body) = &op.request.body {
            self.body_templates(file, &at(&["request", "body"]), body, &mut used_params);
        }
        match &declared {
            Some(Some(props)) => {
                for (param, pointer) in &used_params {
                    if !props.contains(param) {
                        let hint = match did_you_mean(param, props.iter().map(String::as_str)) {
                            Some(best) => format!("did you mean `{best}`?"),
                            None => format!("declare `{param}` under params_schema.properties"),
                        };
                        self.error(
                            Code::UnknownTemplateParam,
                            file,
                            pointer,
                            format!("template names param `{param}`, which params_schema does not declare"),
                        )
                        .hint = Some(hint);
                    }
                }
            }
            Some(None) => {}
            None if !used_params.is_empty() => {
                self.push(
                    Severity::Warning,
                    Code::MissingParamsSchema,
                    file,
                    &base,
                    true,
                    format!(
                        "templates use params ({}) but the operation has no params_schema",
                        used_params
                            .iter()
                            .map(|(p, _)| format!("`{p}`"))
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .hint = Some(
                    "declare params_schema so bad params get a 422 instead of a broken request"
                        .into(),
                );
            }
            None => {}
        }
        if let (Some(Some(props)), Some(idem)) = (&declared, &op.idempotency) {
            for (i, key) in idem.key.iter().enumerate() {
                self.key_param(
                    file,
                    &at(&["idempotency", "key", &i.to_string()]),
                    key,
                    props,
                );
            }
        }
        if let (Some(Some(props)), Some(keys)) = (
            &declared,
            op.fallback
                .as_ref()
                .and_then(|f| f.cache.as_ref())
                .and_then(|c| c.key.as_ref()),
        ) {
            for (i, key) in keys.iter().enumerate() {
                self.key_param(
                    file,
                    &at(&["fallback", "cache", "key", &i.to_string()]),
                    key,
                    props,
                );
            }
        }

        // Retry: bounds, and no blind retry of writes.
        let retry = EffectiveRetry::resolve(op.retry.as_ref(), set.defaults.retry.as_ref());
        if let Some(b) = op.retry.as_ref().and_then(|r| r.backoff.as_ref()) {
            self.backoff_order(file, &at(&["retry", "backoff"]), b);
        }
        if !op.request.method.is_idempotent()
            && retry.max_attempts.value > 1
            && op.idempotency.is_none()
        {
            let from = match retry.max_attempts.from {
                super::effective::Source::Operation => "",
                super::effective::Source::Defaults => " (from defaults.retry)",
                super::effective::Source::BuiltIn => " (the built-in default)",
            };
            self.error(
                Code::RetryWithoutIdempotency,
                file,
                &at(&["request", "method"]),
                format!(
                    "{} is retried up to {} times{from} without an idempotency key, so a retry may apply it twice",
                    op.request.method.as_str(),
                    retry.max_attempts.value
                ),
            )
            .hint = Some("add `idempotency: { key: [...] }`, or set `retry: { max_attempts: 1 }`".into());
        }

        // Breaker.
        if let Some(b) = &op.breaker {
            let eff = EffectiveBreaker::resolve(Some(b), set.defaults.breaker.as_ref());
            self.breaker_bounds(file, &at(&["breaker"]), &eff, b);
        }

        // Fallback staleness.
        if let Some(c) = op.fallback.as_ref().and_then(|f| f.cache.as_ref())
            && !(c.fresh <= c.stale && c.stale <= c.very_stale)
        {
            self.error(
                Code::StalenessOrder,
                file,
                &at(&["fallback", "cache"]),
                format!(
                    "staleness limits out of order: fresh {}, stale {}, very_stale {}",
                    c.fresh, c.stale, c.very_stale
                ),
            )
            .hint = Some("they must grow: fresh <= stale <= very_stale".into());
        }

        // DLQ: back-off bounds and webhook. (An idempotency key held by a
        // dead letter lives as long as the entry, whatever its ttl.)
        if let Some(dlq) = &op.dlq {
            if let Some(b) = &dlq.backoff {
                self.backoff_order(file, &at(&["dlq", "backoff"]), b);
            }
            if let Some(hook) = dlq.alert.as_ref().and_then(|a| a.webhook.as_ref())
                && let Some(url) = expand_if_set(hook).filter(|u| !u.is_empty())
            {
                self.url(
                    file,
                    &at(&["dlq", "alert", "webhook"]),
                    hook,
                    &url,
                    "webhook",
                );
            }
        }
    }

    /// Checks `params_schema`. Returns `None` when absent, `Some(None)` when it
    /// declares no property list (any name may be valid), else the names.
    fn params_schema(
        &mut self,
        set: &PolicySet,
        operation: &str,
        file: usize,
        pointer: &str,
        schema: Option<&Value>,
    ) -> Option<Option<BTreeSet<String>>> {
        let schema = schema?;
        let hash = value_hash(schema);
        let known = self.validators.get(&hash).is_some_and(|built| {
            built.iter().any(|(op, _)| {
                set.operations
                    .get(op)
                    .and_then(|o| o.params_schema.as_ref())
                    == Some(schema)
            })
        });
        if !known {
            match params_validator(schema) {
                Ok(v) => {
                    self.validators
                        .entry(hash)
                        .or_default()
                        .push((operation.to_owned(), Arc::new(v)));
                }
                Err(e) => {
                    let inner = e.instance_path().as_str();
                    let at = format!("{pointer}{inner}");
                    self.error(
                        Code::InvalidParamsSchema,
                        file,
                        &at,
                        format!("params_schema is not a valid JSON Schema: {e}"),
                    );
                    return Some(None);
                }
            }
        }
        match schema.get("properties").and_then(Value::as_object) {
            Some(props) => Some(Some(props.keys().cloned().collect())),
            None => Some(None),
        }
    }

    fn key_param(&mut self, file: usize, pointer: &str, key: &str, props: &BTreeSet<String>) {
        let first = key.split('.').next().unwrap_or(key);
        if !props.contains(first) {
            let hint = match did_you_mean(first, props.iter().map(String::as_str)) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!(
                    "declared params: {}",
                    props.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            self.error(
                Code::UnknownKeyParam,
                file,
                pointer,
                format!("key names param `{key}`, which params_schema does not declare"),
            )
            .hint = Some(hint);
        }
    }

    fn template(
        &mut self,
        file: usize,
        pointer: &str,
        text: &str,
        used: &mut Vec<(String, String)>,
    ) {
        if !text.contains("{{") && !text.contains("}}") {
            return;
        }
        match Template::parse(text) {
            Ok(t) => {
                for path in t.params() {
                    if let Some(first) = path.first() {
                        used.push((first.clone(), pointer.to_owned()));
                    }
                }
            }
            Err(e) => {
                self.error(Code::BadTemplate, file, pointer, e.message).hint =
                    Some("placeholders read `{{ params.NAME }}`".into());
            }
        }
    }

    fn body_templates(
        &mut self,
        file: usize,
        pointer: &str,
        body: &Value,
        used: &mut Vec<(String, String)>,
    ) {
        match body {
            Value::String(s) => self.template(file, pointer, s, used),
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.body_templates(file, &push_segment(pointer, &i.to_string()), v, used);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    self.body_templates(file, &push_segment(pointer, k), v, used);
                }
            }
            _ => {}
        }
    }
}
