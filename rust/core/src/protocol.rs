//! What crosses between the core and the runner that runs the jobs, declared once:
//! - the claimed job: [`job_columns_table`] lists its columns (name, type, SQL), and
//!   [`JobRow`], the statements that return jobs ([`crate::sql`]) and the binding's `Job`
//!   class are all made from that one list;
//! - the outcome of a run ([`Outcome`], [`Completion`], [`Reported`]);
//! - the events handed to the runner ([`HandoffEvent`], [`LogRecord`]).

use tokio_postgres::Row;

use crate::errors::CoreError;

/// The columns of a claimed job, in order: `name: Rust type = "SQL expression"` over a
/// `procrastinate_jobs` row named `job`. Calls `$then!` with the list, so each user makes
/// what it needs of it (a struct, a column list, a Python class) without spelling the
/// columns again.
///
/// `scheduled_at` travels as microseconds since the epoch; a value that no runner could
/// represent as a date (±infinity, or outside years 1-9999) becomes
/// [`crate::sql::UNREPRESENTABLE_SCHEDULED_AT`] instead of failing the whole statement
/// (one such row would otherwise stop every claim of every worker). `args` stays JSON
/// text: the runner parses it with its own JSON decoder, which is faster than building
/// objects field by field.
#[macro_export]
macro_rules! job_columns_table {
    ($then:ident) => {
        $then! {
            id: i64 = "job.id",
            status: String = "job.status::text",
            task_name: String = "job.task_name",
            priority: i32 = "job.priority",
            lock: Option<String> = "job.lock",
            queueing_lock: Option<String> = "job.queueing_lock",
            /// JSON text.
            args: String = "job.args::text",
            /// Microseconds since the Unix epoch; `UNREPRESENTABLE_SCHEDULED_AT` for a date
            /// no runner can represent (the runner fails that job alone).
            scheduled_at_us: Option<i64> = "CASE WHEN job.scheduled_at IS NULL THEN NULL
            WHEN job.scheduled_at >= '0001-01-01 00:00:00+00'
             AND job.scheduled_at < '10000-01-01 00:00:00+00'
            THEN (extract(epoch FROM job.scheduled_at) * 1000000)::bigint
            ELSE -9223372036854775808 END",
            queue_name: String = "job.queue_name",
            attempts: i32 = "job.attempts",
            worker_id: Option<i64> = "job.worker_id",
        }
    };
}

macro_rules! job_row_struct {
    ($($(#[doc = $doc:literal])* $field:ident: $type:ty = $sql:literal),* $(,)?) => {
        /// One claimed job, as the runner needs it (see [`job_columns_table`]).
        #[derive(Clone, Debug, PartialEq)]
        pub struct JobRow {
            $($(#[doc = $doc])* pub $field: $type,)*
        }

        impl JobRow {
            /// How many columns a job takes in a statement's rows.
            pub const COLUMNS: usize = [$(stringify!($field)),*].len();

            /// The job in the first [`JobRow::COLUMNS`] columns of `row`.
            pub fn from_row(row: &Row) -> Result<JobRow, tokio_postgres::Error> {
                let mut column = 0;
                let mut next = || {
                    column += 1;
                    column - 1
                };
                Ok(JobRow {
                    $($field: row.try_get(next())?,)*
                })
            }
        }
    };
}

job_columns_table!(job_row_struct);

/// The end status of a finished job: procrastinate's `procrastinate_job_status` values
/// that `procrastinate_finish_job_v1` takes, and the `status` label of the outcome
/// metrics (with `retried` for a retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishStatus {
    Succeeded,
    Failed,
    Aborted,
}

impl FinishStatus {
    pub const ALL: [FinishStatus; 3] = [
        FinishStatus::Succeeded,
        FinishStatus::Failed,
        FinishStatus::Aborted,
    ];

    /// The status as procrastinate names it (in the database and in the metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishStatus::Succeeded => "succeeded",
            FinishStatus::Failed => "failed",
            FinishStatus::Aborted => "aborted",
        }
    }

    /// The status named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<FinishStatus> {
        FinishStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == name)
    }
}

