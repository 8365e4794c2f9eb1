//! The terminal write of every claimed job, batched: one statement per batch with the
//! effects of `procrastinate_finish_job_v1` / `procrastinate_retry_job_v2` (and the delete
//! branch of the former), so procrastinate's triggers record the same events per row.
//! Each write is conditioned on the claim it ends (see [`crate::sql`]), so it can be
//! re-sent after a lost reply without ending a later run of the job.
//!
//! If the batched statement is refused, each completion is written on its own through
//! procrastinate's functions, so one bad row cannot hold back the others: its error is
//! reported with its job id, never dropped silently, and a write that failed for a passing
//! reason (a lock timeout, a cancelled statement) is kept to be sent again.

use crate::db::{Db, Prepared, Within};

use crate::errors::{classify, CoreError, CoreResult, Failed, Failure};
use crate::protocol::{ClaimKey, Completion, Outcome};
use crate::sql;

/// The parameter arrays of one batched statement.
#[derive(Default, Debug, PartialEq)]
pub struct CompletionBatch {
    pub finish_ids: Vec<i64>,
    pub finish_attempts: Vec<i32>,
    pub finish_statuses: Vec<&'static str>,
    pub delete_ids: Vec<i64>,
    pub delete_attempts: Vec<i32>,
    pub retry_ids: Vec<i64>,
    pub retry_attempts: Vec<i32>,
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
                Outcome::Finish { delete: true, .. } => {
                    batch.delete_ids.push(completion.job_id);
                    batch.delete_attempts.push(completion.attempts);
                }
                Outcome::Finish { status, .. } => {
                    batch.finish_ids.push(completion.job_id);
                    batch.finish_attempts.push(completion.attempts);
                    batch.finish_statuses.push(status.as_str());
                }
                Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                } => {
                    batch.retry_ids.push(completion.job_id);
                    batch.retry_attempts.push(completion.attempts);
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

/// What writing a batch did, completion by completion.
#[derive(Debug, Default)]
pub struct CompletionReport {
    /// Claims this write ended.
    pub written: Vec<ClaimKey>,
    /// Claims that were no longer current (the job ended, was deleted, recovered, or this
    /// very write had gone through before a lost reply): nothing to write any more.
    pub not_current: Vec<ClaimKey>,
    /// Claims whose write procrastinate's function refused (procrastinate's worker gets
    /// an exception in that case and the job stays `doing`), with the reason.
    pub refused: Vec<(ClaimKey, String)>,
    /// Completions to send again later: their statement failed for a passing reason.
    pub retry_later: Vec<Completion>,
}

impl CompletionReport {
    /// The report of a batched write whose statement returned the ids in `done`.
    pub fn of_batch(
        completions: &[Completion],
        done: &std::collections::HashSet<i64>,
    ) -> CompletionReport {
        let mut report = CompletionReport::default();
        for completion in completions {
            if done.contains(&completion.job_id) {
                report.written.push(completion.key());
            } else {
                report.not_current.push(completion.key());
            }
        }
        report
    }
}

pub struct Completer {
    statement: Prepared,
    finish_one: Prepared,
    retry_one: Prepared,
}

impl Completer {
    pub async fn prepare(client: &Db) -> CoreResult<Self> {
        let failed = |error| CoreError::database("preparing the completion statements", error);
        Ok(Completer {
            statement: client.prepare(sql::COMPLETE).await.map_err(failed)?,
            finish_one: client.prepare(sql::FINISH_ONE).await.map_err(failed)?,
            retry_one: client.prepare(sql::RETRY_ONE).await.map_err(failed)?,
        })
    }

    /// Write the batch: one statement, or, if that statement is refused, one
    /// procrastinate function call per completion. `Err`: nothing is known to be written
    /// (a lost connection: maybe; anything else: no).
    pub async fn write(
        &self,
        client: &Db,
        completions: &[Completion],
        workers: &[i64],
    ) -> Result<CompletionReport, Failed> {
        match self
            .write_batch(client, completions, workers, Within::OwnTransaction)
            .await
        {
            Ok(report) => Ok(report),
            // One job can hold back a batch: a refused row, or a row another session keeps
            // locked (the job session's lock_timeout). One by one, the others go through.
            Err(error) => match classify(&error) {
                Failure::Refused | Failure::Transient => {
                    self.write_one_by_one(client, completions, workers).await
                }
                _ => Err(Failed::new(&error)),
            },
        }
    }

    /// The batch as one statement, nothing else (so it can run inside a transaction).
    pub async fn write_batch(
        &self,
        client: &Db,
        completions: &[Completion],
        workers: &[i64],
        within: Within,
    ) -> Result<CompletionReport, tokio_postgres::Error> {
        let batch = CompletionBatch::build(completions);
        let rows = client
            .query_prepared(
                &self.statement,
                &[
                    &batch.finish_ids,
                    &batch.finish_attempts,
                    &batch.finish_statuses,
                    &batch.delete_ids,
                    &batch.delete_attempts,
                    &batch.retry_ids,
                    &batch.retry_attempts,
                    &batch.retry_at,
                    &batch.retry_priorities,
                    &batch.retry_queues,
                    &batch.retry_locks,
                    &workers,
                ],
                within,
            )
            .await?;
        let mut done = std::collections::HashSet::with_capacity(rows.len());
        for row in rows {
            done.insert(row.try_get::<_, i64>(0)?);
        }
        Ok(CompletionReport::of_batch(completions, &done))
    }

    /// Each completion on its own (autocommit), so that one refused write leaves the
    /// others written. A lost connection stops here (`Err`: the ones before may be
    /// written, the caller re-sends them all, conditioned on their claims).
    async fn write_one_by_one(
        &self,
        client: &Db,
        completions: &[Completion],
        workers: &[i64],
    ) -> Result<CompletionReport, Failed> {
        let mut report = CompletionReport::default();
        let mut remaining = completions.iter();
        while let Some(completion) = remaining.next() {
            let result = match &completion.outcome {
                Outcome::Finish { status, delete } => {
                    client
                        .query_prepared(
                            &self.finish_one,
                            &[
                                &completion.job_id,
                                &completion.attempts,
                                &workers,
                                &status.as_str(),
                                delete,
                            ],
                            Within::OwnTransaction,
                        )
                        .await
                }
                Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                } => {
                    client
                        .query_prepared(
                            &self.retry_one,
                            &[
                                &completion.job_id,
                                &completion.attempts,
                                &workers,
                                retry_at,
                                priority,
                                queue,
                                lock,
                            ],
                            Within::OwnTransaction,
                        )
                        .await
                }
            };
            match result {
                Ok(rows) if rows.is_empty() => report.not_current.push(completion.key()),
                Ok(_) => report.written.push(completion.key()),
                Err(error) => match classify(&error) {
                    Failure::Refused | Failure::Pruned => {
                        let reason = error
                            .as_db_error()
                            .map(|db| db.message().to_string())
                            .unwrap_or_else(|| error.to_string());
                        report.refused.push((completion.key(), reason));
                    }
                    Failure::Transient => {
                        report.retry_later.push(completion.clone());
                        if !is_about_one_row(&error) {
                            // The server refuses any statement now (a cancel, resources, a
                            // read-only server): the rest would fail alike. Later, all.
                            report.retry_later.extend(remaining.cloned());
                            break;
                        }
                    }
                    Failure::Connection => return Err(Failed::new(&error)),
                },
            }
        }
        Ok(report)
    }
}

