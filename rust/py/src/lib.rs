//! `fastworker._core`: the thin PyO3 layer over `fastworker-core`.
//!
//! Everything that can wait returns an asyncio awaitable (pyo3-async-runtimes); everything
//! else returns at once. Jobs come out in batches: one awaitable per batch, never per job.

mod errors;

use std::sync::Arc;
use std::time::Duration;

use fastworker_core::{Completion, HandoffEvent, LogLevel, Outcome, WorkerConfig};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::errors::BindingError;

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds, got {value}"
        ))
    })
}

/// The Rust side of one running worker: claims jobs, hands them over, writes outcomes.
#[pyclass(frozen, module = "fastworker._core")]
struct WorkerCore {
    core: Arc<fastworker_core::WorkerCore>,
}

#[pymethods]
impl WorkerCore {
    /// Connect, prune stalled workers, register and start claiming. Awaitable.
    #[staticmethod]
    #[pyo3(signature = (
        conninfo, *, queues=None, concurrency=1, wait=true, fetch_job_polling_interval=5.0,
        abort_job_polling_interval=5.0, listen_notify=true, update_heartbeat_interval=10.0,
        stalled_worker_timeout=30.0, reconnect_timeout=60.0, max_batch_size=500,
        recover_stalled_jobs=false, queue_concurrency=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn start<'py>(
        py: Python<'py>,
        conninfo: String,
        queues: Option<Vec<String>>,
        concurrency: usize,
        wait: bool,
        fetch_job_polling_interval: f64,
        abort_job_polling_interval: f64,
        listen_notify: bool,
        update_heartbeat_interval: f64,
        stalled_worker_timeout: f64,
        reconnect_timeout: f64,
        max_batch_size: usize,
        recover_stalled_jobs: bool,
        queue_concurrency: Option<std::collections::HashMap<String, usize>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut config = WorkerConfig::new(conninfo);
        config.queues = queues;
        config.concurrency = concurrency;
        config.wait = wait;
        config.fetch_job_polling_interval =
            seconds("fetch_job_polling_interval", fetch_job_polling_interval)?;
        config.abort_job_polling_interval =
            seconds("abort_job_polling_interval", abort_job_polling_interval)?;
        config.listen_notify = listen_notify;
        config.update_heartbeat_interval =
            seconds("update_heartbeat_interval", update_heartbeat_interval)?;
        config.stalled_worker_timeout = seconds("stalled_worker_timeout", stalled_worker_timeout)?;
        config.reconnect_timeout = seconds("reconnect_timeout", reconnect_timeout)?;
        config.max_batch_size = max_batch_size.max(1);
        config.recover_stalled_jobs = recover_stalled_jobs;
        config.queue_concurrency = queue_concurrency.unwrap_or_default();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let core = fastworker_core::WorkerCore::start(config)
                .await
                .map_err(BindingError)?;
            Ok(WorkerCore {
                core: Arc::new(core),
            })
        })
    }

    #[getter]
    fn worker_id(&self) -> i64 {
        self.core.worker_id()
    }

    #[getter]
    fn pruned_workers(&self) -> Vec<i64> {
        self.core.pruned_workers().to_vec()
    }

    #[getter]
    fn recovered_jobs(&self) -> Vec<i64> {
        self.core.recovered_jobs().to_vec()
    }

    /// The job ended `succeeded`, `failed` or `aborted` (or is deleted when `delete`).
    fn finish(&self, job_id: i64, status: &str, delete: bool) -> PyResult<()> {
        if !matches!(status, "succeeded" | "failed" | "aborted") {
            return Err(PyValueError::new_err(format!(
                "end status must be succeeded, failed or aborted, got {status:?}"
            )));
        }
        let outcome = Outcome::Finish {
            status: status.to_string(),
            delete,
        };
        self.core
            .complete(Completion { job_id, outcome })
            .map_err(|error| BindingError(error).into())
    }

    /// The job goes back to `todo` (procrastinate_retry_job_v2 semantics).
    #[pyo3(signature = (job_id, retry_at=None, priority=None, queue=None, lock=None))]
    fn retry(
        &self,
        job_id: i64,
        retry_at: Option<String>,
        priority: Option<i32>,
        queue: Option<String>,
        lock: Option<String>,
    ) -> PyResult<()> {
        let outcome = Outcome::Retry {
            retry_at,
            priority,
            queue,
            lock,
        };
        self.core
            .complete(Completion { job_id, outcome })
            .map_err(|error| BindingError(error).into())
    }

    /// Several outcomes in one call, written in the same batch:
    /// `finished` as (job_id, status, delete), `retried` as (job_id, retry_at, priority, queue, lock).
    #[allow(clippy::type_complexity)]
    fn complete_many(
        &self,
        finished: Vec<(i64, String, bool)>,
        retried: Vec<(
            i64,
            Option<String>,
            Option<i32>,
            Option<String>,
            Option<String>,
        )>,
    ) -> PyResult<()> {
        let mut completions = Vec::with_capacity(finished.len() + retried.len());
        for (job_id, status, delete) in finished {
            if !matches!(status.as_str(), "succeeded" | "failed" | "aborted") {
                return Err(PyValueError::new_err(format!(
                    "end status must be succeeded, failed or aborted, got {status:?}"
                )));
            }
            completions.push(Completion {
                job_id,
                outcome: Outcome::Finish { status, delete },
            });
        }
        for (job_id, retry_at, priority, queue, lock) in retried {
            completions.push(Completion {
                job_id,
                outcome: Outcome::Retry {
                    retry_at,
                    priority,
                    queue,
                    lock,
                },
            });
        }
        self.core
            .complete_many(completions)
            .map_err(|error| BindingError(error).into())
    }

    /// Stop claiming at once; running jobs go on and their outcomes are still written.
    fn stop_fetching(&self) {
        self.core.stop_fetching();
    }

    /// Awaitable: the next list of events, or None once the core is shut down.
    /// Events: ("jobs", [row, ...]), ("abort", [job_id, ...]), ("drained", None),
    /// ("fetching_stopped", None), ("log", (level, action, message, job_id)), ("fatal", exception).
    #[pyo3(signature = (max_events=4096))]
    fn next_events<'py>(&self, py: Python<'py>, max_events: usize) -> PyResult<Bound<'py, PyAny>> {
        let core = self.core.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let events = core.next_events(max_events).await;
            Python::attach(|py| -> PyResult<Py<PyAny>> {
                match events {
                    None => Ok(py.None()),
                    Some(events) => Ok(events_to_python(py, events)?.into_any().unbind()),
                }
            })
        })
    }

    /// Events already queued, without waiting (used while shutting down).
    fn pending_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        events_to_python(py, self.core.try_events())
    }

    /// Awaitable: write every reported outcome, stop, unregister the worker.
    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = self.core.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            core.shutdown().await.map_err(BindingError)?;
            Ok(())
        })
    }
}

