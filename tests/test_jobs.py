"""Jobs end exactly as under procrastinate's own worker.

Each comparison runs one scenario twice, on two fresh databases: once with procrastinate's
worker, once with fastworker, and compares the job rows, the `procrastinate_events` of each
job (in order) and procrastinate's per-job log actions.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import procrastinate
import pytest
from procrastinate import exceptions, job_context, jobs, retry

import fastworker
from tests.conftest import fetch_all
from tests.helpers import (
    Runner,
    assert_same_outcome,
    record_actions,
    run_both,
    snapshot,
)


class MoveOnce(retry.BaseRetryStrategy):
    """Retry once, elsewhere: another priority, queue and lock, and no retry_at."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        if job.attempts == 0:
            return retry.RetryDecision(priority=7, queue="elsewhere", lock="moved")
        return None


def register_outcome_tasks(app: procrastinate.App) -> None:
    @app.task(name="ok")
    async def ok(value: int) -> int:
        return value * 2

    @app.task(name="ok_sync")
    def ok_sync(value: int) -> int:
        return value * 3

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("boom")

    @app.task(name="boom_sync")
    def boom_sync() -> None:
        raise RuntimeError("boom, in a thread")

    @app.task(name="retry_twice", retry=2)
    async def retry_twice() -> None:
        raise ValueError("always")

    @app.task(name="retry_twice_sync", retry=2)
    def retry_twice_sync() -> None:
        raise ValueError("always, in a thread")

    @app.task(name="flaky", retry=retry.RetryStrategy(max_attempts=3), pass_context=True)
    async def flaky(context: job_context.JobContext) -> str:
        if context.job.attempts == 0:
            raise ConnectionError("first attempt fails")
        return "second attempt works"

    @app.task(name="picky", retry=retry.RetryStrategy(max_attempts=5, retry_exceptions=[KeyError]))
    async def picky() -> None:
        raise ValueError("not a KeyError: no retry")

    @app.task(name="retry_later", retry=retry.RetryStrategy(max_attempts=3, wait=3600))
    async def retry_later() -> None:
        raise ValueError("retried in an hour")

    @app.task(name="moving", retry=MoveOnce(), pass_context=True)
    async def moving(context: job_context.JobContext) -> None:
        if context.job.attempts == 0:
            raise ValueError("move me")

    @app.task(name="aborts_itself")
    async def aborts_itself() -> None:
        raise exceptions.JobAborted()

    @app.task(name="scheduled_later")
    async def scheduled_later() -> None:
        raise AssertionError("scheduled in an hour: must not run")


async def defer_outcome_jobs(app: procrastinate.App) -> None:
    await app.tasks["ok"].defer_async(value=1)
    await app.tasks["ok_sync"].defer_async(value=2)
    await app.tasks["boom"].defer_async()
    await app.tasks["boom_sync"].defer_async()
    await app.tasks["retry_twice"].defer_async()
    await app.tasks["retry_twice_sync"].defer_async()
    await app.tasks["flaky"].defer_async()
    await app.tasks["picky"].defer_async()
    await app.tasks["retry_later"].defer_async()
    await app.tasks["moving"].configure(lock="original").defer_async()
    await app.tasks["aborts_itself"].defer_async()
    await app.tasks["scheduled_later"].configure(schedule_in={"hours": 1}).defer_async()
    await app.configure_task(name="no.such.task").defer_async(x=1)
    await app.tasks["ok"].configure(priority=5, queue="other").defer_async(value=3)


