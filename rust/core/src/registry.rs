//! The worker's row in `procrastinate_workers` (through procrastinate's own functions) and
//! the slow periodic duties: heartbeat, abort-request polling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_postgres::Client;

use crate::connect::ConnectionTarget;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::handoff::{HandoffEvent, HandoffSender, LogLevel};

const CHECK_SCHEMA: &str = "SELECT to_regclass('procrastinate_jobs') IS NOT NULL";
const PRUNE_STALLED_WORKERS: &str =
    "SELECT worker_id FROM procrastinate_prune_stalled_workers_v1($1::float8)";
const REGISTER_WORKER: &str = "SELECT worker_id FROM procrastinate_register_worker_v1()";
const UNREGISTER_WORKER: &str = "SELECT procrastinate_unregister_worker_v1($1::bigint)";
const UPDATE_HEARTBEAT: &str = "SELECT procrastinate_update_heartbeat_v1($1::bigint)";
/// The stalled workers, locked until the end of the recovery transaction. Same rule as
/// `procrastinate_prune_stalled_workers_v1`; `now()` is the transaction's start, so the
/// function, run later in the same transaction, deletes exactly these rows.
const LOCK_STALLED_WORKERS: &str = "SELECT id FROM procrastinate_workers
 WHERE last_heartbeat < now() - ($1::float8 || ' SECOND')::interval
 ORDER BY id FOR UPDATE";
/// Their `doing` jobs, read (and locked) before the prune sets their `worker_id` to NULL.
const JOBS_OF_WORKERS: &str = "SELECT id FROM procrastinate_jobs
 WHERE worker_id = ANY($1::bigint[]) AND status = 'doing' ORDER BY id FOR UPDATE";
/// `procrastinate_retry_job_v2` for each job, as procrastinate's `JobManager.retry_job(job)`
/// does (retry now, priority, queue and lock unchanged): event `deferred_for_retry`.
const RETRY_JOBS: &str =
    "SELECT procrastinate_retry_job_v2(id, now(), NULL, NULL, NULL) FROM unnest($1::bigint[]) AS id";
const RETRY_ONE_JOB: &str =
    "SELECT procrastinate_retry_job_v2($1::bigint, now(), NULL, NULL, NULL)";
const FAIL_ONE_JOB: &str =
    "SELECT procrastinate_finish_job_v1($1::bigint, 'failed'::procrastinate_job_status, false)";
const JOBS_TO_ABORT: &str = "SELECT id FROM procrastinate_jobs
 WHERE status = 'doing' AND abort_requested AND worker_id = $1::bigint";

pub async fn check_schema(target: &ConnectionTarget, client: &Client) -> CoreResult<()> {
    let row = client
        .query_one(CHECK_SCHEMA, &[])
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

/// Delete workers whose heartbeat is older than `stalled_worker_timeout`, as procrastinate's
/// worker does at start. Their `doing` jobs keep running nowhere (worker_id becomes NULL).
pub async fn prune_stalled_workers(client: &Client, timeout: Duration) -> CoreResult<Vec<i64>> {
    let rows = client
        .query(PRUNE_STALLED_WORKERS, &[&timeout.as_secs_f64()])
        .await
        .map_err(|error| CoreError::database("pruning stalled workers", error))?;
    rows.iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(|error| CoreError::database("pruning stalled workers", error))
}

/// What [`prune_and_recover_stalled_jobs`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovery {
    pub pruned_workers: Vec<i64>,
    /// Jobs of the pruned workers put back to `todo` (`procrastinate_retry_job_v2`).
    pub retried: Vec<i64>,
    /// Jobs that could not go back to `todo` (another job with the same `queueing_lock`
    /// is already waiting) and were marked `failed` instead, with the reason.
    pub failed: Vec<(i64, String)>,
}

