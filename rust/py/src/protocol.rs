//! The Python face of [`fastworker_core::protocol`]: typed, frozen classes for what crosses
//! between the core and the runner, instead of positional tuples and string tags.
//! - [`Job`]: a claimed job, its fields made from the core's one column table;
//! - [`Event`]: what the core hands over (one variant per kind, for `match`);
//! - [`Outcome`]: how a run ended, with how long it ran, as the runner reports it;
//! - [`Metrics`] and [`Histogram`]: the core's counters, read at scrape time.

use fastworker_core::metrics::Histogram as CoreHistogram;
use fastworker_core::protocol::{
    Completion, FinishStatus, HandoffEvent, JobRow, LogLevel, Reported,
};
use fastworker_core::MetricsSnapshot;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::BindingError;

macro_rules! job_class {
    ($($(#[doc = $doc:literal])* $field:ident: $type:ty = $sql:literal),* $(,)?) => {
        /// A claimed job, as the core read it (see `fastworker_core::job_columns_table`).
        #[pyclass(frozen, get_all, module = "fastworker._core")]
        pub struct Job {
            $($(#[doc = $doc])* pub $field: $type,)*
        }

        impl From<JobRow> for Job {
            fn from(row: JobRow) -> Job {
                Job { $($field: row.$field,)* }
            }
        }

        #[pymethods]
        impl Job {
            /// The field names, in the core's column order.
            #[classattr]
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn __repr__(&self) -> String {
                format!("Job(id={}, task_name={:?}, attempts={})", self.id, self.task_name, self.attempts)
            }
        }
    };
}

fastworker_core::job_columns_table!(job_class);

/// What the core hands to the runner, in the order it happened.
#[pyclass(frozen, module = "fastworker._core")]
pub enum Event {
    /// Claimed jobs, in start order; each must get exactly one outcome.
    Jobs { jobs: Py<PyList> },
    /// The database asked to abort these jobs (held by this worker).
    Abort { job_ids: Vec<i64> },
    /// `wait=False` and the queue is empty: the core has stopped claiming.
    Drained(),
    /// The core will claim nothing more; every claimed job was handed over before this.
    FetchingStopped(),
    /// This worker's row was pruned, and it registered again under this id.
    WorkerId { worker_id: i64 },
    /// These claims (job id, attempts at claim) are no longer this worker's: stop their
    /// runs (their ends are still reported, and found no longer current).
    ClaimsLost { claims: Vec<(i64, i32)> },
    /// A record for Python's logging: `level` is logging's number, `action`
    /// procrastinate's `action` extra.
    Log {
        level: u8,
        action: String,
        message: String,
        job_id: Option<i64>,
    },
    /// The core cannot go on: stop and raise it. Outcomes reported after this are still
    /// written, as far as the database lets them.
    Fatal { error: Py<PyAny> },
}

fn level_number(level: LogLevel) -> u8 {
    match level {
        LogLevel::Debug => 10,
        LogLevel::Info => 20,
        LogLevel::Warning => 30,
        LogLevel::Error => 40,
    }
}

/// The core's events, as Python objects.
pub fn events_to_python(py: Python<'_>, events: Vec<HandoffEvent>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for event in events {
        let event = match event {
            HandoffEvent::Jobs(rows) => {
                let jobs = PyList::empty(py);
                for row in rows {
                    jobs.append(Job::from(row))?;
                }
                Event::Jobs {
                    jobs: jobs.unbind(),
                }
            }
            HandoffEvent::Abort(job_ids) => Event::Abort { job_ids },
            HandoffEvent::Drained => Event::Drained(),
            HandoffEvent::FetchingStopped => Event::FetchingStopped(),
            HandoffEvent::WorkerId(worker_id) => Event::WorkerId { worker_id },
            HandoffEvent::ClaimsLost(claims) => Event::ClaimsLost { claims },
            HandoffEvent::Log(record) => Event::Log {
                level: level_number(record.level),
                action: record.action.to_string(),
                message: record.message,
                job_id: record.job_id,
            },
            HandoffEvent::Fatal(error) => {
                let error: PyErr = BindingError(error).into();
                Event::Fatal {
                    error: error.into_value(py).into_any(),
                }
            }
        };
        list.append(event)?;
    }
    Ok(list)
}

/// How one run of a claimed job ended, as the runner reports it (`job_id` and `attempts`:
/// the job as it was handed over; `duration`: seconds it ran, for the metrics).
#[pyclass(frozen, module = "fastworker._core")]
#[derive(Clone)]
pub enum Outcome {
    /// `procrastinate_finish_job_v1`: `status` is `succeeded`, `failed` or `aborted`;
    /// `delete` removes the row instead (`delete_jobs`).
    #[pyo3(constructor = (job_id, attempts, status, delete = false, duration = 0.0))]
    Finish {
        job_id: i64,
        attempts: i32,
        status: String,
        delete: bool,
        duration: f64,
    },
    /// `procrastinate_retry_job_v2`: `retry_at` an ISO-8601 timestamp with offset (None:
    /// now); `priority`, `queue`, `lock` None to keep the job's own.
    #[pyo3(constructor = (
        job_id, attempts, retry_at = None, priority = None, queue = None, lock = None,
        duration = 0.0
    ))]
    Retry {
        job_id: i64,
        attempts: i32,
        retry_at: Option<String>,
        priority: Option<i32>,
        queue: Option<String>,
        lock: Option<String>,
        duration: f64,
    },
}

