"""The runner's roles, built in one place (`RunnerState._init_runner_state`).

The roles are plain objects, each owning its state and calling only what it is handed:
`ClaimLedger`, `OutcomeSink`, `Lifecycle`, `JobTimeouts`, `JobExecutor` (and, per run,
`EventPump`), `PeriodicDeferrer`, `StopSignals`, `Shutdown`, the core seen through
`CorePort`. procrastinate's `Worker` subclass keeps procrastinate's methods and hooks (its
tests and middleware call them), each file a class of the chain, delegating to the roles:

    RunnerState (this file) <- Outcomes <- Upstream <- Hooks
        <- fastworker.Worker (the facade, `fastworker/worker.py`)
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from procrastinate import job_context, tasks
from procrastinate import worker as procrastinate_worker

from fastworker import _core
from fastworker.runner.executor import JobExecutor
from fastworker.runner.ledger import ClaimLedger
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink
from fastworker.runner.periodic import PeriodicDeferrer
from fastworker.runner.shutdown import Shutdown
from fastworker.runner.signals import StopSignals
from fastworker.runner.timeouts import JobTimeouts

logger = logging.getLogger("procrastinate.worker")
core_logger = logging.getLogger("fastworker.core")


class JobTimeout(Exception):
    """A job ran longer than its ``job_timeout`` / ``task_timeouts`` entry."""


class RunnerState(procrastinate_worker.Worker):
    """procrastinate's worker state, plus what the runner keeps."""

    # fastworker's options that the roles read (set by `Worker.__init__`).
    job_timeout: float | None
    task_timeouts: dict[str, float]
    reconnect_timeout: float

    def _init_runner_state(self) -> None:
        self._core: _core.WorkerCore | None = None
        self._async_tasks: dict[str, bool] = {}
        # Every claim handed over, from its hand-over to its outcome (`runner/ledger.py`).
        self._ledger: ClaimLedger[job_context.JobContext] = ClaimLedger(self._job_ids_to_abort)
        # Outcomes on their way to the core (`runner/outcomes.py`).
        self._outcome_sink = OutcomeSink(
            self._ledger,
            delete_jobs=self.delete_jobs,
            logger=self.logger,
            log_extra=self._log_extra,
        )
        # Stops, drains and the core's fatal error (`runner/lifecycle.py`).
        self._lifecycle = Lifecycle(self._stop_event)
        # Starting each job handed over and ending it with one outcome (`runner/executor.py`).
        self._executor = JobExecutor(
            # Looked up at each call: procrastinate's tests and subclasses replace these.
            process_job=lambda context: self._process_job(context),
            abort_job=lambda job_task, context, reason: self._abort_job(job_task, context, reason),
            ledger=self._ledger,
            sink=self._outcome_sink,
            timeouts=JobTimeouts(
                ledger=self._ledger,
                job_timeout=self.job_timeout,
                task_timeouts=self.task_timeouts,
                app=self.app,
                task_is_async=self._task_is_async,
                logger=self.logger,
                log_extra=self._log_extra,
            ),
            lifecycle=self._lifecycle,
            task_is_async=self._task_is_async,
            app=self.app,
            worker_name=self.worker_name,
            queues=self.queues,
            additional_context=self.additional_context,
            logger=self.logger,
            log_extra=self._log_extra,
        )
        # The periodic deferrer, a side task of each run (`runner/periodic.py`).
        self._periodic = PeriodicDeferrer(self.app, reconnect_timeout=self.reconnect_timeout)
        # SIGINT/SIGTERM while a run lasts (`runner/signals.py`).
        self._signals = StopSignals(
            self._lifecycle,
            stop=lambda: self.stop(),
            hard_stop=lambda: self._request_hard_stop(),
            logger=self.logger,
            log_extra=self._log_extra,
        )
        # The end of each run (`runner/shutdown.py`).
        self._shutdown_steps = Shutdown(
            lifecycle=self._lifecycle,
            sink=self._outcome_sink,
            # procrastinate's, looked up at the call as the hooks are.
            abort_running_jobs=lambda: self._abort_running_jobs(),
            graceful_timeout=self.shutdown_graceful_timeout,
            queues=self.queues,
            logger=self.logger,
            log_extra=self._log_extra,
        )

    def _request_hard_stop(self) -> None:
        """Abort the running jobs now (a second signal, a cancel while stopping)."""
        self._lifecycle.request_hard_stop(self._core, self._loop)

    def _task_is_async(self, task: tasks.Task[Any, Any, Any]) -> bool:
        is_async = self._async_tasks.get(task.name)
        if is_async is None:
            is_async = self._async_tasks[task.name] = inspect.iscoroutinefunction(task.func)
        return is_async
