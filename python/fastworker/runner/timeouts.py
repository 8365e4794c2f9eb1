"""Job timeouts (`job_timeout`, `task_timeouts`): a job over its time is cancelled
through the abort path and ends failed with `JobTimeout` (or is retried)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from procrastinate import App, job_context, tasks

from fastworker.runner.ledger import ClaimLedger


class JobTimeout(Exception):
    """A job ran longer than its ``job_timeout`` / ``task_timeouts`` entry."""


class JobTimeouts:
    """Owns the timers of the running jobs' timeouts; may call the claim ledger (a job over
    its timeout is marked timed out, and a sync one asked to abort)."""

    def __init__(
        self,
        *,
        ledger: ClaimLedger[job_context.JobContext],
        job_timeout: float | None,
        task_timeouts: Mapping[str, float],
        app: App,
        task_is_async: Callable[[tasks.Task[Any, Any, Any]], bool],
        logger: logging.Logger,
        log_extra: Callable[..., dict[str, Any]],
    ) -> None:
        self._ledger = ledger
        self._job_timeout = job_timeout
        self._task_timeouts = task_timeouts
        self._app = app
        self._task_is_async = task_is_async
        self._logger = logger
        self._log_extra = log_extra

    def arm(self, job_task: asyncio.Task[Any], context: job_context.JobContext) -> None:
        """Arm the job's timeout, if it has one (its task's, else `job_timeout`)."""
        timeout = self._task_timeouts.get(context.job.task_name, self._job_timeout)
        if timeout is None:
            return
        timer = asyncio.get_running_loop().call_later(
            timeout, self._time_out_job, job_task, context, timeout
        )
        job_task.add_done_callback(lambda _: timer.cancel())

    def _time_out_job(
        self, job_task: asyncio.Task[Any], context: job_context.JobContext, timeout: float
    ) -> None:
        """Cancel a job over its timeout, through the same path as an abort."""
        job = context.job
        if job_task.done() or job.id is None:
            return
        self._ledger.time_out(job.id)
        task = self._app.tasks.get(job.task_name)
        is_async = task is not None and self._task_is_async(task)
        self._logger.warning(
            f"Job {job.call_string} exceeded its timeout of {timeout} s: "
            + ("cancelling it" if is_async else "asking it to abort (sync job)"),
            extra=self._log_extra(
                action="job_timeout", context=context, job_result=None, timeout=timeout
            ),
        )
        if is_async:
            job_task.cancel()
        else:
            # A thread cannot be interrupted: the job sees context.should_abort().
            self._ledger.request_abort(
                job.id, job_context.AbortReason.USER_REQUEST, keep_earlier=True
            )
