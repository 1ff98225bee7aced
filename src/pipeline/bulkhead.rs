//! The priority bulkhead: how many calls of each priority class may be in
//! flight at once against one upstream, and who goes next when a slot frees.
//!
//! One [`Bulkhead`] exists per upstream and is shared by all its operations.
//! Each class has its own `concurrency` (slots), `queue` (waiters) and
//! `queue_timeout`; an optional upstream-wide `max_concurrency` caps the sum.
//!
//! # Admission
//!
//! A call takes a slot of its class at once when the class has a free slot,
//! the upstream-wide cap is not reached and nobody of its class is already
//! waiting (so a class is FIFO). Otherwise it waits in its class queue; a
//! full queue rejects at once with [`Failure::BulkheadFull`], and a waiter
//! still queued after its class's `queue_timeout` fails with
//! [`Failure::QueueTimeout`].
//!
//! # Hand-over
//!
//! A freed slot is handed, under the same lock that freed it, to the
//! highest-priority class that has waiters and room, oldest waiter first.
//! The shared cap is therefore granted in strict priority order: `bulk`
//! waiters that queued first still wait while `critical` waiters can run, so
//! `critical` is never starved by `bulk`. (A lower class may take a shared
//! slot that a higher class cannot use because its own class limit is full.)
//!
//! The granted [`BulkheadPermit`] travels to the waiter through a oneshot
//! channel. Every path releases it exactly once:
//!
//! * the holder drops it (normally, on cancellation, or while unwinding from
//!   a panic): `Drop` frees the slot and hands it on;
//! * the waiter was dropped before the hand-over: the send fails, and the
//!   dispatcher disarms the returned permit and undoes the grant in place,
//!   without re-entering the lock it holds;
//! * the waiter is dropped after the hand-over but before it took the permit
//!   out of the channel: the channel drops the permit in the waiter's
//!   context (no lock held there), and its `Drop` releases it.
//!
//! # Reconfiguration
//!
//! [`Bulkhead::reconfigure`] swaps the limits in place. In-use counts belong
//! to the bulkhead, not to a configuration, so permits already held stay held
//! and are counted against the new limits (a class shrunk below its in-use
//! count admits nobody until enough permits return). Queued waiters of a
//! class that no longer exists fail with [`Failure::BulkheadFull`]; waiters
//! of a class that remains keep their place and their original deadline,
//! even if the new queue is shorter.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Failure;
use crate::policy::model::{Priority, Upstream};

/// Limits of one priority class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassLimits {
    /// Calls of this class in flight at once.
    pub concurrency: u32,
    /// Calls of this class that may wait for a slot; 0 means no waiting.
    pub queue: u32,
    /// How long a call may wait for a slot before it fails.
    pub queue_timeout: Duration,
}

/// The limits of one upstream's bulkhead.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BulkheadConfig {
    /// The configured classes; a priority without an entry is refused.
    pub classes: BTreeMap<Priority, ClassLimits>,
    /// Cap on calls in flight across all classes, if any.
    pub max_concurrency: Option<u32>,
}

impl From<&Upstream> for BulkheadConfig {
    fn from(upstream: &Upstream) -> BulkheadConfig {
        let classes = upstream
            .priorities
            .iter()
            .map(|(priority, class)| {
                let limits = ClassLimits {
                    concurrency: class.concurrency,
                    queue: class.queue,
                    queue_timeout: super::std(class.queue_timeout),
                };
                (*priority, limits)
            })
            .collect();
        BulkheadConfig {
            classes,
            max_concurrency: upstream.max_concurrency,
        }
    }
}

/// A priority bulkhead shared by the operations of one upstream.
///
/// Created with [`Bulkhead::new`], which returns an `Arc` because every
/// [`BulkheadPermit`] keeps the bulkhead alive until it is released.
pub struct Bulkhead {
    shared: Arc<Shared>,
}

/// The state behind the lock, shared with every permit.
struct Shared {
    state: Mutex<State>,
}

/// What a waiter receives: a slot, or the reason it will never get one.
type Grant = Result<BulkheadPermit, Failure>;

