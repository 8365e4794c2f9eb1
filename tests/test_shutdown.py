"""Stopping a worker while jobs run: graceful (they finish, results are written) and hard
(graceful timeout or a second cancel / signal: async jobs are cancelled, sync jobs see
`context.should_abort()`, and each ends `aborted` or retried as its retry strategy says).
Every claimed job ends in a recorded state and the worker row is removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from typing import Any

import procrastinate
import pytest
from procrastinate import exceptions, job_context, retry

import fastworker
from tests.conftest import fetch_all
from tests.helpers import (
    PATIENCE,
    finish,
    numbered,
    record_actions,
    snapshot,
    wait_for,
    wait_for_rows,
)

NO_SIGNALS: dict[str, Any] = {"install_signal_handlers": False}


@dataclasses.dataclass
class Blockers:
    """Tasks that block until released (async: an asyncio.Event; sync: a threading.Event)
    or, for the sync ones, until the worker asks them to abort."""

    started: list[str] = dataclasses.field(default_factory=list)
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    release_threads: threading.Event = dataclasses.field(default_factory=threading.Event)
    abort_reasons: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def set_free(self) -> None:
        self.release.set()
        self.release_threads.set()


def register_blockers(app: procrastinate.App) -> Blockers:
    blockers = Blockers()

    async def block(name: str) -> str:
        blockers.started.append(name)
        await asyncio.wait_for(blockers.release.wait(), PATIENCE)
        return f"{name} released"

    def block_sync(context: job_context.JobContext, name: str) -> str:
        blockers.started.append(name)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if blockers.release_threads.is_set():
                return f"{name} released"
            if context.should_abort():
                blockers.abort_reasons.append((name, context.abort_reason()))
                raise exceptions.JobAborted()
            time.sleep(0.005)
        raise AssertionError(f"{name}: neither released nor asked to abort")

    @app.task(name="blocked")
    async def blocked(name: str) -> str:
        return await block(name)

    @app.task(name="blocked_retry", retry=retry.RetryStrategy(max_attempts=3))
    async def blocked_retry(name: str) -> str:
        return await block(name)

    @app.task(name="blocked_sync", pass_context=True)
    def blocked_sync(context: job_context.JobContext, name: str) -> str:
        return block_sync(context, name)

    @app.task(name="blocked_sync_retry", pass_context=True, retry=3)
    def blocked_sync_retry(context: job_context.JobContext, name: str) -> str:
        return block_sync(context, name)

    @app.task(name="quick")
    async def quick() -> None:
        blockers.started.append("quick")

    return blockers


async def defer_blocked_jobs(app: procrastinate.App) -> None:
    """One job of each blocking kind, then one quick job that must not start."""
    for name in ("blocked", "blocked_retry", "blocked_sync", "blocked_sync_retry"):
        await app.tasks[name].defer_async(name=name)
    await app.tasks["quick"].defer_async()


async def test_stop_lets_running_jobs_finish(app: procrastinate.App, dsn: str) -> None:
    """`Worker.stop()`: claiming stops at once, running jobs finish, `run()` returns."""
    blockers = register_blockers(app)
    await defer_blocked_jobs(app)
    worker = fastworker.Worker(app, concurrency=4, fetch_job_polling_interval=0.05, **NO_SIGNALS)
    run = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: len(blockers.started) == 4, "the four blocking jobs")
        worker.stop()
        await wait_for_rows(
            dsn,
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'",
            [(4,)],
        )
        assert not run.done()
        assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(1,)]
        blockers.set_free()
        assert await finish(run) is None
    finally:
        blockers.set_free()
        if not run.done():
            run.cancel()
            await finish(run)
    state = snapshot(dsn)
    assert [row[3] for row in state.jobs] == ["succeeded"] * 4 + ["todo"]
    assert state.events[5] == ["deferred"]
    assert state.workers == 0
    assert "quick" not in blockers.started


async def test_stop_from_a_sync_task_thread(app: procrastinate.App, dsn: str) -> None:
    """A sync task (in its thread) stops the worker: that job still succeeds, nothing
    more starts."""
    worker = fastworker.Worker(app, concurrency=1, **NO_SIGNALS)
    ran: list[int] = []

    @app.task(name="stopper")
    def stopper(i: int) -> None:
        ran.append(i)
        worker.stop()

    for i in range(3):
        await stopper.defer_async(i=i)
    assert await finish(asyncio.create_task(worker.run())) is None
    assert ran == [0]
    assert [row[3] for row in snapshot(dsn).jobs] == ["succeeded", "todo", "todo"]
    assert snapshot(dsn).workers == 0


async def test_second_cancel_aborts_running_jobs(app: procrastinate.App, dsn: str) -> None:
    """First cancel: graceful (the jobs keep running). Second cancel: hard stop, running
    jobs are aborted (or retried, per their retry strategy), all results written.

    procrastinate's worker has no second step: a second cancel interrupts its shutdown
    and leaves its jobs `doing` and its worker row behind."""
    blockers = register_blockers(app)
    await defer_blocked_jobs(app)
    with record_actions() as recorder:
        worker = asyncio.create_task(
            fastworker.run_async(app, concurrency=4, fetch_job_polling_interval=0.05, **NO_SIGNALS)
        )
        try:
            await wait_for(lambda: len(blockers.started) == 4, "the four blocking jobs")
            worker.cancel()
            for _ in range(10):
                await asyncio.sleep(0.01)
            assert not worker.done()
            assert fetch_all(
                dsn, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'"
            ) == [(4,)]
            worker.cancel()
            ended = await finish(worker)
        finally:
            blockers.set_free()
            if not worker.done():
                worker.cancel()
                await finish(worker)
    assert isinstance(ended, asyncio.CancelledError)
    assert sorted(blockers.abort_reasons) == [
        ("blocked_sync", job_context.AbortReason.SHUTDOWN),
        ("blocked_sync_retry", job_context.AbortReason.SHUTDOWN),
    ]
    state = snapshot(dsn)
    assert {row[1]: (row[3], row[4]) for row in state.jobs} == {
        "blocked": ("aborted", 1),
        "blocked_retry": ("todo", 1),
        "blocked_sync": ("aborted", 1),
        "blocked_sync_retry": ("todo", 1),
        "quick": ("todo", 0),
    }
    assert state.workers == 0
    actions = recorder.job_actions()
    assert sorted(a for job_actions in actions.values() for a in job_actions if "abort" in a) == [
        "abort_job",
        "abort_job",
        "abort_job",
        "abort_job",
        "job_aborted",
        "job_aborted",
        "job_aborted_retry",
        "job_aborted_retry",
    ]


async def test_hard_stop_records_every_claimed_job(app: procrastinate.App, dsn: str) -> None:
    """Many jobs, some running, some not yet claimed, graceful timeout 0: nothing is left
    `doing`; running jobs end aborted / retried, the others are untouched."""
    blockers = register_blockers(app)
    kinds = ["blocked", "blocked_retry", "blocked_sync", "blocked_sync_retry"]
    for i in range(16):
        await app.tasks[kinds[i % 4]].defer_async(name=f"{kinds[i % 4]}-{i}")
    worker = asyncio.create_task(
        fastworker.run_async(
            app,
            concurrency=5,
            shutdown_graceful_timeout=0,
            fetch_job_polling_interval=0.05,
            **NO_SIGNALS,
        )
    )
    try:
        await wait_for(lambda: len(blockers.started) == 5, "five jobs running")
        worker.cancel()
        assert isinstance(await finish(worker), asyncio.CancelledError)
    finally:
        blockers.set_free()
        if not worker.done():
            worker.cancel()
            await finish(worker)
    state = snapshot(dsn)
    assert state.doing == 0 and state.workers == 0
    started = set(blockers.started)
    for job_id, task_name, _, status, attempts, *_ in state.jobs:
        name = f"{task_name}-{job_id - 1}"
        if name not in started:
            assert (status, attempts, state.events[job_id]) == ("todo", 0, ["deferred"])
        elif task_name.endswith("_retry"):
            assert (status, attempts) == ("todo", 1)
            assert state.events[job_id][:4] == [
                "deferred",
                "started",
                "scheduled",
                "deferred_for_retry",
            ]
        else:
            assert (status, attempts, state.events[job_id][-1]) == ("aborted", 1, "aborted")
    assert len(started) == 5


async def test_cancel_during_start_up_loses_nothing(app: procrastinate.App, dsn: str) -> None:
    """Cancelled before it has even registered: it still stops cleanly; any job it had
    claimed meanwhile ran to the end; the rest stay todo."""
    done: list[int] = []

    @app.task(name="fast")
    async def fast(i: int) -> None:
        done.append(i)

    await fast.batch_defer_async(*numbered(50))
    for attempt in range(3):
        worker = asyncio.create_task(fastworker.run_async(app, concurrency=8, **NO_SIGNALS))
        for _ in range(attempt):
            await asyncio.sleep(0)
        worker.cancel()
        assert isinstance(await finish(worker), asyncio.CancelledError)
        state = snapshot(dsn)
        assert state.doing == 0 and state.workers == 0
        assert {row[3] for row in state.jobs} <= {"todo", "succeeded"}
        succeeded = sorted(row[0] - 1 for row in state.jobs if row[3] == "succeeded")
        assert sorted(done) == succeeded


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_then_second_signal(
    app: procrastinate.App, dsn: str, signum: signal.Signals
) -> None:
    """With signal handlers: a first SIGTERM / SIGINT stops gracefully (the running job goes
    on), a second one aborts it; the previous handlers are back afterwards.

    (procrastinate's worker puts the previous handlers back at the first signal, so its
    second SIGTERM kills the process and its second SIGINT raises KeyboardInterrupt.)"""
    blockers = register_blockers(app)
    await app.tasks["blocked"].defer_async(name="blocked")
    await app.tasks["blocked"].defer_async(name="never started")
    previous = signal.getsignal(signum)
    worker = asyncio.create_task(
        fastworker.run_async(app, fetch_job_polling_interval=0.05, install_signal_handlers=True)
    )
    try:
        await wait_for(lambda: blockers.started == ["blocked"], "the blocking job")
        # Never send a signal nobody handles: that would end the test run.
        assert signal.getsignal(signum) not in (signal.SIG_DFL, previous)
        os.kill(os.getpid(), signum)
        for _ in range(10):
            await asyncio.sleep(0.01)
        assert not worker.done()
        assert signal.getsignal(signum) not in (signal.SIG_DFL, previous)
        os.kill(os.getpid(), signum)
        ended = await finish(worker)
    finally:
        blockers.set_free()
        if not worker.done():
            worker.cancel()
            await finish(worker)
    assert ended is None
    assert signal.getsignal(signum) == previous
    assert [row[3] for row in snapshot(dsn).jobs] == ["aborted", "todo"]
    assert snapshot(dsn).workers == 0