@pytest.mark.parametrize("delete_jobs", ["never", "successful", "always"])
async def test_outcomes_match_procrastinate(delete_jobs: str) -> None:
    """Success, failure, retries (immediate, later, elsewhere, exhausted, not applicable),
    a self-aborting task, an unknown task, a job scheduled later: the same rows, events and
    log actions as procrastinate's worker, for every `delete_jobs` value."""

    async def scenario(app: procrastinate.App, dsn: str, run: Runner) -> None:
        register_outcome_tasks(app)
        await defer_outcome_jobs(app)
        await run(app, concurrency=1, wait=False, delete_jobs=delete_jobs)

    theirs, ours = await run_both(scenario)
    assert_same_outcome(theirs, ours)

    # The scenario covers what it means to: a sanity check on the reference run.
    statuses = sorted(row[3] for row in theirs.snapshot.jobs)
    if delete_jobs == "never":
        assert statuses.count("succeeded") == 5  # ok x2, ok_sync, flaky, moving
        assert statuses.count("failed") == 6
        assert statuses.count("aborted") == 1
        assert statuses.count("todo") == 2  # retry_later, scheduled_later
    elif delete_jobs == "successful":
        assert "succeeded" not in statuses
        assert statuses.count("failed") == 6
    else:
        assert sorted(statuses) == ["todo", "todo"]


async def test_outcomes_match_procrastinate_with_concurrency() -> None:
    """Independent jobs at concurrency 4: every job ends as under procrastinate's worker
    (retries are left out: with concurrency above 1, whether procrastinate's `wait=False`
    worker still picks up an immediate retry depends on timing)."""

    async def scenario(app: procrastinate.App, dsn: str, run: Runner) -> None:
        register_outcome_tasks(app)
        for value in range(12):
            await app.tasks["ok"].defer_async(value=value)
            await app.tasks["ok_sync"].defer_async(value=value)
            if value % 3 == 0:
                await app.tasks["boom"].defer_async()
                await app.tasks["boom_sync"].defer_async()
                await app.configure_task(name="no.such.task").defer_async()
        await run(app, concurrency=4, wait=False)

    theirs, ours = await run_both(scenario)
    assert_same_outcome(theirs, ours)


async def test_unknown_task_fails_with_the_error_logged(app: procrastinate.App, dsn: str) -> None:
    job_id = await app.configure_task(name="nobody.registered.this").defer_async(a=1)

    with record_actions() as recorder:
        await fastworker.run_async(app, wait=False, install_signal_handlers=False)

    assert fetch_all(dsn, "SELECT status::text, attempts FROM procrastinate_jobs") == [
        ("failed", 1)
    ]
    (not_found,) = recorder.with_action("task_not_found")
    assert not_found.levelno == logging.ERROR
    assert not_found.exc_info is not None
    assert isinstance(not_found.exc_info[1], exceptions.TaskNotFound)
    (error,) = recorder.with_action("job_error")
    assert error.levelno == logging.ERROR
    assert error.__dict__["job"]["id"] == job_id


async def test_raising_task_fails_with_the_exception_logged(
    app: procrastinate.App, dsn: str
) -> None:
    @app.task(name="raises")
    async def raises() -> None:
        raise ZeroDivisionError("the task's own error")

    await raises.defer_async()
    with record_actions() as recorder:
        await fastworker.run_async(app, wait=False, install_signal_handlers=False)

    assert fetch_all(dsn, "SELECT status::text, attempts FROM procrastinate_jobs") == [
        ("failed", 1)
    ]
    (error,) = recorder.with_action("job_error")
    assert error.exc_info is not None and isinstance(error.exc_info[1], ZeroDivisionError)


async def test_sync_tasks_run_in_threads_async_tasks_on_the_loop(
    app: procrastinate.App, dsn: str
) -> None:
    loop_thread = threading.get_ident()
    threads: dict[str, list[int]] = {"sync": [], "async": []}

    @app.task(name="in_thread")
    def in_thread(i: int) -> int:
        threads["sync"].append(threading.get_ident())
        return i

    @app.task(name="on_loop")
    async def on_loop(i: int) -> int:
        threads["async"].append(threading.get_ident())
        return i

    for i in range(5):
        await in_thread.defer_async(i=i)
        await on_loop.defer_async(i=i)
    await fastworker.run_async(app, concurrency=3, wait=False, install_signal_handlers=False)

    assert len(threads["sync"]) == len(threads["async"]) == 5
    assert loop_thread not in threads["sync"]
    assert set(threads["async"]) == {loop_thread}
    assert snapshot(dsn).statuses() == {i: "succeeded" for i in range(1, 11)}


