"""Which job runs when: locks, priorities, schedules, queues, `wait=False`, concurrency."""

from __future__ import annotations

import asyncio
import datetime
import threading
from typing import Any

import procrastinate
import pytest

import fastworker
from tests.conftest import fetch_all
from tests.helpers import (
    PATIENCE,
    doing_count,
    finish,
    numbered,
    snapshot,
    wait_for,
    wait_for_rows,
    wait_for_value,
    wait_until_listening,
)

NO_SIGNALS: dict[str, Any] = {"install_signal_handlers": False}


async def test_same_lock_never_runs_concurrently_and_runs_by_priority_then_id(
    app: procrastinate.App, dsn: str
) -> None:
    running: dict[str, int] = {}
    overlaps: list[str] = []
    started: list[tuple[str, int, int]] = []  # (lock, priority, job id)

    @app.task(name="locked", pass_context=True)
    async def locked(context: procrastinate.JobContext, lock: str) -> None:
        assert context.job.id is not None
        started.append((lock, context.job.priority, context.job.id))
        running[lock] = running.get(lock, 0) + 1
        if running[lock] > 1:
            overlaps.append(lock)
        for _ in range(5):  # give the other slots every chance to start a same-lock job
            await asyncio.sleep(0)
        running[lock] -= 1

    priorities = [0, 3, 0, -2, 3, 1, 0, 5, -2, 1]
    for i, priority in enumerate(priorities):
        for lock in ("a", "b"):
            await locked.configure(lock=lock, priority=priority).defer_async(lock=lock)
        if i % 3 == 0:
            await locked.configure(priority=priority).defer_async(lock=f"free-{i}")
    total = 2 * len(priorities) + 4

    # wait=True: with free slots and only locked jobs left, a claim comes back short, which
    # is where procrastinate's `wait=False` worker stops too (see the next test).
    worker = asyncio.create_task(
        fastworker.run_async(app, concurrency=6, fetch_job_polling_interval=0.05, **NO_SIGNALS)
    )
    try:
        await wait_for(lambda: len(started) == total, "every job to start")
        await wait_for_rows(
            dsn,
            "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1",
            [("succeeded", total)],
        )
    finally:
        worker.cancel()
        await finish(worker)

    assert overlaps == []
    for lock in ("a", "b"):
        order = [(priority, job_id) for name, priority, job_id in started if name == lock]
        assert len(order) == len(priorities)
        assert order == sorted(order, key=lambda item: (-item[0], item[1]))


async def test_lock_waits_for_the_running_job_then_follows(
    app: procrastinate.App, dsn: str
) -> None:
    """A job whose lock is held by a running job waits, even with free slots and a higher
    priority; a job with another lock does not."""
    release = asyncio.Event()
    started: list[str] = []

    @app.task(name="hold")
    async def hold(name: str) -> None:
        started.append(name)
        if name == "first":
            await release.wait()

    await hold.configure(lock="L", priority=5).defer_async(name="first")
    await hold.configure(lock="L").defer_async(name="third")
    worker = asyncio.create_task(
        fastworker.run_async(app, concurrency=4, fetch_job_polling_interval=0.05, **NO_SIGNALS)
    )
    try:
        await wait_for(lambda: started == ["first"], "the first job to start")
        await hold.configure(lock="L", priority=9).defer_async(name="second")
        await hold.configure(lock="other").defer_async(name="other lock")
        await wait_for(lambda: "other lock" in started, "the other-lock job to run")
        # Free slots, and "second" outranks "first", but "first" holds the lock.
        assert started == ["first", "other lock"]
        assert fetch_all(
            dsn,
            "SELECT args->>'name', status::text FROM procrastinate_jobs"
            " WHERE lock = 'L' ORDER BY id",
        ) == [("first", "doing"), ("third", "todo"), ("second", "todo")]
        release.set()
        await wait_for(lambda: len(started) == 4, "the others to run after the first")
        assert started == ["first", "other lock", "second", "third"]
    finally:
        release.set()
        worker.cancel()
        await finish(worker)
    assert set(snapshot(dsn).statuses().values()) == {"succeeded"}


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_priorities_then_ids(app: procrastinate.App, dsn: str, concurrency: int) -> None:
    started: list[tuple[int, int]] = []

    @app.task(name="prioritised", pass_context=True)
    async def prioritised(context: procrastinate.JobContext) -> None:
        assert context.job.id is not None
        started.append((context.job.priority, context.job.id))

    for priority in [0, 2, -1, 2, 7, 0, -1, 7, 3, 0, 1, 2]:
        await prioritised.configure(priority=priority).defer_async()
    await fastworker.run_async(app, concurrency=concurrency, wait=False, **NO_SIGNALS)

    assert len(started) == 12
    assert started == sorted(started, key=lambda item: (-item[0], item[1]))
    assert set(snapshot(dsn).statuses().values()) == {"succeeded"}


