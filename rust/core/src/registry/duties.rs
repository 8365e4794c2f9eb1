//! [`Registry`]: the heartbeat and abort-request polling (and the metrics sampling, see
//! [`super::sampling`]) on a connection of their own, through outages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::sampling::METRICS_SAMPLE_INTERVAL;
use super::{bounded, liveness_interval, not_connected, query_ids, unless_stopped, Identity};
use crate::connect::ConnectionTarget;
use crate::db::Db;
use crate::errors::{CoreError, CoreResult, Failed, Failure};
use crate::handoff::HandoffSender;
use crate::protocol::{HandoffEvent, LogLevel};
use crate::sql;
use crate::timing::{ticker, ticker_now, Backoff, FIRST_BACKOFF};

/// The first wait, and the longest, between two connection attempts of the registry's
/// duties during an outage (the heartbeat tries at each of its ticks regardless).
const OUTAGE_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const OUTAGE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest wait between two attempts to delete this worker's row at shutdown.
const UNREGISTER_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The heartbeat and the abort poll run at most this often, whatever their settings say.
const SHORTEST_DUTY_PERIOD: Duration = Duration::from_millis(10);

/// The registry's connection is down and could not be opened again: since when, and when
/// its duties try again. One outage is logged twice, when it starts and when it ends, not
/// once per failed duty.
#[derive(Debug)]
pub struct Outage {
    since: Instant,
    backoff: Backoff,
    retry_at: Instant,
}

pub struct Registry {
    pub target: ConnectionTarget,
    /// `None` while disconnected: the next duty connects again.
    pub client: Option<Db>,
    /// `Some` while the connection is down (see [`Outage`]).
    pub outage: Option<Outage>,
    pub identity: Arc<Identity>,
    pub handoff: HandoffSender,
    pub in_flight: Arc<AtomicUsize>,
    pub heartbeat_interval: Duration,
    /// Other workers take this one for stalled once its heartbeat is this old: what is left
    /// of it after `heartbeat_interval` bounds every step of a heartbeat (see
    /// [`Registry::step_limit`]).
    pub stalled_worker_timeout: Duration,
    pub abort_polling_interval: Duration,
    pub response_timeout: Duration,
    pub stop: watch::Receiver<bool>,
    /// Metrics are served: sample the queue depth and the claimed jobs' waits.
    pub sample_metrics: bool,
    /// When the heartbeat was last known written, and whether it is known late.
    pub heartbeat_watch: HeartbeatWatch,
}

/// How many steps of at most [`Registry::step_limit`] fit in what `stalled_worker_timeout`
/// leaves after `update_heartbeat_interval`: the duty ahead of a heartbeat on the same
/// connection (or its first connect) going unanswered, a new connection, the heartbeat sent
/// again on it; and one step of margin (the scheduling of timers, the server's clock).
const HEARTBEAT_STEPS: u32 = 4;

/// The shortest step, whatever the settings: below it a healthy server would fail most
/// heartbeats for being slow (settings this tight are warned about at start).
const MIN_STEP: Duration = Duration::from_millis(100);

/// When this worker's heartbeat was last written (the reply seen), and whether it is
/// known to be older than `stalled_worker_timeout`.
#[derive(Debug)]
pub struct HeartbeatWatch {
    written: Instant,
    late: bool,
}

/// What a heartbeat round changed that is worth saying.
#[derive(Debug, PartialEq)]
enum HeartbeatNews {
    /// Written again after it was known late, this long after the last write.
    WrittenAgain { after: Duration },
    /// Not written for `since`, past `stalled_worker_timeout`: said once per lateness.
    Late { since: Duration },
}

impl HeartbeatWatch {
    /// The heartbeat was just written (registering the worker writes the first one).
    pub fn new() -> Self {
        Self::written_at(Instant::now())
    }

    fn written_at(now: Instant) -> Self {
        HeartbeatWatch {
            written: now,
            late: false,
        }
    }

    /// Note one heartbeat round at `now` (`written`: whether it was); what to say, if
    /// anything.
    fn round(
        &mut self,
        now: Instant,
        written: bool,
        stalled_worker_timeout: Duration,
    ) -> Option<HeartbeatNews> {
        let since = now.saturating_duration_since(self.written);
        if written {
            let was_late = self.late;
            *self = Self::written_at(now);
            return was_late.then_some(HeartbeatNews::WrittenAgain { after: since });
        }
        if self.late || since < stalled_worker_timeout {
            return None;
        }
        self.late = true;
        Some(HeartbeatNews::Late { since })
    }
}

