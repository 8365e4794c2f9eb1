//! Every statement the core sends, in one place, each with a table of its parameters.
//!
//! The statements follow procrastinate's functions (`procrastinate_fetch_job_v2`,
//! `procrastinate_finish_job_v1`, `procrastinate_retry_job_v2`, the worker functions) row
//! for row, so procrastinate's triggers record the same events. Two things are the core's
//! own:
//! - claims are batched (one statement claims up to the free slots);
//! - every terminal write is conditioned on the claim it ends (the job is `doing`, with the
//!   attempts it had when claimed, for this process's worker ids or none): a write re-sent
//!   after a lost reply, or one that arrives after the job was recovered elsewhere, matches
//!   no row instead of ending somebody else's run.

/// The columns of a claimed job, as [`crate::fetcher::JobRow::from_row`] reads them, from
/// a `procrastinate_jobs` row named `job`. `scheduled_at` travels as microseconds since the
/// epoch; a value that no runner could represent as a date (±infinity, or outside years
/// 1-9999) becomes [`UNREPRESENTABLE_SCHEDULED_AT`] instead of failing the whole statement
/// (one such row would otherwise stop every claim of every worker).
macro_rules! job_columns {
    () => {
        "job.id, job.status::text, job.task_name, job.priority, job.lock, job.queueing_lock,
       job.args::text,
       CASE WHEN job.scheduled_at IS NULL THEN NULL
            WHEN job.scheduled_at >= '0001-01-01 00:00:00+00'
             AND job.scheduled_at < '10000-01-01 00:00:00+00'
            THEN (extract(epoch FROM job.scheduled_at) * 1000000)::bigint
            ELSE -9223372036854775808 END,
       job.queue_name, job.attempts, job.worker_id"
    };
}

/// `scheduled_at_us` of a job whose `scheduled_at` cannot be represented (see
/// [`job_columns`]): the runner fails such a job with a clear error.
pub const UNREPRESENTABLE_SCHEDULED_AT: i64 = i64::MIN;

/// The claim's choice of jobs, up to `allowed`. Parameters:
///
/// | | |
/// |---|---|
/// | `$1` | queues (`NULL`: all) |
/// | `$2` | this worker's id |
/// | `$3` | most jobs to claim |
/// | `$4` | concurrency |
/// | `$5` | queues at their `queue_concurrency` limit |
/// | `$6`, `$7` | limited queues with room, and how much |
/// | `$8` | jobs whose terminal write was refused: `doing`, but holding no slot |
/// | `$9` | jobs the same statement ends ([`COMPLETE_AND_CLAIM`]): still `doing` in its snapshot, yet holding neither a lock nor a slot once it commits |
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

/// `status = 'doing'` and the worker on the allowed jobs, returning [`job_columns`].
macro_rules! claim_update {
    () => {
        concat!(
            "
UPDATE procrastinate_jobs AS job
   SET status = 'doing', worker_id = $2::bigint
  FROM allowed
 WHERE job.id = allowed.id
RETURNING ",
            job_columns!()
        )
    };
}

/// The claim on its own: `$1`-`$9` as in [`claim_steps`] (`$9` empty).
pub const CLAIM: &str = concat!("WITH ", claim_steps!(), claim_update!());