struct State {
    config: BulkheadConfig,
    /// Indexed by [`slot`]; kept for every priority so that in-use counts
    /// survive reconfiguration, whatever classes come and go.
    classes: [ClassState; Priority::ALL.len()],
    /// Permits held across all classes.
    in_use: u32,
    /// Id of the next waiter; ids grow, so a class's map is in FIFO order.
    next_waiter: u64,
}

#[derive(Default)]
struct ClassState {
    in_use: u32,
    waiters: BTreeMap<u64, oneshot::Sender<Grant>>,
}

/// Position of a priority in [`State::classes`].
fn slot(priority: Priority) -> usize {
    match priority {
        Priority::Critical => 0,
        Priority::High => 1,
        Priority::Normal => 2,
        Priority::Low => 3,
        Priority::Bulk => 4,
    }
}

impl Shared {
    /// Locks the state. No code panics while holding it, but if a panic ever
    /// did, the counts would still be consistent enough to keep serving, so a
    /// poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees one slot of `priority` and hands freed capacity on.
    fn release(self: &Arc<Self>, priority: Priority) {
        let mut state = self.lock();
        let class = &mut state.classes[slot(priority)];
        class.in_use = class.in_use.saturating_sub(1);
        state.in_use = state.in_use.saturating_sub(1);
        dispatch(self, &mut state);
    }
}

/// Hands free slots to waiters: highest class first, oldest waiter first.
///
/// Runs with the lock held. A grant whose waiter is gone comes back from
/// `send`; it is disarmed and undone here, never dropped armed (its `Drop`
/// would lock again).
fn dispatch(shared: &Arc<Shared>, state: &mut State) {
    let max = state.config.max_concurrency;
    for priority in Priority::ALL {
        let Some(concurrency) = state.config.classes.get(&priority).map(|l| l.concurrency) else {
            continue;
        };
        let class = &mut state.classes[slot(priority)];
        while class.in_use < concurrency && max.is_none_or(|m| state.in_use < m) {
            let Some((_, waiter)) = class.waiters.pop_first() else {
                break;
            };
            class.in_use = class.in_use.saturating_add(1);
            state.in_use = state.in_use.saturating_add(1);
            let permit = BulkheadPermit {
                shared: Arc::clone(shared),
                priority,
                armed: true,
            };
            if let Err(Ok(mut permit)) = waiter.send(Ok(permit)) {
                // The waiter was cancelled before the hand-over.
                permit.armed = false;
                class.in_use = class.in_use.saturating_sub(1);
                state.in_use = state.in_use.saturating_sub(1);
            }
        }
        if max.is_some_and(|m| state.in_use >= m) {
            return;
        }
    }
}

