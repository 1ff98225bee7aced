//! The runtime's event stream: breaker transitions, dead letters, redrives
//! and reloads, broadcast to whoever listens (the admin API's server-sent
//! events, metrics, tests).

use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::clock::UnixMillis;
use crate::pipeline::breaker::Transition;

/// Events a slow listener may fall behind by before it skips the oldest.
pub const CAPACITY: usize = 1024;

/// Something operators may want to know as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An operation's breaker changed state.
    Breaker {
        /// The operation.
        operation: String,
        /// The change.
        #[serde(flatten)]
        transition: Transition,
    },
    /// A call failed for good and was written to the DLQ.
    DeadLettered {
        /// Entry id.
        id: i64,
        /// The operation.
        operation: String,
        /// Why the call failed.
        error_code: String,
        /// When.
        at: UnixMillis,
    },
    /// A redrive delivered a dead letter.
    Delivered {
        /// Entry id.
        id: i64,
        /// The operation.
        operation: String,
        /// Redrives it took.
        redrive_attempts: u32,
        /// When.
        at: UnixMillis,
    },
    /// A dead letter ran out of attempts (or failed for good) and needs a human.
    Parked {
        /// Entry id.
        id: i64,
        /// The operation.
        operation: String,
        /// The last failure.
        error_code: String,
        /// When.
        at: UnixMillis,
    },
    /// A policy reload was applied or refused.
    Reload {
        /// Whether the new generation is serving.
        applied: bool,
        /// The generation serving after the attempt.
        generation: String,
        /// Errors that refused it (empty when applied).
        errors: Vec<String>,
        /// Warnings it was applied (or refused) with, `file:line:col: message`.
        warnings: Vec<String>,
        /// When.
        at: UnixMillis,
    },
}

/// An event with its place in the stream: ids start at 1 and grow by one
/// per event emitted, so a listener that sees a jump knows it missed some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    /// The event's id (1, 2, 3 …, in emit order, for the process's life).
    pub id: u64,
    /// The event.
    pub event: Event,
}

/// A broadcast channel of [`Event`]s; cloning shares it.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Event>,
    numbered: broadcast::Sender<Numbered>,
    // The last id given; held while sending, so ids reach listeners in order.
    last: Arc<Mutex<u64>>,
}

impl Events {
    /// A channel with no listener yet.
    pub fn new() -> Events {
        let (sender, _) = broadcast::channel(CAPACITY);
        let (numbered, _) = broadcast::channel(CAPACITY);
        Events {
            sender,
            numbered,
            last: Arc::default(),
        }
    }

    /// Sends `event` to every listener; without listeners it is dropped
    /// (its id is used all the same).
    pub fn emit(&self, event: Event) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        *last += 1;
        let _ = self.numbered.send(Numbered {
            id: *last,
            event: event.clone(),
        });
        let _ = self.sender.send(event);
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// A receiver of every event from now on, with its id.
    pub fn subscribe_numbered(&self) -> broadcast::Receiver<Numbered> {
        self.numbered.subscribe()
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reload(n: u64) -> Event {
        Event::Reload {
            applied: true,
            generation: format!("g{n}"),
            errors: Vec::new(),
            warnings: Vec::new(),
            at: 0,
        }
    }

    #[tokio::test]
    async fn ids_grow_by_one_per_event_including_unheard_ones() {
        let events = Events::new();
        events.emit(reload(0));
        let mut numbered = events.subscribe_numbered();
        let mut plain = events.subscribe();
        events.emit(reload(1));
        events.emit(reload(2));
        let first = numbered.recv().await.expect("an event");
        let second = numbered.recv().await.expect("an event");
        assert_eq!((first.id, second.id), (2, 3), "the unheard first took id 1");
        assert_eq!(first.event, reload(1));
        assert_eq!(plain.recv().await.expect("an event"), reload(1));
    }
}
