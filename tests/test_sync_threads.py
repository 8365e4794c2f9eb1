"""Sync tasks run in a pool of `concurrency` threads the worker owns (`sync_executor`,
`fastworker/runner/sync_threads.py`), not in the loop's default executor, whose
``min(32, cores + 4)`` threads capped them; ``sync_executor="default"`` keeps
procrastinate's behaviour. The pool's threads are gone when a run ends, a hard stop too."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procrastinate
import pytest
from procrastinate import job_context

import fastworker
from fastworker.runner.sync_threads import THREAD_NAME_PREFIX
from tests.conftest import fetch_all
from tests.helpers import PATIENCE, finish, numbered, wait_for, wait_in_thread

NO_SIGNALS: dict[str, Any] = {"install_signal_handlers": False}

#: One more thread than the loop's default executor has here: with it, these jobs could
#: never all run at once.
BEYOND_THE_DEFAULT = min(32, (os.cpu_count() or 1) + 4) + 2

REQUEST = contextvars.ContextVar("request", default="unset")


def pool_threads() -> list[threading.Thread]:
    return [
        thread for thread in threading.enumerate() if thread.name.startswith(THREAD_NAME_PREFIX)
    ]


def statuses(dsn: str) -> list[tuple[Any, ...]]:
    return fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")


async def test_a_sync_task_runs_concurrency_times_at_once(app: procrastinate.App, dsn: str) -> None:
    """N sync jobs at concurrency=N, N more than the loop's default executor's threads:
    each waits at a barrier of N, which only breaks if all N run at once. Each job sees
    the context variables of the worker's loop, as under asgiref's sync_to_async."""
    barrier = threading.Barrier(BEYOND_THE_DEFAULT, timeout=PATIENCE)
    threads: set[str] = set()
    seen: list[str] = []

    @app.task(name="meet")
    def meet(i: int) -> None:
        threads.add(threading.current_thread().name)
        seen.append(REQUEST.get())
        barrier.wait()

    await meet.batch_defer_async(*numbered(BEYOND_THE_DEFAULT))
    REQUEST.set("the worker's")
    await fastworker.run_async(app, concurrency=BEYOND_THE_DEFAULT, wait=False, **NO_SIGNALS)
    assert statuses(dsn) == [("succeeded", BEYOND_THE_DEFAULT)]
    assert len(threads) == BEYOND_THE_DEFAULT
    assert all(name.startswith(THREAD_NAME_PREFIX) for name in threads)
    assert seen == ["the worker's"] * BEYOND_THE_DEFAULT
    assert pool_threads() == []


async def test_sync_executor_default_runs_them_in_the_loops_default_executor(
    app: procrastinate.App, dsn: str
) -> None:
    """procrastinate's behaviour: the loop's default executor (here one of 2 threads, set
    for this test's loop only), whatever the concurrency."""
    default = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loop-default")
    asyncio.get_running_loop().set_default_executor(default)
    threads: set[str] = set()

    @app.task(name="where")
    def where(i: int) -> None:
        threads.add(threading.current_thread().name)

    await where.batch_defer_async(*numbered(6))
    await fastworker.run_async(
        app, concurrency=6, wait=False, sync_executor="default", **NO_SIGNALS
    )
    assert statuses(dsn) == [("succeeded", 6)]
    assert threads and all(name.startswith("loop-default") for name in threads)
    default.shutdown(wait=True)


async def test_no_pool_thread_outlives_a_hard_stop(app: procrastinate.App, dsn: str) -> None:
    """A hard stop aborts the running sync jobs (they see `should_abort()`); when the run
    has ended, the pool's threads are gone."""
    started: list[int] = []

    @app.task(name="until_aborted", pass_context=True)
    def until_aborted(context: job_context.JobContext, i: int) -> None:
        started.append(i)
        while not context.should_abort():
            threading.Event().wait(0.01)
        raise procrastinate.exceptions.JobAborted()

    await until_aborted.batch_defer_async(*numbered(3))
    worker = asyncio.create_task(fastworker.run_async(app, concurrency=3, **NO_SIGNALS))
    await wait_for(lambda: len(started) == 3, "the three sync jobs running")
    assert len(pool_threads()) == 3
    worker.cancel()
    for _ in range(10):
        await asyncio.sleep(0.01)
    assert not worker.done()  # the sync jobs hold the graceful stop up
    worker.cancel()  # a second cancel while stopping: a hard stop
    assert isinstance(await finish(worker), asyncio.CancelledError)
    assert statuses(dsn) == [("aborted", 3)]
    assert pool_threads() == []


async def test_a_thread_still_running_does_not_hold_the_run_up(
    app: procrastinate.App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync job whose task was cancelled (by anyone: a thread cannot be stopped) keeps
    its thread: the run still ends, says so, and the thread goes once the function
    returns."""
    started = threading.Event()
    release = threading.Event()

    @app.task(name="held")
    def held() -> None:
        started.set()
        wait_in_thread(release, "the test to release the thread")

    await held.defer_async()
    worker = fastworker.Worker(app, concurrency=2, **NO_SIGNALS)
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(wait_in_thread, started, "the sync job to start")
        (job_task,) = worker._running_jobs
        job_task.cancel()
        worker.stop()
        assert await finish(run) is None
        assert "sync_threads_still_running" in [
            getattr(record, "action", None) for record in caplog.records
        ]
        assert len(pool_threads()) == 1
    finally:
        release.set()
    await wait_for(lambda: not pool_threads(), "the thread to end")
    assert statuses(dsn) == [("aborted", 1)]


@pytest.mark.parametrize("value", ["thread", "", None, 1])
def test_a_bad_sync_executor_is_refused(app: procrastinate.App, value: object) -> None:
    with pytest.raises(ValueError, match="sync_executor must be 'threads' or 'default', got"):
        fastworker.Worker(app, sync_executor=value)
