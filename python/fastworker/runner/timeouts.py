"""Job timeouts (`job_timeout`, `task_timeouts`): a job over its time is cancelled
through the abort path and ends failed with `JobTimeout` (or is retried)."""

from __future__ import annotations

import asyncio
from typing import Any

from procrastinate import job_context

from fastworker.runner.upstream import Upstream


class Timeouts(Upstream):
    """Cancelling jobs that run over their timeout."""

    def _start_timeout(self, job_task: asyncio.Task[Any], context: job_context.JobContext) -> None:
        """Arm the job's timeout, if it has one (its task's, else `job_timeout`)."""
        timeout = self.task_timeouts.get(context.job.task_name, self.job_timeout)
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
        task = self.app.tasks.get(job.task_name)
        is_async = task is not None and self._task_is_async(task)
        self.logger.warning(
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
