//! Watches the policy directory and reloads on change.
//!
//! A `notify` watcher on each policy directory (non-recursive, through
//! notify-debouncer-full, which gathers each editor's events) asks for a
//! reload; the reload itself rereads the directory and compares the
//! generation hash, so the watcher never needs to know which file an event
//! named. That is what makes it robust to editors that save through a
//! temporary file and a rename (vim, VS Code, `sed -i`) and to Kubernetes
//! ConfigMap updates, whose `..data` symlink swap never names the policy
//! file in any event. A reload starts once the directory has been quiet for
//! [`DEBOUNCE`]: writes less than that apart make one reload.
//!
//! Access events are ignored (reading the files for the reload raises
//! them, and would loop). A periodic rescan every [`RESCAN`] rereads the
//! files whatever the watcher says: it covers filesystems without events,
//! and a watcher that cannot be created (inotify instance or watch limits,
//! common in containers), which is tried again at each rescan. A watch
//! belongs to the directory it was set on, not to its path: when a watched
//! directory is removed or renamed away (its own `Remove` or rename event,
//! or a new device and inode at its path), the watcher is set up again as
//! soon as a directory is back at the path (looked for every
//! [`MISSING_POLL`] while it is missing), and the files are reread.

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

/// How long notify-debouncer-full holds an event to pair renames and drop
/// repeats before passing it on.
pub const NOTIFY_BATCH: Duration = Duration::from_millis(20);

/// Quiet time after the last event before a reload starts: long enough to
/// gather a burst of writes (an editor's write-rename-chmod, a tool writing
/// several files) into one reload, short enough to keep the
/// file-written-to-serving latency well under 250 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Period of the rescan that rereads the files whatever the watcher says.
pub const RESCAN: Duration = Duration::from_secs(2);

/// How long a rescan waits for a watcher event already on its way (on a
/// loaded machine inotify and the debouncer can take a while to pass it).
const RESCAN_GRACE: Duration = Duration::from_millis(250);

/// How often a policy directory that disappeared is looked for.
pub const MISSING_POLL: Duration = Duration::from_millis(100);

type Watcher = Debouncer<notify_debouncer_full::notify::RecommendedWatcher, RecommendedCache>;

/// A live watch of the policy directories.
pub(crate) struct Watching {
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

/// Starts watching `reloader`'s paths until `stop`. When no file watcher
/// can be created, the periodic rescan still rereads the files (and tries
/// to set the watcher up again each time); signals and the API reload too.
///
/// A watch lasts as long as the directory it was set on: when a policy
/// directory is removed (or renamed away) and a new one appears at its
/// path, the watcher is set up again on the new one and the files reread.
///
/// `watching` says, from before this returns until the task ends, whether
/// a file watcher is set on the directories now: false while none can be
/// created or a directory is missing (only the rescan rereads then), and
/// once stopped.
pub fn spawn(
    reloader: Arc<Reloader>,
    stop: watch::Receiver<bool>,
    watching: Arc<AtomicBool>,
) -> JoinHandle<()> {
    spawn_with(reloader, stop, watching, make_watcher)
}

/// [`spawn`] with another way to make the watcher (tests make it fail).
fn spawn_with<F>(
    reloader: Arc<Reloader>,
    stop: watch::Receiver<bool>,
    flag: Arc<AtomicBool>,
    make: F,
) -> JoinHandle<()>
where
    F: Fn(&[PathBuf], mpsc::Sender<()>) -> Result<Watching, String> + Send + 'static,
{
    let dirs = watched_dirs(reloader.paths());
    let (tx, rx) = mpsc::channel::<()>(1);
    // Watching before this returns: a change made right after is seen.
    let watching = match make(&dirs, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, rescan = ?RESCAN, "cannot watch the policy directory; rereading it periodically instead (SIGHUP and POST /v1/policies/reload still reload at once)");
            None
        }
    };
    flag.store(watching.is_some(), Ordering::Release);
    tokio::spawn(async move {
        run(reloader, stop, make, dirs, (tx, rx), watching, &flag).await;
        flag.store(false, Ordering::Release);
    })
}