async def test_scheduled_jobs_wait_until_due(app: procrastinate.App, dsn: str) -> None:
    ran: list[tuple[str, datetime.datetime]] = []

    @app.task(name="when")
    async def when(name: str) -> None:
        ran.append((name, datetime.datetime.now(datetime.timezone.utc)))

    now = datetime.datetime.now(datetime.timezone.utc)
    await when.configure(schedule_in={"hours": 1}).defer_async(name="in an hour")
    await when.configure(schedule_at=now - datetime.timedelta(minutes=1)).defer_async(
        name="overdue"
    )
    await when.defer_async(name="now")

    # wait=False: what is due runs, what is not stays todo, untouched.
    await fastworker.run_async(app, wait=False, **NO_SIGNALS)
    assert [name for name, _ in ran] == ["overdue", "now"]
    assert fetch_all(
        dsn, "SELECT args->>'name', status::text, attempts FROM procrastinate_jobs ORDER BY id"
    ) == [("in an hour", "todo", 0), ("overdue", "succeeded", 1), ("now", "succeeded", 1)]

    # A running worker picks a job up once it is due: nothing notifies then, polling does.
    due_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    await when.configure(schedule_at=due_at).defer_async(name="soon")
    worker = asyncio.create_task(
        fastworker.run_async(app, fetch_job_polling_interval=0.1, **NO_SIGNALS)
    )
    try:
        await wait_for(lambda: len(ran) == 3, "the job scheduled a second ahead to run")
    finally:
        worker.cancel()
        await finish(worker)
    name, ran_at = ran[-1]
    assert name == "soon"
    # Started no earlier than due (database and test share one clock).
    assert ran_at >= due_at
    assert fetch_all(
        dsn, "SELECT args->>'name', status::text FROM procrastinate_jobs ORDER BY id"
    ) == [
        ("in an hour", "todo"),
        ("overdue", "succeeded"),
        ("now", "succeeded"),
        ("soon", "succeeded"),
    ]


async def test_queue_filtering(app: procrastinate.App, dsn: str) -> None:
    ran: list[str] = []

    @app.task(name="queued", pass_context=True)
    async def queued(context: procrastinate.JobContext) -> None:
        ran.append(context.job.queue)

    for queue in ("a", "b", "c", "a", "default", "b"):
        await queued.configure(queue=queue).defer_async()

    await fastworker.run_async(app, queues=["a", "b"], wait=False, **NO_SIGNALS)
    assert sorted(ran) == ["a", "a", "b", "b"]
    assert fetch_all(
        dsn,
        "SELECT queue_name, status::text, count(*) FROM procrastinate_jobs"
        " GROUP BY 1, 2 ORDER BY 1",
    ) == [("a", "succeeded", 2), ("b", "succeeded", 2), ("c", "todo", 1), ("default", "todo", 1)]

    await fastworker.run_async(app, queues=["c"], wait=False, **NO_SIGNALS)
    assert sorted(ran) == ["a", "a", "b", "b", "c"]
    await fastworker.run_async(app, wait=False, **NO_SIGNALS)  # all queues
    assert sorted(ran) == ["a", "a", "b", "b", "c", "default"]


