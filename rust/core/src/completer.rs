//! The terminal write of every claimed job, batched: one statement per batch with the
//! effects of `procrastinate_finish_job_v1` / `procrastinate_retry_job_v2` (and the delete
//! branch of the former), so procrastinate's triggers record the same events per row.
//!
//! If the batched statement fails for a reason other than connectivity, each completion is
//! written on its own through procrastinate's functions, so one bad row cannot hold back the
//! others and its error is reported with its job id, never dropped silently.

use tokio_postgres::{Client, Statement};

use crate::errors::{CoreError, CoreResult};

/// The `finished` and `deleted` steps (procrastinate_finish_job_v1's two branches), with
/// the numbers of their parameters: shared by [`COMPLETE_JOBS`] and the claim statement
/// that completes a batch on its way ([`crate::fetcher::COMPLETE_AND_CLAIM_JOBS`]).
macro_rules! finish_and_delete_steps {
    ($finish_ids:literal, $finish_statuses:literal, $delete_ids:literal) => {
        concat!(
            "
finished AS (
    UPDATE procrastinate_jobs AS job
       SET status = f.status::procrastinate_job_status,
           abort_requested = false,
           attempts = CASE job.status WHEN 'doing' THEN job.attempts + 1 ELSE job.attempts END
      FROM unnest(",
            $finish_ids,
            "::bigint[], ",
            $finish_statuses,
            "::text[]) AS f(id, status)
     WHERE job.id = f.id AND job.status IN ('todo', 'doing')
    RETURNING job.id
), deleted AS (
    DELETE FROM procrastinate_jobs AS job
     WHERE job.id = ANY(",
            $delete_ids,
            "::bigint[]) AND job.status IN ('todo', 'doing')
    RETURNING job.id
)"
        )
    };
}
pub(crate) use finish_and_delete_steps;

pub const COMPLETE_JOBS: &str = concat!(
    "WITH ",
    finish_and_delete_steps!("$1", "$2", "$3"),
    ", retried AS (
    UPDATE procrastinate_jobs AS job
       SET status = CASE WHEN job.status = 'doing' AND job.abort_requested
                         THEN 'failed' ELSE 'todo' END::procrastinate_job_status,
           attempts = CASE WHEN job.status = 'doing' AND job.abort_requested
                           THEN job.attempts ELSE job.attempts + 1 END,
           scheduled_at = CASE WHEN job.status = 'doing' AND job.abort_requested
                               THEN job.scheduled_at ELSE r.retry_at::timestamptz END,
           priority = CASE WHEN job.status = 'doing' AND job.abort_requested
                           THEN job.priority ELSE coalesce(r.priority, job.priority) END,
           queue_name = CASE WHEN job.status = 'doing' AND job.abort_requested
                             THEN job.queue_name ELSE coalesce(r.queue_name, job.queue_name) END,
           lock = CASE WHEN job.status = 'doing' AND job.abort_requested
                       THEN job.lock ELSE coalesce(r.lock, job.lock) END
      FROM unnest($4::bigint[], $5::text[], $6::int[], $7::text[], $8::text[])
           AS r(id, retry_at, priority, queue_name, lock)
     WHERE job.id = r.id AND job.status IN ('doing', 'failed')
    RETURNING job.id
)
SELECT id FROM finished
UNION ALL SELECT id FROM deleted
UNION ALL SELECT id FROM retried"
);

const FINISH_ONE: &str = "SELECT procrastinate_finish_job_v1($1::bigint, $2::text::procrastinate_job_status, $3::boolean)";
const RETRY_ONE: &str = "SELECT procrastinate_retry_job_v2($1::bigint, $2::text::timestamptz, $3::int, $4::text, $5::text)";

/// How a job ended, as procrastinate's worker decides it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `procrastinate_finish_job_v1(id, status, delete_job)`; status is one of
    /// `succeeded`, `failed`, `aborted`.
    Finish { status: String, delete: bool },
    /// `procrastinate_retry_job_v2(id, retry_at, priority, queue, lock)`; `retry_at` is an
    /// ISO-8601 timestamp with offset (as PostgreSQL parses `timestamptz`).
    Retry {
        retry_at: Option<String>,
        priority: Option<i32>,
        queue: Option<String>,
        lock: Option<String>,
    },
}

/// Outcomes as the runner reported them in one call; `durations` (seconds each job ran)
/// is either empty or one per completion, and only feeds the metrics.
#[derive(Debug, Default)]
pub struct Reported {
    pub completions: Vec<Completion>,
    pub durations: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub job_id: i64,
    pub outcome: Outcome,
}

/// The parameter arrays of one batched statement.
#[derive(Default, Debug, PartialEq)]
pub struct CompletionBatch {
    pub finish_ids: Vec<i64>,
    pub finish_statuses: Vec<String>,
    pub delete_ids: Vec<i64>,
    pub retry_ids: Vec<i64>,
    pub retry_at: Vec<Option<String>>,
    pub retry_priorities: Vec<Option<i32>>,
    pub retry_queues: Vec<Option<String>>,
    pub retry_locks: Vec<Option<String>>,
}