impl Bulkhead {
    /// A bulkhead with `config`'s limits and nothing in flight.
    pub fn new(config: BulkheadConfig) -> Arc<Bulkhead> {
        let state = State {
            config,
            classes: Default::default(),
            in_use: 0,
            next_waiter: 0,
        };
        Arc::new(Bulkhead {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
            }),
        })
    }

    /// The limits in force.
    pub fn config(&self) -> BulkheadConfig {
        self.shared.lock().config.clone()
    }

    /// True when `priority` is a configured class of this bulkhead.
    pub fn has_class(&self, priority: Priority) -> bool {
        self.shared.lock().config.classes.contains_key(&priority)
    }

    /// Takes a slot of class `priority`, waiting in the class queue if need be.
    ///
    /// Fails at once with [`Failure::BulkheadFull`] when the class queue is
    /// full (or the class is not configured), and with
    /// [`Failure::QueueTimeout`] when no slot came within the class's
    /// `queue_timeout`. Cancel-safe: dropping the future at any point leaves
    /// no slot taken and no waiter queued.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Result<BulkheadPermit, Failure> {
        let (id, receiver, queue_timeout) = {
            let mut state = self.shared.lock();
            let Some(limits) = state.config.classes.get(&priority) else {
                return Err(Failure::BulkheadFull { priority });
            };
            let (concurrency, queue, queue_timeout) =
                (limits.concurrency, limits.queue, limits.queue_timeout);
            let max = state.config.max_concurrency;
            let total = state.in_use;
            let class = &mut state.classes[slot(priority)];
            if class.waiters.is_empty()
                && class.in_use < concurrency
                && max.is_none_or(|m| total < m)
            {
                class.in_use = class.in_use.saturating_add(1);
                state.in_use = state.in_use.saturating_add(1);
                return Ok(BulkheadPermit {
                    shared: Arc::clone(&self.shared),
                    priority,
                    armed: true,
                });
            }
            if class.waiters.len() >= usize::try_from(queue).unwrap_or(usize::MAX) {
                return Err(Failure::BulkheadFull { priority });
            }
            let id = state.next_waiter;
            state.next_waiter = state.next_waiter.wrapping_add(1);
            let (sender, receiver) = oneshot::channel();
            state.classes[slot(priority)].waiters.insert(id, sender);
            (id, receiver, queue_timeout)
        };
        self.wait(priority, id, receiver, queue_timeout).await
    }

    /// The queued half of [`acquire`](Bulkhead::acquire).
    async fn wait(
        &self,
        priority: Priority,
        id: u64,
        mut receiver: oneshot::Receiver<Grant>,
        queue_timeout: Duration,
    ) -> Result<BulkheadPermit, Failure> {
        let started = Instant::now();
        // Removes the waiter if this future is dropped while queued. Declared
        // after `receiver`, so it runs first; the order does not matter for
        // correctness (each takes the lock on its own), only for tidiness.
        let mut queued = Queued {
            shared: &self.shared,
            priority,
            id,
            armed: true,
        };
        let outcome = match started.checked_add(queue_timeout) {
            Some(deadline) => tokio::time::timeout_at(deadline, &mut receiver).await.ok(),
            // A timeout too large to represent never fires.
            None => Some((&mut receiver).await),
        };
        queued.armed = false;
        let timed_out = || Failure::QueueTimeout {
            priority,
            waited: started.elapsed(),
        };
        match outcome {
            Some(Ok(grant)) => grant,
            // The sender went away without a word; cannot happen while the
            // waiter is queued, but refusing is the safe answer.
            Some(Err(_)) => Err(Failure::BulkheadFull { priority }),
            None => {
                let still_queued = {
                    let mut state = self.shared.lock();
                    state.classes[slot(priority)].waiters.remove(&id).is_some()
                };
                if still_queued {
                    return Err(timed_out());
                }
                // Dequeued between the timer firing and the lock: the grant
                // (or refusal) is already in the channel. Honour it rather
                // than waste a slot.
                match receiver.try_recv() {
                    Ok(grant) => grant,
                    Err(_) => Err(timed_out()),
                }
            }
        }
    }

    /// Replaces the limits in place; see the module docs for what carries over.
    pub fn reconfigure(&self, config: BulkheadConfig) {
        let mut state = self.shared.lock();
        state.config = config;
        for priority in Priority::ALL {
            if state.config.classes.contains_key(&priority) {
                continue;
            }
            let waiters = std::mem::take(&mut state.classes[slot(priority)].waiters);
            for (_, waiter) in waiters {
                // A refusal holds no permit, so a failed send drops nothing
                // that locks.
                let _ = waiter.send(Err(Failure::BulkheadFull { priority }));
            }
        }
        dispatch(&self.shared, &mut state);
    }

    /// Limits and current use, for the admin API and metrics.
    ///
    /// Lists the configured classes; permits still held in a class that a
    /// reconfiguration removed count only in the total `in_use`.
    pub fn snapshot(&self) -> BulkheadSnapshot {
        let state = self.shared.lock();
        let classes = state
            .config
            .classes
            .iter()
            .map(|(priority, limits)| {
                let class = &state.classes[slot(*priority)];
                let snapshot = ClassSnapshot {
                    concurrency: limits.concurrency,
                    queue: limits.queue,
                    in_use: class.in_use,
                    queued: u32::try_from(class.waiters.len()).unwrap_or(u32::MAX),
                };
                (*priority, snapshot)
            })
            .collect();
        BulkheadSnapshot {
            classes,
            in_use: state.in_use,
            max_concurrency: state.config.max_concurrency,
        }
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// Removes a queued waiter whose future is dropped before it was served.
struct Queued<'a> {
    shared: &'a Arc<Shared>,
    priority: Priority,
    id: u64,
    armed: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            let sender = self.shared.lock().classes[slot(self.priority)]
                .waiters
                .remove(&self.id);
            // Dropped after the lock is released (it holds no permit anyway).
            drop(sender);
        }
    }
}