/// A passing failure caused by the row this statement touched (another session holds its
/// lock, or a deadlock over it), not by the state of the server.
fn is_about_one_row(error: &tokio_postgres::Error) -> bool {
    let code = error.as_db_error().map(|db| db.code().code());
    matches!(code, Some("55P03" | "40P01" | "40001"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FinishStatus;

    #[test]
    fn batch_splits_by_outcome() {
        let completions = vec![
            Completion {
                job_id: 1,
                attempts: 0,
                outcome: Outcome::Finish {
                    status: FinishStatus::Succeeded,
                    delete: false,
                },
            },
            Completion {
                job_id: 2,
                attempts: 1,
                outcome: Outcome::Finish {
                    status: FinishStatus::Failed,
                    delete: true,
                },
            },
            Completion {
                job_id: 3,
                attempts: 2,
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
        assert_eq!(batch.finish_statuses, vec!["succeeded"]);
        assert_eq!(batch.finish_attempts, vec![0]);
        assert_eq!(batch.delete_ids, vec![2]);
        assert_eq!(batch.delete_attempts, vec![1]);
        assert_eq!(batch.retry_attempts, vec![2]);
        assert_eq!(batch.retry_ids, vec![3]);
        assert_eq!(batch.retry_priorities, vec![Some(5)]);
        assert_eq!(batch.retry_queues, vec![None]);
        assert_eq!(batch.retry_locks, vec![Some("l".to_string())]);
    }
}
