//! The claim: procrastinate's `procrastinate_fetch_job_v2`, for a whole batch in one statement.
//!
//! Same rules as the function: status `todo`, the queue filter, `scheduled_at <= now()`,
//! `priority DESC, id ASC`, the lock rule, `FOR UPDATE SKIP LOCKED`, then `status = 'doing'`
//! and `worker_id`. The `LIMIT` subtracts the jobs this worker already holds in `doing`, so the
//! database itself enforces "never more than `concurrency` jobs in `doing`", even if the
//! core's own bookkeeping were wrong (a lost reply, a completion not yet written).

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::db::{Db, Prepared, Within};

use crate::completer::CompletionBatch;
use crate::errors::{CoreError, CoreResult};
use crate::protocol::JobRow;
use crate::sql;

/// What one claim asks for.
#[derive(Clone, Copy, Debug)]
pub struct ClaimRequest<'a> {
    pub claimant: &'a Claimant,
    /// The most jobs to claim.
    pub limit: usize,
    pub room: &'a QueueRoom,
    /// Jobs whose terminal write was refused: `doing`, but holding no slot.
    pub abandoned: &'a [i64],
    /// If the claim comes back short, also look when the earliest job scheduled for later
    /// is due (`sql::schedule_look`).
    pub look_at_schedule: bool,
}

/// What a claim's look at the schedule found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ScheduleLook {
    /// Not asked for, or the claim was full.
    #[default]
    NotMade,
    /// No job is scheduled for later.
    NothingLater,
    /// The earliest job scheduled for later is due in this long (zero: past due by now).
    DueIn(Duration),
}

/// What a claim statement answered: the jobs it claimed (in start order), the claims it
/// ended (the statements that also end a batch), and its look at the schedule.
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<JobRow>,
    pub ended: HashSet<i64>,
    pub schedule: ScheduleLook,
}

impl Claimed {
    /// The rows of a claim statement: a claimed job (`true` in
    /// [`sql::CLAIMED_COLUMN`]), an ended claim (`false`, its id), or the look at the
    /// schedule (`false`, a NULL id, the seconds in [`sql::DUE_IN_COLUMN`]).
    fn from_rows(rows: &[Row]) -> Result<Claimed, tokio_postgres::Error> {
        let mut claimed = Claimed::default();
        for row in rows {
            if row.try_get::<_, bool>(sql::CLAIMED_COLUMN)? {
                claimed.jobs.push(JobRow::from_row(row)?);
            } else if let Some(id) = row.try_get::<_, Option<i64>>(0)? {
                claimed.ended.insert(id);
            } else {
                let seconds: Option<f64> = row.try_get(sql::DUE_IN_COLUMN)?;
                claimed.schedule = match seconds {
                    None => ScheduleLook::NothingLater,
                    // Past due by now (it was in the future when the statement ran): at once.
                    Some(seconds) => ScheduleLook::DueIn(
                        Duration::try_from_secs_f64(seconds).unwrap_or_default(),
                    ),
                };
            }
        }
        claimed.jobs = in_start_order(std::mem::take(&mut claimed.jobs));
        Ok(claimed)
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

    /// Claim up to `request.limit` jobs, in the order procrastinate would have fetched them
    /// one by one.
    pub async fn claim(
        &self,
        client: &Db,
        within: Within,
        request: &ClaimRequest<'_>,
    ) -> Result<Claimed, tokio_postgres::Error> {
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let mut params = self.claim_params(request, &limit);
        self.add_room(&mut params, request.room);
        params.push(&request.look_at_schedule);
        let rows = client
            .query_prepared(&self.statement, &params, within)
            .await?;
        Claimed::from_rows(&rows)
    }

    /// Write a batch without retries and claim in the same statement
    /// ([`sql::COMPLETE_AND_CLAIM`]): the claimed jobs, and the ids whose claim it ended.
    pub async fn complete_and_claim(
        &self,
        client: &Db,
        batch: &CompletionBatch,
        request: &ClaimRequest<'_>,
    ) -> Result<Claimed, tokio_postgres::Error> {
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let mut params = self.claim_params(request, &limit);
        params.extend([
            &batch.finish_ids as &(dyn ToSql + Sync),
            &batch.finish_attempts,
            &batch.finish_statuses,
            &batch.delete_ids,
            &batch.delete_attempts,
            &request.claimant.worker_ids,
        ]);
        self.add_room(&mut params, request.room);
        params.push(&request.look_at_schedule);
        let rows = client
            .query_prepared(&self.completing_statement, &params, Within::OwnTransaction)
            .await?;
        Claimed::from_rows(&rows)
    }

    /// `$1` to `$5` of both claim statements (see [`sql::CLAIM`]).
    fn claim_params<'a>(
        &'a self,
        request: &'a ClaimRequest<'_>,
        limit: &'a i64,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            &self.queues,
            &request.claimant.worker_id,
            limit,
            &self.concurrency,
            &request.abandoned,
        ]
    }

    /// The three parameters of the statements with per-queue limits, before the last.
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
