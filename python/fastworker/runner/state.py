"""The state the runner's roles share, declared and initialised in one place.

The runner is procrastinate's `Worker`, extended role by role, each role a class in its
own file that builds on the ones before it:

    RunnerState (this file) <- Outcomes <- Upstream <- Timeouts <- Intake <- Shutdown
        <- Periodic <- fastworker.Worker (the facade, `fastworker/worker.py`)
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from procrastinate import job_context, tasks
from procrastinate import worker as procrastinate_worker

from fastworker import _core
from fastworker.runner.ledger import ClaimLedger
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink

logger = logging.getLogger("procrastinate.worker")
core_logger = logging.getLogger("fastworker.core")


class JobTimeout(Exception):
    """A job ran longer than its ``job_timeout`` / ``task_timeouts`` entry."""


class RunnerState(procrastinate_worker.Worker):
    """procrastinate's worker state, plus what the runner keeps."""

    # fastworker's options that the roles read (set by `Worker.__init__`).
    job_timeout: float | None
    task_timeouts: dict[str, float]

    def _init_runner_state(self) -> None:
        self._core: _core.WorkerCore | None = None
        self._async_tasks: dict[str, bool] = {}
        self._json_loads: Callable[[str], Any] = json.loads
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

    def _task_is_async(self, task: tasks.Task[Any, Any, Any]) -> bool:
        is_async = self._async_tasks.get(task.name)
        if is_async is None:
            is_async = self._async_tasks[task.name] = inspect.iscoroutinefunction(task.func)
        return is_async
