//! `claygate explain`: one operation's pipeline, layer by layer, with every
//! effective value and where it came from (the operation, `defaults`, the
//! upstream, a timeout class, or claygate's built-in default).

use std::fmt::Write as _;

use serde::Serialize;

use crate::compile::{DEFAULT_IDEMPOTENCY_HEADER, DEFAULT_MAX_RESPONSE_BYTES};
use crate::pipeline::fallback::{DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES};
use crate::policy::PolicySet;
use crate::policy::effective::{
    EffectiveBreaker, EffectiveRetry, Source, Sourced, default_dlq_backoff, timeout_ref,
};
use crate::policy::model::{Backoff, Condition, Priority, TimeoutRef};

/// One setting of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Setting {
    /// The setting's name, as in policy files.
    pub name: String,
    /// Its effective value, as policy files would write it.
    pub value: String,
    /// Where the value came from.
    pub from: String,
}

/// One layer of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    /// The layer's name.
    pub layer: &'static str,
    /// Its settings; empty when the layer is off.
    pub settings: Vec<Setting>,
}

/// The explanation of one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The operation.
    pub operation: String,
    /// Where it is defined, `file:line:col`.
    pub defined_at: String,
    /// The layers, outermost first.
    pub layers: Vec<Layer>,
}

fn from(source: Source) -> String {
    match source {
        Source::Operation => "operation".into(),
        Source::Defaults => "defaults".into(),
        Source::BuiltIn => "built-in".into(),
    }
}

fn setting<T>(name: &str, s: &Sourced<T>, show: impl Fn(&T) -> String) -> Setting {
    Setting {
        name: name.into(),
        value: show(&s.value),
        from: from(s.from),
    }
}

fn fixed(name: &str, value: impl Into<String>, from: impl Into<String>) -> Setting {
    Setting {
        name: name.into(),
        value: value.into(),
        from: from.into(),
    }
}

fn conditions(c: &[Condition]) -> String {
    c.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
}

fn backoff(b: &Backoff) -> String {
    format!(
        "{} x{} up to {}, {} jitter",
        b.initial,
        b.multiplier,
        b.max,
        match b.jitter {
            crate::policy::model::Jitter::Full => "full",
            crate::policy::model::Jitter::Equal => "equal",
            crate::policy::model::Jitter::None => "no",
        }
    )
}

