"""Running one job: procrastinate's own code path, copied from procrastinate 3.10's
`Worker._process_job` (`procrastinate/worker.py`) and kept step for step; what differs is
said in its docstring. Re-read it against upstream when procrastinate's changes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

from procrastinate import exceptions, job_context, jobs, middleware, utils
from procrastinate import worker as procrastinate_worker

from fastworker.runner.ledger import claim_of
from fastworker.runner.outcomes import Outcomes
from fastworker.runner.state import JobTimeout


class Upstream(Outcomes):
    """procrastinate's `_process_job`, reporting to the core."""

    def _unless_claim_lost(self, job: jobs.Job) -> None:
        """Called in a sync job's thread, before its function. The job may have waited for
        a thread of the loop's executor (fewer threads than `concurrency`), and its claim
        may have been lost meanwhile: then the function is not called, and the job ends
        aborted, as a sync job that saw `should_abort()` does."""
        if self._ledger.is_lost(claim_of(job)):
            raise exceptions.JobAborted(f"The claim of job {job.id} is no longer this worker's")

    async def _process_job(self, context: job_context.JobContext) -> None:
        """Run one job and hand its outcome to the core.

        procrastinate 3.10.0's `Worker._process_job`, step for step (same exceptions
        caught, same retry decision, same status, same log records). What differs:
        - log records' `extra` dicts are only built when the record will be emitted, and
          the outcome is handed to the core synchronously (it never blocks) instead of
          through a shielded task: nothing observable changes;
        - fastworker's own: the claim is marked started (only started jobs are cancelled,
          see `_abort_job`); an abort that came before the first step is raised here, and
          so is a claim lost before it (see `_stop_lost_claims`): its task function is
          never called, sync or async; a sync job whose claim is lost while it waits for
          a thread is not called either (`_unless_claim_lost`); a job cancelled by its
          timeout ends with `JobTimeout` instead of as aborted.
        """
        job = context.job
        task = self.app.tasks.get(job.task_name)
        job_retry = None
        exc_info: bool | BaseException = False
        retry_decision = None
        job_result = job_context.JobResult(start_timestamp=context.start_timestamp)
        if job.id is not None:
            self._ledger.start(claim_of(job))
        try:
            if job.id is not None and self._ledger.is_lost(claim_of(job)):
                # No longer this worker's claim (it may run elsewhere already): it never
                # starts, as a cancel at its first step would end it.
                raise asyncio.CancelledError()
            if (
                task is not None
                and self._ledger.abort_requested(job.id)
                and self._task_is_async(task)
            ):
                # Aborted before it started (see `_abort_job`): cancelled at its first
                # step, as the cancel would have done.
                raise asyncio.CancelledError()
            if not task:
                raise exceptions.TaskNotFound
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(
                    f"Loaded job info, about to start job {job.call_string}",
                    extra=self._log_extra(
                        context=context, action="loaded_job_info", job_result=job_result
                    ),
                )
            if self.logger.isEnabledFor(logging.INFO):
                self.logger.info(
                    f"Starting job {job.call_string}",
                    extra=self._log_extra(
                        context=context, action="start_job", job_result=job_result
                    ),
                )
            job_args = [context] if task.pass_context else []
            task_is_async = self._task_is_async(task)

            async def run_job() -> Any:
                middlewares = self._resolve_task_middlewares(task, task_is_async)
                if task_is_async:

                    async def run_async_task() -> Any:
                        return await task(*job_args, **job.task_kwargs)

                    task_result = await middleware.compose(
                        middlewares, run_async_task, context, self
                    )()
                else:

                    def run_sync_task() -> Any:
                        self._unless_claim_lost(job)
                        return task(*job_args, **job.task_kwargs)

                    task_result = await utils.sync_to_async(
                        middleware.compose(middlewares, run_sync_task, context, self)
                    )
                # A sync function may return an awaitable: run it (procrastinate does).
                if inspect.isawaitable(task_result):
                    task_result = await task_result
                return task_result

            if self.worker_middleware:
                job_result.result = await middleware.compose(
                    self.worker_middleware, run_job, context, self
                )()
            else:
                job_result.result = await run_job()
        except BaseException as raised:
            e = raised
            if self._ledger.is_timed_out(job.id) and isinstance(
                e, (asyncio.CancelledError, exceptions.JobAborted)
            ):
                # Over its timeout: a failure (retried if the strategy says so), not an abort.
                e = JobTimeout(f"Job exceeded its timeout ({job.call_string})")
                e.__cause__ = raised
            exc_info = e
            # An aborted job can be retried if the abort comes from a shutdown.
            if not isinstance(e, exceptions.JobAborted) or (
                context.abort_reason() == job_context.AbortReason.SHUTDOWN
            ):
                job_retry = task.get_retry_exception(exception=e, job=job) if task else None
                retry_decision = job_retry.retry_decision if job_retry else None
                if isinstance(e, exceptions.TaskNotFound):
                    self.logger.exception(
                        "Task was not found",
                        extra=self._log_extra(
                            context=context,
                            action="task_not_found",
                            exception=str(e),
                            job_result=job_result,
                        ),
                    )
        finally:
            job_result.end_timestamp = time.time()
            if isinstance(exc_info, (exceptions.JobAborted, asyncio.CancelledError)):
                status = jobs.Status.ABORTED
            elif exc_info:
                status = jobs.Status.FAILED
            else:
                status = jobs.Status.SUCCEEDED
            outcome_level = (
                logging.ERROR if status == jobs.Status.FAILED and not job_retry else logging.INFO
            )
            if procrastinate_worker.logger.isEnabledFor(outcome_level):
                self._log_job_outcome(
                    status=status,
                    context=context,
                    job_result=job_result,
                    job_retry=job_retry,
                    exc_info=exc_info,
                )
            if job.id is not None:
                self._ledger.forget_time_out(job.id)
            self._outcome_sink.report(job, status, retry_decision, context, job_result)
