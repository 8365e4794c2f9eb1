//! The claim: procrastinate's `procrastinate_fetch_job_v2`, for a whole batch in one statement.
//!
//! Same rules as the function: status `todo`, the queue filter, `scheduled_at <= now()`,
//! `priority DESC, id ASC`, the lock rule, `FOR UPDATE SKIP LOCKED`, then `status = 'doing'`
//! and `worker_id`. The `LIMIT` subtracts the jobs this worker already holds in `doing`, so the
//! database itself enforces "never more than `concurrency` jobs in `doing`", even if the
//! core's own bookkeeping were wrong (a lost reply, a completion not yet written).

use std::collections::HashSet;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use crate::completer::CompletionBatch;
use crate::errors::{CoreError, CoreResult};

/// The claim's steps up to the choice of jobs (`allowed`). Parameters: `$1` queues, `$2`
/// worker id, `$3` limit, `$4` concurrency, `$5` full queues, `$6`/`$7` room per limited
/// queue, `$8` abandoned jobs, `$9` jobs the same statement ends (see
/// [`COMPLETE_AND_CLAIM_JOBS`]): they are still `doing` in its snapshot, yet hold neither a
/// lock nor a slot once it commits.
macro_rules! claim_steps {
    () => {
        "
candidate AS (
    SELECT jobs.id, jobs.priority, jobs.queue_name
      FROM procrastinate_jobs AS jobs
     -- procrastinate's lock rule. Written as `lock IS NULL OR NOT EXISTS` (the same truth
     -- table as its `NOT EXISTS (... jobs.lock IS NOT NULL ...)`) so the planner keeps it a
     -- per-row subplan, run only for locked candidates, instead of a hash anti-join that
     -- reads every job of the table on each claim.
     WHERE (jobs.lock IS NULL OR NOT EXISTS (
               SELECT 1
                 FROM procrastinate_jobs AS other_jobs
                WHERE other_jobs.lock = jobs.lock
                  AND NOT (other_jobs.id = ANY($9::bigint[]))
                  AND (
                        other_jobs.status = 'doing'
                        OR (
                            other_jobs.status = 'todo'
                            AND (
                                other_jobs.priority > jobs.priority
                                OR (other_jobs.priority = jobs.priority AND other_jobs.id < jobs.id)
                            )
                        )
                  )
           ))
       AND jobs.status = 'todo'
       AND ($1::varchar[] IS NULL OR jobs.queue_name = ANY($1::varchar[]))
       AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
       -- Queues at their per-queue concurrency limit (fastworker's queue_concurrency).
       AND NOT (jobs.queue_name = ANY($5::varchar[]))
       AND NOT (jobs.id = ANY($9::bigint[]))
     ORDER BY jobs.priority DESC, jobs.id ASC
     -- A plain parameter: the planner sees the value and walks the priority index. (An
     -- expression here made it sort the whole table: 20 ms per claim on 20,000 jobs.)
     LIMIT $3::bigint
       FOR UPDATE OF jobs SKIP LOCKED
), within_queue_limits AS (
    -- Per-queue limits: keep, in claim order, no more of a limited queue than it has room
    -- for. (Window functions are not allowed next to FOR UPDATE, hence this step.)
    SELECT ranked.id, ranked.priority
      FROM (
            SELECT candidate.id, candidate.priority, candidate.queue_name,
                   row_number() OVER (PARTITION BY candidate.queue_name
                                      ORDER BY candidate.priority DESC, candidate.id ASC) AS rank
              FROM candidate
           ) AS ranked
      LEFT JOIN unnest($6::varchar[], $7::bigint[]) AS room(queue_name, free)
             ON room.queue_name = ranked.queue_name
     WHERE room.free IS NULL OR ranked.rank <= room.free
), allowed AS (
    SELECT within_queue_limits.id
      FROM within_queue_limits
     ORDER BY within_queue_limits.priority DESC, within_queue_limits.id ASC
     LIMIT greatest(0, $4::bigint - (
               SELECT count(*) FROM procrastinate_jobs AS held
                WHERE held.worker_id = $2::bigint AND held.status = 'doing'
                  -- Jobs that ended but whose terminal write the database refused: they
                  -- stay `doing`, yet no longer take a slot (procrastinate frees it too).
                  AND NOT (held.id = ANY($8::bigint[]))
                  AND NOT (held.id = ANY($9::bigint[]))))
)"
    };
}

/// `status = 'doing'` and the worker on the allowed jobs, returning what the runner needs.
macro_rules! claim_update {
    () => {
        "
UPDATE procrastinate_jobs AS job
   SET status = 'doing', worker_id = $2::bigint
  FROM allowed
 WHERE job.id = allowed.id
RETURNING job.id, job.status::text AS status, job.task_name, job.priority, job.lock,
          job.queueing_lock, job.args::text AS args,
          (extract(epoch FROM job.scheduled_at) * 1000000)::bigint AS scheduled_at_us,
          job.queue_name, job.attempts, job.worker_id"
    };
}

pub const CLAIM_JOBS: &str = concat!("WITH ", claim_steps!(), claim_update!());

/// One statement, so one message and one commit for a whole round trip: the batch's
/// finished and deleted jobs (`$10` ids, `$11` statuses, `$12` deleted ids, as in
/// [`crate::completer::COMPLETE_JOBS`]) and the claim of the slots they free (`$9` = the
/// ids of `$10` and `$12`). Rows: the claimed jobs with `true` last, then one row per
/// written completion (its id, `false` last). Retries go through the two-statement
/// transaction instead: a retried job may be claimable at once, which this statement's
/// snapshot could not see.
pub const COMPLETE_AND_CLAIM_JOBS: &str = concat!(
    "WITH ",
    crate::completer::finish_and_delete_steps!("$10", "$11", "$12"),
    ", ",
    claim_steps!(),
    ", claimed AS (",
    claim_update!(),
    "
)
SELECT claimed.*, true FROM claimed
UNION ALL SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false FROM finished
UNION ALL SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false FROM deleted"
);

