"""procrastinate's hook for a job's end (`_persist_job_status`) and the runner's own
(`_report_outcome`), delegated to the `OutcomeSink` (`runner/outcome_sink.py`)."""

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
        self._report_outcome(job, status, retry_decision, context, job_result)

    def _report_outcome(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        self._outcome_sink.report(job, status, retry_decision, context, job_result)