fn level_number(level: LogLevel) -> u8 {
    match level {
        LogLevel::Debug => 10,
        LogLevel::Info => 20,
        LogLevel::Warning => 30,
        LogLevel::Error => 40,
    }
}

fn events_to_python(py: Python<'_>, events: Vec<HandoffEvent>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for event in events {
        let item: Bound<'_, PyTuple> = match event {
            HandoffEvent::Jobs(jobs) => {
                let rows = PyList::empty(py);
                for job in jobs {
                    rows.append((
                        job.id,
                        job.status,
                        job.task_name,
                        job.priority,
                        job.lock,
                        job.queueing_lock,
                        job.args,
                        job.scheduled_at_us,
                        job.queue_name,
                        job.attempts,
                        job.worker_id,
                    ))?;
                }
                ("jobs", rows).into_pyobject(py)?
            }
            HandoffEvent::Abort(ids) => ("abort", ids).into_pyobject(py)?,
            HandoffEvent::Drained => ("drained", py.None()).into_pyobject(py)?,
            HandoffEvent::FetchingStopped => ("fetching_stopped", py.None()).into_pyobject(py)?,
            HandoffEvent::Log(record) => (
                "log",
                (
                    level_number(record.level),
                    record.action,
                    record.message,
                    record.job_id,
                ),
            )
                .into_pyobject(py)?,
            HandoffEvent::Fatal(error) => {
                let error: PyErr = BindingError(error).into();
                ("fatal", error.into_value(py)).into_pyobject(py)?
            }
        };
        list.append(item)?;
    }
    Ok(list)
}

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // The core's own runtime: one thread is enough (it waits on the network) and leaves
    // the other cores to the Python threads and PostgreSQL.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(1)
        .thread_name("fastworker-core")
        .enable_all();
    pyo3_async_runtimes::tokio::init(builder);
    module.add_class::<WorkerCore>()?;
    errors::register(module)?;
    Ok(())
}