/// Explains `name`; `None` when the set has no such operation.
pub fn explain(set: &PolicySet, name: &str) -> Option<Explanation> {
    let op = set.operations.get(name)?;
    let upstream = set.upstreams.get(&op.upstream)?;
    let at_upstream = format!("upstream {}", op.upstream);
    let mut layers = Vec::new();

    let mut idem = Vec::new();
    if let Some(i) = &op.idempotency {
        idem.push(fixed(
            "key",
            format!("sha256 of [{}]", i.key.join(", ")),
            "operation",
        ));
        idem.push(fixed(
            "ttl",
            i.ttl.map_or("24h".into(), |d| d.to_string()),
            if i.ttl.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
        idem.push(fixed(
            "header",
            i.header
                .clone()
                .unwrap_or(DEFAULT_IDEMPOTENCY_HEADER.into()),
            if i.header.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
        idem.push(fixed(
            "on_concurrent",
            match i.on_concurrent {
                Some(crate::policy::model::OnConcurrent::Reject) => "reject",
                _ => "wait",
            },
            if i.on_concurrent.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
    }
    layers.push(Layer {
        layer: "idempotency",
        settings: idem,
    });

    let mut fallback = Vec::new();
    if let Some(f) = &op.fallback {
        if let Some(c) = &f.cache {
            fallback.push(fixed(
                "cache",
                format!(
                    "fresh {}, stale {}, very_stale {}",
                    c.fresh, c.stale, c.very_stale
                ),
                "operation",
            ));
            fallback.push(fixed(
                "cache.max_entries",
                c.max_entries
                    .map_or(DEFAULT_MAX_ENTRIES.to_string(), |n| n.to_string()),
                if c.max_entries.is_some() {
                    "operation"
                } else {
                    "built-in"
                },
            ));
            fallback.push(fixed(
                "cache.max_bytes",
                c.max_bytes
                    .map_or(DEFAULT_MAX_BYTES.to_string(), |n| n.to_string()),
                if c.max_bytes.is_some() {
                    "operation"
                } else {
                    "built-in"
                },
            ));
        }
        if let Some(v) = &f.static_value {
            fallback.push(fixed("static", v.to_string(), "operation"));
        }
    }
    layers.push(Layer {
        layer: "fallback",
        settings: fallback,
    });

    layers.push(Layer {
        layer: "deadline",
        settings: op
            .deadline
            .map(|d| vec![fixed("deadline", d.to_string(), "operation")])
            .unwrap_or_default(),
    });

    let r = EffectiveRetry::resolve(op.retry.as_ref(), set.defaults.retry.as_ref());
    layers.push(Layer {
        layer: "retry",
        settings: vec![
            setting("max_attempts", &r.max_attempts, u32::to_string),
            setting("backoff", &r.backoff, backoff),
            setting("on", &r.on, |c| conditions(c)),
            setting(
                "respect_retry_after",
                &r.respect_retry_after,
                bool::to_string,
            ),
            setting("budget_percent", &r.budget_percent, |p| format!("{p}%")),
        ],
    });

    let b = EffectiveBreaker::resolve(op.breaker.as_ref(), set.defaults.breaker.as_ref());
    let mut breaker = vec![
        setting("mode", &b.mode, |m| match m {
            crate::policy::model::BreakerMode::Enforce => "enforce".into(),
            crate::policy::model::BreakerMode::MetricsOnly => "metrics_only".into(),
        }),
        setting(
            "error_threshold_percentage",
            &b.error_threshold_percentage,
            |p| format!("{p}%"),
        ),
        setting("volume_threshold", &b.volume_threshold, u32::to_string),
        setting("window", &b.window, ToString::to_string),
        setting("buckets", &b.buckets, u32::to_string),
        setting("reset_timeout", &b.reset_timeout, ToString::to_string),
        setting("max_reset_timeout", &b.max_reset_timeout, |d| {
            d.map_or("none (fixed)".into(), |d| d.to_string())
        }),
        setting("half_open_trials", &b.half_open_trials, u32::to_string),
        setting(
            "half_open_max_wait",
            &b.half_open_max_wait,
            ToString::to_string,
        ),
        setting("failure_on", &b.failure_on, |c| conditions(c)),
    ];
    breaker.push(setting("slow_call", &b.slow_call, |s| {
        s.as_ref().map_or("off".into(), |s| {
            format!("slower than {} at {}%", s.duration, s.threshold_percentage)
        })
    }));
    layers.push(Layer {
        layer: "breaker",
        settings: breaker,
    });

    let priority = match (op.priority, set.defaults.priority) {
        (Some(p), _) => (p, "operation"),
        (None, Some(p)) => (p, "defaults"),
        (None, None) => (Priority::Normal, "built-in"),
    };
    let mut bulkhead = Vec::new();
    if let Some(class) = upstream.priorities.get(&priority.0) {
        bulkhead.push(fixed("priority", priority.0.as_str(), priority.1));
        bulkhead.push(fixed(
            "class",
            format!(
                "{} slots, queue {}, queue_timeout {}",
                class.concurrency, class.queue, class.queue_timeout
            ),
            at_upstream.clone(),
        ));
        if let Some(max) = upstream.max_concurrency {
            bulkhead.push(fixed(
                "max_concurrency",
                max.to_string(),
                at_upstream.clone(),
            ));
        }
    }
    layers.push(Layer {
        layer: "bulkhead",
        settings: bulkhead,
    });

    let mut limit = Vec::new();
    if let Some(r) = &upstream.rate_limit {
        limit.push(fixed(
            "per_second",
            r.per_second.to_string(),
            at_upstream.clone(),
        ));
        limit.push(fixed(
            "burst",
            r.burst.unwrap_or(r.per_second).to_string(),
            at_upstream.clone(),
        ));
        limit.push(fixed(
            "critical_reserve_percent",
            format!("{}%", r.critical_reserve_percent.unwrap_or(0)),
            at_upstream.clone(),
        ));
    }
    layers.push(Layer {
        layer: "rate_limit",
        settings: limit,
    });

    let t = timeout_ref(op, &set.defaults);
    let attempt = set
        .attempt_timeout(op)
        .map_or("?".into(), |d| d.to_string());
    let timeout_from = match &t.value {
        Some(TimeoutRef::Class(c)) => format!("{} (class {c})", from(t.from)),
        Some(TimeoutRef::Literal(_)) => from(t.from),
        None if set.timeouts.contains_key("request") => "timeouts.request".into(),
        None => "built-in".into(),
    };
    let connect_from = if set.timeouts.contains_key("connect") {
        "timeouts.connect"
    } else {
        "built-in"
    };
    layers.push(Layer {
        layer: "timeout",
        settings: vec![
            fixed("attempt", attempt, timeout_from),
            fixed("connect", set.connect_timeout().to_string(), connect_from),
        ],
    });

    // The source form only: an expanded URL may carry a key in its query.
    let shown_base = upstream.base_url.clone();
    let mut http = vec![
        fixed(
            "request",
            format!("{} {}", op.request.method.as_str(), op.request.path),
            "operation",
        ),
        fixed("base_url", shown_base, at_upstream.clone()),
        fixed(
            "headers",
            upstream
                .headers
                .keys()
                .chain(op.request.headers.keys())
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            "upstream and operation (values never shown)",
        ),
        fixed(
            "max_response_bytes",
            upstream
                .max_response_bytes
                .map_or(DEFAULT_MAX_RESPONSE_BYTES.to_string(), |b| b.to_string()),
            if upstream.max_response_bytes.is_some() {
                at_upstream.as_str()
            } else {
                "built-in"
            },
        ),
    ];
    if let Some(body) = &op.request.body {
        http.push(fixed("body", body.to_string(), "operation"));
    }
    layers.push(Layer {
        layer: "http",
        settings: http,
    });

    let mut dlq = Vec::new();
    if let Some(d) = &op.dlq {
        dlq.push(fixed(
            "max_attempts",
            d.max_attempts.unwrap_or(5).to_string(),
            if d.max_attempts.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
        dlq.push(fixed(
            "backoff",
            backoff(&d.backoff.clone().unwrap_or_else(default_dlq_backoff)),
            if d.backoff.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
        dlq.push(fixed(
            "redrive_rate",
            format!("{}/s", d.redrive_rate.unwrap_or(10)),
            if d.redrive_rate.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
        dlq.push(fixed(
            "retention",
            d.retention.map_or("14d".into(), |r| r.to_string()),
            if d.retention.is_some() {
                "operation"
            } else {
                "built-in"
            },
        ));
    }
    layers.push(Layer {
        layer: "dlq",
        settings: dlq,
    });

    let defined_at = set
        .origins
        .operations
        .get(name)
        .map(|o| match o.span {
            Some(s) => format!("{}:{}:{}", o.file, s.line, s.column),
            None => o.file.clone(),
        })
        .unwrap_or_default();
    Some(Explanation {
        operation: name.to_owned(),
        defined_at,
        layers,
    })
}

/// Renders an explanation as aligned text.
pub fn render_text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "operation {}  ({})", e.operation, e.defined_at);
    let _ = writeln!(out, "layers, outermost first:");
    let width = e
        .layers
        .iter()
        .flat_map(|l| l.settings.iter().map(|s| s.name.len() + s.value.len()))
        .max()
        .unwrap_or(0)
        .min(52)
        + 2;
    for (i, layer) in e.layers.iter().enumerate() {
        if layer.settings.is_empty() {
            let _ = writeln!(out, "{:>2}. {:<12} off", i + 1, layer.layer);
            continue;
        }
        for (j, s) in layer.settings.iter().enumerate() {
            let head = if j == 0 {
                format!("{:>2}. {:<12}", i + 1, layer.layer)
            } else {
                " ".repeat(16)
            };
            let pair = format!("{} {}", s.name, s.value);
            let _ = writeln!(out, "{head} {pair:<width$} [{}]", s.from);
        }
    }
    out
}
