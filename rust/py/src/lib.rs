//! `fastworker._core`: the thin PyO3 layer over `fastworker-core`.
//!
//! Everything that can wait returns an asyncio awaitable (pyo3-async-runtimes); everything
//! else returns at once. Jobs come out in batches: one awaitable per batch, never per job.

mod errors;
mod protocol;

use std::sync::Arc;
use std::time::Duration;

use fastworker_core::connect::ConnectionTarget;
use fastworker_core::params::CONNECTION_KEYWORDS;
use fastworker_core::{ConnectionParams, CoreError, WorkerConfig};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::BindingError;
use crate::protocol::{events_to_python, metrics_to_python, Metrics, Outcome};

/// The Rust side of one running worker: claims jobs, hands them over, writes outcomes.
#[pyclass(frozen, module = "fastworker._core")]
struct WorkerCore {
    core: Arc<fastworker_core::WorkerCore>,
}

#[pymethods]
impl WorkerCore {
    /// Connect, prune stalled workers, register and start claiming. Awaitable.
    /// `options`: the core's options by name (`WorkerConfig`'s fields: `connection`,
    /// procrastinate's worker options that concern claiming, fastworker's own), durations
    /// in seconds; what is not given keeps the core's default, and an unknown name or a bad
    /// value raises ConfigurationError.
    #[staticmethod]
    fn start<'py>(py: Python<'py>, options: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let config: WorkerConfig = pythonize::depythonize(options)
            .map_err(|error| BindingError(CoreError::Config(format!("worker options: {error}"))))?;
        config.validate().map_err(BindingError)?;
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

    /// Outcomes of ended runs, written in one batch (see `Outcome`). Raises ValueError for
    /// an outcome the core cannot write, and none of the call's outcomes is taken then.
    fn report(&self, outcomes: Vec<Bound<'_, Outcome>>) -> PyResult<()> {
        self.core
            .report(protocol::reported(outcomes)?)
            .map_err(|error| BindingError(error).into())
    }

    /// Counters and histograms of this worker, for a metrics exporter.
    fn metrics(&self, py: Python<'_>) -> PyResult<Metrics> {
        metrics_to_python(py, self.core.metrics())
    }

    /// Stop claiming at once; running jobs go on and their outcomes are still written.
    fn stop_fetching(&self) {
        self.core.stop_fetching();
    }

    /// A hard stop: stop claiming, and at shutdown give up at once on outcomes that an
    /// unreachable database keeps from being written.
    fn hard_stop(&self) {
        self.core.hard_stop();
    }

    /// Awaitable: the next list of events (see `Event`), or None once the core is shut down.
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

    /// A file descriptor that turns readable when `take_events` has something to return
    /// (for `loop.add_reader`), or None where the platform has none: use `next_events`.
    fn events_fd(&self) -> Option<i32> {
        self.core.events_fd()
    }

    /// For a runner woken by `events_fd`: every event queued now, or None once the core is
    /// shut down and everything was delivered.
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        match self.core.take_events() {
            None => Ok(None),
            Some(events) => Ok(Some(events_to_python(py, events)?)),
        }
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

/// Awaitable: connect once with the core's own connection code (`connection`: libpq's
/// keywords, as `WorkerConfig.connection`), and return where it landed: `user`,
/// `database`, `server_port` and `ssl`. fastworker's start-up check and its tests use it
/// to compare the core's connections with libpq's.
#[pyfunction]
fn probe_connection<'py>(
    py: Python<'py>,
    connection: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let params: ConnectionParams = pythonize::depythonize(connection).map_err(|error| {
        BindingError(CoreError::Config(format!("connection parameters: {error}")))
    })?;
    let target = ConnectionTarget::new(&params).map_err(BindingError)?;
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let landed = target.probe().await.map_err(BindingError)?;
        Python::attach(|py| -> PyResult<Py<PyAny>> {
            let answer = pyo3::types::PyDict::new(py);
            answer.set_item("user", landed.user)?;
            answer.set_item("database", landed.database)?;
            answer.set_item("server_port", landed.server_port)?;
            answer.set_item("ssl", landed.ssl)?;
            Ok(answer.into_any().unbind())
        })
    })
}

/// Registered with `atexit`: lets the runtime's threads finish handing results to asyncio
/// before the interpreter finalizes.
///
/// pyo3-async-runtimes resolves each awaitable from a tokio blocking thread that holds the
/// GIL while it calls `loop.call_soon_threadsafe`. The awaiting coroutine can resume (and
/// `asyncio.run` return, and the interpreter start finalizing) before that thread has
/// released the GIL; it then aborts the process with "PyGILState_Release: thread state
/// must be current when releasing" (seen on a worker that exits at once, e.g. with an
/// unreachable database). atexit callbacks run before finalization starts: releasing the
/// GIL for a moment here lets any such thread finish first.
#[pyfunction]
fn _quiesce_before_exit(py: Python<'_>) {
    py.detach(|| std::thread::sleep(Duration::from_millis(50)));
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
    protocol::register(module)?;
    module.add_function(wrap_pyfunction!(probe_connection, module)?)?;
    module.add("CONNECTION_KEYWORDS", CONNECTION_KEYWORDS.to_vec())?;
    let quiesce = wrap_pyfunction!(_quiesce_before_exit, module)?;
    module.add_function(quiesce.clone())?;
    module
        .py()
        .import("atexit")?
        .call_method1("register", (quiesce,))?;
    Ok(())
}