async fn run<F>(
    reloader: Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
    make: F,
    dirs: Vec<PathBuf>,
    (tx, mut rx): (mpsc::Sender<()>, mpsc::Receiver<()>),
    mut watching: Option<Watching>,
    flag: &AtomicBool,
) where
    F: Fn(&[PathBuf], mpsc::Sender<()>) -> Result<Watching, String> + Send + 'static,
{
    // Whether "cannot watch" was said (said once, then quietly retried).
    let mut unwatched = watching.is_none();
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    let mut missing = false;
    loop {
        let trigger = tokio::select! {
            () = stopped(&mut stop) => break,
            Some(()) = rx.recv() => {
                if !quiet(&mut rx, &mut stop).await {
                    break;
                }
                Trigger::Watch
            }
            _ = rescan.tick() => {
                // A write made just before the tick raises its event within
                // a moment: give it that, so a change the watcher sees is
                // the watcher's (and a rescan that applies something means
                // the watcher missed it).
                if watching.is_some() {
                    match tokio::time::timeout(RESCAN_GRACE, rx.recv()).await {
                        Ok(Some(())) => {
                            if !quiet(&mut rx, &mut stop).await {
                                break;
                            }
                            Trigger::Watch
                        }
                        _ => Trigger::Rescan,
                    }
                } else {
                    Trigger::Rescan
                }
            }
            () = tokio::time::sleep(MISSING_POLL), if missing => Trigger::Rescan,
        };
        if !dirs.iter().all(|d| d.is_dir()) {
            flag.store(false, Ordering::Release);
            if watching.take().is_some() || !missing {
                tracing::warn!(dirs = ?dirs, "a policy directory disappeared; still serving the last generation, waiting for it to come back");
            }
            missing = true;
            continue;
        }
        if watching.as_ref().is_some_and(|w| w.stale(&dirs)) {
            tracing::info!(dirs = ?dirs, "a policy directory was replaced; watching the new one");
            flag.store(false, Ordering::Release);
            watching = None;
        }
        if watching.is_none() {
            // Watch first, then reread: a change made in between is
            // either in the files read or raises an event.
            match make(&dirs, tx.clone()) {
                Ok(w) => {
                    if missing || unwatched {
                        tracing::info!(dirs = ?dirs, "watching the policy directory again");
                    }
                    unwatched = false;
                    watching = Some(w);
                    flag.store(true, Ordering::Release);
                }
                Err(e) if unwatched => {
                    tracing::debug!(error = %e, "still cannot watch the policy directory");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the policy directory yet; rereading it periodically");
                    unwatched = true;
                }
            }
        }
        missing = false;
        reloader.reload(trigger, false).await;
    }
    drop(watching);
}

