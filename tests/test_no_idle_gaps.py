"""Work that becomes claimable without a `job_inserted` notification starts at once, not at
the next poll: a lock's next job, a job scheduled for later, a delayed retry.

The polling interval is an hour in these tests: a job that runs at all within the tests'
bounded waits was not waiting for a poll. Nothing here is timed."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import procrastinate
import pytest
from procrastinate import JobContext, RetryStrategy

import fastworker
from tests.conftest import fetch_all
from tests.helpers import finish, wait_for

HOUR: dict[str, Any] = {
    "fetch_job_polling_interval": 3600,
    "abort_job_polling_interval": 3600,
    "install_signal_handlers": False,
}


def statuses(dsn: str) -> list[str]:
    return [
        row[0] for row in fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs ORDER BY id")
    ]


async def run_until(app: procrastinate.App, done: Any, what: str, **options: Any) -> None:
    worker = asyncio.create_task(fastworker.run_async(app, **{**HOUR, **options}))
    try:
        await wait_for(done, what)
    finally:
        worker.cancel()
        await finish(worker)


async def test_a_lock_chain_runs_without_waiting_for_the_poll(
    app: procrastinate.App, dsn: str
) -> None:
    """20 jobs on one lock: each starts as soon as the one before it ends (its end and the
    claim of the next are one round trip), in order."""
    order: list[int] = []

    @app.task(name="chained")
    async def chained(n: int) -> None:
        order.append(n)

    for n in range(20):
        await chained.configure(lock="entity-1").defer_async(n=n)
    await run_until(
        app, lambda: statuses(dsn) == ["succeeded"] * 20, "the whole chain", concurrency=4
    )
    assert order == list(range(20))


@pytest.mark.parametrize("listen_notify", [True, False], ids=["notified", "not listening"])
async def test_a_job_scheduled_for_later_starts_when_due(
    app: procrastinate.App, dsn: str, listen_notify: bool
) -> None:
    """Deferred with `schedule_in`, to an idle worker, or before the worker starts: it
    starts once due (never before), not at the next poll."""
    started: list[datetime.datetime] = []

    @app.task(name="later")
    async def later() -> None:
        started.append(datetime.datetime.now(datetime.timezone.utc))

    before_start = await later.configure(schedule_in={"seconds": 1}).defer_async()
    worker = asyncio.create_task(fastworker.run_async(app, listen_notify=listen_notify, **HOUR))
    try:
        await wait_for(lambda: statuses(dsn) == ["succeeded"], "the job deferred before start")
        if listen_notify:
            await later.configure(schedule_in={"seconds": 1}).defer_async()
            await wait_for(
                lambda: statuses(dsn) == ["succeeded"] * 2, "the job deferred to an idle worker"
            )
    finally:
        worker.cancel()
        await finish(worker)
    scheduled = [
        row[0] for row in fetch_all(dsn, "SELECT scheduled_at FROM procrastinate_jobs ORDER BY id")
    ]
    assert before_start == 1
    assert len(started) == len(scheduled)
    for start, due in zip(started, scheduled, strict=True):
        assert start >= due, (start, due)


async def test_a_delayed_retry_runs_when_due(app: procrastinate.App, dsn: str) -> None:
    attempts: list[int] = []

    @app.task(name="flaky", retry=RetryStrategy(max_attempts=2, wait=1), pass_context=True)
    async def flaky(context: JobContext) -> None:
        attempts.append(context.job.attempts)
        if context.job.attempts == 0:
            raise ValueError("first attempt fails; retried in a second")

    await flaky.defer_async()
    await run_until(app, lambda: statuses(dsn) == ["succeeded"], "the retry")
    assert attempts == [0, 1]


async def test_a_lock_successor_scheduled_for_later_runs_when_due(
    app: procrastinate.App, dsn: str
) -> None:
    """The lock's next job is scheduled a second later: it runs then, and (procrastinate's
    rule) it holds back the lock's later jobs until it has run."""
    order: list[str] = []

    @app.task(name="step")
    async def step(label: str) -> None:
        order.append(label)

    await step.configure(lock="L").defer_async(label="first")
    await step.configure(lock="L", schedule_in={"seconds": 1}).defer_async(label="scheduled")
    await step.configure(lock="L").defer_async(label="last")
    await run_until(app, lambda: statuses(dsn) == ["succeeded"] * 3, "the three steps")
    assert order == ["first", "scheduled", "last"]


async def test_only_the_worker_s_own_queues_set_its_wake_up(
    app: procrastinate.App, dsn: str
) -> None:
    """A job of another queue, due first, does not count for this worker: its own queue's
    job, due a little later, still starts when due, and the other one stays `todo`."""
    ran: list[str] = []

    @app.task(name="record")
    async def record(label: str) -> None:
        ran.append(label)

    await record.configure(queue="elsewhere", schedule_in={"seconds": 1}).defer_async(
        label="elsewhere"
    )
    await record.configure(queue="mine", schedule_in={"seconds": 2}).defer_async(label="mine")
    await run_until(
        app,
        lambda: statuses(dsn) == ["todo", "succeeded"],
        "this worker's own scheduled job",
        queues=["mine"],
    )
    assert ran == ["mine"]


async def test_wait_false_runs_everything_that_running_jobs_make_claimable(
    app: procrastinate.App, dsn: str
) -> None:
    """`wait=False` returns once a claim finds nothing and no job runs: a lock's next jobs,
    a retry with no delay and jobs deferred by running tasks all run before it returns.
    procrastinate's worker stops at its first empty fetch instead (docs/migration.md)."""
    ran: list[str] = []

    @app.task(name="parent")
    async def parent(depth: int) -> None:
        ran.append(f"parent-{depth}")
        await asyncio.sleep(0.05)  # the worker's claims come back empty meanwhile
        if depth < 3:
            await parent.defer_async(depth=depth + 1)

    @app.task(name="flaky", retry=RetryStrategy(max_attempts=3), pass_context=True)
    async def flaky(context: JobContext) -> None:
        ran.append(f"flaky-{context.job.attempts}")
        if context.job.attempts < 2:
            raise ValueError("not yet")

    @app.task(name="locked")
    async def locked(n: int) -> None:
        ran.append(f"locked-{n}")
        await asyncio.sleep(0.01)

    await parent.defer_async(depth=0)
    await flaky.defer_async()
    for n in range(5):
        await locked.configure(lock="one-entity").defer_async(n=n)
    await asyncio.wait_for(
        fastworker.run_async(app, wait=False, concurrency=4, **HOUR), timeout=120
    )
    assert statuses(dsn) == ["succeeded"] * 10
    assert [name for name in ran if name.startswith("parent")] == [
        f"parent-{depth}" for depth in range(4)
    ]
    assert [name for name in ran if name.startswith("flaky")] == ["flaky-0", "flaky-1", "flaky-2"]
    assert [name for name in ran if name.startswith("locked")] == [f"locked-{n}" for n in range(5)]