async def test_listening_on_queues_with_awkward_names(app: procrastinate.App, dsn: str) -> None:
    """A worker on specific queues is woken by their notifications (polling is set far
    beyond the test's patience), names quoted as identifiers; other queues stay untouched."""
    awkward = 'we"ird queue#1 ;--'
    ran: list[str] = []

    @app.task(name="notified", pass_context=True)
    async def notified(context: procrastinate.JobContext) -> None:
        ran.append(context.job.queue)

    worker = asyncio.create_task(
        fastworker.run_async(
            app, queues=[awkward, "plain"], fetch_job_polling_interval=3600, **NO_SIGNALS
        )
    )
    try:
        await wait_until_listening(dsn)
        await notified.configure(queue="elsewhere").defer_async()
        await notified.configure(queue=awkward).defer_async()
        await wait_for(lambda: ran == [awkward], "the awkward-queue job to run")
        await notified.configure(queue="plain").defer_async()
        await wait_for(lambda: ran == [awkward, "plain"], "a job woken by notification")
        await notified.configure(queue=awkward).defer_async()
        await wait_for(lambda: len(ran) == 3, "a second awkward-queue job, by notification")
    finally:
        worker.cancel()
        await finish(worker)
    assert fetch_all(
        dsn, "SELECT queue_name, status::text FROM procrastinate_jobs ORDER BY id"
    ) == [
        ("elsewhere", "todo"),
        (awkward, "succeeded"),
        ("plain", "succeeded"),
        (awkward, "succeeded"),
    ]


async def test_wait_false_drains_and_returns(app: procrastinate.App, dsn: str) -> None:
    # Nothing to do: returns at once.
    await asyncio.wait_for(fastworker.run_async(app, wait=False, **NO_SIGNALS), PATIENCE)

    done: list[int] = []

    @app.task(name="work")
    async def work(i: int) -> None:
        await asyncio.sleep(0)
        done.append(i)

    await work.batch_defer_async(*numbered(200))
    await asyncio.wait_for(
        fastworker.run_async(app, concurrency=7, wait=False, **NO_SIGNALS), PATIENCE
    )
    assert sorted(done) == list(range(200))
    state = snapshot(dsn)
    assert set(state.statuses().values()) == {"succeeded"}
    assert all(row[4] == 1 for row in state.jobs)  # attempts
    assert all(events == ["deferred", "started", "succeeded"] for events in state.events.values())
    assert state.workers == 0


async def test_doing_never_exceeds_concurrency(app: procrastinate.App, dsn: str) -> None:
    """Jobs block until the test lets them go, a few at a time; the jobs in `doing` (sampled
    from the database all along) and the tasks running at once never exceed `concurrency`,
    and the worker does fill its slots."""
    concurrency = 4
    total = 30
    gate = asyncio.Semaphore(0)
    running = 0
    max_running = 0
    finished = 0

    @app.task(name="blocking")
    async def blocking(i: int) -> None:
        nonlocal running, max_running, finished
        running += 1
        max_running = max(max_running, running)
        try:
            await gate.acquire()
        finally:
            running -= 1
            finished += 1

    await blocking.batch_defer_async(*numbered(total))

    samples: list[int] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(await asyncio.to_thread(doing_count, dsn))

    sampler = asyncio.create_task(sample())
    worker = asyncio.create_task(
        fastworker.run_async(app, concurrency=concurrency, wait=False, **NO_SIGNALS)
    )
    try:
        released = 0
        while released < total:
            await wait_for_value(lambda: finished, released, "jobs ended")
            await wait_for_value(lambda: running, min(concurrency, total - released), "running")
            await wait_for_rows(
                dsn,
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'",
                [(min(concurrency, total - released),)],
            )
            step = 1 if released % 2 else 3
            step = min(step, total - released)
            for _ in range(step):
                gate.release()
            released += step
        await finish(worker)
    finally:
        for _ in range(total):
            gate.release()
        stop_sampling.set()
        await sampler
        if not worker.done():
            worker.cancel()
            await finish(worker)

    assert worker.exception() is None
    assert max_running == concurrency
    assert len(samples) > 0 and max(samples) <= concurrency
    assert set(snapshot(dsn).statuses().values()) == {"succeeded"}


