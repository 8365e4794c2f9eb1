"""The job executor (`JobExecutor`): each job the core hands over becomes an asyncio task
running procrastinate's `_process_job` with its context, whatever the order of events:
every job handed over gets exactly one outcome. A row that cannot be decoded, or whose
args are not a JSON object, fails alone; a run whose claim is lost is stopped as an abort
would; a job over its timeout is cancelled (`JobTimeouts`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from procrastinate import App, job_context, jobs, tasks

from fastworker import _core
from fastworker.runner.intake import job_from_row
from fastworker.runner.ledger import ClaimLedger, claim_of
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink
from fastworker.runner.timeouts import JobTimeouts

RunningJobs = dict[asyncio.Task[Any], job_context.JobContext]


class JobExecutor:
    """Owns the running jobs (procrastinate's `Worker._running_jobs`, one dict per run,
    which procrastinate's shutdown and abort methods read) and the start of each job; may
    call ``process_job`` (the worker's `_process_job`), the claim ledger, the outcome sink,
    the timeouts, the lifecycle (is a hard stop on?) and ``abort_job`` (the worker's
    `_abort_job`, procrastinate's hook)."""

    def __init__(
        self,
        *,
        process_job: Callable[[job_context.JobContext], Coroutine[Any, Any, None]],
        abort_job: Callable[
            [asyncio.Task[Any], job_context.JobContext, job_context.AbortReason], None
        ],
        ledger: ClaimLedger[job_context.JobContext],
        sink: OutcomeSink,
        timeouts: JobTimeouts,
        lifecycle: Lifecycle,
        task_is_async: Callable[[tasks.Task[Any, Any, Any]], bool],
        app: App,
        worker_name: str | None,
        queues: Iterable[str] | None,
        additional_context: dict[str, Any] | None,
        logger: logging.Logger,
        log_extra: Callable[..., dict[str, Any]],
    ) -> None:
        self._process_job = process_job
        self._abort_job = abort_job
        self._ledger = ledger
        self._sink = sink
        self._timeouts = timeouts
        self._lifecycle = lifecycle
        self._task_is_async = task_is_async
        self._app = app
        self._worker_name = worker_name
        self._queues = queues
        self._additional_context = additional_context
        self._logger = logger
        self._log_extra = log_extra
        #: The app's connector's JSON decoder, set as the worker starts.
        self.json_loads: Callable[[str], Any] = json.loads
        self.running: RunningJobs = {}

    def begin_run(self) -> RunningJobs:
        """A new run: no job running yet. Returns the running jobs' dict, which the worker
        shares as procrastinate's `_running_jobs`."""
        self.running = {}
        return self.running

    def start_job(self, row: _core.Job) -> None:
        """Start one claimed job. Whatever happens, it gets exactly one outcome: a row that
        cannot be decoded (arguments the connector's JSON decoder rejects, a date Python
        cannot hold) fails that job alone, with the reason logged."""
        try:
            job = job_from_row(row, self.json_loads)
        except Exception as error:  # RecursionError, OverflowError, ValueError, ...
            self._fail_undecodable(job_from_row(row, decode=False), error)
            return
        job_id = job.id
        additional_context = self._additional_context
        context = job_context.JobContext(
            app=self._app,
            worker_name=self._worker_name,
            worker_queues=self._queues,
            additional_context=additional_context.copy() if additional_context else {},
            job=job,
            abort_reason=lambda: self._abort_reason(job),
            start_timestamp=time.time(),
        )
        if not isinstance(job.task_kwargs, dict):
            self._refuse_job(context)
            return
        assert job_id is not None
        self._ledger.hand_over((job_id, job.attempts), context)
        job_task = asyncio.create_task(
            self._process_job(context), name=f"process job {job.task_name}[{job.id}]"
        )
        self.running[job_task] = context
        job_task.add_done_callback(self._on_job_done)
        self._timeouts.arm(job_task, context)
        if self._lifecycle.hard_stop_requested:
            # Claimed by a request that was in flight when the hard stop came.
            self._abort_job(job_task, context, job_context.AbortReason.SHUTDOWN)

    def abort_before_first_step(
        self,
        job_task: asyncio.Task[Any],
        context: job_context.JobContext,
        reason: job_context.AbortReason,
    ) -> bool:
        """For the worker's `_abort_job`: a job whose task has not taken its first step
        yet (an abort in the same batch of events as the job, or a hard stop already set
        when a claim lands) is not cancelled, which would end it before `_process_job`'s
        first line, with no outcome. Its abort reason is set, and `_process_job` raises the
        cancellation itself as it starts. False if the job has started (or ended): then
        procrastinate's `_abort_job` cancels it."""
        if self._ledger.is_started(claim_of(context.job)) or job_task.done():
            return False
        assert context.job.id
        self._ledger.request_abort(context.job.id, reason)
        self._logger.debug(
            "Received a request to abort a job that has not started yet: it ends at its first step",
            extra=self._log_extra(action="abort_job", context=context, job_result=None),
        )
        return True

    def _abort_reason(self, job: jobs.Job) -> job_context.AbortReason | None:
        if job.id is None:
            return None
        return self._ledger.abort_reason(claim_of(job))

    def stop_lost_claims(self, claims: list[tuple[int, int]]) -> None:
        """These runs' claims are no longer this worker's (the job was recovered by another
        worker after this one was pruned, and may run there): stop them, as an abort would.
        A run that has not started yet (its first step not taken, or a sync job still
        waiting for a thread) never calls its task function: `_process_job` ends it
        aborted. Their ends are still reported, and found no longer current. By claim, not
        by job: the job may run here under a new claim too."""
        lost = self._ledger.lose(claims)
        for job_task, context in list(self.running.items()):
            job = context.job
            if (job.id, job.attempts) not in lost:
                continue
            self._logger.warning(
                f"Job {job.call_string}: its claim is no longer this worker's; stopping it",
                extra=self._log_extra(action="claim_lost", context=context, job_result=None),
            )
            task = self._app.tasks.get(job.task_name)
            if (
                task is not None
                and self._task_is_async(task)
                and self._ledger.is_started(claim_of(job))
            ):
                job_task.cancel()

    def _fail_undecodable(self, job: jobs.Job, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:300]
        context = job_context.JobContext(
            app=self._app,
            worker_name=self._worker_name,
            worker_queues=self._queues,
            additional_context={},
            job=job,
            abort_reason=lambda: None,
            start_timestamp=time.time(),
        )
        self._logger.error(
            f"Job {job.task_name}[{job.id}] failed: its row cannot be decoded ({reason})",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception=reason
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._sink.report(job, jobs.Status.FAILED, None, context, result)

    def _refuse_job(self, context: job_context.JobContext) -> None:
        """A job whose args are not a JSON object (``null``, a list, a string ...) cannot be
        called with keyword arguments, and procrastinate's own job logging
        (``Job.call_string``) fails on it, so `_process_job` would end without writing
        anything and the job would stay ``doing``. It fails at once instead, reason logged."""
        job = context.job
        found = json.dumps(job.task_kwargs)[:100]
        context = context.evolve(job=job.evolve(task_kwargs={}))
        self._logger.error(
            f"Job {job.task_name}[{job.id}] failed: its args must be a JSON object, got {found}",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception="invalid args"
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._sink.report(context.job, jobs.Status.FAILED, None, context, result)

    def _on_job_done(self, task: asyncio.Task[Any]) -> None:
        context = self.running.pop(task, None)
        if context is None:
            return
        if not self._ledger.run_ended(claim_of(context.job)):
            return
        # The task ended without reporting an outcome. Its job still gets one, so that it
        # leaves `doing` and frees its slot. Named without its arguments: they may be what
        # broke it.
        job = context.job
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Something failed outside the task's own code, where `_process_job` reports
            # (its logging: a log handler, or arguments whose repr fails).
            reason = f"{type(error).__name__}: {error}"[:300]
            self._logger.error(
                f"Job {job.task_name}[{job.id}] ended without an outcome ({reason}): "
                "ending it failed",
                extra={"action": "job_error", "job_id": job.id, "exception": reason},
            )
            self._sink.report(job, jobs.Status.FAILED, None, context, result)
            return
        # Cancelled before its first step (`_abort_job` defers such cancels, but anyone
        # may cancel a task).
        self._logger.warning(
            f"Job {job.task_name}[{job.id}] was cancelled before it started: ending it aborted",
            extra=self._log_extra(
                action="job_cancelled_before_start", context=context, job_result=None
            ),
        )
        self._sink.report(job, jobs.Status.ABORTED, None, context, result)
