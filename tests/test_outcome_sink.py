"""The outcome sink against a fake of the binding (`tests/fake_core.py`): batching, the
first outcome of a claim standing, and an outcome the core cannot take failing alone."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import procrastinate
import pytest
from procrastinate import job_context, jobs, retry

from fastworker import _core
from fastworker.runner.ledger import ClaimLedger
from fastworker.runner.outcome_sink import OutcomeSink
from tests.fake_core import FakeCore

# Never opened: JobContext wants an app, the sink never reaches the database.
APP = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo="dbname=unused"))
LOGGER = logging.getLogger("procrastinate.worker")


def log_extra(action: str, **fields: object) -> dict[str, object]:
    return {"action": action}


def job(job_id: int, attempts: int = 0) -> jobs.Job:
    return jobs.Job(
        id=job_id,
        queue="default",
        lock=None,
        queueing_lock=None,
        task_name="task",
        task_kwargs={},
        attempts=attempts,
    )


def context_of(ran: jobs.Job) -> job_context.JobContext:
    return job_context.JobContext(
        app=APP, job=ran, abort_reason=lambda: None, start_timestamp=time.time()
    )


def sink_with(
    core: FakeCore | None,
    delete_jobs: jobs.DeleteJobCondition = jobs.DeleteJobCondition.NEVER,
) -> tuple[OutcomeSink, ClaimLedger[job_context.JobContext], dict[int, job_context.AbortReason]]:
    abort_reasons: dict[int, job_context.AbortReason] = {}
    ledger: ClaimLedger[job_context.JobContext] = ClaimLedger(abort_reasons)
    sink = OutcomeSink(ledger, delete_jobs=delete_jobs, logger=LOGGER, log_extra=log_extra)
    sink.core = core
    return sink, ledger, abort_reasons


def end(sink: OutcomeSink, ran: jobs.Job, status: jobs.Status, **kwargs: object) -> None:
    sink.report(ran, status, kwargs.get("retry_decision"), context_of(ran), None)  # type: ignore[arg-type]


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_outcomes_of_one_loop_turn_go_to_the_core_in_one_batch() -> None:
    core = FakeCore()
    sink, _, abort_reasons = sink_with(core, jobs.DeleteJobCondition.SUCCESSFUL)
    abort_reasons[1] = job_context.AbortReason.USER_REQUEST
    end(sink, job(1), jobs.Status.SUCCEEDED)
    end(sink, job(2), jobs.Status.FAILED)
    assert core.batches == []  # not before the loop turns
    await next_turn()
    assert [
        [(o.job_id, o.status, o.delete) for o in batch]  # type: ignore[union-attr]
        for batch in core.batches
    ] == [[(1, "succeeded", True), (2, "failed", False)]]
    assert abort_reasons == {}  # the job's abort request is done with


async def test_only_the_first_outcome_of_a_started_claim_counts() -> None:
    core = FakeCore()
    sink, ledger, _ = sink_with(core)
    first = job(1)
    ledger.hand_over((1, 0), context_of(first))
    ledger.start((1, 0))
    end(sink, first, jobs.Status.SUCCEEDED)
    end(sink, first, jobs.Status.FAILED)
    await next_turn()
    assert [[o.status for o in batch] for batch in core.batches] == [["succeeded"]]  # type: ignore[union-attr]


async def test_a_retry_goes_to_the_core_with_its_decision() -> None:
    core = FakeCore()
    sink, _, _ = sink_with(core)
    at = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    decision = retry.RetryDecision(retry_at=at, priority=3, queue="again", lock="l")
    end(sink, job(1, attempts=2), jobs.Status.FAILED, retry_decision=decision)
    await next_turn()
    [[outcome]] = core.batches
    assert isinstance(outcome, _core.Outcome.Retry)
    assert (outcome.job_id, outcome.attempts, outcome.priority, outcome.queue) == (1, 2, 3, "again")
    assert outcome.retry_at == at.isoformat()


async def test_a_retry_decision_the_core_cannot_write_fails_its_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = FakeCore()
    sink, _, _ = sink_with(core)
    decision = retry.RetryDecision(retry_in={"seconds": 1}, priority=2**40)
    end(sink, job(1), jobs.Status.FAILED, retry_decision=decision)
    await next_turn()
    [[outcome]] = core.batches
    assert isinstance(outcome, _core.Outcome.Finish) and outcome.status == "failed"
    assert "is not a 32-bit integer" in caplog.text


async def test_an_outcome_the_core_refuses_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    core = FakeCore()
    core.refuse = lambda outcome: outcome.job_id == 2 and outcome.duration > 0
    sink, _, _ = sink_with(core)
    for job_id in (1, 2, 3):
        ran = job(job_id)
        result = job_context.JobResult(start_timestamp=1.0, end_timestamp=2.0)
        sink.report(ran, jobs.Status.SUCCEEDED, None, context_of(ran), result)
    await next_turn()
    # The batch is refused whole, then each is tried alone: job 2's is refused again, and
    # it fails instead (with no duration); the others are written as they were.
    assert [
        [(o.job_id, o.status) for o in batch]  # type: ignore[union-attr]
        for batch in core.batches
    ] == [[(1, "succeeded")], [(2, "failed")], [(3, "succeeded")]]
    assert "The outcome of job 2 could not be handed to the core" in caplog.text


async def test_outcomes_after_the_core_is_gone_are_said_to_stay_doing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, _, _ = sink_with(None)
    end(sink, job(1), jobs.Status.SUCCEEDED)
    await next_turn()
    assert "Could not record the end of jobs [1]: the worker core has stopped" in caplog.text
