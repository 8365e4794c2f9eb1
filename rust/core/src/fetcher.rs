//! The claim: procrastinate's `procrastinate_fetch_job_v2`, for a whole batch in one statement.
//!
//! Same rules as the function: status `todo`, the queue filter, `scheduled_at <= now()`,
//! `priority DESC, id ASC`, the lock rule, `FOR UPDATE SKIP LOCKED`, then `status = 'doing'`
//! and `worker_id`. The `LIMIT` subtracts the jobs this worker already holds in `doing`, so the
//! database itself enforces "never more than `concurrency` jobs in `doing`", even if the
//! core's own bookkeeping were wrong (a lost reply, a completion not yet written).

use std::collections::HashSet;

use tokio_postgres::types::ToSql;

use crate::db::{Db, Prepared, Within};

use crate::completer::CompletionBatch;
use crate::errors::{CoreError, CoreResult};
use crate::protocol::JobRow;
use crate::sql;

/// Room left in the queues that have a per-queue concurrency limit.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct QueueRoom {
    /// Limited queues with no room: not even considered.
    pub full: Vec<String>,
    /// Limited queues with room, and how much.
    pub names: Vec<String>,
    pub free: Vec<i64>,
}

impl QueueRoom {
    /// `limits` by queue; `held` is how many jobs of each queue this worker holds.
    pub fn compute(
        limits: &std::collections::HashMap<String, usize>,
        held: &std::collections::HashMap<String, usize>,
    ) -> QueueRoom {
        let mut room = QueueRoom::default();
        for (queue, limit) in limits {
            let free = limit.saturating_sub(held.get(queue).copied().unwrap_or(0));
            if free == 0 {
                room.full.push(queue.clone());
            } else {
                room.names.push(queue.clone());
                room.free.push(i64::try_from(free).unwrap_or(i64::MAX));
            }
        }
        room
    }

    /// Room for any job at all, in the limited queues (the unlimited ones always have room).
    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.names.is_empty()
    }
}

/// The job connection's own settings, on top of [`crate::connect`]'s.
/// - `enable_sort = off`: a generic plan takes a `LIMIT` of unknown value as 10% of the
///   rows, so it may read every `todo` job and sort them rather than walk the priority
///   index, which already gives the claim order (seen on a table grown since its last
///   ANALYZE). With sorts disabled the index wins; sorts that have no alternative (of a few
///   claimed rows, of the orphans) still happen. Only on this connection: elsewhere it
///   could turn a small sort into a walk of a whole index.
///
/// (The common `lock_timeout` matters most here: a job row that another session keeps
/// locked makes its terminal write fail after a moment, to be sent again later, instead of
/// holding back every other completion and claim behind it.)
const CLAIM_SETTINGS: [(&str, &str); 1] = [("enable_sort", "off")];

/// Who claims: this worker's current id, and every id this process has had (see
/// [`crate::registry::Identity`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Claimant {
    pub worker_id: i64,
    pub worker_ids: Vec<i64>,
}

pub struct Fetcher {
    statement: Prepared,
    completing_statement: Prepared,
    queues: Option<Vec<String>>,
    concurrency: i64,
    /// Per-queue limits are set: the statements with their steps (and 3 more parameters).
    queue_limits: bool,
}

impl Fetcher {
    /// `queue_limits`: whether `queue_concurrency` is set; without it, the claim leaves
    /// out the per-queue steps (a window function and sorts) altogether.
    pub async fn prepare(
        client: &mut Db,
        queues: Option<Vec<String>>,
        concurrency: usize,
        queue_limits: bool,
    ) -> CoreResult<Self> {
        for (name, value) in CLAIM_SETTINGS {
            client
                .set(name, value)
                .await
                .map_err(|error| CoreError::database("setting up the job session", error))?;
        }
        let failed = |error| CoreError::database("preparing the claim statements", error);
        let (statement, completing_statement) = if queue_limits {
            (
                client
                    .prepare(sql::CLAIM_WITH_QUEUE_LIMITS)
                    .await
                    .map_err(failed)?,
                client
                    .prepare(sql::COMPLETE_AND_CLAIM_WITH_QUEUE_LIMITS)
                    .await
                    .map_err(failed)?,
            )
        } else {
            (
                client.prepare(sql::CLAIM).await.map_err(failed)?,
                client
                    .prepare(sql::COMPLETE_AND_CLAIM)
                    .await
                    .map_err(failed)?,
            )
        };
        Ok(Fetcher {
            statement,
            completing_statement,
            queues,
            concurrency: i64::try_from(concurrency).unwrap_or(i64::MAX),
            queue_limits,
        })
    }

