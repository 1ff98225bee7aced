//! The runtime's event stream: breaker transitions, dead letters, redrives
//! and reloads, broadcast to whoever listens (the admin API's server-sent
//! events, metrics, tests).

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

/// A broadcast channel of [`Event`]s; cloning shares it.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Event>,
}

impl Events {
    /// A channel with no listener yet.
    pub fn new() -> Events {
        let (sender, _) = broadcast::channel(CAPACITY);
        Events { sender }
    }

    /// Sends `event` to every listener; without listeners it is dropped.
    pub fn emit(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}
