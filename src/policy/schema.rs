//! The JSON Schema of the policy language: embedded, checked, and turned into diagnostics.
//!
//! `schemas/policy.schema.json` is the normative definition of a policy file.
//! It is compiled into the binary, so `claygate schema` prints exactly what
//! `claygate validate` checks against.

use std::sync::LazyLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::diagnostic::{Code, Diagnostic};
use super::load::{SpanIndex, parent_pointer, push_segment};

/// The policy schema's text, as shipped in `schemas/policy.schema.json`.
pub const SCHEMA_TEXT: &str = include_str!("../../schemas/policy.schema.json");

static SCHEMA: LazyLock<Result<(Value, Validator), String>> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(SCHEMA_TEXT).map_err(|e| e.to_string())?;
    let validator = jsonschema::draft202012::new(&schema).map_err(|e| e.to_string())?;
    Ok((schema, validator))
});

/// The schema as a JSON value.
pub fn schema() -> Result<&'static Value, String> {
    SCHEMA.as_ref().map(|(s, _)| s).map_err(Clone::clone)
}

/// Checks one document against the policy schema; every violation is a diagnostic.
pub fn check(file: &str, doc: &Value, spans: &SpanIndex) -> Vec<Diagnostic> {
    let (schema, validator) = match SCHEMA.as_ref() {
        Ok(pair) => (&pair.0, &pair.1),
        Err(e) => {
            return vec![Diagnostic::error(
                Code::InvalidValue,
                file,
                None,
                format!("the built-in policy schema does not load: {e}"),
            )];
        }
    };
    let mut out: Vec<Diagnostic> = validator
        .iter_errors(doc)
        .flat_map(|e| to_diagnostics(file, schema, spans, &e))
        .collect();
    out.dedup();
    out
}

/// The subschema that governs the node at `pointer`, following `properties`,
/// `additionalProperties`, `items` and local `$ref`s.
pub fn schema_at<'s>(schema: &'s Value, pointer: &str) -> Option<&'s Value> {
    let mut node = resolve(schema, schema)?;
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        let next = node
            .get("properties")
            .and_then(|p| p.get(&seg))
            .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
            .or_else(|| node.get("items").filter(|a| a.is_object()))?;
        node = resolve(schema, next)?;
    }
    Some(node)
}

fn resolve<'s>(root: &'s Value, mut node: &'s Value) -> Option<&'s Value> {
    for _ in 0..16 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => node = root.pointer(r.strip_prefix('#')?)?,
            None => return Some(node),
        }
    }
    None
}

