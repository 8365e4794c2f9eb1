"""Features procrastinate's worker lacks: per-queue concurrency and job timeouts."""

from __future__ import annotations

import asyncio
import time

import procrastinate
import pytest
from procrastinate import JobContext, RetryStrategy

import fastworker
from tests.conftest import fetch_all


async def test_queue_concurrency_caps_running_jobs_of_that_queue(
    app: procrastinate.App, dsn: str
) -> None:
    running: dict[str, int] = {"emails": 0, "other": 0}
    most: dict[str, int] = {"emails": 0, "other": 0}
    doing_emails: list[int] = []

    @app.task(name="track")
    async def track(queue: str) -> None:
        running[queue] += 1
        most[queue] = max(most[queue], running[queue])
        if queue == "emails":
            # What the database says this worker holds in the limited queue, right now.
            rows = fetch_all(
                dsn,
                "SELECT count(*) FROM procrastinate_jobs"
                " WHERE status = 'doing' AND queue_name = 'emails'",
            )
            doing_emails.append(rows[0][0])
        await asyncio.sleep(0.01)
        running[queue] -= 1

    await track.configure(queue="emails").batch_defer_async(
        *({"queue": "emails"} for _ in range(30))
    )
    await track.configure(queue="other").batch_defer_async(*({"queue": "other"} for _ in range(30)))
    await fastworker.run_async(
        app,
        concurrency=10,
        queue_concurrency={"emails": 2},
        wait=False,
        install_signal_handlers=False,
    )
    assert most["emails"] == 2, most  # the limit is reached, never passed
    assert max(doing_emails) <= 2, doing_emails  # not even claimed beyond it
    assert most["other"] > 2, most  # other queues use the rest of the concurrency
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 60)
    ]


async def test_queue_concurrency_with_one_limited_queue_drains_it(
    app: procrastinate.App, dsn: str
) -> None:
    @app.task(name="noop", queue="emails")
    async def noop() -> None:
        await asyncio.sleep(0)

    await noop.batch_defer_async(*({} for _ in range(25)))
    await fastworker.run_async(
        app,
        concurrency=5,
        queue_concurrency={"emails": 1},
        wait=False,
        install_signal_handlers=False,
    )
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 25)
    ]


def test_bad_limits_are_refused(app: procrastinate.App) -> None:
    with pytest.raises(ValueError, match="queue_concurrency"):
        fastworker.Worker(app, queue_concurrency={"emails": 0})
    with pytest.raises(ValueError, match="job_timeout"):
        fastworker.Worker(app, job_timeout=-1)


async def test_async_job_over_its_timeout_fails_and_others_finish(
    app: procrastinate.App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="slow")
    async def slow() -> None:
        await asyncio.sleep(60)

    @app.task(name="quick")
    async def quick() -> None:
        await asyncio.sleep(0)

    slow_id = await slow.defer_async()
    quick_id = await quick.defer_async()
    caplog.set_level("INFO")
    await fastworker.run_async(
        app, concurrency=2, job_timeout=0.2, wait=False, install_signal_handlers=False
    )
    statuses = dict(fetch_all(dsn, "SELECT id, status::text FROM procrastinate_jobs"))
    assert statuses == {slow_id: "failed", quick_id: "succeeded"}
    assert any(getattr(r, "action", None) == "job_timeout" for r in caplog.records)
    failure = [r for r in caplog.records if getattr(r, "action", None) == "job_error"]
    assert failure and isinstance(failure[0].exc_info[1], fastworker.JobTimeout)  # type: ignore[index]


async def test_timeout_follows_the_retry_strategy_and_per_task_timeouts(
    app: procrastinate.App, dsn: str
) -> None:
    attempts: list[int] = []

    @app.task(name="flaky", retry=RetryStrategy(max_attempts=1), pass_context=True)
    async def flaky(context: JobContext) -> None:
        attempts.append(context.job.attempts)
        if context.job.attempts == 0:
            await asyncio.sleep(60)  # first run: over the timeout

    job_id = await flaky.defer_async()
    await fastworker.run_async(
        app,
        concurrency=1,
        job_timeout=60,
        task_timeouts={"flaky": 0.2},
        wait=False,
        install_signal_handlers=False,
    )
    assert attempts == [0, 1]
    assert fetch_all(
        dsn, "SELECT status::text, attempts FROM procrastinate_jobs WHERE id = %s", job_id
    ) == [("succeeded", 2)]
    events = [
        row[0]
        for row in fetch_all(
            dsn, "SELECT type::text FROM procrastinate_events WHERE job_id = %s ORDER BY id", job_id
        )
    ]
    # As procrastinate: a retry without a delay is scheduled "now", hence `scheduled`.
    assert events == [
        "deferred",
        "started",
        "scheduled",
        "deferred_for_retry",
        "started",
        "succeeded",
    ]