/// The outcomes of one report, checked, for the core.
pub fn reported(outcomes: Vec<Bound<'_, Outcome>>) -> PyResult<Reported> {
    let mut completions = Vec::with_capacity(outcomes.len());
    let mut durations = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let (job_id, attempts, outcome, duration) = match outcome.get().clone() {
            Outcome::Finish {
                job_id,
                attempts,
                status,
                delete,
                duration,
            } => {
                let Some(status) = FinishStatus::from_name(&status) else {
                    return Err(PyValueError::new_err(format!(
                        "end status must be succeeded, failed or aborted, got {status:?}"
                    )));
                };
                let finish = fastworker_core::Outcome::Finish { status, delete };
                (job_id, attempts, finish, duration)
            }
            Outcome::Retry {
                job_id,
                attempts,
                retry_at,
                priority,
                queue,
                lock,
                duration,
            } => {
                let retry = fastworker_core::Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                };
                (job_id, attempts, retry, duration)
            }
        };
        completions.push(Completion {
            job_id,
            attempts,
            outcome,
        });
        durations.push(duration);
    }
    Ok(Reported {
        completions,
        durations,
    })
}

/// A histogram: `counts[i]` observations at most `bounds[i]` (not cumulative), the last
/// count over every bound (+Inf).
#[pyclass(frozen, get_all, module = "fastworker._core")]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl From<&CoreHistogram> for Histogram {
    fn from(histogram: &CoreHistogram) -> Histogram {
        Histogram {
            bounds: histogram.bounds.to_vec(),
            counts: histogram.counts.clone(),
            sum: histogram.sum,
            count: histogram.count,
        }
    }
}

