"""procrastinate's hooks that the runner changes (`_abort_job`), and the wiring of the core's
event pump to the roles: the worker's part in starting and stopping jobs is delegation."""

from __future__ import annotations

import asyncio
from typing import Any

from procrastinate import job_context

from fastworker.runner.core_port import CorePort
from fastworker.runner.events import EventHandlers, EventPump
from fastworker.runner.ledger import claim_of
from fastworker.runner.upstream import Upstream


class Hooks(Upstream):
    """The worker's side of the job executor and the event pump."""

    def _event_pump(self, core: CorePort) -> EventPump:
        """The pump of the core's events: jobs and lost claims go to the job executor,
        abort requests to procrastinate's own path (which calls `_abort_job`)."""
        return EventPump(
            core,
            self._lifecycle,
            EventHandlers(
                start_job=self._executor.start_job,
                abort_jobs=self._handle_abort_jobs_requested,
                stop_lost_claims=self._executor.stop_lost_claims,
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