/// The conditions of every terminal write: the row is still the claim being ended.
/// `$ids` / `$attempts`: the jobs and the attempts they had when claimed; `$workers`:
/// every worker id this process has had (a pruned worker's jobs have none left).
macro_rules! ending_claims {
    ($ids:literal, $attempts:literal, $workers:literal) => {
        concat!(
            "job.id = ANY(",
            $ids,
            "::bigint[])
       AND job.status = 'doing'
       AND (job.id, job.attempts) IN (SELECT * FROM unnest(",
            $ids,
            "::bigint[], ",
            $attempts,
            "::int[]))
       AND (job.worker_id IS NULL OR job.worker_id = ANY(",
            $workers,
            "::bigint[]))"
        )
    };
}

/// `procrastinate_finish_job_v1`'s two branches (update to an end status, or delete) for
/// the claims they end.
macro_rules! finish_and_delete_steps {
    ($ids:literal, $attempts:literal, $statuses:literal,
     $delete_ids:literal, $delete_attempts:literal, $workers:literal) => {
        concat!(
            "
finished AS (
    UPDATE procrastinate_jobs AS job
       SET status = ended.status::procrastinate_job_status,
           abort_requested = false,
           attempts = job.attempts + 1
      FROM unnest(",
            $ids,
            "::bigint[], ",
            $statuses,
            "::text[]) AS ended(id, status)
     WHERE job.id = ended.id
       AND ",
            ending_claims!($ids, $attempts, $workers),
            "
    RETURNING job.id
), deleted AS (
    DELETE FROM procrastinate_jobs AS job
     WHERE ",
            ending_claims!($delete_ids, $delete_attempts, $workers),
            "
    RETURNING job.id
)"
        )
    };
}

/// A batch of terminal writes, retries included:
///
/// | | |
/// |---|---|
/// | `$1`, `$2`, `$3` | finished jobs, their attempts at claim, their end status |
/// | `$4`, `$5` | deleted jobs, their attempts at claim |
/// | `$6`, `$7` | retried jobs, their attempts at claim |
/// | `$8`-`$11` | their `retry_at` (timestamptz text), priority, queue, lock (`NULL`: unchanged) |
/// | `$12` | every worker id this process has had |
///
/// Returns the id of each claim it ended; a claim it did not end is no longer current.
pub const COMPLETE: &str = concat!(
    "WITH ",
    finish_and_delete_steps!("$1", "$2", "$3", "$4", "$5", "$12"),
    ", retried AS (
    -- procrastinate_retry_job_v2: an abort requested while it ran fails the job instead.
    UPDATE procrastinate_jobs AS job
       SET status = CASE WHEN job.abort_requested
                         THEN 'failed' ELSE 'todo' END::procrastinate_job_status,
           attempts = CASE WHEN job.abort_requested
                           THEN job.attempts ELSE job.attempts + 1 END,
           scheduled_at = CASE WHEN job.abort_requested
                               THEN job.scheduled_at ELSE r.retry_at::timestamptz END,
           priority = CASE WHEN job.abort_requested
                           THEN job.priority ELSE coalesce(r.priority, job.priority) END,
           queue_name = CASE WHEN job.abort_requested
                             THEN job.queue_name ELSE coalesce(r.queue_name, job.queue_name) END,
           lock = CASE WHEN job.abort_requested
                       THEN job.lock ELSE coalesce(r.lock, job.lock) END
      FROM unnest($6::bigint[], $8::text[], $9::int[], $10::text[], $11::text[])
           AS r(id, retry_at, priority, queue_name, lock)
     WHERE job.id = r.id
       AND ",
    ending_claims!("$6", "$7", "$12"),
    "
    RETURNING job.id
)
SELECT id FROM finished
UNION ALL SELECT id FROM deleted
UNION ALL SELECT id FROM retried"
);

/// One statement, so one message and one commit for a whole round trip: a batch without
/// retries and the claim of the slots it frees.
///
/// | | |
/// |---|---|
/// | `$1`-`$9` | the claim, as in [`claim_steps`]; `$9` = the ids of `$10` and `$13` |
/// | `$10`, `$11`, `$12` | finished jobs, their attempts at claim, their end status |
/// | `$13`, `$14` | deleted jobs, their attempts at claim |
/// | `$15` | every worker id this process has had |
///
/// Rows: the claimed jobs ([`job_columns`]) with `true` last, then one row per claim it
/// ended (its id, `false` last). Retries go through [`COMPLETE`] then [`CLAIM`] in one
/// transaction instead: a retried job may be claimable at once, which this statement's
/// snapshot could not see.
pub const COMPLETE_AND_CLAIM: &str = concat!(
    "WITH ",
    finish_and_delete_steps!("$10", "$11", "$12", "$13", "$14", "$15"),
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

/// The last column of [`COMPLETE_AND_CLAIM`]: a claimed job, or an ended claim.
pub const CLAIMED_COLUMN: usize = 11;

/// The job row of one claim, locked, if it is still that claim (`$1` job, `$2` attempts
/// at claim, `$3` this process's worker ids): the guard of the one-by-one writes below.
macro_rules! current_claim {
    () => {
        "(SELECT job.id FROM procrastinate_jobs AS job
          WHERE job.id = $1::bigint AND job.attempts = $2::int AND job.status = 'doing'
            AND (job.worker_id IS NULL OR job.worker_id = ANY($3::bigint[]))
            FOR UPDATE) AS claim"
    };
}

/// One terminal write through procrastinate's own function, when a batch failed: `$1`-`$3`
/// as in [`current_claim`], `$4` end status, `$5` delete. No row: the claim is no longer
/// current. The function's own error (a job in an unexpected state) says why it refused.
pub const FINISH_ONE: &str = concat!(
    "SELECT procrastinate_finish_job_v1(claim.id, $4::text::procrastinate_job_status, $5::boolean) FROM ",
    current_claim!()
);

/// One retry through `procrastinate_retry_job_v2`: `$1`-`$3` as in [`current_claim`],
/// `$4` retry_at (timestamptz text), `$5` priority, `$6` queue, `$7` lock.
pub const RETRY_ONE: &str = concat!(
    "SELECT procrastinate_retry_job_v2(claim.id, $4::text::timestamptz, $5::int, $6::text, $7::text) FROM ",
    current_claim!()
);

/// Jobs this process holds in `doing` that the dispatcher does not know of: claims whose
/// reply was lost with a connection, or made by a statement of a lost connection that
/// committed later. `$1` this process's worker ids; `$2`, `$3` the claims it knows (job
/// ids and attempts at claim); `$4` jobs whose terminal write was refused.
pub const ORPHANED_CLAIMS: &str = concat!(
    "SELECT ",
    job_columns!(),
    "
  FROM procrastinate_jobs AS job
 WHERE job.worker_id = ANY($1::bigint[]) AND job.status = 'doing'
   AND (job.id, job.attempts) NOT IN (SELECT * FROM unnest($2::bigint[], $3::int[]))
   AND NOT (job.id = ANY($4::bigint[]))
 ORDER BY job.priority DESC, job.id ASC"
);

/// Of the jobs whose terminal write was refused (`$2`), those still `doing` for this
/// process (`$1` its worker ids): the others hold nothing any more.
pub const STILL_ABANDONED: &str = "SELECT job.id FROM procrastinate_jobs AS job
 WHERE job.id = ANY($2::bigint[]) AND job.status = 'doing'
   AND (job.worker_id IS NULL OR job.worker_id = ANY($1::bigint[]))";

/// This connection's server process, to tell it apart after a loss (a pid alone may be
/// reused by a later backend; with its start time it cannot).
pub const BACKEND_IDENTITY: &str =
    "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()";
/// `$1` pid, `$2` backend_start: whether that server process still runs.
pub const BACKEND_ALIVE: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1::int AND backend_start = $2::timestamptz)";
/// `$1` pid, `$2` backend_start: end that server process (one of this worker's own, left
/// half-open: it may still hold the row locks of a transaction nobody will finish).
pub const TERMINATE_BACKEND: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE pid = $1::int AND backend_start = $2::timestamptz";

pub const CHECK_SCHEMA: &str = "SELECT to_regclass('procrastinate_jobs') IS NOT NULL";
/// `$1` seconds: delete the workers silent for longer (procrastinate's own function).
pub const PRUNE_STALLED_WORKERS: &str =
    "SELECT worker_id FROM procrastinate_prune_stalled_workers_v1($1::float8)";
pub const REGISTER_WORKER: &str = "SELECT worker_id FROM procrastinate_register_worker_v1()";
/// `$1` worker id.
pub const UNREGISTER_WORKER: &str = "SELECT procrastinate_unregister_worker_v1($1::bigint)";
/// `procrastinate_update_heartbeat_v1`, saying whether the row was there (`$1` worker id):
/// no row means this worker was pruned.
pub const UPDATE_HEARTBEAT: &str =
    "UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = $1::bigint RETURNING id";
/// The stalled workers (`$1` seconds since their heartbeat), except this process's own
/// (`$2`), locked until the end of the recovery transaction; one that another session
/// holds is left for the next round.
pub const LOCK_STALLED_WORKERS: &str = "SELECT id FROM procrastinate_workers
 WHERE last_heartbeat < now() - ($1::float8 || ' SECOND')::interval
   AND NOT (id = ANY($2::bigint[]))
 ORDER BY id FOR UPDATE SKIP LOCKED";
/// The `doing` jobs of the workers `$1`, locked before the workers are deleted (which sets
/// their `worker_id` to NULL).
pub const JOBS_OF_WORKERS: &str = "SELECT id FROM procrastinate_jobs
 WHERE worker_id = ANY($1::bigint[]) AND status = 'doing' ORDER BY id FOR UPDATE";
/// Delete the locked workers `$1` (what `procrastinate_prune_stalled_workers_v1` does, for
/// exactly the rows this transaction locked).
pub const DELETE_WORKERS: &str =
    "DELETE FROM procrastinate_workers WHERE id = ANY($1::bigint[]) RETURNING id";
/// `procrastinate_retry_job_v2` for each job of `$1`, as procrastinate's
/// `JobManager.retry_job(job)` does (retry now; priority, queue and lock unchanged).
pub const RETRY_JOBS: &str =
    "SELECT procrastinate_retry_job_v2(id, now(), NULL, NULL, NULL) FROM unnest($1::bigint[]) AS id";
/// The same for one job (`$1`).
pub const RETRY_JOB: &str =
    "SELECT procrastinate_retry_job_v2($1::bigint, now(), NULL, NULL, NULL)";
/// `$1` job: ends `failed` (a stalled job that cannot go back to `todo`).
pub const FAIL_JOB: &str =
    "SELECT procrastinate_finish_job_v1($1::bigint, 'failed'::procrastinate_job_status, false)";
/// Jobs of this process (`$1` its worker ids) whose abort was requested.
pub const JOBS_TO_ABORT: &str = "SELECT id FROM procrastinate_jobs
 WHERE status = 'doing' AND abort_requested AND worker_id = ANY($1::bigint[])";