    /// Claim up to `limit` jobs, in the order procrastinate would have fetched them one by one.
    /// `abandoned`: jobs of this worker still `doing` whose terminal write was refused; they
    /// do not count against `concurrency`.
    pub async fn claim(
        &self,
        client: &Db,
        within: Within,
        claimant: &Claimant,
        limit: usize,
        room: &QueueRoom,
        abandoned: &[i64],
    ) -> Result<Vec<JobRow>, tokio_postgres::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut params = self.claim_params(claimant, &limit, &abandoned);
        self.add_room(&mut params, room);
        let rows = client
            .query_prepared(&self.statement, &params, within)
            .await?;
        let jobs = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(in_start_order(jobs))
    }

    /// Write a batch without retries and claim in the same statement
    /// ([`sql::COMPLETE_AND_CLAIM`]): the claimed jobs, and the ids whose claim it ended.
    pub async fn complete_and_claim(
        &self,
        client: &Db,
        claimant: &Claimant,
        batch: &CompletionBatch,
        limit: usize,
        room: &QueueRoom,
        abandoned: &[i64],
    ) -> Result<(Vec<JobRow>, HashSet<i64>), tokio_postgres::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut params = self.claim_params(claimant, &limit, &abandoned);
        params.extend([
            &batch.finish_ids as &(dyn ToSql + Sync),
            &batch.finish_attempts,
            &batch.finish_statuses,
            &batch.delete_ids,
            &batch.delete_attempts,
            &claimant.worker_ids,
        ]);
        self.add_room(&mut params, room);
        let rows = client
            .query_prepared(&self.completing_statement, &params, Within::OwnTransaction)
            .await?;
        let mut jobs = Vec::new();
        let mut done = HashSet::new();
        for row in &rows {
            if row.try_get::<_, bool>(sql::CLAIMED_COLUMN)? {
                jobs.push(JobRow::from_row(row)?);
            } else {
                done.insert(row.try_get::<_, i64>(0)?);
            }
        }
        Ok((in_start_order(jobs), done))
    }

    /// `$1` to `$5` of both claim statements (see [`sql::CLAIM`]).
    fn claim_params<'a>(
        &'a self,
        claimant: &'a Claimant,
        limit: &'a i64,
        abandoned: &'a &[i64],
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            &self.queues,
            &claimant.worker_id,
            limit,
            &self.concurrency,
            abandoned,
        ]
    }

    /// The last three parameters of the statements with per-queue limits.
    fn add_room<'a>(&self, params: &mut Vec<&'a (dyn ToSql + Sync)>, room: &'a QueueRoom) {
        if self.queue_limits {
            params.extend([&room.full as &(dyn ToSql + Sync), &room.names, &room.free]);
        }
    }
}

/// In start order, as procrastinate's one-by-one fetch would start them (UPDATE ...
/// RETURNING does not keep the candidates' order, nor does the orphan search have one).
pub fn in_start_order(mut jobs: Vec<JobRow>) -> Vec<JobRow> {
    jobs.sort_unstable_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn queue_room_splits_full_and_free_queues() {
        let limits = HashMap::from([("emails".to_string(), 2), ("reports".to_string(), 3)]);
        let held = HashMap::from([("emails".to_string(), 2), ("reports".to_string(), 1)]);
        let room = QueueRoom::compute(&limits, &held);
        assert_eq!(room.full, vec!["emails".to_string()]);
        assert_eq!(room.names, vec!["reports".to_string()]);
        assert_eq!(room.free, vec![2]);
        assert!(QueueRoom::compute(&HashMap::new(), &held).is_empty());
    }
}