impl Default for HeartbeatWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// See [`Registry::step_limit`].
fn heartbeat_step(
    stalled_worker_timeout: Duration,
    heartbeat_interval: Duration,
    response_timeout: Duration,
) -> Duration {
    let room = stalled_worker_timeout.saturating_sub(heartbeat_interval);
    if room.is_zero() {
        return response_timeout;
    }
    (room / HEARTBEAT_STEPS).max(MIN_STEP)
}

/// The registry's periodic duties.
#[derive(Clone, Copy)]
enum Duty {
    /// The idle connection died (seen without a round trip): a new one now, so that
    /// `/healthz` and the next duty see it.
    Reconnect,
    Heartbeat,
    PollAborts,
    SampleMetrics,
}

impl Registry {
    /// Heartbeat and abort polling until stopped; returns itself so the caller can
    /// unregister. A stop ends a duty in progress (a connect, a statement) at once.
    pub async fn run(mut self) -> Self {
        // The heartbeat and the abort poll first run one period from now (registering
        // wrote the first heartbeat); the sample and the check of the idle connection run at
        // once.
        let mut heartbeat = ticker(self.heartbeat_interval.max(SHORTEST_DUTY_PERIOD));
        let mut abort_poll = ticker(self.abort_polling_interval.max(SHORTEST_DUTY_PERIOD));
        let mut sample = ticker_now(METRICS_SAMPLE_INTERVAL);
        let mut liveness = ticker_now(liveness_interval(self.response_timeout));
        self.handoff
            .metrics()
            .set_connected("registry", self.client.is_some());
        let mut stop = self.stop.clone();
        loop {
            let duty = tokio::select! {
                _ = self.stop.changed() => return self,
                _ = liveness.tick() => {
                    let closed = self.client.as_ref().is_none_or(Db::is_closed);
                    if !closed || self.backing_off() {
                        continue;
                    }
                    Duty::Reconnect
                }
                _ = sample.tick(), if self.sample_metrics => {
                    if self.backing_off() {
                        continue;
                    }
                    Duty::SampleMetrics
                }
                _ = heartbeat.tick() => Duty::Heartbeat,
                _ = abort_poll.tick() => {
                    if self.in_flight.load(Ordering::Relaxed) == 0 || self.backing_off() {
                        continue;
                    }
                    Duty::PollAborts
                }
            };
            if unless_stopped(&mut stop, self.perform(duty))
                .await
                .is_none()
            {
                return self;
            }
        }
    }

    async fn perform(&mut self, duty: Duty) {
        match duty {
            Duty::Heartbeat => self.beat().await,
            Duty::PollAborts => {
                if let Err(error) = self.poll_aborts().await {
                    self.lost("poll_jobs_to_abort_error", "polling jobs to abort", &error);
                }
            }
            Duty::Reconnect => {
                if let Err(reason) = self.connect().await {
                    self.connection_failed(&reason);
                }
            }
            Duty::SampleMetrics => {
                if let Err(error) = self.sample_metrics().await {
                    if error.failure == Failure::Connection {
                        self.lost("metrics_sample_failed", "sampling the queue depth", &error);
                    } else {
                        // Not worth a warning each time: the heartbeat says it.
                        self.handoff.log(
                            LogLevel::Debug,
                            "metrics_sample_failed",
                            format!("Error sampling the queue depth: {}", error.reason),
                        );
                    }
                }
            }
        }
    }

    /// The longest one step of a heartbeat may take (a connect, a statement, or the duty
    /// ahead of it on this connection): a share of what `stalled_worker_timeout` leaves
    /// after `update_heartbeat_interval`, so that a heartbeat that goes unanswered is sent
    /// again, on a new connection, before other workers take this one for stalled.
    /// Settings that leave nothing (warned about at start) keep `response_timeout`.
    fn step_limit(&self) -> Duration {
        heartbeat_step(
            self.stalled_worker_timeout,
            self.heartbeat_interval,
            self.response_timeout,
        )
    }

    /// How long a statement of the registry may go unanswered.
    pub(super) fn statement_limit(&self) -> Duration {
        self.response_timeout.min(self.step_limit())
    }

    /// One heartbeat; if its connection failed (unanswered, lost, or no new one in time),
    /// sent again at once on a new connection: waiting for the next tick may be too late.
    async fn beat(&mut self) {
        let mut written = self.heartbeat().await;
        if let Err(error) = &written {
            let again = error.failure == Failure::Connection;
            self.lost("heartbeat_failed", "updating the heartbeat", error);
            if again {
                written = self.heartbeat().await;
                if let Err(error) = &written {
                    self.lost("heartbeat_failed", "updating the heartbeat", error);
                }
            }
        }
        self.watch_heartbeat(written.is_ok());
    }

