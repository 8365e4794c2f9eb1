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

/// The columns of a claimed job, from a `procrastinate_jobs` row named `job`: the list
/// of [`crate::job_columns_table`].
macro_rules! job_columns {
    () => {
        $crate::job_columns_table!(sql_column_list)
    };
}

/// `, NULL` for each column of [`job_columns`] after the first: the rest of a row that
/// carries only a job id in the claimed-job columns.
macro_rules! nulls_after_job_id {
    () => {
        $crate::job_columns_table!(sql_nulls_after_first)
    };
}

/// `a, b, c` of a column table's SQL expressions.
macro_rules! sql_column_list {
    ($(#[doc = $first_doc:literal])* $first:ident: $first_type:ty = $first_sql:literal
     $(, $(#[doc = $doc:literal])* $field:ident: $type:ty = $sql:literal)* $(,)?) => {
        concat!($first_sql $(, ", ", $sql)*)
    };
}

/// `, NULL` for each column of a column table but the first.
macro_rules! sql_nulls_after_first {
    ($(#[doc = $first_doc:literal])* $first:ident: $first_type:ty = $first_sql:literal
     $(, $(#[doc = $doc:literal])* $field:ident: $type:ty = $sql:literal)* $(,)?) => {
        concat!("" $(, sql_nulls_after_first!(@null $sql))*)
    };
    (@null $sql:literal) => {
        ", NULL"
    };
}

/// `scheduled_at_us` of a job whose `scheduled_at` cannot be represented (see
/// [`job_columns`]): the runner fails such a job with a clear error.
pub const UNREPRESENTABLE_SCHEDULED_AT: i64 = i64::MIN;

/// The claim's choice of jobs, `candidate`, with the rules of `procrastinate_fetch_job_v2`.
/// `$ending`: the jobs the same statement ends ([`COMPLETE_AND_CLAIM`]): still `doing` in
/// its snapshot, yet holding neither a lock nor a slot once it commits. `$limit`: how many.
///
/// | | |
/// |---|---|
/// | `$1` | queues (`NULL`: all) |
/// | `$2` | this worker's id |
/// | `$3` | most jobs to claim |
/// | `$4` | concurrency |
/// | `$5` | jobs whose terminal write was refused: `doing`, but holding no slot |
macro_rules! candidates {
    ($ending:literal, $queue_filter:expr, $limit:expr) => {
        concat!(
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
                  AND NOT (other_jobs.id = ANY(", $ending, "))
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
       AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())", $queue_filter, "
       AND NOT (jobs.id = ANY(", $ending, "))
     ORDER BY jobs.priority DESC, jobs.id ASC
     LIMIT ", $limit, "
       FOR UPDATE OF jobs SKIP LOCKED
)"
        )
    };
}

/// The jobs this worker holds in `doing`, but those that hold no slot (`$5`, refused
/// writes, and `$ending`, those the same statement ends).
macro_rules! held {
    ($ending:literal) => {
        concat!(
            "(SELECT count(*) FROM procrastinate_jobs AS held
                WHERE held.worker_id = $2::bigint AND held.status = 'doing'
                  AND NOT (held.id = ANY($5::bigint[]))
                  AND NOT (held.id = ANY(",
            $ending,
            ")))"
        )
    };
}

/// The claim without per-queue limits: the jobs this worker holds (slots) cap the
/// candidates' `LIMIT`, so the database itself enforces "never more than `concurrency`
/// jobs in `doing`" even if the core's own bookkeeping were wrong.
macro_rules! claim_steps {
    ($ending:literal) => {
        candidates!(
            $ending,
            "",
            concat!(
                "least($3::bigint, greatest(0, $4::bigint - ",
                held!($ending),
                "))"
            )
        )
    };
}

/// The claim with per-queue limits (fastworker's `queue_concurrency`): the candidates
/// skip queues at their limit (`$full`), then keep, in claim order, no more of a limited
/// queue than it has room for (`$names` / `$free`), then no more than the free slots.
macro_rules! limited_claim_steps {
    ($ending:literal, $full:literal, $names:literal, $free:literal) => {
        concat!(
            candidates!(
                $ending,
                concat!("\n       AND NOT (jobs.queue_name = ANY(", $full, "::varchar[]))"),
                "$3::bigint"
            ),
            ", within_queue_limits AS (
    -- Window functions are not allowed next to FOR UPDATE, hence this step.
    SELECT ranked.id, ranked.priority
      FROM (
            SELECT candidate.id, candidate.priority, candidate.queue_name,
                   row_number() OVER (PARTITION BY candidate.queue_name
                                      ORDER BY candidate.priority DESC, candidate.id ASC) AS rank
              FROM candidate
           ) AS ranked
      LEFT JOIN unnest(", $names, "::varchar[], ", $free, "::bigint[]) AS room(queue_name, free)
             ON room.queue_name = ranked.queue_name
     WHERE room.free IS NULL OR ranked.rank <= room.free
), allowed AS (
    SELECT within_queue_limits.id
      FROM within_queue_limits
     ORDER BY within_queue_limits.priority DESC, within_queue_limits.id ASC
     LIMIT greatest(0, $4::bigint - ", held!($ending), ")
)"
        )
    };
}

/// `status = 'doing'` and the worker on the chosen jobs (`$chosen`: `candidate` or
/// `allowed`), returning [`job_columns`]. By id (`= ANY`): an index is the only way.
macro_rules! claim_update {
    ($chosen:literal) => {
        concat!(
            "
UPDATE procrastinate_jobs AS job
   SET status = 'doing', worker_id = $2::bigint
 WHERE job.id = ANY(ARRAY(SELECT id FROM ",
            $chosen,
            "))
RETURNING ",
            job_columns!()
        )
    };
}

/// The row a claim adds when it is asked to look at the schedule (`$look`) and it came back
/// short (fewer than `$3` jobs: every job claimable now is taken): a NULL job id, `false`,
/// and in how many seconds the earliest `todo` job scheduled for later in the queues `$1`
/// is due (`NULL`: none). A job scheduled for later (a `schedule_in`, a delayed retry, a
/// lock successor scheduled later) is then claimed when due, whatever the polling
/// interval. Being part of the claim, the look costs an idle worker woken by a
/// notification no second statement (and no second transaction), which every worker of a
/// fleet would pay for every job. The filter holds only parameters and the claim's count,
/// so PostgreSQL runs the look only when it passes.
macro_rules! schedule_look {
    ($look:literal) => {
        concat!(
            "
UNION ALL SELECT NULL",
            nulls_after_job_id!(),
            ", false, (
    SELECT extract(epoch FROM min(job.scheduled_at) - now())::float8
      FROM procrastinate_jobs AS job
     WHERE job.status = 'todo' AND job.scheduled_at > now()
       AND ($1::varchar[] IS NULL OR job.queue_name = ANY($1::varchar[]))
)
 WHERE ",
            $look,
            "::boolean AND (SELECT count(*) FROM claimed) < $3::bigint"
        )
    };
}

/// The tail of the claim statements on their own: the claimed jobs ([`job_columns`]),
/// `true`, a NULL; then the [`schedule_look`] row, if any.
macro_rules! claimed_rows {
    ($chosen:literal, $look:literal) => {
        concat!(
            ", claimed AS (",
            claim_update!($chosen),
            "
)
SELECT claimed.*, true, NULL::float8 FROM claimed",
            schedule_look!($look)
        )
    };
}

/// The claim on its own: `$1`-`$5` as in [`candidates`], `$6` look at the schedule if
/// short. Rows: see [`claimed_rows`].
pub const CLAIM: &str = concat!(
    "WITH ",
    claim_steps!("'{}'::bigint[]"),
    claimed_rows!("candidate", "$6")
);

/// The claim with per-queue limits: `$1`-`$5` as in [`candidates`], `$6` queues at their
/// limit, `$7` / `$8` limited queues with room, and how much, `$9` look at the schedule
/// if short.
pub const CLAIM_WITH_QUEUE_LIMITS: &str = concat!(
    "WITH ",
    limited_claim_steps!("'{}'::bigint[]", "$6", "$7", "$8"),
    claimed_rows!("allowed", "$9")
);

/// The conditions of every terminal write: the row is still the claim being ended.
/// `$ids` / `$attempts`: the jobs and the attempts they had when claimed; `$workers`:
/// every worker id this process has had (a pruned worker's jobs have none left).
///
/// Found by id through the primary key, whatever the statistics: `= ANY` on the id, a
/// job's own entries picked with `array_position` rather than by joining the arrays (a
/// join let small tables be read whole), and the status compared as text, which keeps
/// the planner off procrastinate's partial indexes `WHERE status = 'doing'`: a plan made
/// while few jobs run would walk all of them on every write once many do.
macro_rules! ending_claims {
    ($ids:literal, $attempts:literal, $workers:literal) => {
        concat!(
            "job.id = ANY(",
            $ids,
            "::bigint[])
       AND job.status::text = 'doing'
       AND job.attempts = (",
            $attempts,
            "::int[])[array_position(",
            $ids,
            "::bigint[], job.id)]
       AND (job.worker_id IS NULL OR job.worker_id = ANY(",
            $workers,
            "::bigint[]))"
        )
    };
}

/// `procrastinate_finish_job_v1`'s two branches (update to an end status, or delete) for
/// the claims they end. An ended job also lets go of its `worker_id`, which
/// procrastinate's function keeps: procrastinate's schema references the worker with `ON
/// DELETE SET NULL` and indexes `worker_id` only for `doing` jobs, so deleting a worker row
/// (at every shutdown, and when a stalled worker is pruned) would rewrite every job that
/// worker ever ran (procrastinate's issue #1454: minutes for a worker with millions).
/// Once the worker row is gone, its jobs have no `worker_id` under either worker.
macro_rules! finish_and_delete_steps {
    ($ids:literal, $attempts:literal, $statuses:literal,
     $delete_ids:literal, $delete_attempts:literal, $workers:literal) => {
        concat!(
            "
finished AS (
    UPDATE procrastinate_jobs AS job
       SET status = (",
            $statuses,
            "::text[])[array_position(",
            $ids,
            "::bigint[], job.id)]
                    ::procrastinate_job_status,
           abort_requested = false,
           attempts = job.attempts + 1,
           worker_id = NULL
     WHERE ",
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
           scheduled_at = CASE WHEN job.abort_requested THEN job.scheduled_at
                               ELSE ($8::text[])[array_position($6::bigint[], job.id)]::timestamptz END,
           priority = CASE WHEN job.abort_requested THEN job.priority
                           ELSE coalesce(($9::int[])[array_position($6::bigint[], job.id)],
                                         job.priority) END,
           queue_name = CASE WHEN job.abort_requested THEN job.queue_name
                             ELSE coalesce(($10::text[])[array_position($6::bigint[], job.id)],
                                           job.queue_name) END,
           lock = CASE WHEN job.abort_requested THEN job.lock
                       ELSE coalesce(($11::text[])[array_position($6::bigint[], job.id)],
                                     job.lock) END
     WHERE ",
    ending_claims!("$6", "$7", "$12"),
    "
    RETURNING job.id
)
SELECT id FROM finished
UNION ALL SELECT id FROM deleted
UNION ALL SELECT id FROM retried"
);

/// The tail of the statements that end a batch and claim: the claimed jobs
/// ([`job_columns`]) with `true` and a NULL, then one row per claim it ended (its id,
/// `false`, a NULL), then the [`schedule_look`] row, if any.
macro_rules! claimed_then_ended {
    ($chosen:literal, $look:literal) => {
        concat!(
            ", claimed AS (",
            claim_update!($chosen),
            "
)
SELECT claimed.*, true, NULL::float8 FROM claimed
UNION ALL SELECT id",
            nulls_after_job_id!(),
            ", false, NULL FROM finished
UNION ALL SELECT id",
            nulls_after_job_id!(),
            ", false, NULL FROM deleted",
            schedule_look!($look)
        )
    };
}

/// One statement, so one message and one commit for a whole round trip: a batch without
/// retries and the claim of the slots it frees.
///
/// | | |
/// |---|---|
/// | `$1`-`$5` | the claim, as in [`candidates`] |
/// | `$6`, `$7`, `$8` | finished jobs, their attempts at claim, their end status |
/// | `$9`, `$10` | deleted jobs, their attempts at claim |
/// | `$11` | every worker id this process has had |
/// | `$12` | look at the schedule if the claim is short |
///
/// Rows: see [`claimed_then_ended`]. Retries go through [`COMPLETE`] then [`CLAIM`] in one
/// transaction instead: a retried job may be claimable at once, which this statement's
/// snapshot could not see.
pub const COMPLETE_AND_CLAIM: &str = concat!(
    "WITH ",
    finish_and_delete_steps!("$6", "$7", "$8", "$9", "$10", "$11"),
    ", ",
    claim_steps!("($6::bigint[] || $9::bigint[])"),
    claimed_then_ended!("candidate", "$12")
);

/// [`COMPLETE_AND_CLAIM`] with per-queue limits: `$12` queues at their limit, `$13` /
/// `$14` limited queues with room, and how much, `$15` look at the schedule if short.
pub const COMPLETE_AND_CLAIM_WITH_QUEUE_LIMITS: &str = concat!(
    "WITH ",
    finish_and_delete_steps!("$6", "$7", "$8", "$9", "$10", "$11"),
    ", ",
    limited_claim_steps!("($6::bigint[] || $9::bigint[])", "$12", "$13", "$14"),
    claimed_then_ended!("allowed", "$15")
);

/// The column of the claim statements that tells a claimed job (`true`) from an ended
/// claim or the look at the schedule (`false`; the look's job id is NULL).
pub const CLAIMED_COLUMN: usize = crate::protocol::JobRow::COLUMNS;

/// The last column of the claim statements: on the look's row, in how many seconds the
/// earliest job scheduled for later is due (see [`schedule_look`]).
pub const DUE_IN_COLUMN: usize = CLAIMED_COLUMN + 1;

/// The job row of one claim, locked, if it is still that claim (`$1` job, `$2` attempts
/// at claim, `$3` this process's worker ids): the guard of the one-by-one writes below.
macro_rules! current_claim {
    () => {
        "(SELECT job.id FROM procrastinate_jobs AS job
          WHERE job.id = $1::bigint AND job.attempts = $2::int AND job.status::text = 'doing'
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
/// ids and attempts at claim; one job may appear twice: a run of a claim lost to a
/// recovery elsewhere, and its new claim); `$4` jobs whose terminal write was refused.
/// (Unordered: the dispatcher puts them in start order.)
pub const ORPHANED_CLAIMS: &str = concat!(
    "SELECT ",
    job_columns!(),
    "
  FROM procrastinate_jobs AS job
 WHERE job.worker_id = ANY($1::bigint[]) AND job.status = 'doing'
   AND NOT EXISTS (SELECT 1 FROM unnest($2::bigint[], $3::int[]) AS known(id, attempts)
                    WHERE known.id = job.id AND known.attempts = job.attempts)
   AND NOT (job.id = ANY($4::bigint[]))"
);

/// Of the claims this process knows (`$1` job ids, `$2` attempts at claim), those that are
/// no longer current: the job moved on without this process (recovered by another worker
/// after this one was pruned, aborted and deleted...). `$3` this process's worker ids.
pub const LOST_CLAIMS: &str = "SELECT known.id, known.attempts
  FROM unnest($1::bigint[], $2::int[]) AS known(id, attempts)
 WHERE NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs AS job
         WHERE job.id = ANY($1::bigint[])
           AND job.id = known.id AND job.attempts = known.attempts
           AND job.status::text = 'doing'
           AND (job.worker_id IS NULL OR job.worker_id = ANY($3::bigint[])))";

/// Claims this process runs (`$1` job ids, `$2` attempts at claim) that lost their worker
/// (their `worker_id` went NULL: this worker's row was deleted, by a prune during a network
/// split or by hand), given back to it under its current id `$3`. Without this, such a job
/// would look abandoned to every recovery while it runs here, and would stay `doing`
/// forever if this process died before ending it. (`$3` must exist: a row deleted again
/// meanwhile fails the foreign key, and the next check tries again.)
pub const REATTACH_CLAIMS: &str = "UPDATE procrastinate_jobs AS job SET worker_id = $3::bigint
 WHERE job.id = ANY($1::bigint[]) AND job.worker_id IS NULL AND job.status::text = 'doing'
   AND job.attempts = ($2::int[])[array_position($1::bigint[], job.id)]
   AND EXISTS (SELECT 1 FROM procrastinate_workers WHERE id = $3::bigint)
 RETURNING job.id";

/// Of the jobs whose terminal write was refused (`$2`), those still `doing` for this
/// process (`$1` its worker ids): the others hold nothing any more.
pub const STILL_ABANDONED: &str = "SELECT job.id FROM procrastinate_jobs AS job
 WHERE job.id = ANY($2::bigint[]) AND job.status::text = 'doing'
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
/// their `worker_id` to NULL). (Unordered: an `ORDER BY id` let small tables' plans walk an
/// index of every waiting job; two recoveries never lock the same jobs, their workers'
/// rows being locked first.)
pub const JOBS_OF_WORKERS: &str = "SELECT id FROM procrastinate_jobs
 WHERE worker_id = ANY($1::bigint[]) AND status = 'doing' FOR UPDATE";
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
/// `doing` jobs with no worker (their worker's row was deleted: pruned as stalled, or by
/// hand), with their attempts. The recovery puts back to run those still without a worker
/// a whole `stalled_worker_timeout` later: a live worker gives its own back to itself
/// ([`REATTACH_CLAIMS`]) within a heartbeat interval. (The partial index of running jobs
/// finds them.)
pub const UNOWNED_JOBS: &str = "SELECT id, attempts FROM procrastinate_jobs
 WHERE status = 'doing' AND worker_id IS NULL";
/// Of the unowned jobs `$1` (attempts when first seen `$2`), those still `doing` with no
/// worker and the same attempts, locked for their recovery; one that another session
/// holds (another recovery) is left to it.
pub const LOCK_UNOWNED_JOBS: &str = "SELECT id FROM procrastinate_jobs AS job
 WHERE job.id = ANY($1::bigint[]) AND job.worker_id IS NULL AND job.status = 'doing'
   AND job.attempts = ($2::int[])[array_position($1::bigint[], job.id)]
 FOR UPDATE SKIP LOCKED";
/// Jobs of this process (`$1` its worker ids) whose abort was requested.
pub const JOBS_TO_ABORT: &str = "SELECT id FROM procrastinate_jobs
 WHERE status = 'doing' AND abort_requested AND worker_id = ANY($1::bigint[])";

/// Where a connection landed: who, which database, which server (its port setting) and
/// whether TLS carries it (see [`crate::connect::ConnectionTarget::probe`]).
pub const WHERE_CONNECTED: &str = "SELECT current_user::text, current_database()::text,
 current_setting('port')::int,
 coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)";
/// Metrics (only when the runner serves them): the waiting and running jobs by queue and
/// status, sampled every few seconds. It counts the rows of procrastinate's partial index of
/// `todo` and `doing` jobs: its cost grows with the backlog, not with the finished jobs.
/// Of the `todo` ones, it also counts those due now (as `procrastinate_fetch_job_v2` sees
/// them: no `scheduled_at`, or one past) and says how long the oldest of them has been due,
/// in seconds: since its `scheduled_at`, or, unscheduled, since its insertion (the job row
/// has none: its `deferred` event's, found by the events' `job_id` index for one job per
/// queue, the lowest id). Jobs scheduled for later and retries that wait are not due.
pub const QUEUE_DEPTH: &str =
    "SELECT depth.queue_name::text, depth.status::text, depth.jobs, depth.due,
       extract(epoch FROM now() - least(
           depth.earliest_scheduled_due,
           (SELECT min(event.at) FROM procrastinate_events AS event
             WHERE event.job_id = depth.oldest_unscheduled AND event.type = 'deferred')
       ))::float8
  FROM (SELECT queue_name, status, count(*)::bigint AS jobs,
               count(*) FILTER (WHERE status = 'todo'
                                  AND (scheduled_at IS NULL OR scheduled_at <= now()))::bigint
                   AS due,
               min(scheduled_at) FILTER (WHERE status = 'todo' AND scheduled_at <= now())
                   AS earliest_scheduled_due,
               min(id) FILTER (WHERE status = 'todo' AND scheduled_at IS NULL)
                   AS oldest_unscheduled
          FROM procrastinate_jobs
         WHERE status = ANY(ARRAY['todo', 'doing']::procrastinate_job_status[])
         GROUP BY queue_name, status) AS depth";
/// Metrics: when the claimed jobs `$1` were inserted (their `deferred` event) and last
/// claimed (`started`), in seconds since the epoch (database time), by their events' index.
pub const JOB_EVENT_TIMES: &str = "SELECT job_id,
       extract(epoch FROM max(at) FILTER (WHERE type = 'deferred'))::float8,
       extract(epoch FROM max(at) FILTER (WHERE type = 'started'))::float8
  FROM procrastinate_events
 WHERE job_id = ANY($1::bigint[])
   AND type = ANY(ARRAY['deferred', 'started']::procrastinate_job_event_type[])
 GROUP BY job_id";

/// The connections the core sends its statements on: the job connection's session plans
/// differently (see [`crate::fetcher`]) from the others' (registry, recovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    Jobs,
    Registry,
}

/// Every statement the core sends (but the session settings and LISTEN), by name and
/// connection: the plan test (`rust/core/tests/plans.rs`) explains each of them.
pub const STATEMENTS: &[(&str, &str, Session)] = &[
    ("claim", CLAIM, Session::Jobs),
    (
        "claim with queue limits",
        CLAIM_WITH_QUEUE_LIMITS,
        Session::Jobs,
    ),
    ("complete and claim", COMPLETE_AND_CLAIM, Session::Jobs),
    (
        "complete and claim with queue limits",
        COMPLETE_AND_CLAIM_WITH_QUEUE_LIMITS,
        Session::Jobs,
    ),
    ("complete (with retries)", COMPLETE, Session::Jobs),
    ("finish one", FINISH_ONE, Session::Jobs),
    ("retry one", RETRY_ONE, Session::Jobs),
    ("orphaned claims", ORPHANED_CLAIMS, Session::Jobs),
    ("still abandoned", STILL_ABANDONED, Session::Jobs),
    ("lost claims", LOST_CLAIMS, Session::Jobs),
    ("reattach claims", REATTACH_CLAIMS, Session::Jobs),
    ("backend identity", BACKEND_IDENTITY, Session::Jobs),
    ("backend alive", BACKEND_ALIVE, Session::Jobs),
    ("terminate backend", TERMINATE_BACKEND, Session::Jobs),
    ("check schema", CHECK_SCHEMA, Session::Registry),
    ("where connected", WHERE_CONNECTED, Session::Registry),
    (
        "prune stalled workers",
        PRUNE_STALLED_WORKERS,
        Session::Registry,
    ),
    ("register worker", REGISTER_WORKER, Session::Registry),
    ("unregister worker", UNREGISTER_WORKER, Session::Registry),
    ("heartbeat", UPDATE_HEARTBEAT, Session::Registry),
    ("abort poll", JOBS_TO_ABORT, Session::Registry),
    ("queue depth", QUEUE_DEPTH, Session::Registry),
    ("job event times", JOB_EVENT_TIMES, Session::Registry),
    (
        "lock stalled workers",
        LOCK_STALLED_WORKERS,
        Session::Registry,
    ),
    (
        "jobs of stalled workers",
        JOBS_OF_WORKERS,
        Session::Registry,
    ),
    ("delete stalled workers", DELETE_WORKERS, Session::Registry),
    ("unowned jobs", UNOWNED_JOBS, Session::Registry),
    ("lock unowned jobs", LOCK_UNOWNED_JOBS, Session::Registry),
    ("retry stalled jobs", RETRY_JOBS, Session::Registry),
    ("retry one stalled job", RETRY_JOB, Session::Registry),
    ("fail one stalled job", FAIL_JOB, Session::Registry),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::JobRow;

    #[test]
    fn the_job_columns_come_from_the_one_table() {
        assert_eq!(JobRow::COLUMNS, 11);
        assert!(CLAIM.contains("RETURNING job.id, job.status::text, job.task_name,"));
        assert!(ORPHANED_CLAIMS.contains("job.queue_name, job.attempts, job.worker_id"));
        // The rows of ended claims: the id, then a NULL for each other job column.
        let ended = format!(
            "SELECT id{}, false, NULL FROM finished",
            ", NULL".repeat(10)
        );
        assert!(COMPLETE_AND_CLAIM.contains(&ended), "{COMPLETE_AND_CLAIM}");
        assert_eq!(CLAIMED_COLUMN, 11);
    }

    #[test]
    fn the_claim_writes_the_unrepresentable_date_sentinel_the_core_exports() {
        // The column table can only hold a literal: it must be this constant's value.
        let sentinel = format!("ELSE {UNREPRESENTABLE_SCHEDULED_AT} END");
        assert!(CLAIM.contains(&sentinel), "{CLAIM}");
    }
}