async def test_doing_never_exceeds_concurrency_while_jobs_keep_coming(
    app: procrastinate.App, dsn: str
) -> None:
    """A running worker woken by notifications for jobs deferred one by one and in bursts,
    while its slots are full and as they free up: `doing` (sampled from the database all
    along) never exceeds `concurrency`."""
    concurrency = 3
    gate = asyncio.Semaphore(0)
    running = 0
    max_running = 0
    finished = 0

    @app.task(name="blocking")
    async def blocking(i: int) -> None:
        nonlocal running, max_running, finished
        running += 1
        max_running = max(max_running, running)
        try:
            await gate.acquire()
        finally:
            running -= 1
            finished += 1

    samples: list[int] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(await asyncio.to_thread(doing_count, dsn))

    sampler = asyncio.create_task(sample())
    worker = asyncio.create_task(
        fastworker.run_async(
            app, concurrency=concurrency, fetch_job_polling_interval=0.05, **NO_SIGNALS
        )
    )
    total = 0
    try:
        for burst in (1, 1, 5, 1, 12, 2):
            if burst == 1:
                await blocking.defer_async(i=total)
            else:
                await blocking.batch_defer_async(*numbered(burst))
            total += burst
            await wait_for_value(
                lambda: running, min(concurrency, total - finished), "running jobs"
            )
            ended = finished
            gate.release()  # one job ends per step, so the backlog grows
            await wait_for_value(lambda: finished, ended + 1, "one more job ended")
        for _ in range(total):
            gate.release()
        await wait_for_rows(
            dsn,
            "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1",
            [("succeeded", total)],
        )
    finally:
        for _ in range(total):
            gate.release()
        stop_sampling.set()
        await sampler
        worker.cancel()
        await finish(worker)
    assert max_running == concurrency
    assert len(samples) > 0 and max(samples) <= concurrency


async def test_sync_jobs_never_exceed_concurrency(app: procrastinate.App, dsn: str) -> None:
    concurrency = 3
    lock = threading.Lock()
    gate = threading.Semaphore(0)
    running = 0
    max_running = 0
    finished = 0

    @app.task(name="blocking_sync")
    def blocking_sync(i: int) -> None:
        nonlocal running, max_running, finished
        with lock:
            running += 1
            max_running = max(max_running, running)
        try:
            if not gate.acquire(timeout=PATIENCE):
                raise AssertionError("gave up waiting for the gate")
        finally:
            with lock:
                running -= 1
                finished += 1

    await blocking_sync.batch_defer_async(*numbered(10))
    worker = asyncio.create_task(
        fastworker.run_async(app, concurrency=concurrency, wait=False, **NO_SIGNALS)
    )
    try:
        for released in range(10):
            await wait_for_value(lambda: running, min(concurrency, 10 - released), "running")
            assert doing_count(dsn) <= concurrency
            gate.release()
            await wait_for_value(lambda: finished, released + 1, "jobs ended")
        await finish(worker)
    finally:
        for _ in range(10):
            gate.release()
        if not worker.done():
            worker.cancel()
            await finish(worker)
    assert max_running == concurrency
    assert set(snapshot(dsn).statuses().values()) == {"succeeded"}


async def test_two_workers_share_a_queue_without_running_a_job_twice(
    app: procrastinate.App, dsn: str
) -> None:
    runs: list[int] = []

    @app.task(name="once")
    async def once(i: int) -> None:
        runs.append(i)
        await asyncio.sleep(0)

    await once.batch_defer_async(*numbered(300))
    await asyncio.gather(
        fastworker.run_async(app, concurrency=5, wait=False, name="w1", **NO_SIGNALS),
        fastworker.run_async(app, concurrency=3, wait=False, name="w2", **NO_SIGNALS),
    )
    assert sorted(runs) == list(range(300))
    assert set(snapshot(dsn).statuses().values()) == {"succeeded"}
