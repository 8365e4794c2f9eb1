"""Event intake and job start: the core's events (claimed jobs, abort requests, lost
claims, logs, the end of a drain, a fatal error) are taken as they come, and each claimed
job becomes an asyncio task with its context, whatever the order of events: every job
handed over gets exactly one outcome."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from procrastinate import job_context, jobs

from fastworker import _core, compat
from fastworker.runner.core_port import CorePort
from fastworker.runner.events import EventHandlers, EventPump
from fastworker.runner.ledger import claim_of
from fastworker.runner.timeouts import Timeouts

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# The core's `scheduled_at` for a date no datetime can hold (±infinity, a year outside
# 1-9999): such a job fails alone, with this said.
_UNREPRESENTABLE_SCHEDULED_AT = -(2**63)
# Arguments nested deeper than this fail their job alone. Python's recursive operations
# (repr in procrastinate's job logs, copies, JSON log formatters) stop at the recursion
# limit (1000 frames, with the caller's frames counted): args that decode but nest close to
# it broke the job's logging and left it `doing`.
MAX_ARGS_DEPTH = 500


def _depth(value: Any) -> int:
    """How deep lists and dicts nest in ``value``, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_args_depth(text: str, value: Any) -> None:
    """Refuse arguments nested deeper than `MAX_ARGS_DEPTH`. The brackets of the JSON text
    bound the depth, so only texts with that many are walked."""
    if text.count("[") + text.count("{") <= MAX_ARGS_DEPTH:
        return
    depth = _depth(value)
    if depth > MAX_ARGS_DEPTH:
        raise ValueError(
            f"its args nest {depth} levels deep, more than fastworker handles ({MAX_ARGS_DEPTH})"
        )


def connector_json_loads(connector: Any) -> Callable[[str], Any]:
    """The JSON decoder the app's connector uses for job arguments (procrastinate's
    connectors take a ``json_loads``), else the standard one."""
    return compat.connector_json_loads(connector) or json.loads


def job_from_row(
    row: _core.Job, loads: Callable[[str], Any] = json.loads, *, decode: bool = True
) -> jobs.Job:
    """procrastinate's Job of a claimed row. ``decode=False``: without its arguments and
    date (a row that could not be decoded, with what is safe to show in logs)."""
    task_kwargs: Any = {}
    scheduled_at = None
    if decode:
        scheduled_at_us = row.scheduled_at_us
        if scheduled_at_us == _UNREPRESENTABLE_SCHEDULED_AT:
            raise ValueError(
                "its scheduled_at is a date Python cannot represent (infinity, or a year "
                "outside 1-9999)"
            )
        task_kwargs = loads(row.args)
        check_args_depth(row.args, task_kwargs)
        if scheduled_at_us is not None:
            scheduled_at = _EPOCH + datetime.timedelta(microseconds=scheduled_at_us)
    return jobs.Job(
        id=row.id,
        status=row.status,
        priority=row.priority,
        lock=row.lock,
        queueing_lock=row.queueing_lock,
        task_name=row.task_name,
        task_kwargs=task_kwargs,
        scheduled_at=scheduled_at,
        queue=row.queue_name,
        attempts=row.attempts,
        worker_id=row.worker_id,
    )