/// `recover_stalled_jobs=True`: prune the stalled workers like procrastinate, and put the
/// jobs they held in `doing` back to run, in one transaction. Two workers doing this at
/// once recover each job once: the worker rows are locked, the second finds them gone.
///
/// `own_worker_id`: the running worker's own row gets its heartbeat in the same transaction
/// first, so it never prunes itself (its heartbeat could be late if the registry's
/// connection was down for a while).
pub async fn prune_and_recover_stalled_jobs(
    client: &mut Client,
    timeout: Duration,
    own_worker_id: Option<i64>,
) -> CoreResult<Recovery> {
    const WHAT: &str = "pruning stalled workers and recovering their jobs";
    let db = |error| CoreError::database(WHAT, error);
    let mut transaction = client.transaction().await.map_err(db)?;
    if let Some(worker_id) = own_worker_id {
        transaction
            .execute(UPDATE_HEARTBEAT, &[&worker_id])
            .await
            .map_err(db)?;
    }
    let seconds = timeout.as_secs_f64();
    let stalled: Vec<i64> = transaction
        .query(LOCK_STALLED_WORKERS, &[&seconds])
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(db)?;
    if stalled.is_empty() {
        transaction.commit().await.map_err(db)?;
        return Ok(Recovery::default());
    }
    let jobs: Vec<i64> = transaction
        .query(JOBS_OF_WORKERS, &[&stalled])
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let pruned_workers: Vec<i64> = transaction
        .query(PRUNE_STALLED_WORKERS, &[&seconds])
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut recovery = Recovery {
        pruned_workers,
        ..Recovery::default()
    };
    if !jobs.is_empty() {
        // All at once; if one job refuses (a queueing_lock conflict), one by one.
        let all = transaction
            .savepoint("fastworker_recover_all")
            .await
            .map_err(db)?;
        match all.execute(RETRY_JOBS, &[&jobs]).await {
            Ok(_) => {
                all.commit().await.map_err(db)?;
                recovery.retried = jobs;
            }
            Err(error) if is_connectivity_error(&error) => return Err(db(error)),
            Err(_) => {
                all.rollback().await.map_err(db)?;
                for job_id in jobs {
                    let one = transaction
                        .savepoint("fastworker_recover_one")
                        .await
                        .map_err(db)?;
                    match one.execute(RETRY_ONE_JOB, &[&job_id]).await {
                        Ok(_) => {
                            one.commit().await.map_err(db)?;
                            recovery.retried.push(job_id);
                            continue;
                        }
                        Err(error) if is_connectivity_error(&error) => return Err(db(error)),
                        Err(error) => {
                            one.rollback().await.map_err(db)?;
                            let reason = error
                                .as_db_error()
                                .map(|db_error| db_error.message().to_string())
                                .unwrap_or_else(|| error.to_string());
                            transaction
                                .execute(FAIL_ONE_JOB, &[&job_id])
                                .await
                                .map_err(db)?;
                            recovery.failed.push((job_id, reason));
                        }
                    }
                }
            }
        }
    }
    transaction.commit().await.map_err(db)?;
    Ok(recovery)
}

/// Log what a recovery did, with procrastinate-style `action` extras.
pub fn log_recovery(handoff: &HandoffSender, recovery: &Recovery) {
    if !recovery.retried.is_empty() {
        handoff.log(
            LogLevel::Warning,
            "stalled_jobs_retried",
            format!(
                "Put {} jobs of stalled workers {:?} back to run: {:?}",
                recovery.retried.len(),
                recovery.pruned_workers,
                recovery.retried
            ),
        );
    }
    for (job_id, reason) in &recovery.failed {
        handoff.log_job(
            LogLevel::Error,
            "stalled_job_failed",
            *job_id,
            format!("Stalled job {job_id} could not be retried and was marked failed: {reason}"),
        );
    }
}