/// How a job ended, as procrastinate's worker decides it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `procrastinate_finish_job_v1(id, status, delete_job)`.
    Finish { status: FinishStatus, delete: bool },
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

/// One claim: a job, and the attempts it had when it was claimed. A job is claimed again
/// only after a terminal write (which raises its attempts) or a recovery (likewise), so
/// the pair names one run of one job.
pub type ClaimKey = (i64, i32);

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub job_id: i64,
    /// The job's attempts when it was claimed (the row the runner was handed).
    pub attempts: i32,
    pub outcome: Outcome,
}

impl Completion {
    pub fn key(&self) -> ClaimKey {
        (self.job_id, self.attempts)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

/// A log record for the runner's logging system; `action` is procrastinate's `action` extra.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRecord {
    pub level: LogLevel,
    pub action: &'static str,
    pub message: String,
    pub job_id: Option<i64>,
}

#[derive(Debug)]
pub enum HandoffEvent {
    /// Claimed jobs, in start order. Each must be completed exactly once.
    Jobs(Vec<JobRow>),
    /// The database asked to abort these jobs (held by this worker).
    Abort(Vec<i64>),
    /// `wait=False` and the queue is empty: the core has stopped claiming.
    Drained,
    /// The dispatcher will claim nothing more; every claimed job was handed over before this.
    FetchingStopped,
    Log(LogRecord),
    /// The core cannot go on; the runner should stop and raise it. The core still writes
    /// every outcome reported after this, as far as the database lets it.
    Fatal(CoreError),
    /// This worker's row was pruned and it registered again under this id.
    WorkerId(i64),
    /// These claims (job id, attempts at claim) are no longer this worker's: their runs
    /// should stop (their ends are still reported, and found no longer current).
    ClaimsLost(Vec<(i64, i32)>),
}

impl HandoffEvent {
    /// The kinds of event, by the names of the runner's `Event` classes: the binding makes
    /// one class per kind and exports this list (`EVENT_KINDS`), and the test suite holds
    /// the binding's classes and the stub (`_core.pyi`) to it.
    pub const KINDS: [&'static str; 8] = [
        "Jobs",
        "Abort",
        "Drained",
        "FetchingStopped",
        "Log",
        "Fatal",
        "WorkerId",
        "ClaimsLost",
    ];

    /// This event's kind, one of [`HandoffEvent::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            HandoffEvent::Jobs(_) => "Jobs",
            HandoffEvent::Abort(_) => "Abort",
            HandoffEvent::Drained => "Drained",
            HandoffEvent::FetchingStopped => "FetchingStopped",
            HandoffEvent::Log(_) => "Log",
            HandoffEvent::Fatal(_) => "Fatal",
            HandoffEvent::WorkerId(_) => "WorkerId",
            HandoffEvent::ClaimsLost(_) => "ClaimsLost",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_its_own_kind_and_every_kind_is_listed() {
        let one_of_each = [
            HandoffEvent::Jobs(Vec::new()),
            HandoffEvent::Abort(Vec::new()),
            HandoffEvent::Drained,
            HandoffEvent::FetchingStopped,
            HandoffEvent::Log(LogRecord {
                level: LogLevel::Info,
                action: "test",
                message: String::new(),
                job_id: None,
            }),
            HandoffEvent::Fatal(CoreError::Internal(String::new())),
            HandoffEvent::WorkerId(1),
            HandoffEvent::ClaimsLost(Vec::new()),
        ];
        assert_eq!(one_of_each.map(|event| event.kind()), HandoffEvent::KINDS);
    }

    #[test]
    fn a_finish_status_is_known_by_its_procrastinate_name_only() {
        for status in FinishStatus::ALL {
            assert_eq!(FinishStatus::from_name(status.as_str()), Some(status));
        }
        assert_eq!(
            FinishStatus::ALL.map(FinishStatus::as_str),
            ["succeeded", "failed", "aborted"]
        );
        for other in ["retried", "todo", "doing", "Succeeded", ""] {
            assert_eq!(FinishStatus::from_name(other), None, "{other:?}");
        }
    }
}
