//! The scenario's own copy of the policies, paced for a walk of a minute.
//!
//! The bundled policies are sized for production: breakers wait 30s before
//! a trial, the probe runs every 15s, answers stay fresh for minutes and an
//! operation counts as degraded for a minute after a fallback answer. A
//! narrated outage of a minute would show none of the recovery happening on
//! its own. So the scenario serves a copy, in a temporary directory, with
//! those few values shortened (and says which): the recovery is then the
//! policies' own, not the demo resetting things. The copy is watched like
//! any policy directory, and the scenario edits it once more mid-run (the
//! cache windows) to show a hot reload.
//!
//! Files are edited as data, not as text: each is read with the policy
//! loader, changed, and written back as JSON (which is YAML), so the edits
//! do not depend on how the files are laid out. Comments are not kept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::policy;

/// Why the copy cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare the scenario's copy of the policies ({path}): {source}", path = .path.display())]
pub struct PaceError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// The values the copy is paced with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    /// Every breaker's `reset_timeout` (and no `max_reset_timeout` growth).
    pub breaker_reset: Duration,
    /// Every upstream probe's `interval`.
    pub probe_interval: Duration,
    /// `health.fallback_window`.
    pub fallback_window: Duration,
}

/// A temporary copy of a policy directory, removed on drop.
#[derive(Debug)]
pub struct PolicyCopy {
    /// The directory served.
    pub dir: PathBuf,
    /// What was changed, one line each, for the narration.
    pub notes: Vec<String>,
}

impl Drop for PolicyCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `250ms`, `4s`: a duration as policies write it.
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PaceError + '_ {
    move |source| PaceError {
        path: path.to_path_buf(),
        source,
    }
}

/// One policy file as data; `None` when it does not parse (copied as is,
/// for the server to report).
struct File {
    name: String,
    text: String,
    value: Option<Value>,
}

fn read_dir(dir: &Path) -> Result<Vec<File>, PaceError> {
    let mut files = Vec::new();
    for path in policy::policy_files_in(dir).map_err(io(dir))? {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let value = match policy::load::parse_yaml(&name, &text) {
            Ok(Some(doc)) if doc.value.is_object() => Some(doc.value),
            _ => None,
        };
        files.push(File { name, text, value });
    }
    Ok(files)
}

/// Writes `file` into `dir` atomically (a dot-file renamed over it, so the
/// watcher never reads half a file and the temporary is no policy file).
fn write(dir: &Path, file: &File, header: &str) -> Result<(), PaceError> {
    let text = match &file.value {
        Some(value) => format!(
            "# {header}\n{}\n",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        None => file.text.clone(),
    };
    let target = dir.join(&file.name);
    let tmp = dir.join(format!(".{}.tmp", file.name));
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))
}

fn object<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    value.get_mut(key).and_then(Value::as_object_mut)
}

/// Sets `key` of `map` to `to`; answers the old text when it changed.
fn set(map: &mut Map<String, Value>, key: &str, to: &str) -> Option<String> {
    let old = map
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| "default".to_owned());
    if old == to {
        return None;
    }
    map.insert(key.to_owned(), Value::from(to));
    Some(old)
}

/// Copies the policy files of `from` into a fresh temporary directory with
/// `pace` applied.
pub fn copy_paced(from: &Path, pace: &Pace) -> Result<PolicyCopy, PaceError> {
    let mut files = read_dir(from)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "claygate-demo-policies-{}-{stamp:x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut copy = PolicyCopy {
        dir,
        notes: Vec::new(),
    };
    let reset = duration_text(pace.breaker_reset);
    let interval = duration_text(pace.probe_interval);
    let window = duration_text(pace.fallback_window);
    let mut notes = Vec::new();
    let mut health_set = false;
    for file in &mut files {
        let Some(value) = file.value.as_mut() else {
            continue;
        };
        let mut breakers: Vec<(String, &mut Map<String, Value>)> = Vec::new();
        let (defaults, operations, upstreams, health) = match value.as_object_mut() {
            Some(map) => {
                let mut defaults = None;
                let mut operations = None;
                let mut upstreams = None;
                let mut health = None;
                for (k, v) in map.iter_mut() {
                    match k.as_str() {
                        "defaults" => defaults = v.as_object_mut(),
                        "operations" => operations = v.as_object_mut(),
                        "upstreams" => upstreams = v.as_object_mut(),
                        "health" => health = v.as_object_mut(),
                        _ => {}
                    }
                }
                (defaults, operations, upstreams, health)
            }
            None => continue,
        };
        if let Some(defaults) = defaults {
            let breaker = defaults
                .entry("breaker")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(b) = breaker.as_object_mut() {
                breakers.push(("defaults".to_owned(), b));
            }
        }
        if let Some(operations) = operations {
            for (name, op) in operations.iter_mut() {
                if let Some(b) = op.get_mut("breaker").and_then(Value::as_object_mut)
                    && b.contains_key("reset_timeout")
                {
                    breakers.push((name.clone(), b));
                }
            }
        }
        for (owner, breaker) in breakers {
            if let Some(old) = set(breaker, "reset_timeout", &reset) {
                notes.push(format!(
                    "{}: breaker reset_timeout {old} -> {reset}",
                    where_of(&owner)
                ));
            }
            if let Some(max) = breaker.remove("max_reset_timeout") {
                notes.push(format!(
                    "{}: breaker max_reset_timeout {} dropped (no growth between trials)",
                    where_of(&owner),
                    max.as_str().unwrap_or("?")
                ));
            }
        }
        if let Some(upstreams) = upstreams {
            for (name, upstream) in upstreams.iter_mut() {
                if let Some(probe) = object(upstream, "probe")
                    && let Some(old) = set(probe, "interval", &interval)
                {
                    notes.push(format!(
                        "upstream {name}: probe interval {old} -> {interval}"
                    ));
                }
            }
        }
        if let Some(health) = health {
            health_set = true;
            if let Some(old) = set(health, "fallback_window", &window) {
                notes.push(format!("health.fallback_window {old} -> {window}"));
            }
        }
    }
    if !health_set {
        // No `health` section anywhere: the first file with upstreams gets one.
        if let Some(value) = files
            .iter_mut()
            .filter_map(|f| f.value.as_mut())
            .find(|v| v.get("upstreams").is_some())
            .and_then(Value::as_object_mut)
        {
            value.insert(
                "health".to_owned(),
                serde_json::json!({ "fallback_window": window }),
            );
            notes.push(format!("health.fallback_window default -> {window}"));
        }
    }
    let header = format!(
        "claygate demo: a paced copy of {}, for the outage scenario",
        from.display()
    );
    for file in &files {
        write(&copy.dir, file, &header)?;
    }
    copy.notes = notes;
    Ok(copy)
}

