//! `GET /v1/events`: the runtime's events as server-sent events.
//!
//! Each [`Event`] becomes one SSE event whose `event:` is its `type`
//! (`breaker`, `dead_lettered`, `delivered`, `parked`, `reload`), whose
//! `id:` is its number in the process's event stream (1, 2, 3 …: a jump
//! means events were missed, e.g. while disconnected) and whose `data:` is
//! the event as JSON. `Last-Event-ID` is not replayed: the stream starts
//! with the events after the client connects. The stream opens with a `retry:` hint and a
//! `subscribed` comment (so a client knows it is listening), sends a
//! keep-alive comment when idle, and ends when the server begins to drain.
//!
//! A listener too slow for the broadcast buffer is never skipped silently:
//! it receives a `lagged` event saying how many events it missed, then the
//! stream goes on with the newest.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::events::Numbered;

/// How long a client waits before reconnecting (the `retry:` hint).
pub const RETRY: Duration = Duration::from_secs(3);
/// Idle time after which a keep-alive comment is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often an idle stream checks whether the server is draining.
const DRAIN_CHECK: Duration = Duration::from_millis(500);

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// The SSE form of an event: `event:` its type, `id:` its number, `data:` its JSON.
fn to_sse(numbered: &Numbered) -> SseEvent {
    let value = match serde_json::to_value(&numbered.event) {
        Ok(v) => v,
        Err(e) => {
            return SseEvent::default()
                .event("error")
                .id(numbered.id.to_string())
                .data(
                    json!({ "type": "error", "message": format!("cannot encode an event: {e}") })
                        .to_string(),
                );
        }
    };
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event")
        .to_owned();
    SseEvent::default()
        .event(kind)
        .id(numbered.id.to_string())
        .data(value.to_string())
}

/// Said to a listener that fell behind by `missed` events.
fn lagged(missed: u64) -> SseEvent {
    SseEvent::default().event("lagged").data(
        json!({
            "type": "lagged",
            "missed": missed,
            "message": format!("this listener fell behind and missed {missed} event(s); the stream continues with the newest"),
        })
        .to_string(),
    )
}

/// Streams the runtime's events (breaker transitions, dead letters,
/// deliveries, parked entries, reloads) as they happen.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    responses(
        (status = 200, description = "Server-sent events: `event:` is the type (`breaker`, `dead_lettered`, `delivered`, `parked`, `reload`, or `lagged` when this listener missed events), `id:` the event's number (growing by one per event: a jump means missed events), `data:` the event as JSON", body = String, content_type = "text/event-stream"),
    )
)]
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Subscribed before the response starts: every event after the client
    // sees the headers reaches it.
    let receiver = state.runtime().events.subscribe_numbered();
    let mut check = tokio::time::interval(DRAIN_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hello = SseEvent::default().retry(RETRY).comment("subscribed");
    let rest = stream::unfold(
        (receiver, check, state),
        |(mut receiver, mut check, state)| async move {
            loop {
                tokio::select! {
                    received = receiver.recv() => {
                        let event = match received {
                            Ok(event) => to_sse(&event),
                            Err(RecvError::Lagged(missed)) => {
                                tracing::warn!(missed, "an event listener fell behind");
                                lagged(missed)
                            }
                            Err(RecvError::Closed) => return None,
                        };
                        return Some((Ok(event), (receiver, check, state)));
                    }
                    _ = check.tick() => {
                        if state.draining() {
                            return None;
                        }
                    }
                }
            }
        },
    );
    Sse::new(stream::once(async move { Ok(hello) }).chain(rest))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}
