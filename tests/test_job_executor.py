"""The job executor with a recording `process_job` and a fake of the binding
(`tests/fake_core.py`) behind the outcome sink: every row handed over gets exactly one
outcome, whatever becomes of its task."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import procrastinate
import pytest
from procrastinate import job_context

from fastworker.runner.executor import JobExecutor
from fastworker.runner.ledger import ClaimLedger, claim_of
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink
from fastworker.runner.timeouts import JobTimeouts
from tests.fake_core import FakeCore

LOGGER = logging.getLogger("procrastinate.worker")


def log_extra(action: str, **fields: object) -> dict[str, object]:
    return {"action": action}


def row(job_id: int, args: str = "{}", attempts: int = 0) -> Any:
    """A claimed row with the fields of the binding's `Job`."""
    return SimpleNamespace(
        id=job_id,
        status="doing",
        task_name="noop",
        priority=0,
        lock=None,
        queueing_lock=None,
        args=args,
        scheduled_at_us=None,
        queue_name="default",
        attempts=attempts,
        worker_id=1,
    )


class Harness:
    def __init__(self) -> None:
        # Never opened: the executor only looks its tasks up.
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo="dbname=unused")
        )

        @self.app.task(name="noop")
        async def noop() -> None:
            pass

        self.core = FakeCore()
        self.ledger: ClaimLedger[job_context.JobContext] = ClaimLedger({})
        self.sink = OutcomeSink(
            self.ledger,
            delete_jobs=procrastinate.jobs.DeleteJobCondition.NEVER,
            logger=LOGGER,
            log_extra=log_extra,
        )
        self.sink.core = self.core
        self.lifecycle = Lifecycle(asyncio.Event())
        self.aborted: list[tuple[int | None, job_context.AbortReason]] = []
        self.release = asyncio.Event()
        self.behaviour = "report"

        def task_is_async(task: Any) -> bool:
            return True

        self.executor = JobExecutor(
            process_job=self.process_job,
            abort_job=lambda job_task, context, reason: self.aborted.append(
                (context.job.id, reason)
            ),
            ledger=self.ledger,
            sink=self.sink,
            timeouts=JobTimeouts(
                ledger=self.ledger,
                job_timeout=None,
                task_timeouts={},
                app=self.app,
                task_is_async=task_is_async,
                logger=LOGGER,
                log_extra=log_extra,
            ),
            lifecycle=self.lifecycle,
            task_is_async=task_is_async,
            app=self.app,
            worker_name="worker",
            queues=None,
            additional_context=None,
            logger=LOGGER,
            log_extra=log_extra,
        )
        self.running = self.executor.begin_run()

    async def process_job(self, context: job_context.JobContext) -> None:
        """As the worker's `_process_job`: marks the claim started, then runs."""
        self.ledger.start(claim_of(context.job))
        await self.release.wait()
        if self.behaviour == "raise":
            raise RuntimeError("broke outside the task's own code")
        now = context.start_timestamp
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self.sink.report(context.job, procrastinate.jobs.Status.SUCCEEDED, None, context, result)

    def written(self) -> list[tuple[int, str]]:
        return [
            (outcome.job_id, outcome.status)  # type: ignore[union-attr]
            for batch in self.core.batches
            for outcome in batch
        ]

    async def until_written(self, count: int) -> None:
        async def wait() -> None:
            while len(self.written()) < count:
                self.core.reported.clear()
                await self.core.reported.wait()

        await asyncio.wait_for(wait(), timeout=60)


async def test_a_job_runs_and_reports_once() -> None:
    harness = Harness()
    harness.executor.start_job(row(1))
    [context] = harness.running.values()
    assert harness.ledger.awaiting_outcome((1, 0)) and context.job.task_kwargs == {}
    harness.release.set()
    await harness.until_written(1)
    await asyncio.sleep(0)
    assert harness.written() == [(1, "succeeded")] and harness.running == {}


async def test_rows_that_cannot_run_fail_alone(caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness()
    harness.executor.start_job(row(1, args="{not json"))
    harness.executor.start_job(row(2, args="[1, 2]"))
    harness.executor.start_job(row(3))
    harness.release.set()
    await harness.until_written(3)
    assert sorted(harness.written()) == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert "its row cannot be decoded" in caplog.text
    assert "its args must be a JSON object, got [1, 2]" in caplog.text


async def test_a_task_that_ends_without_an_outcome_still_gets_one() -> None:
    harness = Harness()
    harness.behaviour = "raise"
    harness.executor.start_job(row(1))
    harness.release.set()
    await harness.until_written(1)
    assert harness.written() == [(1, "failed")]


async def test_a_task_cancelled_before_its_first_step_ends_aborted() -> None:
    harness = Harness()
    harness.executor.start_job(row(1))
    [job_task] = harness.running
    job_task.cancel()
    await harness.until_written(1)
    assert harness.written() == [(1, "aborted")]


async def test_a_job_claimed_during_a_hard_stop_is_aborted_at_once() -> None:
    harness = Harness()
    harness.lifecycle.request_hard_stop(None, None)
    harness.executor.start_job(row(1))
    assert harness.aborted == [(1, job_context.AbortReason.SHUTDOWN)]


async def test_a_lost_claim_cancels_its_started_run_only() -> None:
    harness = Harness()
    harness.executor.start_job(row(1))
    harness.executor.start_job(row(2))
    await asyncio.sleep(0)  # both take their first step
    old, new = list(harness.running)
    harness.executor.stop_lost_claims([(1, 0), (2, 5)])  # job 2 lost under another claim
    assert harness.ledger.is_lost((1, 0)) and not harness.ledger.is_lost((2, 0))
    await asyncio.wait([old], timeout=60)
    assert old.cancelled() and not new.done()
    harness.release.set()
    await harness.until_written(2)
    # The lost run still reports its end (the core finds it no longer current).
    assert harness.written() == [(1, "aborted"), (2, "succeeded")]


async def test_an_abort_before_the_first_step_is_deferred_to_it_after_it_is_not() -> None:
    harness = Harness()
    harness.executor.start_job(row(1))
    [(job_task, context)] = harness.running.items()
    reason = job_context.AbortReason.USER_REQUEST
    # Not started yet: the abort is recorded for `_process_job` to raise, not cancelled.
    assert harness.executor.abort_before_first_step(job_task, context, reason)
    assert harness.ledger.abort_requested(1) and not job_task.cancelled()
    await asyncio.sleep(0)  # its first step
    # Started: procrastinate's `_abort_job` cancels it.
    assert not harness.executor.abort_before_first_step(job_task, context, reason)