pub async fn register_worker(client: &Client) -> CoreResult<i64> {
    let row = client
        .query_one(REGISTER_WORKER, &[])
        .await
        .map_err(|error| CoreError::database("registering the worker", error))?;
    row.try_get(0)
        .map_err(|error| CoreError::database("registering the worker", error))
}

pub struct Registry {
    pub target: ConnectionTarget,
    pub client: Client,
    pub worker_id: i64,
    pub handoff: HandoffSender,
    pub in_flight: Arc<AtomicUsize>,
    pub heartbeat_interval: Duration,
    pub abort_polling_interval: Duration,
    pub stop: watch::Receiver<bool>,
    /// `recover_stalled_jobs`: also prune and recover periodically (every
    /// `stalled_worker_timeout`), waking the dispatcher when jobs went back to `todo`.
    pub recover_stalled: Option<Duration>,
    pub wake: Arc<Notify>,
}

impl Registry {
    /// Heartbeat and abort polling until stopped; returns itself so the caller can unregister.
    pub async fn run(mut self) -> Self {
        let mut heartbeat =
            tokio::time::interval(self.heartbeat_interval.max(Duration::from_millis(10)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut abort_poll =
            tokio::time::interval(self.abort_polling_interval.max(Duration::from_millis(10)));
        abort_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        abort_poll.tick().await;
        let recover_period = self
            .recover_stalled
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_secs(1));
        let mut recover = tokio::time::interval(recover_period);
        recover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recover.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.changed() => return self,
                _ = heartbeat.tick() => {
                    let result = self.client.execute(UPDATE_HEARTBEAT, &[&self.worker_id]).await;
                    self.after(result.map(|_| ()), "heartbeat_failed", "updating the heartbeat").await;
                }
                _ = recover.tick(), if self.recover_stalled.is_some() => {
                    let timeout = self.recover_stalled.unwrap_or_default();
                    match prune_and_recover_stalled_jobs(&mut self.client, timeout, Some(self.worker_id)).await {
                        Ok(recovery) => {
                            log_recovery(&self.handoff, &recovery);
                            if !recovery.retried.is_empty() {
                                self.wake.notify_one();
                            }
                        }
                        Err(CoreError::Database { source, .. }) => {
                            self.after(Err(source), "recover_stalled_jobs_error", "recovering stalled jobs").await;
                        }
                        Err(error) => self.handoff.log(
                            LogLevel::Warning,
                            "recover_stalled_jobs_error",
                            format!("Error recovering stalled jobs: {error}"),
                        ),
                    }
                }
                _ = abort_poll.tick() => {
                    if self.in_flight.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    match self.client.query(JOBS_TO_ABORT, &[&self.worker_id]).await {
                        Ok(rows) => {
                            let ids: Vec<i64> = rows.iter().filter_map(|row| row.try_get(0).ok()).collect();
                            if !ids.is_empty() {
                                self.handoff.send(HandoffEvent::Abort(ids));
                            }
                        }
                        Err(error) => self.after(Err(error), "poll_jobs_to_abort_error", "polling jobs to abort").await,
                    }
                }
            }
        }
    }

    async fn after(
        &mut self,
        result: Result<(), tokio_postgres::Error>,
        action: &'static str,
        what: &str,
    ) {
        let Err(error) = result else { return };
        self.handoff
            .log(LogLevel::Warning, action, format!("Error {what}: {error}"));
        if is_connectivity_error(&error) || self.client.is_closed() {
            // One attempt per tick: these duties are periodic, the next tick retries.
            if let Ok(client) = self.target.connect().await {
                self.client = client;
            }
        }
    }

    pub async fn unregister(&mut self) -> CoreResult<()> {
        if self.client.is_closed() {
            self.client = self
                .target
                .connect_with_backoff(Duration::from_secs(5))
                .await?;
        }
        self.client
            .execute(UNREGISTER_WORKER, &[&self.worker_id])
            .await
            .map_err(|error| CoreError::database("unregistering the worker", error))?;
        Ok(())
    }
}
