//! Watches the policy directory and reloads on change.
//!
//! A debounced `notify` watcher on each policy directory (non-recursive)
//! turns a burst of file events into one reload request; the reload itself
//! rereads the directory and compares the generation hash, so the watcher
//! never needs to know which file an event named. That is what makes it
//! robust to editors that save through a temporary file and a rename (vim,
//! VS Code, `sed -i`) and to Kubernetes ConfigMap updates, whose `..data`
//! symlink swap never names the policy file in any event.
//!
//! Access events are ignored (reading the files for the reload raises
//! them, and would loop). A slow periodic rescan covers filesystems
//! without events. A watch belongs to the directory it was set on, not to
//! its path: when a watched directory is removed or renamed away (its own
//! `Remove` or rename event, or a new device and inode at its path), the
//! watcher is set up again as soon as a directory is back at the path
//! (looked for every [`MISSING_POLL`] while it is missing), and the files
//! are reread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify_debouncer_full::notify::event::ModifyKind;
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::reload::{Reloader, Trigger};

/// Quiet time after the last event before a reload starts: long enough to
/// gather an editor's write-rename-chmod burst, short enough to keep the
/// file-written-to-serving latency well under 250 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Period of the fallback rescan.
pub const RESCAN: Duration = Duration::from_secs(2);

/// How often a policy directory that disappeared is looked for.
pub const MISSING_POLL: Duration = Duration::from_millis(100);

type Watcher = Debouncer<notify_debouncer_full::notify::RecommendedWatcher, RecommendedCache>;

/// A live watch of the policy directories.
struct Watching {
    _debouncer: Watcher,
    /// Which directories were watched (device and inode, where known).
    ids: Vec<Option<DirId>>,
    /// Set when an event says a watched directory itself was removed or
    /// renamed: the watch is gone, or follows the directory elsewhere.
    lost: Arc<AtomicBool>,
}

impl Watching {
    /// Whether this watch no longer covers the directories at `dirs`.
    fn stale(&self, dirs: &[PathBuf]) -> bool {
        self.lost.load(Ordering::Acquire)
            || self.ids != dirs.iter().map(|d| dir_id(d)).collect::<Vec<_>>()
    }
}

type DirId = (u64, u64);

/// The directory's device and inode: a directory removed and created again,
/// or another moved in its place, is another directory to watch.
#[cfg(unix)]
fn dir_id(dir: &Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn dir_id(_dir: &Path) -> Option<DirId> {
    None
}

/// Starts watching `reloader`'s paths until `stop`. Fails when no watcher
/// can be created (the caller may still reload by signal or API).
///
/// A watch lasts as long as the directory it was set on: when a policy
/// directory is removed (or renamed away) and a new one appears at its
/// path, the watcher is set up again on the new one and the files reread.
pub fn spawn(
    reloader: Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, String> {
    let dirs = watched_dirs(reloader.paths());
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watching = Some(make_watcher(&dirs, tx.clone())?);
    Ok(tokio::spawn(async move {
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut missing = false;
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                Some(()) = rx.recv() => {}
                _ = rescan.tick() => {}
                () = tokio::time::sleep(MISSING_POLL), if missing => {}
            }
            if !dirs.iter().all(|d| d.is_dir()) {
                if watching.take().is_some() {
                    tracing::warn!(dirs = ?dirs, "a policy directory disappeared; still serving the last generation, waiting for it to come back");
                }
                missing = true;
                continue;
            }
            if watching.as_ref().is_some_and(|w| w.stale(&dirs)) {
                tracing::info!(dirs = ?dirs, "a policy directory was replaced; watching the new one");
                watching = None;
            }
            if watching.is_none() {
                // Watch first, then reread: a change made in between is
                // either in the files read or raises an event.
                match make_watcher(&dirs, tx.clone()) {
                    Ok(w) => {
                        if missing {
                            tracing::info!(dirs = ?dirs, "policy directory is back; watching again");
                        }
                        watching = Some(w);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot watch the policy directory yet"),
                }
            }
            missing = false;
            reloader.reload(Trigger::Watch, false).await;
        }
        drop(watching);
    }))
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The directories to watch: each path itself, or a file's parent.
fn watched_dirs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            if p.is_file() {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            } else {
                p.clone()
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn make_watcher(dirs: &[PathBuf], tx: mpsc::Sender<()>) -> Result<Watching, String> {
    let ids = dirs.iter().map(|d| dir_id(d)).collect();
    let lost = Arc::new(AtomicBool::new(false));
    // The paths events name a watched directory by (notify makes them absolute).
    let roots: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| {
            [
                d.clone(),
                std::path::absolute(d).unwrap_or_else(|_| d.clone()),
            ]
        })
        .collect();
    let flag = Arc::clone(&lost);
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let relevant = match &result {
            Ok(events) => {
                let gone = events.iter().any(|e| {
                    matches!(
                        e.kind,
                        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                    ) && e.paths.iter().any(|p| roots.contains(p))
                });
                if gone {
                    flag.store(true, Ordering::Release);
                }
                events
                    .iter()
                    .any(|e| !matches!(e.kind, EventKind::Access(_)))
            }
            // An error may hide a change: rescan.
            Err(_) => true,
        };
        if relevant {
            // A full channel already holds a pending reload request.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("cannot create a file watcher: {e}"))?;
    for dir in dirs {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    }
    Ok(Watching {
        _debouncer: debouncer,
        ids,
        lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_watched_through_their_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "version: 1\n").expect("write");
        let dirs = watched_dirs(&[file, dir.path().to_path_buf()]);
        assert_eq!(dirs, vec![dir.path().to_path_buf()]);
    }
}