/// The core's metrics at one moment (`WorkerCore.metrics()`).
#[pyclass(frozen, get_all, module = "fastworker._core")]
pub struct Metrics {
    /// (task, queue, jobs claimed)
    pub claimed: Vec<(String, String, u64)>,
    /// (task, queue, status, outcomes written); status: succeeded, failed, aborted, retried
    pub outcomes: Vec<(String, String, String, u64)>,
    /// (task, queue, how long its jobs ran)
    pub job_duration: Vec<(String, String, Py<Histogram>)>,
    pub claim_batch_size: Py<Histogram>,
    pub completion_batch_size: Py<Histogram>,
    pub claim_to_start: Py<Histogram>,
    /// Outcomes reported and not yet written.
    pub completer_backlog: u64,
    /// Jobs claimed and not yet completed in the database.
    pub in_flight: u64,
    /// role (dispatcher, listener, registry) -> whether its connection is up
    pub connected: std::collections::HashMap<String, bool>,
    /// role -> connections re-established
    pub reconnects: std::collections::HashMap<String, u64>,
    /// (queue, how long its jobs waited to be claimed)
    pub job_wait: Vec<(String, Py<Histogram>)>,
    /// Seconds since this worker's heartbeat was last written (None: never).
    pub heartbeat_age: Option<f64>,
    /// Times the heartbeat was found older than stalled_worker_timeout.
    pub heartbeats_late: u64,
    /// Stalled workers this worker pruned; their jobs it put back to run, or failed.
    pub stalled_workers_pruned: u64,
    pub stalled_jobs_recovered: u64,
    pub stalled_jobs_failed: u64,
    /// (queue, status, jobs) as last sampled; empty unless sampled.
    pub queue_depth: Vec<(String, String, u64)>,
    /// Seconds since the queue depth was sampled (None: never).
    pub queue_depth_age: Option<f64>,
    /// (queue, todo jobs due now, todo jobs scheduled for later, seconds the oldest due
    /// job has been due, None: none is due) for each sampled queue.
    pub queue_due: Vec<(String, u64, u64, Option<f64>)>,
}

pub fn metrics_to_python(py: Python<'_>, snapshot: MetricsSnapshot) -> PyResult<Metrics> {
    let histogram = |histogram: &CoreHistogram| Py::new(py, Histogram::from(histogram));
    let queue_due = snapshot
        .due_by_queue()
        .into_iter()
        .map(|queue| (queue.queue, queue.due, queue.not_due, queue.oldest_due_age))
        .collect();
    Ok(Metrics {
        claimed: snapshot
            .claimed
            .iter()
            .map(|((task, queue), count)| (task.to_string(), queue.to_string(), *count))
            .collect(),
        outcomes: snapshot
            .outcomes
            .iter()
            .map(|((task, queue, status), count)| {
                (
                    task.to_string(),
                    queue.to_string(),
                    status.to_string(),
                    *count,
                )
            })
            .collect(),
        job_duration: snapshot
            .job_duration
            .iter()
            .map(|((task, queue), durations)| {
                Ok((task.to_string(), queue.to_string(), histogram(durations)?))
            })
            .collect::<PyResult<_>>()?,
        claim_batch_size: histogram(&snapshot.claim_batch_size)?,
        completion_batch_size: histogram(&snapshot.completion_batch_size)?,
        claim_to_start: histogram(&snapshot.claim_to_start)?,
        completer_backlog: snapshot.completer_backlog,
        in_flight: snapshot.in_flight,
        connected: snapshot
            .connected
            .iter()
            .map(|(role, up)| (role.to_string(), *up))
            .collect(),
        reconnects: snapshot
            .reconnects
            .iter()
            .map(|(role, count)| (role.to_string(), *count))
            .collect(),
        job_wait: snapshot
            .job_wait
            .iter()
            .map(|(queue, waits)| Ok((queue.to_string(), histogram(waits)?)))
            .collect::<PyResult<_>>()?,
        heartbeat_age: snapshot.last_heartbeat.map(|at| at.elapsed().as_secs_f64()),
        heartbeats_late: snapshot.heartbeats_late,
        stalled_workers_pruned: snapshot.stalled_workers_pruned,
        stalled_jobs_recovered: snapshot.stalled_jobs_recovered,
        stalled_jobs_failed: snapshot.stalled_jobs_failed,
        queue_depth: snapshot
            .queue_depth
            .into_iter()
            .map(|depth| (depth.queue, depth.status, depth.jobs))
            .collect(),
        queue_depth_age: snapshot
            .queue_depth_sampled
            .map(|at| at.elapsed().as_secs_f64()),
        queue_due,
    })
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Job>()?;
    module.add_class::<Histogram>()?;
    module.add_class::<Metrics>()?;
    module.add_class::<Event>()?;
    module.add_class::<Outcome>()?;
    module.add("EVENT_KINDS", HandoffEvent::KINDS.to_vec())?;
    module.add(
        "UNREPRESENTABLE_SCHEDULED_AT",
        fastworker_core::sql::UNREPRESENTABLE_SCHEDULED_AT,
    )?;
    Ok(())
}
