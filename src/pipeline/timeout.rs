//! The timeout hierarchy's two inner levels: the attempt timeout and the
//! call's deadline. (The connect timeout, the third, is set on the HTTP
//! client of each upstream.)
//!
//! An attempt ends at its own timeout or at the deadline, whichever comes
//! first; which one fired decides the failure, so the caller can tell "the
//! upstream was slow" (`attempt_timeout`, worth a retry) from "we are out of
//! time" (`deadline_exceeded`, not).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::Failure;

/// Runs one attempt under `limit`, cut short by `deadline` when that comes first.
pub async fn attempt<T, F>(
    limit: Duration,
    deadline: Option<Instant>,
    inner: F,
) -> Result<T, Failure>
where
    F: Future<Output = Result<T, Failure>>,
{
    attempt_from(Instant::now(), limit, deadline, inner).await
}

/// [`attempt`] for an attempt that started at `start`, which saves a clock
/// read on the hot path when the caller already has the time.
pub async fn attempt_from<T, F>(
    start: Instant,
    limit: Duration,
    deadline: Option<Instant>,
    inner: F,
) -> Result<T, Failure>
where
    F: Future<Output = Result<T, Failure>>,
{
    let own = start.checked_add(limit);
    let (until, deadline_binds) = match (own, deadline) {
        (Some(own), Some(d)) if d <= own => (d, true),
        (Some(own), _) => (own, false),
        (None, Some(d)) => (d, true),
        (None, None) => return inner.await,
    };
    match tokio::time::timeout_at(until, inner).await {
        Ok(result) => result,
        Err(_) if deadline_binds => Err(Failure::DeadlineExceeded),
        Err(_) => Err(Failure::AttemptTimeout { after: limit }),
    }
}

/// Runs a whole call under its deadline, if it has one.
pub async fn deadline<T, F>(deadline: Option<Instant>, inner: F) -> Result<T, Failure>
where
    F: Future<Output = Result<T, Failure>>,
{
    match deadline {
        Some(d) => tokio::time::timeout_at(d, inner)
            .await
            .unwrap_or(Err(Failure::DeadlineExceeded)),
        None => inner.await,
    }
}

/// Time left until `deadline` (zero once passed); `None` without a deadline.
pub fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn slow(d: Duration) -> Result<u8, Failure> {
        tokio::time::sleep(d).await;
        Ok(7)
    }

    #[tokio::test(start_paused = true)]
    async fn the_attempt_timeout_fires_when_it_comes_first() {
        let start = Instant::now();
        let r = attempt(
            Duration::from_secs(1),
            Some(start + Duration::from_secs(5)),
            slow(Duration::from_secs(3)),
        )
        .await;
        assert_eq!(
            r,
            Err(Failure::AttemptTimeout {
                after: Duration::from_secs(1)
            })
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cuts_an_attempt_short() {
        let start = Instant::now();
        let r = attempt(
            Duration::from_secs(10),
            Some(start + Duration::from_secs(2)),
            slow(Duration::from_secs(3)),
        )
        .await;
        assert_eq!(r, Err(Failure::DeadlineExceeded));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn fast_work_passes_through() {
        let r = attempt(
            Duration::from_secs(1),
            None,
            slow(Duration::from_millis(10)),
        )
        .await;
        assert_eq!(r, Ok(7));
        let r = deadline(
            Some(Instant::now() + Duration::from_secs(1)),
            slow(Duration::from_millis(10)),
        )
        .await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_fails() {
        let start = Instant::now();
        let r = deadline(
            Some(start + Duration::from_millis(500)),
            slow(Duration::from_secs(3)),
        )
        .await;
        assert_eq!(r, Err(Failure::DeadlineExceeded));
        assert_eq!(remaining(Some(start)), Some(Duration::ZERO));
        assert_eq!(remaining(None), None);
    }
}
