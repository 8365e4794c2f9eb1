"""procrastinate's hook for a job's end (`_persist_job_status`), delegated to the
`OutcomeSink` (`runner/outcome_sink.py`)."""

from __future__ import annotations

from procrastinate import job_context, jobs, retry

from fastworker.runner.state import RunnerState


class Outcomes(RunnerState):
    """procrastinate's hook for a job's end, delegated to the `OutcomeSink`."""

    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        # procrastinate's hook, kept for code that calls or overrides it.
        self._outcome_sink.report(job, status, retry_decision, context, job_result)