async def test_sync_job_over_its_timeout_is_asked_to_abort(
    app: procrastinate.App, dsn: str
) -> None:
    @app.task(name="cooperative", pass_context=True)
    def cooperative(context: JobContext) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if context.should_abort():
                raise procrastinate.exceptions.JobAborted
            time.sleep(0.01)

    job_id = await cooperative.defer_async()
    await fastworker.run_async(
        app, concurrency=1, job_timeout=0.2, wait=False, install_signal_handlers=False
    )
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job_id) == [
        ("failed",)
    ]


async def test_max_jobs_runs_that_many_jobs_then_the_worker_stops_by_itself(
    app: procrastinate.App, dsn: str
) -> None:
    """procrastinate #1262 (process recycling): with `wait=True`, the worker still ends,
    once its max_jobs jobs have run; no job beyond them is claimed."""
    ran: list[int] = []

    @app.task(name="count")
    async def count(n: int) -> None:
        ran.append(n)
        await asyncio.sleep(0.05)

    await count.batch_defer_async(*({"n": n} for n in range(10)))
    await asyncio.wait_for(
        fastworker.run_async(
            app, concurrency=2, max_jobs=3, install_signal_handlers=False, name="recycled"
        ),
        timeout=120,
    )
    assert sorted(ran) == [0, 1, 2]  # claim order: priority, then id
    assert fetch_all(
        dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1 ORDER BY 1"
    ) == [("succeeded", 3), ("todo", 7)]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


def blueprint_with_a_slow_task() -> procrastinate.Blueprint:
    """A task registered as ``jobs.slow`` with the alias ``old.slow``, for an app to take
    under the namespace ``bp`` (registry names ``bp:jobs.slow`` and ``bp:old.slow``)."""
    blueprint = procrastinate.Blueprint()

    @blueprint.task(name="jobs.slow", aliases=["old.slow"])
    async def slow() -> None:
        await asyncio.sleep(30)

    return blueprint


async def test_a_bare_task_name_times_out_the_task_under_all_its_names(
    app: procrastinate.App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`task_timeouts={"slow": ...}` names the one task whose name ends in ``slow``: a
    blueprint's namespaced task, deferred under its name and under its alias."""
    app.add_tasks_from(blueprint_with_a_slow_task(), namespace="bp")
    caplog.set_level("INFO")
    by_name = await app.configure_task("bp:jobs.slow").defer_async()
    by_alias = await app.configure_task("bp:old.slow").defer_async()
    await fastworker.run_async(
        app, concurrency=2, task_timeouts={"slow": 0.2}, wait=False, install_signal_handlers=False
    )
    statuses = dict(fetch_all(dsn, "SELECT id, status::text FROM procrastinate_jobs"))
    assert statuses == {by_name: "failed", by_alias: "failed"}
    timed_out = [
        record.job["id"]  # type: ignore[attr-defined]
        for record in caplog.records
        if getattr(record, "action", None) == "job_timeout"
    ]
    assert sorted(timed_out) == sorted([by_name, by_alias])


@pytest.mark.parametrize(
    ("timeouts", "message"),
    [
        ({"slwo": 1}, "no task named 'slwo' in the app; did you mean 'bp:jobs.slow'"),
        ({"run": 1}, "'run' is ambiguous, it is the last part of the names of 'a.run', 'b.run'"),
        (
            {"slow": 1, "bp:old.slow": 2},
            "'slow' and 'bp:old.slow' both name the task 'bp:jobs.slow'",
        ),
        ({"nothing_like_it": 1}, "the app's tasks: 'a.run', 'b.run', 'bp:jobs.slow'"),
    ],
)
async def test_an_unknown_or_ambiguous_task_name_is_refused_before_the_worker_starts(
    app: procrastinate.App, dsn: str, timeouts: dict[str, float], message: str
) -> None:
    app.add_tasks_from(blueprint_with_a_slow_task(), namespace="bp")
    for name in ("a.run", "b.run"):
        app.task(name=name)(lambda: None)
    job_id = await app.configure_task("a.run").defer_async()
    with pytest.raises(fastworker.ConfigurationError, match=message.replace(".", r"\.")):
        await fastworker.run_async(
            app, task_timeouts=timeouts, wait=False, install_signal_handlers=False
        )
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job_id) == [
        ("todo",)
    ]


def test_a_queue_limit_on_a_queue_no_task_uses_is_warned_about(
    app: procrastinate.App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="send", queue="emails")
    def send() -> None:
        pass

    caplog.set_level("WARNING")
    fastworker.Worker(app, queue_concurrency={"emials": 1, "emails": 2})
    warnings = [
        record
        for record in caplog.records
        if getattr(record, "action", None) == "queue_concurrency_unused_queue"
    ]
    assert [getattr(record, "queue", None) for record in warnings] == ["emials"]
    assert "'emails'" in warnings[0].getMessage()