/// A slot of one bulkhead class, released when dropped.
///
/// Owns a reference to the bulkhead's state, so it is `'static` and may move
/// across tasks and threads.
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    shared: Arc<Shared>,
    priority: Priority,
    /// False only for a permit the dispatcher took back; such a permit
    /// releases nothing.
    armed: bool,
}

impl BulkheadPermit {
    /// The class this slot belongs to.
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        if self.armed {
            self.shared.release(self.priority);
        }
    }
}

impl fmt::Debug for BulkheadPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadPermit")
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

/// A bulkhead's limits and use at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkheadSnapshot {
    /// The configured classes.
    pub classes: BTreeMap<Priority, ClassSnapshot>,
    /// Permits held across all classes.
    pub in_use: u32,
    /// The upstream-wide cap, if any.
    pub max_concurrency: Option<u32>,
}

/// One class of a [`BulkheadSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassSnapshot {
    /// Slots of the class.
    pub concurrency: u32,
    /// Most waiters the class queues.
    pub queue: u32,
    /// Slots held now (may exceed `concurrency` just after a shrink).
    pub in_use: u32,
    /// Calls waiting now.
    pub queued: u32,
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use futures_util::FutureExt;
    use tokio::sync::mpsc;

    use super::*;
    use crate::policy::model::{Duration as PolicyDuration, PriorityClass};

    const C: Priority = Priority::Critical;
    const N: Priority = Priority::Normal;
    const B: Priority = Priority::Bulk;

    fn limits(concurrency: u32, queue: u32, timeout_ms: u64) -> ClassLimits {
        ClassLimits {
            concurrency,
            queue,
            queue_timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn config(classes: &[(Priority, ClassLimits)], max: Option<u32>) -> BulkheadConfig {
        BulkheadConfig {
            classes: classes.iter().cloned().collect(),
            max_concurrency: max,
        }
    }

    /// Lets every ready task run until it blocks again.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn class(bulkhead: &Bulkhead, priority: Priority) -> ClassSnapshot {
        bulkhead
            .snapshot()
            .classes
            .get(&priority)
            .cloned()
            .expect("class is configured")
    }

    /// Spawns a caller that acquires, reports `name` and releases at once.
    fn spawn_reporter(
        bulkhead: &Arc<Bulkhead>,
        priority: Priority,
        name: &'static str,
        order: &mpsc::UnboundedSender<&'static str>,
    ) -> tokio::task::JoinHandle<()> {
        let bulkhead = Arc::clone(bulkhead);
        let order = order.clone();
        tokio::spawn(async move {
            let permit = bulkhead.acquire(priority).await.expect("slot");
            order.send(name).expect("report");
            drop(permit);
        })
    }

    fn drain(order: &mut mpsc::UnboundedReceiver<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| order.try_recv().ok()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn grants_up_to_concurrency_then_queues_then_rejects() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(2, 1, 1_000))], None));
        let first = bulkhead.acquire(N).await.expect("first slot");
        let _second = bulkhead.acquire(N).await.expect("second slot");

        let waiter = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move { bulkhead.acquire(N).await }
        });
        settle().await;
        assert!(!waiter.is_finished());
        assert_eq!(class(&bulkhead, N).queued, 1);

        let rejected = bulkhead.acquire(N).await;
        assert_eq!(rejected.err(), Some(Failure::BulkheadFull { priority: N }));

        drop(first);
        let third = waiter.await.expect("join").expect("slot after release");
        assert_eq!(third.priority(), N);
        let snapshot = class(&bulkhead, N);
        assert_eq!((snapshot.in_use, snapshot.queued), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_queue_and_unknown_class_reject_at_once() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 0, 1_000))], None));
        let _held = bulkhead.acquire(N).await.expect("slot");
        assert_eq!(
            bulkhead.acquire(N).await.err(),
            Some(Failure::BulkheadFull { priority: N })
        );
        assert!(!bulkhead.has_class(B));
        assert_eq!(
            bulkhead.acquire(B).await.err(),
            Some(Failure::BulkheadFull { priority: B })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_within_a_class() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 10, 60_000))], None));
        let held = bulkhead.acquire(N).await.expect("slot");
        let (report, mut order) = mpsc::unbounded_channel();
        for name in ["a", "b", "c", "d"] {
            spawn_reporter(&bulkhead, N, name, &report);
            settle().await;
        }
        assert_eq!(class(&bulkhead, N).queued, 4);
        drop(held);
        settle().await;
        assert_eq!(drain(&mut order), ["a", "b", "c", "d"]);
        assert_eq!(bulkhead.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_does_not_overtake_its_class_queue() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 10, 60_000))], None));
        let held = bulkhead.acquire(N).await.expect("slot");
        let mut queued = Box::pin(bulkhead.acquire(N));
        assert!((&mut queued).now_or_never().is_none());
        drop(held);
        // The slot went to the queued waiter, not to whoever asks next.
        let mut newcomer = Box::pin(bulkhead.acquire(N));
        assert!(
            (&mut newcomer).now_or_never().is_none(),
            "the newcomer queues"
        );
        let permit = (&mut queued).now_or_never().expect("handed over");
        assert!(permit.is_ok());
        drop(permit);
        assert!((&mut newcomer).now_or_never().expect("next").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn shared_slots_go_to_the_highest_waiting_class_first() {
        let classes = [
            (C, limits(4, 10, 60_000)),
            (N, limits(4, 10, 60_000)),
            (B, limits(4, 10, 60_000)),
        ];
        let bulkhead = Bulkhead::new(config(&classes, Some(1)));
        let held = bulkhead.acquire(B).await.expect("slot");
        let (report, mut order) = mpsc::unbounded_channel();
        // Bulk queues first, critical last.
        for (priority, name) in [(B, "b1"), (B, "b2"), (N, "n1"), (C, "c1"), (C, "c2")] {
            spawn_reporter(&bulkhead, priority, name, &report);
            settle().await;
        }
        assert_eq!(drain(&mut order), Vec::<&str>::new());
        drop(held);
        settle().await;
        assert_eq!(drain(&mut order), ["c1", "c2", "n1", "b1", "b2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn critical_is_not_starved_when_bulk_floods() {
        let classes = [(C, limits(2, 10, 60_000)), (B, limits(2, 100, 60_000))];
        let bulkhead = Bulkhead::new(config(&classes, Some(2)));
        let mut bulk = vec![
            bulkhead.acquire(B).await.expect("bulk slot"),
            bulkhead.acquire(B).await.expect("bulk slot"),
        ];
        let (report, mut order) = mpsc::unbounded_channel();
        for _ in 0..50 {
            spawn_reporter(&bulkhead, B, "bulk", &report);
        }
        settle().await;
        let critical = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move { bulkhead.acquire(C).await }
        });
        settle().await;
        assert_eq!(class(&bulkhead, C).queued, 1);
        assert_eq!(class(&bulkhead, B).queued, 50);

        bulk.pop();
        settle().await;
        let permit = critical.await.expect("join").expect("critical slot");
        assert_eq!(drain(&mut order), Vec::<&str>::new());
        assert_eq!(class(&bulkhead, B).queued, 50);
        drop(permit);
        drop(bulk);
        settle().await;
        assert_eq!(drain(&mut order).len(), 50);
        assert_eq!(bulkhead.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_class_may_use_a_shared_slot_a_full_higher_class_cannot() {
        let classes = [(C, limits(1, 10, 60_000)), (B, limits(1, 10, 60_000))];
        let bulkhead = Bulkhead::new(config(&classes, Some(3)));
        let _critical = bulkhead.acquire(C).await.expect("critical slot");
        let mut waiting_critical = Box::pin(bulkhead.acquire(C));
        assert!((&mut waiting_critical).now_or_never().is_none());
        let bulk = bulkhead.acquire(B).now_or_never().expect("at once");
        assert!(bulk.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn queue_timeout_fires_at_exactly_the_class_timeout() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 5, 500))], None));
        let _held = bulkhead.acquire(N).await.expect("slot");
        let waiter = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move { bulkhead.acquire(N).await }
        });
        settle().await;
        tokio::time::advance(Duration::from_millis(499)).await;
        settle().await;
        assert!(!waiter.is_finished());
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(waiter.is_finished());
        let failure = waiter.await.expect("join").err();
        assert_eq!(
            failure,
            Some(Failure::QueueTimeout {
                priority: N,
                waited: Duration::from_millis(500),
            })
        );
        assert_eq!(class(&bulkhead, N).queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_nothing_behind() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 5, 60_000))], None));
        let held = bulkhead.acquire(N).await.expect("slot");

        // Cancelled by a timeout around it.
        let timed = tokio::time::timeout(Duration::from_millis(100), bulkhead.acquire(N)).await;
        assert!(timed.is_err());
        assert_eq!(class(&bulkhead, N).queued, 0);

        // Cancelled by aborting its task.
        let task = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move { bulkhead.acquire(N).await }
        });
        settle().await;
        assert_eq!(class(&bulkhead, N).queued, 1);
        task.abort();
        settle().await;
        assert_eq!(class(&bulkhead, N).queued, 0);

        drop(held);
        assert_eq!(bulkhead.snapshot().in_use, 0);
        let again = bulkhead.acquire(N).now_or_never().expect("free at once");
        assert!(again.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_cancelled_just_after_the_hand_over_releases_its_slot() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 5, 60_000))], None));
        let held = bulkhead.acquire(N).await.expect("slot");
        let mut waiter = Box::pin(bulkhead.acquire(N));
        assert!((&mut waiter).now_or_never().is_none());

        // The release hands the slot to the waiter, which never looks at it.
        drop(held);
        let snapshot = class(&bulkhead, N);
        assert_eq!((snapshot.in_use, snapshot.queued), (1, 0));
        drop(waiter);
        assert_eq!(bulkhead.snapshot().in_use, 0);
        let again = bulkhead.acquire(N).now_or_never().expect("free at once");
        assert!(again.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_over_racing_the_queue_timeout_is_honoured() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 5, 100))], None));
        let held = bulkhead.acquire(N).await.expect("slot");
        let mut waiter = Box::pin(bulkhead.acquire(N));
        assert!((&mut waiter).now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(held);
        let permit = (&mut waiter).now_or_never().expect("done");
        assert!(permit.is_ok());
        drop(permit);
        assert_eq!(bulkhead.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_while_holding_a_permit_releases_it() {
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 5, 60_000))], None));

        let permit = bulkhead.acquire(N).await.expect("slot");
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let _permit = permit;
            panic!("boom while holding a slot");
        }));
        assert!(unwound.is_err());
        assert_eq!(bulkhead.snapshot().in_use, 0);

        let task = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move {
                let _permit = bulkhead.acquire(N).await.expect("slot");
                panic!("boom in a task");
            }
        });
        assert!(task.await.expect_err("panicked").is_panic());
        assert_eq!(bulkhead.snapshot().in_use, 0);
        assert!(bulkhead.acquire(N).now_or_never().expect("free").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_keeps_held_permits_and_applies_new_limits() {
        let before = [(N, limits(2, 5, 60_000)), (B, limits(1, 5, 60_000))];
        let bulkhead = Bulkhead::new(config(&before, None));
        let normal_1 = bulkhead.acquire(N).await.expect("slot");
        let normal_2 = bulkhead.acquire(N).await.expect("slot");
        let bulk = bulkhead.acquire(B).await.expect("slot");
        let bulk_waiter = tokio::spawn({
            let bulkhead = Arc::clone(&bulkhead);
            async move { bulkhead.acquire(B).await }
        });
        settle().await;

        let after = config(&[(N, limits(1, 5, 60_000))], Some(3));
        bulkhead.reconfigure(after.clone());
        assert_eq!(bulkhead.config(), after);
        assert!(!bulkhead.has_class(B));
        let failure = bulk_waiter.await.expect("join").err();
        assert_eq!(failure, Some(Failure::BulkheadFull { priority: B }));

        // Held permits carry over, above the new class limit.
        assert_eq!(class(&bulkhead, N).in_use, 2);
        assert_eq!(bulkhead.snapshot().in_use, 3);
        let mut waiter = Box::pin(bulkhead.acquire(N));
        assert!((&mut waiter).now_or_never().is_none());
        drop(normal_1);
        assert!((&mut waiter).now_or_never().is_none(), "1 in use, limit 1");
        drop(normal_2);
        let permit = (&mut waiter).now_or_never().expect("admitted");
        assert!(permit.is_ok());

        // A permit of a removed class still releases cleanly.
        drop(bulk);
        assert_eq!(bulkhead.snapshot().in_use, 1);

        // Growing a class admits its waiters at once.
        let mut second = Box::pin(bulkhead.acquire(N));
        assert!((&mut second).now_or_never().is_none());
        bulkhead.reconfigure(config(&[(N, limits(2, 5, 60_000))], None));
        assert!((&mut second).now_or_never().expect("admitted").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_reports_limits_use_and_queues() {
        let classes = [(C, limits(2, 3, 1_000)), (B, limits(1, 4, 1_000))];
        let bulkhead = Bulkhead::new(config(&classes, Some(2)));
        let _c = bulkhead.acquire(C).await.expect("slot");
        let _b = bulkhead.acquire(B).await.expect("slot");
        let mut queued = Box::pin(bulkhead.acquire(B));
        assert!((&mut queued).now_or_never().is_none());

        let snapshot = bulkhead.snapshot();
        assert_eq!(snapshot.in_use, 2);
        assert_eq!(snapshot.max_concurrency, Some(2));
        assert_eq!(
            snapshot.classes.get(&C),
            Some(&ClassSnapshot {
                concurrency: 2,
                queue: 3,
                in_use: 1,
                queued: 0
            })
        );
        assert_eq!(
            snapshot.classes.get(&B),
            Some(&ClassSnapshot {
                concurrency: 1,
                queue: 4,
                in_use: 1,
                queued: 1
            })
        );
        let json = serde_json::to_value(&snapshot).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "classes": {
                    "critical": { "concurrency": 2, "queue": 3, "in_use": 1, "queued": 0 },
                    "bulk": { "concurrency": 1, "queue": 4, "in_use": 1, "queued": 1 }
                },
                "in_use": 2,
                "max_concurrency": 2
            })
        );
    }

    #[test]
    fn handles_and_futures_cross_threads() {
        fn send_sync_static<T: Send + Sync + 'static>() {}
        fn send<T: Send>(_: &T) {}
        send_sync_static::<Bulkhead>();
        send_sync_static::<BulkheadPermit>();
        let bulkhead = Bulkhead::new(config(&[(N, limits(1, 1, 1))], None));
        send(&bulkhead.acquire(N));
    }

    #[test]
    fn config_from_an_upstream() {
        let upstream = Upstream {
            base_url: "https://api.clay.com".to_owned(),
            headers: BTreeMap::new(),
            rate_limit: None,
            probe: None,
            priorities: [(
                C,
                PriorityClass {
                    concurrency: 10,
                    queue: 100,
                    queue_timeout: PolicyDuration::from_secs(2),
                },
            )]
            .into_iter()
            .collect(),
            max_concurrency: Some(12),
            max_response_bytes: None,
        };
        assert_eq!(
            BulkheadConfig::from(&upstream),
            config(&[(C, limits(10, 100, 2_000))], Some(12))
        );
    }

    /// Many threads acquire, release and cancel at once (including
    /// cancellations racing a hand-over); afterwards nothing is held or queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_leaks_under_concurrent_cancellation() {
        let classes = [
            (C, limits(2, 64, 60_000)),
            (N, limits(3, 64, 60_000)),
            (B, limits(3, 64, 60_000)),
        ];
        let bulkhead = Bulkhead::new(config(&classes, Some(4)));
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let bulkhead = Arc::clone(&bulkhead);
                tokio::spawn(async move {
                    let priority = [C, N, B][task % 3];
                    for round in 0..200 {
                        if (task + round) % 3 == 0 {
                            // Poll once, then cancel.
                            drop(bulkhead.acquire(priority).now_or_never());
                        } else {
                            let permit = bulkhead.acquire(priority).await;
                            tokio::task::yield_now().await;
                            drop(permit);
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no panic");
        }
        let snapshot = bulkhead.snapshot();
        assert_eq!(snapshot.in_use, 0);
        assert!(
            snapshot
                .classes
                .values()
                .all(|c| c.in_use == 0 && c.queued == 0)
        );
    }
}