/// The property names an object schema allows, for "did you mean" hints.
fn known_properties(schema: &Value, pointer: &str) -> Vec<String> {
    schema_at(schema, pointer)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The closest candidate to `word`, if any is close enough to be a likely typo.
pub fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let word_lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&word_lower, &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// The last key of a pointer, for messages ("`window` must be …").
fn field_name(pointer: &str) -> String {
    let last = pointer.rsplit('/').next().unwrap_or("");
    let last = last.replace("~1", "/").replace("~0", "~");
    if last.is_empty() {
        "the document".to_owned()
    } else if last.bytes().all(|b| b.is_ascii_digit()) {
        let parent = parent_pointer(pointer).map(field_name).unwrap_or_default();
        format!("{parent}[{last}]")
    } else {
        format!("`{last}`")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

fn shown(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(_) => return "a sequence".into(),
        Value::Object(_) => return "a mapping".into(),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("`{cut}...`")
    } else {
        format!("`{text}`")
    }
}

fn to_diagnostics(
    file: &str,
    schema: &Value,
    spans: &SpanIndex,
    e: &ValidationError<'_>,
) -> Vec<Diagnostic> {
    let pointer = e.instance_path().as_str().to_owned();
    let instance = e.instance();
    let name = field_name(&pointer);
    let at_value = spans.value_span(&pointer);
    let description = schema_at(schema, &pointer)
        .and_then(|s| s.get("description"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let diag =
        |code: Code, message: String| Diagnostic::error(code, file, at_value, message).at(&pointer);
    match e.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let known = known_properties(schema, &pointer);
            unexpected
                .iter()
                .map(|key| {
                    let child = push_segment(&pointer, key);
                    let where_ = if pointer.is_empty() {
                        "at the top level".to_owned()
                    } else {
                        format!("in {name}")
                    };
                    let mut d = Diagnostic::error(
                        Code::UnknownField,
                        file,
                        spans.key_span(&child),
                        format!("unknown field `{key}` {where_}"),
                    )
                    .at(&child);
                    d.hint = Some(match did_you_mean(key, known.iter().map(String::as_str)) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None if known.is_empty() => "remove it".to_owned(),
                        None => format!("known fields: {}", known.join(", ")),
                    });
                    d
                })
                .collect()
        }
        ValidationErrorKind::Required { property } => {
            let key = property.as_str().unwrap_or("?");
            let what = if pointer.is_empty() {
                "the document".to_owned()
            } else {
                name
            };
            let mut d = Diagnostic::error(
                Code::MissingField,
                file,
                spans.key_span(&pointer),
                format!("missing required field `{key}` in {what}"),
            )
            .at(&pointer);
            if let Some(desc) = schema_at(schema, &push_segment(&pointer, key))
                .and_then(|s| s.get("description"))
                .and_then(Value::as_str)
            {
                d = d.hint(format!("`{key}`: {desc}"));
            }
            vec![d]
        }
        ValidationErrorKind::Type { .. } if is_duration_schema(schema, &pointer) => {
            let found = match instance.as_ref() {
                Value::Number(n) => n.to_string(),
                other => json_type(other).to_owned(),
            };
            vec![
                diag(
                    Code::InvalidDuration,
                    format!(
                        "{name} must be a duration such as 250ms, 30s, 5m, 24h or 7d; found {}",
                        shown(instance)
                    ),
                )
                .hint(duration_hint(&found)),
            ]
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => format!("{set:?}"),
            };
            let mut d = diag(
                Code::InvalidType,
                format!(
                    "{name} must be {}, found {}",
                    article(&expected),
                    json_type(instance)
                ),
            );
            if let Some(desc) = description {
                d = d.hint(desc);
            }
            if instance.is_string()
                && matches!(
                    instance.as_str(),
                    Some("yes" | "no" | "on" | "off" | "y" | "n")
                )
            {
                d = d.hint(
                    "YAML 1.2 booleans are `true` and `false`; `yes`/`no`/`on`/`off` are strings",
                );
            }
            vec![d]
        }
        ValidationErrorKind::Constant { expected_value } if pointer == "/version" => {
            let message = if instance.is_string() {
                format!(
                    "`version` must be the number {expected_value}, not the string {}",
                    shown(instance)
                )
            } else {
                format!(
                    "unsupported policy language version {}; this claygate reads version {expected_value}",
                    shown(instance)
                )
            };
            vec![diag(Code::UnsupportedVersion, message).hint("write `version: 1`")]
        }
        ValidationErrorKind::Enum { options } => {
            let names: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let mut d = diag(
                Code::InvalidValue,
                format!(
                    "{name} must be one of {}; found {}",
                    names.join(", "),
                    shown(instance)
                ),
            );
            if let Some(s) = instance.as_str()
                && let Some(best) = did_you_mean(s, names.iter().map(String::as_str))
            {
                d = d.hint(format!("did you mean `{best}`?"));
            }
            vec![d]
        }
        ValidationErrorKind::Pattern { pattern } => {
            let (code, what) = if pattern.ends_with("(ms|s|m|h|d)$") && !pattern.contains("[a-z]") {
                (
                    Code::InvalidDuration,
                    "a duration such as 250ms, 30s, 5m, 24h or 7d".to_owned(),
                )
            } else if pattern.starts_with("^[a-z][a-z0-9_-]") {
                (
                    Code::InvalidName,
                    "a name of lowercase letters, digits, `_` and `-`, starting with a letter"
                        .to_owned(),
                )
            } else if pattern.starts_with("^([a-z]")
                && instance
                    .as_str()
                    .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit()))
            {
                // Starts with a digit: meant as a duration, never a class name.
                (
                    Code::InvalidDuration,
                    "a duration such as 250ms, 30s, 5m, 24h or 7d (or a timeout class name)"
                        .to_owned(),
                )
            } else if pattern.starts_with("^([a-z]") {
                (
                    Code::InvalidValue,
                    "a timeout class name or a duration such as 30s".to_owned(),
                )
            } else if pattern == "^/" {
                (Code::InvalidValue, "a path starting with `/`".to_owned())
            } else {
                (Code::InvalidValue, format!("text matching `{pattern}`"))
            };
            let mut d = diag(
                code,
                format!("{name} must be {what}; found {}", shown(instance)),
            );
            if code == Code::InvalidDuration {
                d = d.hint(duration_hint(instance.as_str().unwrap_or("")));
            }
            vec![d]
        }
        ValidationErrorKind::PropertyNames { error } => {
            let key = error.instance().as_str().unwrap_or("?").to_owned();
            let child = push_segment(&pointer, &key);
            let (code, hint) = match error.kind() {
                ValidationErrorKind::Enum { options } => {
                    let names: Vec<&str> = options
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let hint = match did_you_mean(&key, names.iter().copied()) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None => format!("the classes are {}", names.join(", ")),
                    };
                    (Code::InvalidName, hint)
                }
                _ => (
                    Code::InvalidName,
                    "names use lowercase letters, digits, `_` and `-`, start with a letter, and have at most 64 characters".to_owned(),
                ),
            };
            vec![
                Diagnostic::error(
                    code,
                    file,
                    spans.key_span(&child),
                    format!("invalid name `{key}` in {name}"),
                )
                .at(&child)
                .hint(hint),
            ]
        }
        ValidationErrorKind::Minimum { limit }
        | ValidationErrorKind::ExclusiveMinimum { limit } => {
            vec![diag(
                Code::OutOfRange,
                format!("{name} must be at least {limit}, found {}", shown(instance)),
            )]
        }
        ValidationErrorKind::Maximum { limit }
        | ValidationErrorKind::ExclusiveMaximum { limit } => {
            vec![diag(
                Code::OutOfRange,
                format!("{name} must be at most {limit}, found {}", shown(instance)),
            )]
        }
        ValidationErrorKind::MinItems { limit } => vec![diag(
            Code::OutOfRange,
            format!("{name} needs at least {limit} item(s)"),
        )],
        ValidationErrorKind::MinLength { .. } => {
            vec![diag(Code::OutOfRange, format!("{name} must not be empty"))]
        }
        ValidationErrorKind::MinProperties { .. } => {
            vec![diag(Code::OutOfRange, format!("{name} must not be empty"))]
        }
        ValidationErrorKind::UniqueItems => vec![diag(
            Code::InvalidValue,
            format!("{name} lists the same item twice"),
        )],
        _ => {
            let mut d = diag(
                Code::InvalidValue,
                format!("invalid value {} for {name}", shown(instance)),
            );
            if let Some(desc) = description {
                d = d.hint(desc);
            }
            vec![d]
        }
    }
}