/// Waits until no event has come for [`DEBOUNCE`]; false when stopped first.
async fn quiet(rx: &mut mpsc::Receiver<()>, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        tokio::select! {
            () = stopped(stop) => return false,
            Some(()) = rx.recv() => {}
            () = tokio::time::sleep(DEBOUNCE) => return true,
        }
    }
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
    let mut debouncer = new_debouncer(NOTIFY_BATCH, None, move |result: DebounceEventResult| {
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
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::clock::Clock;
    use crate::compile::CompileOptions;
    use crate::reload::ReloadResult;
    use crate::runtime::Runtime;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    fn ops(volume: u32) -> String {
        format!(
            "version: 1
upstreams:
  clay:
    base_url: \"http://127.0.0.1:9\"
timeouts: {{ connect: 1s, request: 2s }}
operations:
  lookup:
    upstream: clay
    request: {{ method: GET, path: /v1/lookup }}
    breaker: {{ volume_threshold: {volume} }}
"
        )
    }

    /// Runs `work` with the paused clock's auto-advance held off (a
    /// blocking task in flight holds it), for work on other threads.
    async fn held<F: Future>(work: F) -> F::Output {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::task::spawn_blocking(move || {
            let _ = wait.recv();
        });
        let out = work.await;
        drop(done);
        let _ = blocker.await;
        out
    }

    /// Lets the other tasks (and threads) run until `done`, for at most
    /// `within` of real time: a bounded poll that never moves the clock.
    async fn spin(within: Duration, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + within;
        while !done() && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watcher_the_periodic_rescan_applies_an_edit() {
        let policies = tempfile::tempdir().expect("dir");
        let data = tempfile::tempdir().expect("dir");
        let file = policies.path().join("ops.yaml");
        std::fs::write(&file, ops(10)).expect("write");
        let paths = vec![policies.path().to_path_buf()];
        let store = held(SqliteStore::open(data.path()))
            .await
            .expect("the store opens");
        let clock = Clock::new();
        let prepared =
            crate::reload::prepare(&paths, None, &CompileOptions::default(), clock.now())
                .unwrap_or_else(|e| panic!("valid: {e}"));
        prepared.compiled.activate();
        let runtime = Runtime::new(prepared.compiled, Arc::new(store) as Arc<dyn Store>, clock);
        let reloader = Reloader::new(
            Arc::clone(&runtime),
            paths.clone(),
            CompileOptions::default(),
            prepared.generation,
        );
        let first = reloader.current().hash.clone();

        // inotify refuses (instance or watch limit): no watcher, ever.
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&tries);
        let (stop, stopped) = watch::channel(false);
        let applied = || {
            reloader
                .history()
                .into_iter()
                .find(|r| r.result == ReloadResult::Applied && r.trigger == Trigger::Rescan)
        };
        // The clock moves only when the test advances it: the store and the
        // reload run on other threads, which auto-advance cannot see.
        let record = held(async {
            let watching = Arc::new(AtomicBool::new(false));
            let task = spawn_with(
                Arc::clone(&reloader),
                stopped,
                Arc::clone(&watching),
                move |_, _| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Err("cannot create a file watcher: too many open files (test)".to_owned())
                },
            );
            assert_eq!(tries.load(Ordering::SeqCst), 1, "tried at once");
            // Let the loop start its rescan period.
            tokio::task::yield_now().await;
            std::fs::write(&file, ops(20)).expect("edit");

            tokio::time::advance(RESCAN - Duration::from_millis(1)).await;
            spin(Duration::from_millis(50), || applied().is_some()).await;
            assert!(
                applied().is_none(),
                "nothing rereads the files before the rescan"
            );

            tokio::time::advance(Duration::from_millis(1)).await;
            spin(Duration::from_secs(20), || applied().is_some()).await;
            (applied(), task)
        })
        .await;
        let (record, task) = record;
        let record = record.unwrap_or_else(|| {
            panic!(
                "the rescan did not apply the edit: {:?}",
                reloader.history()
            )
        });
        assert_ne!(record.generation, first);
        assert_eq!(reloader.current().hash, record.generation);
        assert_eq!(
            runtime.compiled().operations["lookup"]
                .breaker
                .config()
                .volume_threshold,
            20
        );
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "the watcher is tried again at the rescan"
        );
        stop.send_replace(true);
        task.await.expect("the watch task ends when stopped");
    }

    /// Review round 2, item 1: `watching` says whether a file watcher is
    /// set now, not whether the watch task runs: false while inotify
    /// refuses and while the directory is missing, true once watched.
    #[tokio::test(start_paused = true)]
    async fn the_watching_flag_follows_the_watcher() {
        let policies = tempfile::tempdir().expect("dir");
        let data = tempfile::tempdir().expect("dir");
        let dir = policies.path().join("policies");
        std::fs::create_dir(&dir).expect("dir");
        std::fs::write(dir.join("ops.yaml"), ops(10)).expect("write");
        let paths = vec![dir.clone()];
        let store = held(SqliteStore::open(data.path()))
            .await
            .expect("the store opens");
        let clock = Clock::new();
        let prepared =
            crate::reload::prepare(&paths, None, &CompileOptions::default(), clock.now())
                .unwrap_or_else(|e| panic!("valid: {e}"));
        prepared.compiled.activate();
        let runtime = Runtime::new(prepared.compiled, Arc::new(store) as Arc<dyn Store>, clock);
        let reloader = Reloader::new(
            Arc::clone(&runtime),
            paths,
            CompileOptions::default(),
            prepared.generation,
        );

        // Set beforehand, so the test sees the watch task clear it.
        let flag = Arc::new(AtomicBool::new(true));
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&tries);
        let (stop, stopped) = watch::channel(false);
        let is = |want: bool| flag.load(Ordering::Acquire) == want;
        held(async {
            // inotify refuses at first (a limit), then lets the watch be made.
            let task = spawn_with(
                Arc::clone(&reloader),
                stopped,
                Arc::clone(&flag),
                move |dirs, tx| {
                    if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err("cannot create a file watcher: too many open files (test)".to_owned())
                    } else {
                        make_watcher(dirs, tx)
                    }
                },
            );
            assert!(is(false), "no watcher could be made");

            // Steps of time until `want`, bounded: the rescan, the debounce
            // and the missing-directory poll each need the clock to move.
            let until = |want: bool| {
                let is = &is;
                async move {
                    for _ in 0..100 {
                        if is(want) {
                            return;
                        }
                        tokio::time::advance(MISSING_POLL).await;
                        spin(Duration::from_millis(50), || is(want)).await;
                    }
                }
            };
            until(true).await;
            assert!(is(true), "the rescan made the watcher");
            assert_eq!(tries.load(Ordering::SeqCst), 2);

            std::fs::remove_dir_all(&dir).expect("remove");
            until(false).await;
            assert!(is(false), "a missing directory is not watched");

            std::fs::create_dir(&dir).expect("dir");
            std::fs::write(dir.join("ops.yaml"), ops(20)).expect("write");
            until(true).await;
            assert!(is(true), "watched again once the directory is back");

            stop.send_replace(true);
            task.await.expect("the watch task ends when stopped");
            assert!(is(false), "not watching once stopped");
        })
        .await;
    }

    #[test]
    fn files_are_watched_through_their_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "version: 1\n").expect("write");
        let dirs = watched_dirs(&[file, dir.path().to_path_buf()]);
        assert_eq!(dirs, vec![dir.path().to_path_buf()]);
    }
}
