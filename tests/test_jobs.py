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
from procrastinate import exceptions, job_context

import fastworker
from tests.conftest import fetch_all
from tests.helpers import (
    record_actions,
    snapshot,
)


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


async def test_a_rejected_retry_is_reported_with_its_job_and_reason(
    app: procrastinate.App, dsn: str
) -> None:
    """A retry the database refuses (another job with the same queueing lock is waiting):
    the job stays `doing`, as under procrastinate's worker (the differential scenario
    `retry_conflicts_with_queueing_lock` compares the rest), and fastworker reports the
    refusal on its own logger, with the job id and the reason."""

    @app.task(name="unique", retry=1, pass_context=True)
    async def unique(context: job_context.JobContext, first: bool) -> None:
        if first:
            await context.app.configure_task(name="unique", queueing_lock="Q").defer_async(
                first=False
            )
            raise ValueError("retry me, while my twin waits")

    await unique.configure(queueing_lock="Q").defer_async(first=True)
    with record_actions() as recorder:
        await fastworker.run_async(app, concurrency=1, wait=False, install_signal_handlers=False)
    assert [(row[3], row[4]) for row in snapshot(dsn).jobs] == [("doing", 0), ("succeeded", 1)]
    (refused,) = recorder.with_action("finish_task_failed")
    assert refused.levelno == logging.ERROR
    assert refused.__dict__["job_id"] == 1
    assert "queueing_lock" in refused.getMessage()
