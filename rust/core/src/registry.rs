//! The worker's row in `procrastinate_workers` and the slow periodic duties around it:
//! - [`Identity`]: this process's worker id, registered again if the row disappears;
//! - [`Registry`]: heartbeat and abort-request polling, on a connection of their own;
//! - [`Recovery`] (`recover_stalled_jobs`): pruning stalled workers and putting their jobs
//!   back to run, on another connection, so a recovery that waits for row locks can never
//!   delay this worker's own heartbeat (and get it pruned while it runs).

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_postgres::Transaction;

use crate::connect::ConnectionTarget;
use crate::db::{execute_in, query_in, Db};
use crate::errors::{is_connectivity_error, CoreError, CoreResult, Failed, Failure};
use crate::fetcher::Claimant;
use crate::handoff::HandoffSender;
use crate::metrics::{QueueDepth, MAX_LABEL_VALUES, OTHER_LABEL};
use crate::protocol::{HandoffEvent, LogLevel};
use crate::sql;
use crate::timing::bounded;

pub async fn check_schema(target: &ConnectionTarget, client: &Db) -> CoreResult<()> {
    let row = client
        .query_one(sql::CHECK_SCHEMA, &[])
        .await
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    let present: bool = row
        .try_get(0)
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    if present {
        Ok(())
    } else {
        Err(CoreError::SchemaMissing {
            database: target.database(),
        })
    }
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// The first column of every row, as ids.
pub(crate) async fn query_ids(
    client: &Db,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    ids(client.query(statement, params).await?)
}

/// [`query_ids`] in an open transaction.
async fn query_ids_in(
    transaction: &Transaction<'_>,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    ids(query_in(transaction, statement, params).await?)
}

fn ids(rows: Vec<tokio_postgres::Row>) -> Result<Vec<i64>, tokio_postgres::Error> {
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// Every row as a claim: (job id, attempts), the first two columns.
pub(crate) async fn query_claims(
    client: &Db,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<(i64, i32)>, tokio_postgres::Error> {
    client
        .query(statement, params)
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Delete workers whose heartbeat is older than `stalled_worker_timeout`, as procrastinate's
/// worker does at start. Their `doing` jobs keep running nowhere (worker_id becomes NULL).
pub async fn prune_stalled_workers(client: &Db, timeout: Duration) -> CoreResult<Vec<i64>> {
    query_ids(
        client,
        sql::PRUNE_STALLED_WORKERS,
        &[&timeout.as_secs_f64()],
    )
    .await
    .map_err(|error| CoreError::database("pruning stalled workers", error))
}

/// What [`prune_and_recover_stalled_jobs`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovered {
    pub pruned_workers: Vec<i64>,
    /// Jobs of the pruned workers put back to `todo` (`procrastinate_retry_job_v2`).
    pub retried: Vec<i64>,
    /// Jobs that can never go back to `todo` (another job with the same `queueing_lock`
    /// waits there, committed) and were marked `failed` instead, with the reason.
    pub failed: Vec<(i64, String)>,
    /// Jobs whose retry met a passing error (a lock or statement timeout, a cancel, a
    /// deadlock): left `doing`, without a worker, for the next round, with the error.
    pub left: Vec<(i64, String)>,
}

/// procrastinate's unique index of waiting jobs' queueing locks: a retry that meets it
/// (`23505`, another job with the lock is `todo`, committed) can never succeed.
const QUEUEING_LOCK_INDEX: &str = "procrastinate_jobs_queueing_lock_idx_v1";

/// Whether a stalled job's retry failed because the job truly cannot go back to `todo`:
/// the unique violation procrastinate's own `retry_job` meets. Any other error passes (a
/// lock timeout while a session that took the lock is still open, a cancel, a statement
/// timeout, a deadlock, a serialization failure): the job is tried again later.
fn cannot_go_back(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db_error| {
        *db_error.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db_error.constraint() == Some(QUEUEING_LOCK_INDEX)
    })
}

fn reason_of(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db_error| db_error.message().to_string())
        .unwrap_or_else(|| error.to_string())
}

/// What [`retry_or_fail`] did with each job.
#[derive(Debug, Default)]
struct Outcomes {
    retried: Vec<i64>,
    failed: Vec<(i64, String)>,
    left: Vec<(i64, String)>,
}

impl Outcomes {
    fn record_in(self, recovered: &mut Recovered) {
        recovered.retried = self.retried;
        recovered.failed = self.failed;
        recovered.left = self.left;
    }
}

/// `recover_stalled_jobs=True`: prune the stalled workers like procrastinate, and put the
/// jobs they held in `doing` back to run, in one transaction. Two workers doing this at
/// once recover each job once: the worker rows are locked (`SKIP LOCKED`: one that another
/// recovery holds is its to handle). `own`: this process's worker ids, never pruned by
/// itself, however late its heartbeat. Row locks held by another session make it fail
/// after the session's `lock_timeout`, to be tried again at the next round.
pub async fn prune_and_recover_stalled_jobs(
    client: &mut Db,
    timeout: Duration,
    own: &[i64],
) -> CoreResult<Recovered> {
    const WHAT: &str = "pruning stalled workers and recovering their jobs";
    let db = |error| CoreError::database(WHAT, error);
    let mut transaction = client.transaction().await.map_err(db)?;
    let seconds = timeout.as_secs_f64();
    let stalled = query_ids_in(&transaction, sql::LOCK_STALLED_WORKERS, &[&seconds, &own])
        .await
        .map_err(db)?;
    if stalled.is_empty() {
        transaction.commit().await.map_err(db)?;
        return Ok(Recovered::default());
    }
    let jobs = query_ids_in(&transaction, sql::JOBS_OF_WORKERS, &[&stalled])
        .await
        .map_err(db)?;
    let pruned_workers = query_ids_in(&transaction, sql::DELETE_WORKERS, &[&stalled])
        .await
        .map_err(db)?;
    let mut recovered = Recovered {
        pruned_workers,
        ..Recovered::default()
    };
    if !jobs.is_empty() {
        retry_or_fail(&mut transaction, jobs)
            .await
            .map_err(db)?
            .record_in(&mut recovered);
    }
    transaction.commit().await.map_err(db)?;
    Ok(recovered)
}

/// Put `jobs` (locked by `transaction`) back to run, as procrastinate's
/// `JobManager.retry_job(job)` does: all at once; if that fails, one by one. A job that
/// can never go back to `todo` ([`cannot_go_back`]) ends `failed`; one whose retry met a
/// passing error stays `doing` for the next round (a job is never lost to a passing
/// error); the others go back to run all the same.
async fn retry_or_fail(
    transaction: &mut Transaction<'_>,
    jobs: Vec<i64>,
) -> Result<Outcomes, tokio_postgres::Error> {
    let all = transaction.savepoint("fastworker_recover_all").await?;
    match execute_in(&all, sql::RETRY_JOBS, &[&jobs]).await {
        Ok(_) => {
            all.commit().await?;
            return Ok(Outcomes {
                retried: jobs,
                ..Outcomes::default()
            });
        }
        Err(error) if is_connectivity_error(&error) => return Err(error),
        Err(_) => all.rollback().await?,
    }
    let mut outcomes = Outcomes::default();
    for job_id in jobs {
        let one = transaction.savepoint("fastworker_recover_one").await?;
        let error = match execute_in(&one, sql::RETRY_JOB, &[&job_id]).await {
            Ok(_) => {
                one.commit().await?;
                outcomes.retried.push(job_id);
                continue;
            }
            Err(error) if is_connectivity_error(&error) => return Err(error),
            Err(error) => {
                one.rollback().await?;
                error
            }
        };
        if !cannot_go_back(&error) {
            outcomes.left.push((job_id, reason_of(&error)));
            continue;
        }
        // The failure write may meet a passing error too: then the job is left as well.
        let fail = transaction.savepoint("fastworker_fail_one").await?;
        match execute_in(&fail, sql::FAIL_JOB, &[&job_id]).await {
            Ok(_) => {
                fail.commit().await?;
                outcomes.failed.push((job_id, reason_of(&error)));
            }
            Err(failing) if is_connectivity_error(&failing) => return Err(failing),
            Err(failing) => {
                fail.rollback().await?;
                outcomes.left.push((job_id, reason_of(&failing)));
            }
        }
    }
    Ok(outcomes)
}

/// `doing` jobs without a worker, as the recovery has watched them: since when each has
/// been seen so, at which attempts.
#[derive(Debug, Default)]
pub struct Unowned {
    seen: std::collections::HashMap<i64, (i32, Instant)>,
}

impl Unowned {
    /// Note the unowned jobs seen now; return those seen so, at the same attempts, for at
    /// least `grace`.
    fn observe(&mut self, now: Instant, jobs: &[(i64, i32)], grace: Duration) -> Vec<(i64, i32)> {
        let previous = std::mem::take(&mut self.seen);
        let mut due = Vec::new();
        for &(job_id, attempts) in jobs {
            let since = match previous.get(&job_id) {
                Some(&(seen_attempts, since)) if seen_attempts == attempts => since,
                _ => now,
            };
            if now.duration_since(since) >= grace {
                due.push((job_id, attempts));
            }
            self.seen.insert(job_id, (attempts, since));
        }
        due
    }
}

/// `recover_stalled_jobs=True`, for the `doing` jobs whose worker row is gone (pruned by
/// procrastinate's own worker, deleted by hand, or a worker of ours that was deleted and
/// then died before it took its jobs back): once such a job has had no worker for a whole
/// `grace` (the `stalled_worker_timeout`), it is put back to run. A live worker whose row
/// was deleted takes its jobs back within a heartbeat interval or so
/// ([`sql::REATTACH_CLAIMS`]), so those are not touched.
pub async fn recover_unowned_jobs(
    client: &mut Db,
    unowned: &mut Unowned,
    grace: Duration,
) -> CoreResult<Recovered> {
    const WHAT: &str = "recovering jobs without a worker";
    let db = |error| CoreError::database(WHAT, error);
    let jobs = query_claims(client, sql::UNOWNED_JOBS, &[])
        .await
        .map_err(db)?;
    let due = unowned.observe(Instant::now(), &jobs, grace);
    if due.is_empty() {
        return Ok(Recovered::default());
    }
    let (ids, attempts): (Vec<i64>, Vec<i32>) = due.into_iter().unzip();
    let mut transaction = client.transaction().await.map_err(db)?;
    let locked = query_ids_in(&transaction, sql::LOCK_UNOWNED_JOBS, &[&ids, &attempts])
        .await
        .map_err(db)?;
    let mut recovered = Recovered::default();
    if !locked.is_empty() {
        retry_or_fail(&mut transaction, locked)
            .await
            .map_err(db)?
            .record_in(&mut recovered);
    }
    transaction.commit().await.map_err(db)?;
    Ok(recovered)
}

/// Log what a recovery did, with procrastinate-style `action` extras.
pub fn log_recovery(handoff: &HandoffSender, recovered: &Recovered) {
    handoff.metrics().stalled_recovered(
        recovered.pruned_workers.len(),
        recovered.retried.len(),
        recovered.failed.len(),
    );
    if !recovered.retried.is_empty() {
        handoff.log(
            LogLevel::Warning,
            "stalled_jobs_retried",
            if recovered.pruned_workers.is_empty() {
                format!(
                    "Put {} jobs that had no worker for stalled_worker_timeout back to run: {:?}",
                    recovered.retried.len(),
                    recovered.retried
                )
            } else {
                format!(
                    "Put {} jobs of stalled workers {:?} back to run: {:?}",
                    recovered.retried.len(),
                    recovered.pruned_workers,
                    recovered.retried
                )
            },
        );
    }
    for (job_id, reason) in &recovered.failed {
        handoff.log_job(
            LogLevel::Error,
            "stalled_job_failed",
            *job_id,
            format!("Stalled job {job_id} could not be retried and was marked failed: {reason}"),
        );
    }
    for (job_id, reason) in &recovered.left {
        handoff.log_job(
            LogLevel::Warning,
            "stalled_job_left",
            *job_id,
            format!(
                "Stalled job {job_id} could not be put back to run now ({reason}): left \
                 `doing`, tried again at the next recovery round"
            ),
        );
    }
}

/// The queues with the most jobs keep their label, at most [`MAX_LABEL_VALUES`] of them;
/// the others are summed under [`OTHER_LABEL`], by status.
pub fn cap_queue_depth(mut depth: Vec<QueueDepth>) -> Vec<QueueDepth> {
    let mut totals: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for entry in &depth {
        *totals.entry(entry.queue.clone()).or_default() += entry.jobs;
    }
    if totals.len() <= MAX_LABEL_VALUES {
        return depth;
    }
    let mut queues: Vec<(String, u64)> = totals.into_iter().collect();
    queues.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let kept: std::collections::HashSet<String> = queues
        .into_iter()
        .take(MAX_LABEL_VALUES - 1)
        .map(|(queue, _)| queue)
        .collect();
    let mut other: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    depth.retain(|entry| {
        if kept.contains(&entry.queue) {
            return true;
        }
        *other.entry(entry.status.clone()).or_default() += entry.jobs;
        false
    });
    depth.extend(other.into_iter().map(|(status, jobs)| QueueDepth {
        queue: OTHER_LABEL.to_string(),
        status,
        jobs,
    }));
    depth
}

pub async fn register_worker(client: &Db) -> CoreResult<i64> {
    let row = client
        .query_one(sql::REGISTER_WORKER, &[])
        .await
        .map_err(|error| CoreError::database("registering the worker", error))?;
    row.try_get(0)
        .map_err(|error| CoreError::database("registering the worker", error))
}

/// This process's worker id. If its row in `procrastinate_workers` disappears (another
/// worker pruned it as stalled, someone deleted it), the first role to notice registers a
/// new one; the jobs claimed under the old id are still this process's to end, so every
/// id it has had stays known.
pub struct Identity {
    current: AtomicI64,
    all: std::sync::Mutex<Vec<i64>>,
    registering: tokio::sync::Mutex<()>,
}

impl Identity {
    pub fn new(worker_id: i64) -> Identity {
        Identity {
            current: AtomicI64::new(worker_id),
            all: std::sync::Mutex::new(vec![worker_id]),
            registering: tokio::sync::Mutex::new(()),
        }
    }

    pub fn current(&self) -> i64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Every worker id this process has had, the current one first.
    pub fn all(&self) -> Vec<i64> {
        let mut ids = match self.all.lock() {
            Ok(ids) => ids.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        ids.reverse();
        ids
    }

    pub fn claimant(&self) -> Claimant {
        Claimant {
            worker_id: self.current(),
            worker_ids: self.all(),
        }
    }

    /// `gone` has no row any more: register again (once, whoever notices first) and say
    /// so. Returns the id to use from now on.
    pub async fn register_again(
        &self,
        client: &Db,
        gone: i64,
        handoff: &HandoffSender,
        noticed: &str,
    ) -> CoreResult<i64> {
        let _one_at_a_time = self.registering.lock().await;
        let current = self.current();
        if current != gone {
            return Ok(current);
        }
        let worker_id = register_worker(client).await?;
        match self.all.lock() {
            Ok(mut ids) => ids.push(worker_id),
            Err(poisoned) => poisoned.into_inner().push(worker_id),
        }
        self.current.store(worker_id, Ordering::SeqCst);
        handoff.log(
            LogLevel::Warning,
            "worker_registered_again",
            format!(
                "Worker {gone} is no longer in procrastinate_workers ({noticed}): another \
                 worker pruned it as stalled, or its row was deleted. Registered again as \
                 worker {worker_id}; the jobs it runs are still ended by it"
            ),
        );
        handoff.send(HandoffEvent::WorkerId(worker_id));
        Ok(worker_id)
    }
}

fn not_connected(reason: String) -> Failed {
    Failed {
        failure: Failure::Connection,
        reason,
    }
}

/// How often an idle role looks whether its connection is still open (a local check, no
/// round trip): a connection whose server process ended (`pg_terminate_backend`, a
/// restart) shows as down, and is replaced, within this, not at the role's next statement.
pub fn liveness_interval(response_timeout: Duration) -> Duration {
    response_timeout.min(Duration::from_secs(1))
}

/// The first wait, and the longest, between two connection attempts of the registry's
/// duties during an outage (the heartbeat tries at each of its ticks regardless).
const OUTAGE_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const OUTAGE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The registry's connection is down and could not be opened again: since when, and when
/// its duties try again. One outage is logged twice, when it starts and when it ends, not
/// once per failed duty.
#[derive(Debug)]
pub struct Outage {
    since: Instant,
    backoff: Duration,
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

impl HeartbeatWatch {
    /// The heartbeat was just written (registering the worker writes the first one).
    pub fn new() -> Self {
        HeartbeatWatch {
            written: Instant::now(),
            late: false,
        }
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

/// How often the registry samples the queue depth and the waits, when metrics are served.
pub const METRICS_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

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

/// `work`, unless `stop` changes first (or its sender is gone): `None` then. What a role
/// waits for (a connect, a statement) never holds back a stop.
pub(crate) async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = stop.changed() => None,
        value = work => Some(value),
    }
}

impl Registry {
    /// Heartbeat and abort polling until stopped; returns itself so the caller can
    /// unregister. A stop ends a duty in progress (a connect, a statement) at once.
    pub async fn run(mut self) -> Self {
        let mut heartbeat =
            tokio::time::interval(self.heartbeat_interval.max(Duration::from_millis(10)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut abort_poll =
            tokio::time::interval(self.abort_polling_interval.max(Duration::from_millis(10)));
        abort_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        abort_poll.tick().await;
        let mut sample = tokio::time::interval(METRICS_SAMPLE_INTERVAL);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = tokio::time::interval(liveness_interval(self.response_timeout));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
    fn statement_limit(&self) -> Duration {
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
        let watch = &mut self.heartbeat_watch;
        if written {
            if watch.late {
                self.handoff.log(
                    LogLevel::Warning,
                    "heartbeat_written_again",
                    format!(
                        "The heartbeat of worker {} is written again, after {:.1} s",
                        self.identity.current(),
                        watch.written.elapsed().as_secs_f64()
                    ),
                );
            }
            *watch = HeartbeatWatch::new();
            return;
        }
        let since = watch.written.elapsed();
        if watch.late || since < self.stalled_worker_timeout {
            return;
        }
        watch.late = true;
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

    /// One sample: the jobs by queue and status, and the waits of the jobs claimed since
    /// the last one (from their events: inserted, claimed; database time).
    async fn sample_metrics(&mut self) -> Result<(), Failed> {
        self.ensure_connected().await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| not_connected("not connected".into()))?;
        let limit = self.statement_limit();
        let rows = bounded(limit, client.query(sql::QUEUE_DEPTH, &[])).await?;
        let mut depth = Vec::with_capacity(rows.len());
        for row in &rows {
            let jobs: i64 = row.try_get(2).map_err(|error| Failed::new(&error))?;
            depth.push(QueueDepth {
                queue: row.try_get(0).map_err(|error| Failed::new(&error))?,
                status: row.try_get(1).map_err(|error| Failed::new(&error))?,
                jobs: u64::try_from(jobs).unwrap_or(0),
            });
        }
        let depth = cap_queue_depth(depth);
        self.handoff.metrics().update(|state| {
            state.queue_depth = depth;
            state.queue_depth_sampled = Some(Instant::now());
        });
        let pending = self.handoff.metrics().take_pending_waits();
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = pending.iter().map(|wait| wait.job_id).collect();
        let rows = bounded(limit, client.query(sql::JOB_EVENT_TIMES, &[&ids])).await?;
        let mut times = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let job_id: i64 = row.try_get(0).map_err(|error| Failed::new(&error))?;
            let deferred: Option<f64> = row.try_get(1).map_err(|error| Failed::new(&error))?;
            let started: Option<f64> = row.try_get(2).map_err(|error| Failed::new(&error))?;
            times.insert(job_id, (deferred, started));
        }
        for wait in pending {
            let Some(&(deferred, Some(started))) = times.get(&wait.job_id) else {
                continue; // deleted since (delete_jobs), or its events were
            };
            let scheduled = wait.scheduled_at_us.map(|at| at as f64 / 1_000_000.0);
            let since = match (deferred, scheduled) {
                (Some(deferred), Some(scheduled)) => deferred.max(scheduled),
                (Some(at), None) | (None, Some(at)) => at,
                (None, None) => continue,
            };
            self.handoff
                .metrics()
                .observe_wait(wait.queue, started - since);
        }
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

    async fn ensure_connected(&mut self) -> Result<(), Failed> {
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
                self.outage = Some(Outage {
                    since: now,
                    backoff: OUTAGE_FIRST_BACKOFF,
                    retry_at: now + OUTAGE_FIRST_BACKOFF,
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
                outage.backoff = (outage.backoff * 2).min(OUTAGE_MAX_BACKOFF);
                outage.retry_at = now + outage.backoff;
                let wait = outage.backoff.as_secs_f64();
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
        let mut delay = Duration::from_millis(50);
        loop {
            let worker_id = self.identity.current();
            let left = deadline.saturating_duration_since(Instant::now());
            let reason = match tokio::time::timeout(left, self.unregister_once(worker_id)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failed)) => failed.reason,
                Err(_) => format!("no answer within {trying:?}"),
            };
            self.client = None;
            if Instant::now() + delay >= deadline {
                return Err(CoreError::Unreachable {
                    target: self.target.description().to_string(),
                    reason: format!("unregistering worker {worker_id}: {reason}"),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
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

/// `recover_stalled_jobs`: every `stalled_worker_timeout`, prune the stalled workers and
/// put their jobs back to run, and the jobs left without a worker for as long, on a
/// connection of its own.
pub struct Recovery {
    pub target: ConnectionTarget,
    pub identity: Arc<Identity>,
    pub handoff: HandoffSender,
    pub stalled_worker_timeout: Duration,
    pub response_timeout: Duration,
    pub stop: watch::Receiver<bool>,
    /// Woken when jobs went back to `todo`.
    pub wake: Arc<Notify>,
}

impl Recovery {
    pub async fn run(mut self) {
        let mut client: Option<Db> = None;
        let mut unowned = Unowned::default();
        let mut tick =
            tokio::time::interval(self.stalled_worker_timeout.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // A stop ends a connect or a recovery in progress at once (rolled back).
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = self.stop.changed() => return,
                _ = tick.tick() => {}
            }
            if client.as_ref().is_none_or(Db::is_closed) {
                let Some(connected) = unless_stopped(&mut stop, self.target.connect()).await else {
                    return;
                };
                client = connected.ok();
            }
            let Some(connection) = client.as_mut() else {
                continue;
            };
            let own = self.identity.all();
            let grace = self.stalled_worker_timeout;
            let attempt = tokio::time::timeout(self.response_timeout, async {
                let mut recovered = prune_and_recover_stalled_jobs(connection, grace, &own).await?;
                log_recovery(&self.handoff, &recovered);
                let unowned_recovered =
                    recover_unowned_jobs(connection, &mut unowned, grace).await?;
                log_recovery(&self.handoff, &unowned_recovered);
                recovered.retried.extend(unowned_recovered.retried);
                Ok::<_, CoreError>(recovered)
            });
            let Some(attempt) = unless_stopped(&mut stop, attempt).await else {
                return;
            };
            match attempt {
                Ok(Ok(recovered)) => {
                    if !recovered.retried.is_empty() {
                        self.wake.notify_one();
                    }
                }
                Ok(Err(error)) => {
                    self.handoff.log(
                        LogLevel::Warning,
                        "recover_stalled_jobs_error",
                        format!("Error recovering stalled jobs (tried again later): {error}"),
                    );
                    client = None;
                }
                Err(_) => {
                    self.handoff.log(
                        LogLevel::Warning,
                        "recover_stalled_jobs_error",
                        "Error recovering stalled jobs (tried again later): no answer from the server",
                    );
                    client = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_depth_keeps_the_deepest_queues_and_sums_the_others() {
        let depth: Vec<QueueDepth> = (0..150u64)
            .flat_map(|index| {
                ["todo", "doing"].map(|status| QueueDepth {
                    queue: format!("q{index}"),
                    status: status.to_string(),
                    jobs: index,
                })
            })
            .collect();
        let capped = cap_queue_depth(depth);
        let queues: std::collections::HashSet<&str> =
            capped.iter().map(|entry| entry.queue.as_str()).collect();
        assert_eq!(queues.len(), MAX_LABEL_VALUES);
        assert!(queues.contains("q149") && !queues.contains("q0"));
        // Nothing is lost: the sums are kept.
        let total = |status: &str| -> u64 {
            capped
                .iter()
                .filter(|entry| entry.status == status)
                .map(|entry| entry.jobs)
                .sum()
        };
        assert_eq!(total("todo"), (0..150).sum::<u64>());
        assert_eq!(total("doing"), (0..150).sum::<u64>());
    }

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
    fn an_unowned_job_is_due_once_seen_so_for_the_whole_grace() {
        let grace = Duration::from_secs(30);
        let start = Instant::now();
        let mut unowned = Unowned::default();
        assert!(unowned.observe(start, &[(1, 0), (2, 0)], grace).is_empty());
        // Job 2 got its worker back in between; job 1 did not.
        let later = start + grace;
        assert_eq!(unowned.observe(later, &[(1, 0)], grace), vec![(1, 0)]);
        // Job 2 unowned again: its wait starts over.
        assert!(unowned.observe(later, &[(2, 0)], grace).is_empty());
    }

    #[test]
    fn an_unowned_job_at_new_attempts_waits_again() {
        let grace = Duration::from_secs(30);
        let start = Instant::now();
        let mut unowned = Unowned::default();
        unowned.observe(start, &[(1, 0)], grace);
        // Retried and claimed again (its new worker was deleted too): a new claim.
        assert!(unowned.observe(start + grace, &[(1, 1)], grace).is_empty());
        assert_eq!(
            unowned.observe(start + grace * 2, &[(1, 1)], grace),
            vec![(1, 1)]
        );
    }
}