    /// Once the heartbeat is known to be older than `stalled_worker_timeout`, other
    /// workers may take this one for stalled and run its running jobs again: say so, once,
    /// loudly. The jobs keep running here: the ones another worker did take back are
    /// cancelled here as soon as the dispatcher sees they are no longer this worker's
    /// ([`sql::LOST_CLAIMS`]); cancelling the others would lose their work for nothing.
    fn watch_heartbeat(&mut self, written: bool) {
        let news = self
            .heartbeat_watch
            .round(Instant::now(), written, self.stalled_worker_timeout);
        match news {
            None => {}
            Some(HeartbeatNews::WrittenAgain { after }) => self.handoff.log(
                LogLevel::Warning,
                "heartbeat_written_again",
                format!(
                    "The heartbeat of worker {} is written again, after {:.1} s",
                    self.identity.current(),
                    after.as_secs_f64()
                ),
            ),
            Some(HeartbeatNews::Late { since }) => {
                self.handoff.metrics().heartbeat_late();
                self.handoff.log(
                    LogLevel::Error,
                    "heartbeat_late",
                    format!(
                        "The heartbeat of worker {} has not been written for {:.1} s, longer than \
                         stalled_worker_timeout ({} s): other workers may take it for stalled and \
                         run its {} running jobs again. They go on here; any that another worker \
                         takes back is cancelled here once this worker sees it",
                        self.identity.current(),
                        since.as_secs_f64(),
                        self.stalled_worker_timeout.as_secs_f64(),
                        self.in_flight.load(Ordering::Relaxed),
                    ),
                );
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<(), Failed> {
        self.ensure_connected().await?;
        let limit = self.statement_limit();
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| not_connected("not connected".into()))?;
        let worker_id = self.identity.current();
        let rows = bounded(limit, client.query(sql::UPDATE_HEARTBEAT, &[&worker_id])).await?;
        if rows.is_empty() {
            // Registering writes a heartbeat too.
            let registering = self.identity.register_again(
                client,
                worker_id,
                &self.handoff,
                "its heartbeat found no row",
            );
            match tokio::time::timeout(limit, registering).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return Err(Failed {
                        failure: if error.is_connectivity() {
                            Failure::Connection
                        } else {
                            Failure::Transient
                        },
                        reason: error.to_string(),
                    })
                }
                Err(_) => return Err(Failed::no_answer(limit)),
            }
        }
        self.handoff.metrics().heartbeat_written();
        Ok(())
    }