fn where_of(owner: &str) -> String {
    if owner == "defaults" {
        "defaults".to_owned()
    } else {
        format!("operation {owner}")
    }
}

/// Sets `fresh` and `stale` of every cached fallback in the policy files of
/// `dir`, rewriting only the files that change; answers what changed.
pub fn shorten_cache_windows(
    dir: &Path,
    fresh: Duration,
    stale: Duration,
) -> Result<Vec<String>, PaceError> {
    let fresh = duration_text(fresh);
    let stale = duration_text(stale);
    let mut notes = Vec::new();
    for mut file in read_dir(dir)? {
        let mut changed = false;
        if let Some(operations) = file.value.as_mut().and_then(|v| object(v, "operations")) {
            for (name, op) in operations.iter_mut() {
                let Some(cache) = op
                    .get_mut("fallback")
                    .and_then(|f| f.get_mut("cache"))
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                let old_fresh = set(cache, "fresh", &fresh);
                let old_stale = set(cache, "stale", &stale);
                if old_fresh.is_some() || old_stale.is_some() {
                    changed = true;
                    notes.push(format!(
                        "{}: {name} fresh {} -> {fresh}, stale {} -> {stale}",
                        file.name,
                        old_fresh.as_deref().unwrap_or(&fresh),
                        old_stale.as_deref().unwrap_or(&stale),
                    ));
                }
            }
        }
        if changed {
            let header = "claygate demo: cache windows shortened mid-run (a hot reload)";
            write(dir, &file, header)?;
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadOptions, UnsetEnv, load_paths};

    fn pace() -> Pace {
        Pace {
            breaker_reset: Duration::from_secs(4),
            probe_interval: Duration::from_millis(500),
            fallback_window: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_bundled_policies_are_paced_and_still_valid() {
        let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
        let copy = copy_paced(&bundled, &pace()).expect("the copy is made");
        let options = LoadOptions {
            unset_env: UnsetEnv::Ignore,
        };
        let loaded = load_paths(std::slice::from_ref(&copy.dir), options).expect("reads");
        let set = loaded
            .set
            .unwrap_or_else(|| panic!("the paced copy is valid: {:#?}", loaded.diagnostics));
        let original = load_paths(&[bundled], options)
            .expect("reads")
            .set
            .expect("the bundled policies are valid");
        assert_eq!(
            set.operations.keys().collect::<Vec<_>>(),
            original.operations.keys().collect::<Vec<_>>()
        );
        let reset =
            |b: Option<&crate::policy::model::BreakerPolicy>| b.and_then(|b| b.reset_timeout);
        assert_eq!(
            reset(set.defaults.breaker.as_ref()).map(|d| d.to_std()),
            Some(Duration::from_secs(4))
        );
        assert!(
            set.defaults
                .breaker
                .as_ref()
                .is_some_and(|b| b.max_reset_timeout.is_none())
        );
        assert_eq!(
            reset(set.operations["lookup_company"].breaker.as_ref()).map(|d| d.to_std()),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            set.upstreams["clay"]
                .probe
                .as_ref()
                .and_then(|p| p.interval)
                .map(|d| d.to_std()),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            set.health.fallback_window.map(|d| d.to_std()),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            set.health.dlq_degraded_above,
            original.health.dlq_degraded_above
        );
        assert_eq!(set.operations["push_row"], original.operations["push_row"]);
        assert!(
            copy.notes.iter().any(|n| n.contains("30s -> 4s")),
            "{:?}",
            copy.notes
        );

        let notes =
            shorten_cache_windows(&copy.dir, Duration::from_secs(2), Duration::from_secs(6))
                .expect("edited");
        assert_eq!(notes.len(), 3, "{notes:?}");
        let set = load_paths(std::slice::from_ref(&copy.dir), options)
            .expect("reads")
            .set
            .expect("still valid");
        for op in ["enrich_person", "enrich_company", "lookup_company"] {
            let cache = set.operations[op]
                .fallback
                .as_ref()
                .and_then(|f| f.cache.as_ref())
                .expect("a cache");
            assert_eq!(cache.fresh.to_std(), Duration::from_secs(2), "{op}");
            assert_eq!(cache.stale.to_std(), Duration::from_secs(6), "{op}");
            let before = original.operations[op]
                .fallback
                .as_ref()
                .and_then(|f| f.cache.as_ref())
                .expect("a cache");
            assert_eq!(cache.very_stale, before.very_stale, "{op}");
        }
        let dir = copy.dir.clone();
        drop(copy);
        assert!(!dir.exists(), "the copy is removed");
    }
}