/// One claimed job, as the runner needs it. `args` stays JSON text: the runner parses it
/// with its own JSON decoder, which is faster than building objects field by field.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRow {
    pub id: i64,
    pub status: String,
    pub task_name: String,
    pub priority: i32,
    pub lock: Option<String>,
    pub queueing_lock: Option<String>,
    pub args: String,
    /// Microseconds since the Unix epoch.
    pub scheduled_at_us: Option<i64>,
    pub queue_name: String,
    pub attempts: i32,
    pub worker_id: Option<i64>,
}

impl JobRow {
    pub fn from_row(row: &Row) -> Result<JobRow, tokio_postgres::Error> {
        Ok(JobRow {
            id: row.try_get(0)?,
            status: row.try_get(1)?,
            task_name: row.try_get(2)?,
            priority: row.try_get(3)?,
            lock: row.try_get(4)?,
            queueing_lock: row.try_get(5)?,
            args: row.try_get(6)?,
            scheduled_at_us: row.try_get(7)?,
            queue_name: row.try_get(8)?,
            attempts: row.try_get(9)?,
            worker_id: row.try_get(10)?,
        })
    }
}

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

/// The job connection's own setting, on top of [`crate::connect`]'s. A generic plan takes a
/// `LIMIT` of unknown value as 10% of the rows, so it may read every `todo` job and sort
/// them rather than walk the priority index, which already gives the claim order (seen on
/// a table grown since its last ANALYZE). With sorts disabled the index wins; sorts that
/// have no alternative (of a few claimed rows, of the orphans) still happen. Only on this
/// connection: elsewhere it could turn a small sort into a walk of a whole index.
const CLAIM_SESSION_SETUP: &str = "SET enable_sort TO off";

pub struct Fetcher {
    statement: Statement,
    completing_statement: Statement,
    queues: Option<Vec<String>>,
    worker_id: i64,
    concurrency: i64,
}

impl Fetcher {
    pub async fn prepare(
        client: &Client,
        queues: Option<Vec<String>>,
        worker_id: i64,
        concurrency: usize,
    ) -> CoreResult<Self> {
        client
            .batch_execute(CLAIM_SESSION_SETUP)
            .await
            .map_err(|error| CoreError::database("setting up the job session", error))?;
        let statement = client
            .prepare(CLAIM_JOBS)
            .await
            .map_err(|error| CoreError::database("preparing the claim statement", error))?;
        let completing_statement = client
            .prepare(COMPLETE_AND_CLAIM_JOBS)
            .await
            .map_err(|error| CoreError::database("preparing the claim statement", error))?;
        Ok(Fetcher {
            statement,
            completing_statement,
            queues,
            worker_id,
            concurrency: i64::try_from(concurrency).unwrap_or(i64::MAX),
        })
    }

    /// Claim up to `limit` jobs, in the order procrastinate would have fetched them one by one.
    /// `abandoned`: jobs of this worker still `doing` whose terminal write was refused; they
    /// do not count against `concurrency`.
    pub async fn claim(
        &self,
        client: &Client,
        limit: usize,
        room: &QueueRoom,
        abandoned: &[i64],
    ) -> Result<Vec<JobRow>, tokio_postgres::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let none_ending: Vec<i64> = Vec::new();
        let params = self.claim_params(&limit, room, &abandoned, &none_ending);
        let rows = client.query(&self.statement, &params).await?;
        let jobs = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(in_start_order(jobs))
    }

    /// Write a batch without retries and claim in the same statement
    /// ([`COMPLETE_AND_CLAIM_JOBS`]): the claimed jobs, and the ids whose write was done.
    pub async fn complete_and_claim(
        &self,
        client: &Client,
        batch: &CompletionBatch,
        limit: usize,
        room: &QueueRoom,
        abandoned: &[i64],
    ) -> Result<(Vec<JobRow>, HashSet<i64>), tokio_postgres::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let ending = batch.ending_ids();
        let mut params = self.claim_params(&limit, room, &abandoned, &ending);
        params.extend([
            &batch.finish_ids as &(dyn ToSql + Sync),
            &batch.finish_statuses,
            &batch.delete_ids,
        ]);
        let rows = client.query(&self.completing_statement, &params).await?;
        let mut jobs = Vec::new();
        let mut done = HashSet::new();
        for row in &rows {
            if row.try_get::<_, bool>(CLAIMED_COLUMN)? {
                jobs.push(JobRow::from_row(row)?);
            } else {
                done.insert(row.try_get::<_, i64>(0)?);
            }
        }
        Ok((in_start_order(jobs), done))
    }
}

impl Fetcher {
    /// `$1` to `$9` of both claim statements (see [`claim_steps`]).
    fn claim_params<'a>(
        &'a self,
        limit: &'a i64,
        room: &'a QueueRoom,
        abandoned: &'a &[i64],
        ending: &'a Vec<i64>,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            &self.queues,
            &self.worker_id,
            limit,
            &self.concurrency,
            &room.full,
            &room.names,
            &room.free,
            abandoned,
            ending,
        ]
    }
}

/// The last column of [`COMPLETE_AND_CLAIM_JOBS`]: a claimed job, or a written completion.
const CLAIMED_COLUMN: usize = 11;

/// UPDATE ... RETURNING does not keep the candidate order; restore it so jobs start in the
/// order procrastinate's one-by-one fetch would start them.
fn in_start_order(mut jobs: Vec<JobRow>) -> Vec<JobRow> {
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
