//! `recover_stalled_jobs`: pruning stalled workers, and putting their jobs (and the jobs
//! left without a worker) back to run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_postgres::Transaction;

use super::{query_claims, query_ids, query_ids_in, unless_stopped, Identity};
use crate::connect::ConnectionTarget;
use crate::db::{execute_in, Db};
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::handoff::HandoffSender;
use crate::protocol::LogLevel;
use crate::sql;
use crate::timing::ticker;

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
    let transaction = client.transaction().await.map_err(db)?;
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
    let recovered = Recovered {
        pruned_workers,
        ..Recovered::default()
    };
    retry_and_commit(transaction, jobs, recovered)
        .await
        .map_err(db)
}

/// [`retry_or_fail`] the `jobs` locked by `transaction` (if any), into `recovered`; commit.
async fn retry_and_commit(
    mut transaction: Transaction<'_>,
    jobs: Vec<i64>,
    mut recovered: Recovered,
) -> Result<Recovered, tokio_postgres::Error> {
    if !jobs.is_empty() {
        retry_or_fail(&mut transaction, jobs)
            .await?
            .record_in(&mut recovered);
    }
    transaction.commit().await?;
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
    let transaction = client.transaction().await.map_err(db)?;
    let locked = query_ids_in(&transaction, sql::LOCK_UNOWNED_JOBS, &[&ids, &attempts])
        .await
        .map_err(db)?;
    retry_and_commit(transaction, locked, Recovered::default())
        .await
        .map_err(db)
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
        let mut tick = ticker(self.stalled_worker_timeout.max(Duration::from_secs(1)));
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
