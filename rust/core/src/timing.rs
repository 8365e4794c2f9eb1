//! Waiting, in one place: the backoff between attempts, the tickers of periodic duties, and
//! the bound on a statement's answer.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::errors::Failed;

/// The first wait after a failure of a statement or of a connect.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two statements refused for a passing reason (the dispatcher's
/// and the delayed completions'). Connect loops cap lower (see their callers): a database
/// back from a restart is found within a second or two.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Exponential backoff with jitter: each wait doubles, up to `cap`. Each wait is drawn in
/// the upper half of its step, so that workers cut off together by one outage do not come
/// back in lockstep, and no wait is longer than the step (or the cap) says.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    step: Duration,
    cap: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { step: first, cap }
    }

    /// The next wait, jittered; the step after it doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = jittered(self.step.min(self.cap), random());
        self.step = (self.step * 2).min(self.cap);
        delay
    }

    /// The step the next wait is drawn from (its longest).
    pub fn step(&self) -> Duration {
        self.step.min(self.cap)
    }

    /// The step after `failures` failures in a row, without jitter: `first`, doubled each
    /// time, up to `cap` (for waits kept per item, as the delayed completions').
    pub fn step_after(first: Duration, cap: Duration, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(16));
        first.saturating_mul(factor).min(cap)
    }
}

/// `step`, shortened by up to half of it: `random` picks where in the upper half.
fn jittered(step: Duration, random: u64) -> Duration {
    let half = step / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let extra = if nanos == 0 { 0 } else { random % (nanos + 1) };
    step - half + Duration::from_nanos(extra)
}

/// A random number, good enough for jitter: the standard library seeds each `RandomState`
/// differently, without a dependency.
fn random() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// A ticker for a periodic duty: the first tick one `period` from now (never at once), and
/// a late tick (a duty that ran long, a busy machine) delays the next ones instead of
/// firing a burst. A zero period (procrastinate allows a polling interval of 0) ticks back
/// to back, every millisecond.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let period = shortest_period(period);
    delaying_ticker(tokio::time::Instant::now() + period, period)
}

/// A ticker as [`ticker`]'s, whose first tick is at once: for a duty that runs as soon as
/// its loop starts (the registry's metrics sample and its check of the idle connection).
pub fn ticker_now(period: Duration) -> tokio::time::Interval {
    delaying_ticker(tokio::time::Instant::now(), shortest_period(period))
}

/// tokio's interval panics on a zero period.
fn shortest_period(period: Duration) -> Duration {
    period.max(Duration::from_millis(1))
}

fn delaying_ticker(first: tokio::time::Instant, period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// A statement (or several), bounded: a server that stops answering (a half-open
/// connection) counts as a lost connection after `limit`.
pub async fn bounded<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failed> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failed::new(&error)),
        Err(_) => Err(Failed::no_answer(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::Failure;

    #[test]
    fn the_steps_double_up_to_the_cap() {
        let mut backoff = Backoff::new(FIRST_BACKOFF, Duration::from_secs(1));
        let steps: Vec<Duration> = (0..7)
            .map(|_| {
                let step = backoff.step();
                backoff.next_delay();
                step
            })
            .collect();
        let millis: Vec<u128> = steps.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [50, 100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn every_wait_lies_in_the_upper_half_of_its_step() {
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        for _ in 0..40 {
            let step = backoff.step();
            let delay = backoff.next_delay();
            assert!(delay <= step, "{delay:?} > {step:?}");
            assert!(delay >= step / 2, "{delay:?} < half of {step:?}");
        }
    }

    #[test]
    fn the_jitter_spans_the_upper_half() {
        let step = Duration::from_millis(100);
        assert_eq!(jittered(step, 0), Duration::from_millis(50));
        assert_eq!(jittered(step, 50_000_000), step);
        assert_eq!(jittered(Duration::ZERO, 7), Duration::ZERO);
        assert_eq!(
            jittered(Duration::from_nanos(1), u64::MAX),
            Duration::from_nanos(1)
        );
    }

    #[test]
    fn waits_are_not_all_alike() {
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), MAX_BACKOFF).next_delay())
            .collect();
        assert!(waits.len() > 1, "twenty workers would retry in lockstep");
    }

    #[test]
    fn a_step_after_failures_is_capped_and_never_overflows() {
        let first = Duration::from_millis(100);
        assert_eq!(Backoff::step_after(first, MAX_BACKOFF, 1), first * 2);
        assert_eq!(
            Backoff::step_after(first, MAX_BACKOFF, 5),
            Duration::from_secs(3) + Duration::from_millis(200)
        );
        assert_eq!(Backoff::step_after(first, MAX_BACKOFF, 6), MAX_BACKOFF);
        assert_eq!(
            Backoff::step_after(first, MAX_BACKOFF, u32::MAX),
            MAX_BACKOFF
        );
    }

    #[tokio::test]
    async fn a_ticker_first_ticks_one_period_from_now() {
        let start = tokio::time::Instant::now();
        let mut ticker = ticker(Duration::from_millis(200));
        ticker.tick().await;
        assert!(start.elapsed() >= Duration::from_millis(200), "not at once");
        // A zero period is allowed (tokio's interval panics on it).
        let mut back_to_back = super::ticker(Duration::ZERO);
        back_to_back.tick().await;
    }

    #[tokio::test]
    async fn a_ticker_now_ticks_at_once_then_every_period() {
        // An hour-long period: a first tick that waited for it would miss the deadline.
        let mut hourly = ticker_now(Duration::from_secs(3600));
        let first = tokio::time::timeout(Duration::from_secs(60), hourly.tick()).await;
        assert!(first.is_ok(), "the first tick is at once");
        let created = tokio::time::Instant::now();
        let mut ticker = ticker_now(Duration::from_millis(200));
        ticker.tick().await;
        ticker.tick().await;
        assert!(
            created.elapsed() >= Duration::from_millis(200),
            "one period later"
        );
        let mut back_to_back = ticker_now(Duration::ZERO);
        back_to_back.tick().await;
        back_to_back.tick().await;
    }

    #[tokio::test]
    async fn an_unanswered_statement_counts_as_a_lost_connection() {
        let never = std::future::pending::<Result<(), tokio_postgres::Error>>();
        let failed = bounded(Duration::from_millis(20), never).await.unwrap_err();
        assert_eq!(failed.failure, Failure::Connection);
        let answered = bounded(Duration::from_secs(2), async { Ok(7) }).await;
        assert_eq!(answered.ok(), Some(7));
    }
}
