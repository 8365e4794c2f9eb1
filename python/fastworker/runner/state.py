"""The state the runner's roles share, declared and initialised in one place.

The runner is procrastinate's `Worker`, extended role by role, each role a class in its
own file that builds on the ones before it:

    RunnerState (this file) <- Outcomes <- Upstream <- Timeouts <- Intake <- Shutdown
        <- Periodic <- fastworker.Worker (the facade, `fastworker/worker.py`)
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from procrastinate import job_context, jobs, tasks
from procrastinate import worker as procrastinate_worker

from fastworker import _core

logger = logging.getLogger("procrastinate.worker")
core_logger = logging.getLogger("fastworker.core")

# An outcome as the runner makes them (the core's Outcome has these two kinds).
Outcome = _core.Outcome.Finish | _core.Outcome.Retry


def claim_of(job: jobs.Job) -> tuple[int, int]:
    """One claim of a job: its id and the attempts it had when claimed."""
    assert job.id is not None
    return (job.id, job.attempts)


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
        # Outcomes waiting for `_flush_outcomes` (see `_report_outcome`).
        self._outcomes: list[Outcome] = []
        self._flush_scheduled = False
        # Jobs handed over whose outcome is not reported yet (see `_on_job_done`).
        # By claim (job id, attempts): a job recovered elsewhere and claimed here again may
        # run here twice at once, under its old claim and its new one.
        self._awaiting_outcome: dict[tuple[int, int], job_context.JobContext] = {}
        # Jobs whose `_process_job` has begun: only those may be cancelled (see `_abort_job`).
        self._started: set[tuple[int, int]] = set()
        # Claims (job id, attempts) that are no longer this worker's (see _stop_lost_claims).
        self._lost_claims: set[tuple[int, int]] = set()
        # Jobs cancelled for running over their timeout (see `_time_out_job`).
        self._timed_out: set[int] = set()
        self._hard_stop = asyncio.Event()
        self._fetching_stopped: asyncio.Future[None] | None = None
        self._fatal_error: BaseException | None = None
        self._drained = False
        # Jobs the core handed over in this run (a drain at max_jobs is not "no job found").
        self._jobs_claimed = 0
        self._signals_received = 0

    def _task_is_async(self, task: tasks.Task[Any, Any, Any]) -> bool:
        is_async = self._async_tasks.get(task.name)
        if is_async is None:
            is_async = self._async_tasks[task.name] = inspect.iscoroutinefunction(task.func)
        return is_async