    async fn poll_aborts(&mut self) -> Result<(), Failed> {
        self.ensure_connected().await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| not_connected("not connected".into()))?;
        let ids = bounded(
            self.statement_limit(),
            query_ids(client, sql::JOBS_TO_ABORT, &[&self.identity.all()]),
        )
        .await?;
        if !ids.is_empty() {
            self.handoff.send(HandoffEvent::Abort(ids));
        }
        Ok(())
    }

    pub(super) async fn ensure_connected(&mut self) -> Result<(), Failed> {
        if self.client.as_ref().is_none_or(Db::is_closed) {
            self.connect().await.map_err(not_connected)?;
        }
        Ok(())
    }

    /// One attempt at a new connection, within a step of the heartbeat (and the
    /// connection's own `connect_timeout`); why it failed. The first success after an
    /// outage ends it, and says how long it lasted.
    async fn connect(&mut self) -> Result<(), String> {
        self.client = None;
        self.handoff.metrics().set_connected("registry", false);
        let limit = self.step_limit();
        let client = tokio::time::timeout(limit, self.target.connect())
            .await
            .map_err(|_| format!("no new connection within {limit:?}"))?
            .map_err(|error| error.to_string())?;
        self.client = Some(client);
        self.handoff.metrics().set_connected("registry", true);
        if let Some(outage) = self.outage.take() {
            self.handoff.log(
                LogLevel::Info,
                "registry_reconnected",
                format!(
                    "Connected to {} again, after {:.1} s without a connection: heartbeat \
                     and abort polling go on",
                    self.target.description(),
                    outage.since.elapsed().as_secs_f64()
                ),
            );
        }
        Ok(())
    }

    /// During an outage, whether the duties that can wait (abort polling, metrics) wait
    /// for its next attempt rather than try to connect now.
    fn backing_off(&self) -> bool {
        self.client.as_ref().is_none_or(Db::is_closed)
            && self
                .outage
                .as_ref()
                .is_some_and(|outage| Instant::now() < outage.retry_at)
    }

    /// The connection is gone, or could not be opened: an outage starts (a warning) or
    /// goes on (a detail, and a longer wait before the next attempt).
    fn connection_failed(&mut self, reason: &str) {
        self.client = None;
        self.handoff.metrics().set_connected("registry", false);
        let now = Instant::now();
        match &mut self.outage {
            None => {
                let mut backoff = Backoff::new(OUTAGE_FIRST_BACKOFF, OUTAGE_MAX_BACKOFF);
                self.outage = Some(Outage {
                    since: now,
                    retry_at: now + backoff.next_delay(),
                    backoff,
                });
                self.handoff.log(
                    LogLevel::Warning,
                    "registry_connection_lost",
                    format!(
                        "Lost the connection to {} ({reason}): heartbeat and abort polling \
                         try again with backoff until it is back",
                        self.target.description()
                    ),
                );
            }
            Some(outage) => {
                let delay = outage.backoff.next_delay();
                outage.retry_at = now + delay;
                let wait = delay.as_secs_f64();
                self.handoff.log(
                    LogLevel::Debug,
                    "registry_still_disconnected",
                    format!(
                        "Still no connection to {} ({reason}); next try in {wait:.1} s",
                        self.target.description()
                    ),
                );
            }
        }
    }

    /// Log a failed duty. A lost (or unanswering) connection is dropped, and the next duty
    /// opens a new one, within the outage's backoff; a statement that failed on a live
    /// connection keeps it (opening one may be what fails, on a server out of connections).
    fn lost(&mut self, action: &'static str, what: &str, error: &Failed) {
        if error.failure == Failure::Connection {
            self.connection_failed(&format!("{what}: {}", error.reason));
            return;
        }
        self.handoff.log(
            LogLevel::Warning,
            action,
            format!("Error {what}: {}", error.reason),
        );
    }

    /// Delete this worker's row, trying for `trying` at most (a new connection each time a
    /// statement fails). A row left behind is pruned as stalled later: it holds no job.
    pub async fn unregister(&mut self, trying: Duration) -> CoreResult<()> {
        let deadline = Instant::now() + trying;
        let mut backoff = Backoff::new(FIRST_BACKOFF, UNREGISTER_MAX_BACKOFF);
        loop {
            let worker_id = self.identity.current();
            let left = deadline.saturating_duration_since(Instant::now());
            let reason = match tokio::time::timeout(left, self.unregister_once(worker_id)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failed)) => failed.reason,
                Err(_) => format!("no answer within {trying:?}"),
            };
            self.client = None;
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                return Err(CoreError::Unreachable {
                    target: self.target.description().to_string(),
                    reason: format!("unregistering worker {worker_id}: {reason}"),
                });
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn unregister_once(&mut self, worker_id: i64) -> Result<(), Failed> {
        self.ensure_connected().await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| not_connected("not connected".into()))?;
        bounded(
            self.response_timeout,
            client.query(sql::UNREGISTER_WORKER, &[&worker_id]),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_sent_again_after_one_unanswered_step_lands_before_the_timeout() {
        let seconds = Duration::from_secs_f64;
        // The defaults: 5 s per step, 10 + 3 x 5 = 25 s at worst through one fault.
        assert_eq!(
            heartbeat_step(seconds(30.0), seconds(10.0), seconds(30.0)),
            seconds(5.0)
        );
        for (stalled, interval) in [(30.0, 10.0), (6.0, 2.0), (2.0, 0.5), (60.0, 59.0)] {
            let step = heartbeat_step(seconds(stalled), seconds(interval), seconds(30.0));
            // Whatever is ahead of it, its connect, its statement.
            assert!(
                seconds(interval) + step * 3 < seconds(stalled),
                "{stalled} {interval}"
            );
        }
        // Settings that leave no room keep response_timeout (warned about at start).
        let never = Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(
            heartbeat_step(seconds(30.0), never, seconds(7.0)),
            seconds(7.0)
        );
    }

    #[test]
    fn a_late_heartbeat_is_said_once_and_its_return_once() {
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let mut watch = HeartbeatWatch::written_at(start);
        // Failures within the timeout: nothing to say.
        assert_eq!(watch.round(start + timeout / 2, false, timeout), None);
        assert_eq!(
            watch.round(start + timeout, false, timeout),
            Some(HeartbeatNews::Late { since: timeout })
        );
        // Still late: said once only.
        assert_eq!(watch.round(start + timeout * 2, false, timeout), None);
        assert_eq!(
            watch.round(start + timeout * 3, true, timeout),
            Some(HeartbeatNews::WrittenAgain { after: timeout * 3 })
        );
        // Written on time again: nothing, and a new lateness counts from the last write.
        let written = start + timeout * 3;
        assert_eq!(watch.round(written + timeout / 2, true, timeout), None);
        assert_eq!(
            watch.round(written + timeout * 2, false, timeout),
            Some(HeartbeatNews::Late {
                since: timeout * 3 / 2
            })
        );
    }
}