/// True when the node at `pointer` must be a duration (its schema, or one
/// alternative of it, has a duration pattern).
fn is_duration_schema(schema: &Value, pointer: &str) -> bool {
    schema_at(schema, pointer)
        .and_then(|s| s.get("pattern"))
        .and_then(Value::as_str)
        .is_some_and(|p| p.ends_with("(ms|s|m|h|d)$"))
}

fn article(t: &str) -> String {
    match rename_type(t) {
        "integer" => "an integer".into(),
        "null" => "null".into(),
        other => format!("a {other}"),
    }
}

fn rename_type(t: &str) -> &str {
    match t {
        "object" => "mapping",
        "array" => "sequence",
        other => other,
    }
}

fn duration_hint(found: &str) -> String {
    let digits: String = found.chars().take_while(char::is_ascii_digit).collect();
    let rest = found[digits.len()..].trim().to_lowercase();
    let unit = match rest.as_str() {
        "" => None,
        r if r.starts_with("ms") || r.starts_with("milli") => Some("ms"),
        r if r.starts_with("sec") || r == "s" => Some("s"),
        r if r.starts_with("min") => Some("m"),
        r if r.starts_with('h') => Some("h"),
        r if r.starts_with('d') => Some("d"),
        _ => None,
    };
    match (digits.is_empty(), unit) {
        (false, Some(_)) if digits.trim_start_matches('0').is_empty() => {
            "durations must be positive here".to_owned()
        }
        (false, Some(u)) => format!("write `{digits}{u}`"),
        (false, None) if rest.is_empty() => format!("add a unit: `{digits}s` or `{digits}ms`"),
        _ => "write a whole number and a unit: ms, s, m, h or d".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_schema_compiles() {
        assert!(schema().is_ok(), "{:?}", schema().err());
    }

    #[test]
    fn schema_at_follows_refs_and_maps() {
        let s = schema().expect("schema loads");
        let breaker = schema_at(s, "/operations/x/breaker").expect("breaker schema");
        assert!(breaker["properties"].get("reset_timeout").is_some());
        let item = schema_at(s, "/operations/x/retry/on/0").expect("condition schema");
        assert!(item.get("anyOf").is_some());
    }

    #[test]
    fn typos_get_the_closest_field() {
        assert_eq!(
            did_you_mean("reset_timout", ["reset_timeout", "window", "buckets"]),
            Some("reset_timeout")
        );
        assert_eq!(did_you_mean("zzz", ["reset_timeout", "window"]), None);
    }

    #[test]
    fn duration_hints_suggest_a_spelling() {
        assert_eq!(duration_hint("10 seconds"), "write `10s`");
        assert_eq!(duration_hint("30"), "add a unit: `30s` or `30ms`");
        assert_eq!(duration_hint("0s"), "durations must be positive here");
    }
}
