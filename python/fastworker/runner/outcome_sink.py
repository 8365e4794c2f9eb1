"""Outcome batching to the core (`OutcomeSink`): every ended run's outcome, checked,
collected during one turn of the event loop, and reported to the core in one call (the core
writes them in one statement). An outcome the core cannot take fails only its own job."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any

from procrastinate import job_context, jobs, retry, utils

from fastworker import _core
from fastworker.runner.core_port import CorePort
from fastworker.runner.ledger import ClaimLedger, claim_of

_INT32 = range(-(2**31), 2**31)

# An outcome as the runner makes them (the core's Outcome has these two kinds).
Outcome = _core.Outcome.Finish | _core.Outcome.Retry


def retry_decision_problem(decision: retry.RetryDecision) -> str | None:
    """Why the core could not write this retry decision, or None if it can."""
    if decision.priority is not None and (
        not isinstance(decision.priority, int) or decision.priority not in _INT32
    ):
        return f"priority {decision.priority!r} is not a 32-bit integer"
    for name in ("queue", "lock"):
        value = getattr(decision, name)
        if value is not None and not isinstance(value, str):
            return f"{name} {value!r} is not a string"
    if decision.retry_at is not None and not isinstance(decision.retry_at, datetime.datetime):
        return f"retry_at {decision.retry_at!r} is not a datetime"
    return None


def ran_for(job_result: job_context.JobResult | None) -> float:
    if job_result is None or job_result.end_timestamp is None:
        return 0.0
    return max(0.0, job_result.end_timestamp - job_result.start_timestamp)


class OutcomeSink:
    """Owns the outcomes not yet handed to the core; may call the core's `report` and the
    claim ledger (an outcome is recorded there, so only a claim's first one counts).

    ``core``: set by the worker while the core runs, None before and after (outcomes then
    cannot be written, and say so). ``log_extra``: procrastinate's `Worker._log_extra`."""

    def __init__(
        self,
        ledger: ClaimLedger[job_context.JobContext],
        *,
        delete_jobs: jobs.DeleteJobCondition,
        logger: logging.Logger,
        log_extra: Callable[..., dict[str, Any]],
    ) -> None:
        self.core: CorePort | None = None
        self._ledger = ledger
        self._delete_jobs = delete_jobs
        self._logger = logger
        self._log_extra = log_extra
        self._outcomes: list[Outcome] = []
        self._flush_scheduled = False

    def report(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        # Collected and handed to the core once per event-loop iteration (see `flush`), so
        # outcomes of jobs ending together go out in one batch.
        assert job.id is not None
        if not self._ledger.record_outcome(claim_of(job)):
            # Reported already (a middleware or an override calling this twice): the
            # first outcome stands, as the database would refuse a second one anyway.
            return
        problem = retry_decision_problem(retry_decision) if retry_decision else None
        if problem is not None:
            self._logger.error(
                f"Job {job.call_string} cannot be retried as its retry strategy decided "
                f"({problem}): it fails instead",
                extra=self._log_extra(
                    action="job_error", context=context, job_result=job_result, exception=problem
                ),
            )
            retry_decision, status = None, jobs.Status.FAILED
        if retry_decision:
            # As procrastinate's JobManager.retry_job: no retry_at means now.
            retry_at = retry_decision.retry_at or utils.utcnow()
            self._outcomes.append(
                _core.Outcome.Retry(
                    job.id,
                    job.attempts,
                    retry_at=retry_at.isoformat(),
                    priority=retry_decision.priority,
                    queue=retry_decision.queue,
                    lock=retry_decision.lock,
                    duration=ran_for(job_result),
                )
            )
        else:
            delete_job = {
                jobs.DeleteJobCondition.ALWAYS: True,
                jobs.DeleteJobCondition.NEVER: False,
                jobs.DeleteJobCondition.SUCCESSFUL: status == jobs.Status.SUCCEEDED,
            }[self._delete_jobs]
            self._outcomes.append(
                _core.Outcome.Finish(
                    job.id,
                    job.attempts,
                    status.value,
                    delete=delete_job,
                    duration=ran_for(job_result),
                )
            )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        self._ledger.forget_abort(job.id)
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(
                f"Acknowledged job completion {job.call_string}",
                extra=self._log_extra(
                    action="finish_task", context=context, status=status, job_result=job_result
                ),
            )

    def flush(self) -> None:
        """Hand the collected outcomes to the core, in one call."""
        self._flush_scheduled = False
        if not self._outcomes:
            return
        outcomes, self._outcomes = self._outcomes, []
        core = self.core
        try:
            if core is None:
                raise _core.WorkerShutDown("the worker core is shut down")
            try:
                core.report(outcomes)
            except (TypeError, ValueError, OverflowError):
                # One outcome the core cannot take must not cost the others theirs.
                self._report_one_by_one(core, outcomes)
        except _core.WorkerShutDown:
            # The core is shut down (run() is over): nothing can write these outcomes any
            # more; the jobs stay `doing`, like a killed worker's, for stalled-job recovery.
            job_ids = [outcome.job_id for outcome in outcomes]
            self._logger.error(
                f"Could not record the end of jobs {job_ids}: the worker core has stopped;"
                " they stay in doing",
                extra=self._log_extra(
                    action="finish_task_failed", context=None, job_result=None, job_ids=job_ids
                ),
            )

    def _report_one_by_one(self, core: CorePort, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            try:
                core.report([outcome])
            except (TypeError, ValueError, OverflowError) as error:
                job_id = outcome.job_id
                self._logger.error(
                    f"The outcome of job {job_id} could not be handed to the core ({error}):"
                    " it fails instead",
                    extra=self._log_extra(
                        action="finish_task_failed",
                        context=None,
                        job_result=None,
                        job_id=job_id,
                        exception=str(error),
                    ),
                )
                core.report(
                    [_core.Outcome.Finish(job_id, outcome.attempts, jobs.Status.FAILED.value)]
                )