class Intake(Timeouts):
    """Taking the core's events and starting the jobs they hand over."""

    def _event_pump(self, core: CorePort) -> EventPump:
        """The pump of the core's events, handing jobs, aborts and lost claims here."""
        return EventPump(
            core,
            self._lifecycle,
            EventHandlers(
                start_job=self._start_job,
                abort_jobs=self._handle_abort_jobs_requested,
                stop_lost_claims=self._stop_lost_claims,
                set_worker_id=self._set_worker_id,
                log_core_failure=self._log_core_failure,
            ),
        )

    def _set_worker_id(self, worker_id: int) -> None:
        self.worker_id = worker_id

    def _log_core_failure(self, error: BaseException) -> None:
        self.logger.error(
            f"Worker core failed: {error}",
            extra=self._log_extra(
                action="core_failed", context=None, job_result=None, exception=str(error)
            ),
        )

    def _start_job(self, row: _core.Job) -> None:
        """Start one claimed job. Whatever happens, it gets exactly one outcome: a row that
        cannot be decoded (arguments the connector's JSON decoder rejects, a date Python
        cannot hold) fails that job alone, with the reason logged."""
        try:
            job = job_from_row(row, self._json_loads)
        except Exception as error:  # RecursionError, OverflowError, ValueError, ...
            self._fail_undecodable(job_from_row(row, decode=False), error)
            return
        job_id = job.id
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context=self.additional_context.copy() if self.additional_context else {},
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
        self._running_jobs[job_task] = context
        job_task.add_done_callback(self._on_job_done)
        self._start_timeout(job_task, context)
        if self._lifecycle.hard_stop_requested:
            # Claimed by a request that was in flight when the hard stop came.
            self._abort_job(job_task, context, job_context.AbortReason.SHUTDOWN)

    def _abort_reason(self, job: jobs.Job) -> job_context.AbortReason | None:
        if job.id is None:
            return None
        return self._ledger.abort_reason(claim_of(job))

    def _stop_lost_claims(self, claims: list[tuple[int, int]]) -> None:
        """These runs' claims are no longer this worker's (the job was recovered by another
        worker after this one was pruned, and may run there): stop them, as an abort would.
        A run that has not started yet (its first step not taken, or a sync job still
        waiting for a thread) never calls its task function: `_process_job` ends it
        aborted. Their ends are still reported, and found no longer current. By claim, not
        by job: the job may run here under a new claim too."""
        lost = self._ledger.lose(claims)
        for job_task, context in list(self._running_jobs.items()):
            job = context.job
            if (job.id, job.attempts) not in lost:
                continue
            self.logger.warning(
                f"Job {job.call_string}: its claim is no longer this worker's; stopping it",
                extra=self._log_extra(action="claim_lost", context=context, job_result=None),
            )
            task = self.app.tasks.get(job.task_name)
            if (
                task is not None
                and self._task_is_async(task)
                and self._ledger.is_started(claim_of(job))
            ):
                job_task.cancel()

    def _fail_undecodable(self, job: jobs.Job, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:300]
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context={},
            job=job,
            abort_reason=lambda: None,
            start_timestamp=time.time(),
        )
        self.logger.error(
            f"Job {job.task_name}[{job.id}] failed: its row cannot be decoded ({reason})",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception=reason
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._report_outcome(job, jobs.Status.FAILED, None, context, result)

    def _refuse_job(self, context: job_context.JobContext) -> None:
        """A job whose args are not a JSON object (``null``, a list, a string ...) cannot be
        called with keyword arguments, and procrastinate's own job logging
        (``Job.call_string``) fails on it, so `_process_job` would end without writing
        anything and the job would stay ``doing``. It fails at once instead, reason logged."""
        job = context.job
        found = json.dumps(job.task_kwargs)[:100]
        context = context.evolve(job=job.evolve(task_kwargs={}))
        self.logger.error(
            f"Job {job.task_name}[{job.id}] failed: its args must be a JSON object, got {found}",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception="invalid args"
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._report_outcome(context.job, jobs.Status.FAILED, None, context, result)

    def _on_job_done(self, task: asyncio.Task[Any]) -> None:
        context = self._running_jobs.pop(task, None)
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
            self.logger.error(
                f"Job {job.task_name}[{job.id}] ended without an outcome ({reason}): "
                "ending it failed",
                extra={"action": "job_error", "job_id": job.id, "exception": reason},
            )
            self._report_outcome(job, jobs.Status.FAILED, None, context, result)
            return
        # Cancelled before its first step (`_abort_job` defers such cancels, but anyone
        # may cancel a task).
        self.logger.warning(
            f"Job {job.task_name}[{job.id}] was cancelled before it started: ending it aborted",
            extra=self._log_extra(
                action="job_cancelled_before_start", context=context, job_result=None
            ),
        )
        self._report_outcome(job, jobs.Status.ABORTED, None, context, result)

    def _abort_job(
        self,
        process_job_task: asyncio.Task[Any],
        context: job_context.JobContext,
        reason: job_context.AbortReason,
    ) -> None:
        """procrastinate's `_abort_job`, except for a job whose task has not taken its first
        step yet (an abort in the same batch of events as the job, or a hard stop already
        set when a claim lands): cancelling it then would end it before `_process_job`'s
        first line, with no outcome. Its abort reason is set, and `_process_job` raises the
        cancellation itself as it starts."""
        if self._ledger.is_started(claim_of(context.job)) or process_job_task.done():
            super()._abort_job(process_job_task, context, reason)
            return
        assert context.job.id
        self._ledger.request_abort(context.job.id, reason)
        self.logger.debug(
            "Received a request to abort a job that has not started yet: it ends at its first step",
            extra=self._log_extra(action="abort_job", context=context, job_result=None),
        )