impl CompletionBatch {
    pub fn build(completions: &[Completion]) -> Self {
        let mut batch = CompletionBatch::default();
        for completion in completions {
            match &completion.outcome {
                Outcome::Finish { delete: true, .. } => batch.delete_ids.push(completion.job_id),
                Outcome::Finish { status, .. } => {
                    batch.finish_ids.push(completion.job_id);
                    batch.finish_statuses.push(status.clone());
                }
                Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                } => {
                    batch.retry_ids.push(completion.job_id);
                    batch.retry_at.push(retry_at.clone());
                    batch.retry_priorities.push(*priority);
                    batch.retry_queues.push(queue.clone());
                    batch.retry_locks.push(lock.clone());
                }
            }
        }
        batch
    }

    pub fn has_retries(&self) -> bool {
        !self.retry_ids.is_empty()
    }

    /// The jobs this batch ends for good (finished or deleted, not retried).
    pub fn ending_ids(&self) -> Vec<i64> {
        self.finish_ids
            .iter()
            .chain(&self.delete_ids)
            .copied()
            .collect()
    }
}

/// What writing a batch did.
#[derive(Debug, Default)]
pub struct CompletionReport {
    /// Jobs whose terminal write is done (including those whose row had disappeared).
    pub written: Vec<i64>,
    /// Jobs that were not in a state procrastinate's functions accept (procrastinate's
    /// worker gets an exception from the function in that case), with the reason.
    pub rejected: Vec<(i64, String)>,
}

impl CompletionReport {
    /// The report of a batched write whose statement returned the ids in `done`: the others
    /// were not in a state procrastinate's functions accept.
    pub fn of_batch(
        completions: &[Completion],
        done: &std::collections::HashSet<i64>,
    ) -> CompletionReport {
        let mut report = CompletionReport::default();
        for completion in completions {
            report.written.push(completion.job_id);
            if !done.contains(&completion.job_id) {
                report.rejected.push((
                    completion.job_id,
                    format!(
                        "Job was not found or not in \"doing\" status (job id: {})",
                        completion.job_id
                    ),
                ));
            }
        }
        report
    }
}

pub struct Completer {
    statement: Statement,
}

impl Completer {
    pub async fn prepare(client: &Client) -> CoreResult<Self> {
        let statement = client
            .prepare(COMPLETE_JOBS)
            .await
            .map_err(|error| CoreError::database("preparing the completion statement", error))?;
        Ok(Completer { statement })
    }

    /// Write the batch: one statement, or, if that statement fails for a reason other than
    /// connectivity, one procrastinate function call per completion. A connectivity error
    /// comes back as `Err` for the caller to retry.
    pub async fn write(
        &self,
        client: &Client,
        completions: &[Completion],
    ) -> Result<CompletionReport, tokio_postgres::Error> {
        match self.write_batch(client, completions).await {
            Ok(report) => Ok(report),
            Err(error) if crate::errors::is_connectivity_error(&error) => Err(error),
            Err(_) => self.write_one_by_one(client, completions).await,
        }
    }

    /// The batch as one statement, nothing else (so it can run inside a transaction).
    pub async fn write_batch(
        &self,
        client: &Client,
        completions: &[Completion],
    ) -> Result<CompletionReport, tokio_postgres::Error> {
        let batch = CompletionBatch::build(completions);
        let result = client
            .query(
                &self.statement,
                &[
                    &batch.finish_ids,
                    &batch.finish_statuses,
                    &batch.delete_ids,
                    &batch.retry_ids,
                    &batch.retry_at,
                    &batch.retry_priorities,
                    &batch.retry_queues,
                    &batch.retry_locks,
                ],
            )
            .await;
        let rows = result?;
        let mut done = std::collections::HashSet::with_capacity(rows.len());
        for row in rows {
            done.insert(row.try_get::<_, i64>(0)?);
        }
        Ok(CompletionReport::of_batch(completions, &done))
    }

    async fn write_one_by_one(
        &self,
        client: &Client,
        completions: &[Completion],
    ) -> Result<CompletionReport, tokio_postgres::Error> {
        let mut report = CompletionReport::default();
        for completion in completions {
            let result = match &completion.outcome {
                Outcome::Finish { status, delete } => {
                    client
                        .execute(FINISH_ONE, &[&completion.job_id, status, delete])
                        .await
                }
                Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                } => {
                    client
                        .execute(
                            RETRY_ONE,
                            &[&completion.job_id, retry_at, priority, queue, lock],
                        )
                        .await
                }
            };
            match result {
                Ok(_) => report.written.push(completion.job_id),
                Err(error) if crate::errors::is_connectivity_error(&error) => return Err(error),
                Err(error) => {
                    report.written.push(completion.job_id);
                    let reason = error
                        .as_db_error()
                        .map(|db| db.message().to_string())
                        .unwrap_or_else(|| error.to_string());
                    report.rejected.push((completion.job_id, reason));
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_splits_by_outcome() {
        let completions = vec![
            Completion {
                job_id: 1,
                outcome: Outcome::Finish {
                    status: "succeeded".into(),
                    delete: false,
                },
            },
            Completion {
                job_id: 2,
                outcome: Outcome::Finish {
                    status: "failed".into(),
                    delete: true,
                },
            },
            Completion {
                job_id: 3,
                outcome: Outcome::Retry {
                    retry_at: Some("2030-01-01T00:00:00+00:00".into()),
                    priority: Some(5),
                    queue: None,
                    lock: Some("l".into()),
                },
            },
        ];
        let batch = CompletionBatch::build(&completions);
        assert_eq!(batch.finish_ids, vec![1]);
        assert_eq!(batch.finish_statuses, vec!["succeeded".to_string()]);
        assert_eq!(batch.delete_ids, vec![2]);
        assert_eq!(batch.retry_ids, vec![3]);
        assert_eq!(batch.retry_priorities, vec![Some(5)]);
        assert_eq!(batch.retry_queues, vec![None]);
        assert_eq!(batch.retry_locks, vec![Some("l".to_string())]);
    }
}