async def test_pass_context_gives_procrastinates_job_context(
    app: procrastinate.App, dsn: str
) -> None:
    seen: list[job_context.JobContext] = []

    @app.task(name="with_context", pass_context=True)
    async def with_context(context: job_context.JobContext, value: str) -> None:
        seen.append(context)

    @app.task(name="with_context_sync", pass_context=True)
    def with_context_sync(context: job_context.JobContext, value: str) -> None:
        seen.append(context)

    first = await with_context.configure(lock="L", queueing_lock="Q", priority=3).defer_async(
        value="a"
    )
    second = await with_context_sync.configure(queue="side").defer_async(value="b")
    await fastworker.run_async(
        app,
        name="ctx-worker",
        queues=["default", "side"],
        wait=False,
        additional_context={"shared": "thing"},
        install_signal_handlers=False,
    )

    assert [c.job.id for c in seen] == [first, second]
    for context in seen:
        assert isinstance(context, job_context.JobContext)
        assert context.app is app
        assert context.worker_name == "ctx-worker"
        assert list(context.worker_queues or []) == ["default", "side"]
        assert context.additional_context == {"shared": "thing"}
        assert context.should_abort() is False
        assert context.job.status == "doing"
        assert context.job.attempts == 0
        assert context.job.worker_id is not None
        assert context.task is app.tasks[context.job.task_name]
    job_a, job_b = seen[0].job, seen[1].job
    assert (job_a.task_name, job_a.lock, job_a.queueing_lock, job_a.priority) == (
        "with_context",
        "L",
        "Q",
        3,
    )
    assert job_a.task_kwargs == {"value": "a"}
    assert (job_b.task_name, job_b.queue, job_b.task_kwargs) == (
        "with_context_sync",
        "side",
        {"value": "b"},
    )
    # Each job gets its own copy of additional_context, as procrastinate does.
    assert seen[0].additional_context is not seen[1].additional_context


async def test_task_arguments_and_results_round_trip(app: procrastinate.App, dsn: str) -> None:
    received: list[dict[str, Any]] = []

    @app.task(name="echo")
    async def echo(**kwargs: Any) -> None:
        received.append(kwargs)

    payload = {
        "text": 'héllo "quoted" \\ back',
        "number": 12345678901234,
        "float": 1.5,
        "none": None,
        "nested": {"list": [1, "two", {"three": 3}], "empty": {}},
    }
    await echo.defer_async(**payload)
    await fastworker.run_async(app, wait=False, install_signal_handlers=False)
    assert received == [payload]


async def test_rejected_retry_matches_procrastinate() -> None:
    """A retry the database refuses (another job with the same queueing lock is waiting):
    procrastinate's worker gets the error from `procrastinate_retry_job_v2`, the job stays
    `doing`, and the worker goes on with the next job."""

    async def scenario(app: procrastinate.App, dsn: str, run: Runner) -> None:
        @app.task(name="unique", retry=1, pass_context=True)
        async def unique(context: job_context.JobContext, first: bool) -> None:
            if first:
                await context.app.configure_task(name="unique", queueing_lock="Q").defer_async(
                    first=False
                )
                raise ValueError("retry me, while my twin waits")

        await unique.configure(queueing_lock="Q").defer_async(first=True)
        await run(app, concurrency=1, wait=False)

    theirs, ours = await run_both(scenario)
    assert [(row[3], row[4]) for row in theirs.snapshot.jobs] == [
        ("doing", 0),
        ("succeeded", 1),
    ]
    assert ours.snapshot.jobs == theirs.snapshot.jobs
    assert ours.snapshot.events == theirs.snapshot.events
    assert ours.snapshot.workers == 0
    # procrastinate logs `finish_task` ("Acknowledged job completion") only once the write
    # succeeded; fastworker hands the outcome over first (the write is batched), so it logs
    # it, then reports the refusal on its own logger, with the job id and the reason.
    assert ours.actions[1] == [*theirs.actions[1], "finish_task"]
    assert ours.actions[2] == theirs.actions[2]
    (refused,) = ours.recorder.with_action("finish_task_failed")
    assert refused.levelno == logging.ERROR
    assert refused.__dict__["job_id"] == 1
    assert "queueing_lock" in refused.getMessage()
