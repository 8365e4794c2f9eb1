"""The scenarios of the differential suite (see `harness`). Each runs unchanged under
procrastinate's worker and under fastworker's; none knows which one it runs under.

Determinism: tasks and the scenario synchronise through events (`Run.signal` /
`Run.wait_signal`) and database conditions, never through sleeps; polling intervals are
short so that a scenario takes about a second.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import inspect
import json
import signal
import sys
import threading
import time
from typing import Any

from procrastinate import JobContext, RetryStrategy, exceptions, jobs, retry
from procrastinate import worker as procrastinate_worker

from tests.differential.harness import GUARD_SECONDS, Run, scenario


def _until_succeeded(run: Run, count: int) -> Any:
    """Until ``count`` jobs have succeeded (then the scenario stops its waiting worker)."""
    return lambda: run.until_db(
        "SELECT count(*) >= %s FROM procrastinate_jobs WHERE status = 'succeeded'", count
    )


def _wait_for_abort(context: JobContext) -> None:
    """What a sync task does to honour aborts: poll ``context.should_abort()`` (bounded,
    so that a missing abort fails the scenario instead of leaving a thread spinning)."""
    deadline = time.monotonic() + GUARD_SECONDS
    while not context.should_abort() and time.monotonic() < deadline:
        time.sleep(0.01)


# --- how a single job ends -------------------------------------------------------------


@scenario()
async def scenario_async_success(run: Run) -> None:
    @run.app.task(name="add")
    async def add(a: int, b: int) -> int:
        run.effects.append(("add", a, b))
        return a + b

    await add.defer_async(a=1, b=2)
    await add.defer_async(a=3, b=4)
    await run.run_worker(wait=False)


@scenario()
async def scenario_sync_success(run: Run) -> None:
    @run.app.task(name="mul")
    def mul(a: int, b: int) -> int:
        run.effects.append(("mul", a, b))
        return a * b

    await mul.defer_async(a=6, b=7)
    await run.run_worker(wait=False)


@scenario()
async def scenario_all_defaults(run: Run) -> None:
    """Only wait=False: every other option at procrastinate's default (signal handlers too)."""

    @run.app.task(name="noop")
    async def noop() -> None:
        run.effects.append("ran")

    await noop.defer_async()
    await run.run_worker(fast=False, wait=False)


@scenario()
async def scenario_json_arguments(run: Run) -> None:
    @run.app.task(name="echo")
    async def echo(**kwargs: Any) -> Any:
        run.effects.append(kwargs)
        return kwargs

    await echo.defer_async(
        text='héllo ✓ "quoted" \\ \n',
        number=1.5,
        big=2**53,
        none=None,
        flag=True,
        nested={"list": [1, "two", {"three": 3}], "empty": {}},
    )
    await echo.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_async_raises(run: Run) -> None:
    @run.app.task(name="boom")
    async def boom() -> None:
        run.effects.append("boom")
        raise ValueError("nope")

    await boom.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_sync_raises(run: Run) -> None:
    @run.app.task(name="boom")
    def boom() -> None:
        run.effects.append("boom")
        raise KeyError("nope")

    await boom.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_unknown_task(run: Run) -> None:
    @run.app.task(name="known")
    async def known() -> None:
        run.effects.append("known")

    await run.app.configure_task(name="nobody.knows.me").defer_async(x=1)
    await known.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_unknown_task_with_lock(run: Run) -> None:
    """An unknown task's job still releases its lock for the next job."""

    @run.app.task(name="known")
    async def known() -> None:
        run.effects.append("known")

    await run.app.configure_task(name="missing", lock="L").defer_async()
    await known.configure(lock="L").defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_sync_returns_awaitable(run: Run) -> None:
    async def later(value: int) -> int:
        run.effects.append(("awaited", value))
        return value * 10

    @run.app.task(name="lazy")
    def lazy(value: int) -> Any:
        run.effects.append(("called", value))
        return later(value)

    await lazy.defer_async(value=4)
    await run.run_worker(wait=False)


@scenario()
async def scenario_sync_returns_awaitable_that_raises(run: Run) -> None:
    async def later() -> None:
        raise RuntimeError("late failure")

    @run.app.task(name="lazy", retry=1)
    def lazy() -> Any:
        run.effects.append("called")
        return later()

    await lazy.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_job_aborted_raised(run: Run) -> None:
    """A task raising JobAborted on its own (no abort request): aborted, never retried."""

    @run.app.task(name="quit", retry=3)
    async def quit_() -> None:
        run.effects.append("quit")
        raise exceptions.JobAborted("by itself")

    @run.app.task(name="quit_sync")
    def quit_sync() -> None:
        raise exceptions.JobAborted()

    await quit_.defer_async()
    await quit_sync.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_job_retry_raised_without_strategy(run: Run) -> None:
    """JobRetry raised by a task without a retry strategy: the job fails (procrastinate)."""

    @run.app.task(name="wants_retry")
    async def wants_retry() -> None:
        run.effects.append("ran")
        raise exceptions.JobRetry(retry.RetryDecision(retry_in={"seconds": 0}, priority=9))

    await wants_retry.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_job_retry_raised_with_strategy(run: Run) -> None:
    """JobRetry raised by a task with a strategy: the strategy decides, not the exception."""

    @run.app.task(name="wants_retry_ctx", retry=2, pass_context=True)
    async def wants_retry_ctx(context: JobContext) -> None:
        run.effects.append(("attempt", context.job.attempts, context.job.priority))
        raise exceptions.JobRetry(retry.RetryDecision(retry_in={"seconds": 0}, priority=9))

    await wants_retry_ctx.defer_async()
    await run.run_worker(wait=False)


# --- retries ---------------------------------------------------------------------------


@scenario()
async def scenario_retry_int_exhausted(run: Run) -> None:
    @run.app.task(name="flaky", retry=2, pass_context=True)
    async def flaky(context: JobContext) -> None:
        run.effects.append(("attempt", context.job.attempts))
        raise ValueError(context.job.attempts)

    await flaky.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_retry_then_success(run: Run) -> None:
    @run.app.task(name="flaky", retry=True, pass_context=True)
    def flaky(context: JobContext) -> str:
        run.effects.append(("attempt", context.job.attempts))
        if context.job.attempts < 2:
            raise ValueError("not yet")
        return "finally"

    await flaky.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_retry_exceptions(run: Run) -> None:
    strategy = RetryStrategy(max_attempts=5, retry_exceptions=[ConnectionError])

    @run.app.task(name="matching", retry=strategy, pass_context=True)
    async def matching(context: JobContext) -> None:
        run.effects.append(("matching", context.job.attempts))
        if context.job.attempts < 2:
            raise ConnectionRefusedError("retried: a ConnectionError")
        raise KeyError("not retried")

    @run.app.task(name="other", retry=strategy, pass_context=True)
    async def other(context: JobContext) -> None:
        run.effects.append(("other", context.job.attempts))
        raise ValueError("not retried")

    await matching.defer_async()
    await other.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_retry_scheduled_in_future(run: Run) -> None:
    @run.app.task(name="later", retry=RetryStrategy(max_attempts=3, wait=3600))
    async def later() -> None:
        run.effects.append("ran")
        raise ValueError("retry in an hour")

    @run.app.task(name="linear", retry=RetryStrategy(linear_wait=60, exponential_wait=2))
    def linear() -> None:
        raise ValueError("retry later too")

    await later.defer_async()
    await linear.defer_async()
    await run.run_worker(wait=False)


class MoveStrategy(retry.BaseRetryStrategy):
    """Retries once, on another queue, with another priority and lock."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        if job.attempts >= 1:
            return None
        return retry.RetryDecision(
            retry_at=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(1),
            priority=7,
            queue="elsewhere",
            lock="moved-lock",
        )


@scenario()
async def scenario_retry_changes_queue_priority_lock(run: Run) -> None:
    """The retried job leaves the worker's queue: it stays todo, moved."""

    @run.app.task(name="mover", retry=MoveStrategy())
    async def mover() -> None:
        run.effects.append("ran")
        raise ValueError("move me")

    await mover.defer_async()
    await run.run_worker(wait=False, queues=["default"])


@scenario()
async def scenario_retry_moved_job_runs_on_new_queue(run: Run) -> None:
    @run.app.task(name="mover", retry=MoveStrategy(), pass_context=True)
    async def mover(context: JobContext) -> None:
        job = context.job
        run.effects.append((job.attempts, job.queue, job.priority, job.lock))
        if job.attempts == 0:
            raise ValueError("move me")

    await mover.defer_async()
    await run.run_worker(wait=False, queues=["default", "elsewhere"])


class KeepStrategy(retry.BaseRetryStrategy):
    """Retries once with a decision that changes nothing but the time."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        return None if job.attempts else retry.RetryDecision()


@scenario()
async def scenario_retry_decision_keeps_fields(run: Run) -> None:
    @run.app.task(name="keeper", retry=KeepStrategy(), queue="q1", priority=3, lock="k")
    def keeper() -> None:
        run.effects.append("ran")
        raise ValueError("again")

    await keeper.defer_async()
    await run.run_worker(wait=False)


class LegacyStrategy(retry.BaseRetryStrategy):
    """The deprecated ``get_schedule_in`` API."""

    def get_schedule_in(self, *, exception: BaseException, attempts: int) -> int | None:
        return 0 if attempts < 1 else None


@scenario()
async def scenario_retry_legacy_get_schedule_in(run: Run) -> None:
    @run.app.task(name="legacy", retry=LegacyStrategy(), pass_context=True)
    async def legacy(context: JobContext) -> None:
        run.effects.append(context.job.attempts)
        raise ValueError("legacy")

    await legacy.defer_async()
    await run.run_worker(wait=False)


# --- what gets claimed, in which order -------------------------------------------------


@scenario()
async def scenario_priority_order(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    for label, priority in [("low", -5), ("mid", 0), ("high", 10), ("mid2", 0), ("top", 99)]:
        await record.configure(priority=priority).defer_async(label=label)
    await run.run_worker(wait=False)


@scenario()
async def scenario_lock_serialises(run: Run) -> None:
    """Jobs sharing a lock run one after the other, in order, even with free slots."""

    active: set[str] = set()

    @run.app.task(name="locked")
    async def locked(label: str) -> None:
        active.add(label)
        run.effects.append(("start", label, len(active)))
        await asyncio.sleep(0)
        active.discard(label)

    for label in ["a", "b", "c"]:
        await locked.configure(lock="the-lock").defer_async(label=label)
    await run.run_until(
        lambda: run.until_db(
            "SELECT count(*) = 3 FROM procrastinate_jobs WHERE status = 'succeeded'"
        ),
        concurrency=3,
    )


@scenario()
async def scenario_lock_priority(run: Run) -> None:
    """A later job with a higher priority takes its lock first; other locks are free."""

    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    await record.configure(lock="L", priority=0).defer_async(label="L first deferred")
    await record.configure(lock="L", priority=5).defer_async(label="L higher priority")
    await record.configure(lock="M", priority=1).defer_async(label="M")
    await record.configure(priority=2).defer_async(label="no lock")
    await run.run_worker(wait=False)


@scenario()
async def scenario_scheduled_jobs_wait(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    await record.configure(schedule_in={"hours": 1}).defer_async(label="future")
    await record.configure(schedule_in={"hours": 2}).defer_async(label="further")
    await record.configure(
        schedule_at=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    ).defer_async(label="past")
    await record.defer_async(label="now")
    await run.run_worker(wait=False)


@scenario()
async def scenario_cancelled_and_queueing_lock(run: Run) -> None:
    @run.app.task(name="record", queueing_lock="only-one")
    async def record(label: str) -> None:
        run.effects.append(label)

    first = await record.defer_async(label="first")
    try:
        await record.defer_async(label="second")
    except exceptions.AlreadyEnqueued:
        run.effects.append("already enqueued")
    assert await run.cancel(first, abort=False)
    await record.defer_async(label="third")
    await run.run_worker(wait=False)


@scenario()
async def scenario_wait_false_with_locked_jobs(run: Run) -> None:
    """procrastinate's `wait=False` worker stops as soon as a fetch finds nothing, even when
    jobs only wait for a lock held by a running job. At concurrency 1 a fetch happens only
    once the slot is free, so every job runs, in order."""

    @run.app.task(name="locked")
    async def locked(label: str) -> None:
        run.effects.append(label)

    for label in ("a", "b", "c"):
        await locked.configure(lock="only").defer_async(label=label)
    await run.run_worker(concurrency=1, wait=False)
    assert run.effects == ["a", "b", "c"]


@scenario()
async def scenario_start_order_with_priorities_locks_and_queues(run: Run) -> None:
    """Priorities, locks and queues mixed: the jobs start in procrastinate's worker's order."""

    @run.app.task(name="record", pass_context=True)
    async def record(context: JobContext) -> None:
        run.effects.append(context.job.id)

    for i in range(24):
        await record.configure(
            priority=(i * 7) % 5 - 2, lock=("x", "y", None)[i % 3], queue=("q1", "q2")[i % 2]
        ).defer_async()
    await run.run_worker(concurrency=1, wait=False)
    assert len(run.effects) == 24


class _MoveOnce(retry.BaseRetryStrategy):
    """Retry once, elsewhere: another priority, queue and lock, and no retry_at."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        if job.attempts == 0:
            return retry.RetryDecision(priority=7, queue="elsewhere", lock="moved")
        return None


def _outcome_tasks(run: Run) -> None:
    """Tasks that end every way a job can end."""
    app = run.app

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

    @app.task(name="flaky", retry=RetryStrategy(max_attempts=3), pass_context=True)
    async def flaky(context: JobContext) -> str:
        if context.job.attempts == 0:
            raise ConnectionError("first attempt fails")
        return "second attempt works"

    @app.task(name="picky", retry=RetryStrategy(max_attempts=5, retry_exceptions=[KeyError]))
    async def picky() -> None:
        raise ValueError("not a KeyError: no retry")

    @app.task(name="retry_later", retry=RetryStrategy(max_attempts=3, wait=3600))
    async def retry_later() -> None:
        raise ValueError("retried in an hour")

    @app.task(name="moving", retry=_MoveOnce(), pass_context=True)
    async def moving(context: JobContext) -> None:
        if context.job.attempts == 0:
            raise ValueError("move me")

    @app.task(name="aborts_itself")
    async def aborts_itself() -> None:
        raise exceptions.JobAborted()

    @app.task(name="scheduled_later")
    async def scheduled_later() -> None:
        raise AssertionError("scheduled in an hour: must not run")


def _every_outcome(delete_jobs: str) -> Any:
    async def every_outcome(run: Run) -> None:
        """Success, failure, retries (immediate, later, elsewhere, exhausted, not
        applicable), a self-aborting task, an unknown task, a job scheduled later."""
        _outcome_tasks(run)
        tasks = run.app.tasks
        await tasks["ok"].defer_async(value=1)
        await tasks["ok_sync"].defer_async(value=2)
        for name in ("boom", "boom_sync", "retry_twice", "retry_twice_sync", "flaky"):
            await tasks[name].defer_async()
        await tasks["picky"].defer_async()
        await tasks["retry_later"].defer_async()
        await tasks["moving"].configure(lock="original").defer_async()
        await tasks["aborts_itself"].defer_async()
        await tasks["scheduled_later"].configure(schedule_in={"hours": 1}).defer_async()
        await run.app.configure_task(name="no.such.task").defer_async(x=1)
        await tasks["ok"].configure(priority=5, queue="other").defer_async(value=3)
        await run.run_worker(concurrency=1, wait=False, delete_jobs=delete_jobs)
        statuses = [
            row[0] for row in await run.query("SELECT status::text FROM procrastinate_jobs")
        ]
        # The scenario covers what it means to.
        if delete_jobs == "never":
            assert sorted(statuses) == sorted(
                ["succeeded"] * 5 + ["failed"] * 6 + ["aborted"] + ["todo"] * 2
            ), statuses
        elif delete_jobs == "successful":
            assert "succeeded" not in statuses and statuses.count("failed") == 6, statuses
        else:
            assert statuses == ["todo", "todo"], statuses

    every_outcome.__name__ = f"scenario_every_outcome_delete_jobs_{delete_jobs}"
    return every_outcome


for _delete_jobs in ("never", "successful", "always"):
    scenario()(_every_outcome(_delete_jobs))


@scenario()
async def scenario_every_outcome_at_concurrency_4(run: Run) -> None:
    """Independent jobs at concurrency 4 (retries are left out: above concurrency 1,
    whether procrastinate's `wait=False` worker still picks up an immediate retry depends
    on timing)."""
    # Whether a job still runs when the drain ends (logged "Waiting for job to finish")
    # depends on timing, under either worker.
    run.ignored_worker_actions = {"ending_job"}
    _outcome_tasks(run)
    tasks = run.app.tasks
    for value in range(12):
        await tasks["ok"].defer_async(value=value)
        await tasks["ok_sync"].defer_async(value=value)
        if value % 3 == 0:
            await tasks["boom"].defer_async()
            await tasks["boom_sync"].defer_async()
            await run.app.configure_task(name="no.such.task").defer_async()
    await run.run_worker(concurrency=4, wait=False)


# --- WorkerOptions ---------------------------------------------------------------------


@scenario()
async def scenario_queues_filter(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    for queue in ["a", "b", "c", "a"]:
        await record.configure(queue=queue).defer_async(label=queue)
    await run.run_worker(wait=False, queues=["a", "c"])


@scenario()
async def scenario_queues_empty_list(run: Run) -> None:
    """``queues=[]``: procrastinate listens to no channel and fetches with an empty filter."""

    @run.app.task(name="record")
    async def record() -> None:
        run.effects.append("ran")

    await record.defer_async()
    await run.run_worker(wait=False, queues=[])


@scenario()
async def scenario_worker_name(run: Run) -> None:
    @run.app.task(name="who", pass_context=True)
    async def who(context: JobContext) -> None:
        run.effects.append((context.worker_name, context.queues_display))

    await who.defer_async()
    await run.run_worker(wait=False, name="my-worker", queues=["default"])


@scenario()
async def scenario_worker_name_none(run: Run) -> None:
    @run.app.task(name="who", pass_context=True)
    def who(context: JobContext) -> None:
        run.effects.append((context.worker_name, context.worker_queues))

    await who.defer_async()
    await run.run_worker(wait=False, name=None)


@scenario()
async def scenario_concurrency_all_together(run: Run) -> None:
    """Three jobs that can only finish when all three run at once (concurrency=3)."""
    barrier = asyncio.Barrier(3)

    @run.app.task(name="meet")
    async def meet(n: int) -> None:
        await barrier.wait()
        run.effects.append(n)

    run.unordered_effects = True
    for n in range(3):
        await meet.defer_async(n=n)
    await run.run_until(_until_succeeded(run, 3), concurrency=3)


@scenario()
async def scenario_concurrency_limit(run: Run) -> None:
    """concurrency=2: never more than two jobs running, nor in `doing`."""
    running: set[int] = set()
    barrier = asyncio.Barrier(2)

    @run.app.task(name="pair")
    async def pair(n: int) -> None:
        running.add(n)
        await barrier.wait()
        doing = await run.query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")
        run.effects.append(("pair", len(running), doing[0][0]))
        await barrier.wait()
        running.discard(n)

    for n in range(4):
        await pair.defer_async(n=n)
    await run.run_until(_until_succeeded(run, 4), concurrency=2)


@scenario()
async def scenario_wait_true_gets_notified(run: Run) -> None:
    """wait=True, a long polling interval: a job deferred later arrives by notification."""

    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)
        run.signal(label)

    async def scenario_steps() -> None:
        await run.until_listening()
        job_id = await record.defer_async(label="late")
        await run.until_status(job_id, "succeeded")

    await run.run_until(scenario_steps, fetch_job_polling_interval=600)


@scenario()
async def scenario_listen_notify_false_polls(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)
        run.signal(label)

    async def scenario_steps() -> None:
        job_id = await record.defer_async(label="polled")
        await run.until_status(job_id, "succeeded")

    await run.run_until(scenario_steps, listen_notify=False, fetch_job_polling_interval=0.05)


@scenario()
async def scenario_scheduled_job_runs_when_due(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)
        run.signal(label)

    job_id = await record.configure(schedule_in={"seconds": 0.3}).defer_async(label="due")
    await run.run_until(
        lambda: run.until_status(job_id, "succeeded"), fetch_job_polling_interval=0.05
    )


@scenario()
async def scenario_delete_jobs_never(run: Run) -> None:
    await _delete_jobs(run, "never")


@scenario()
async def scenario_delete_jobs_successful(run: Run) -> None:
    await _delete_jobs(run, "successful")


@scenario()
async def scenario_delete_jobs_always(run: Run) -> None:
    await _delete_jobs(run, "always")


@scenario()
async def scenario_delete_jobs_enum_successful(run: Run) -> None:
    await _delete_jobs(run, jobs.DeleteJobCondition.SUCCESSFUL)


async def _delete_jobs(run: Run, condition: str | jobs.DeleteJobCondition) -> None:
    @run.app.task(name="ok")
    async def ok() -> None:
        run.effects.append("ok")

    @run.app.task(name="ko")
    def ko() -> None:
        run.effects.append("ko")
        raise ValueError("ko")

    @run.app.task(name="ko_retry", retry=1)
    def ko_retry() -> None:
        run.effects.append("ko_retry")
        raise ValueError("ko")

    @run.app.task(name="aborted")
    async def aborted() -> None:
        raise exceptions.JobAborted()

    await ok.defer_async()
    await ko.defer_async()
    await ko_retry.defer_async()
    await aborted.defer_async()
    await run.run_worker(wait=False, delete_jobs=condition)


@scenario()
async def scenario_additional_context(run: Run) -> None:
    """Each job gets its own copy of additional_context."""

    @run.app.task(name="ctx", pass_context=True)
    async def ctx(context: JobContext) -> None:
        run.effects.append(dict(context.additional_context))
        context.additional_context["touched"] = context.job.id

    @run.app.task(name="ctx_sync", pass_context=True)
    def ctx_sync(context: JobContext) -> None:
        run.effects.append(dict(context.additional_context))
        context.additional_context["touched"] = context.job.id

    shared = {"db": "primary", "nested": {"k": 1}}
    await ctx.defer_async()
    await ctx_sync.defer_async()
    await ctx.defer_async()
    await run.run_worker(wait=False, additional_context=shared)
    run.effects.append(shared)


@scenario()
async def scenario_context_fields(run: Run) -> None:
    @run.app.task(name="ctx", pass_context=True, queue="q", priority=4, lock="lk")
    async def ctx(context: JobContext, value: int) -> None:
        job = context.job
        run.effects.append(
            {
                "worker_name": context.worker_name,
                "worker_queues": list(context.worker_queues or []),
                "queues_display": context.queues_display,
                "additional_context": context.additional_context,
                "start_is_recent": 0 <= time.time() - context.start_timestamp < 60,
                "abort_reason": context.abort_reason(),
                "should_abort": context.should_abort(),
                "task": context.task.name,
                "job": (
                    job.task_name,
                    job.task_kwargs,
                    job.queue,
                    job.priority,
                    job.lock,
                    job.queueing_lock,
                    job.attempts,
                    job.status,
                    job.scheduled_at is None,
                    job.worker_id is not None,
                    job.call_string.split("[")[0],
                ),
            }
        )

    await ctx.defer_async(value=5)
    await run.run_worker(
        wait=False, name="ctx-worker", queues=["q"], additional_context={"extra": [1, 2]}
    )


@scenario()
async def scenario_context_scheduled_job(run: Run) -> None:
    @run.app.task(name="ctx", pass_context=True)
    def ctx(context: JobContext) -> None:
        scheduled_at = context.job.scheduled_at
        assert scheduled_at is not None
        run.effects.append((scheduled_at.tzinfo is not None, scheduled_at.year))

    await ctx.configure(
        schedule_at=datetime.datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=datetime.timezone.utc)
    ).defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_install_signal_handlers_sigterm(run: Run) -> None:
    """A SIGTERM while a job runs: the job finishes, nothing more is claimed."""

    @run.app.task(name="first")
    async def first() -> None:
        signal.raise_signal(signal.SIGTERM)
        await run.wait_log("ending_job")  # the worker has stopped and waits for this job
        run.effects.append("first done")

    @run.app.task(name="second")
    async def second() -> None:
        run.effects.append("second ran")

    before = signal.getsignal(signal.SIGTERM)
    await first.defer_async()
    await second.defer_async()
    await run.run_worker(wait=True, install_signal_handlers=True)
    run.effects.append(("handler restored", signal.getsignal(signal.SIGTERM) == before))


@scenario()
async def scenario_install_signal_handlers_false(run: Run) -> None:
    @run.app.task(name="probe")
    async def probe() -> None:
        loop = asyncio.get_running_loop()
        handlers = getattr(loop, "_signal_handlers", {})
        run.effects.append((signal.SIGINT in handlers, signal.SIGTERM in handlers))

    await probe.defer_async()
    await run.run_worker(wait=False, install_signal_handlers=False)


@scenario()
async def scenario_install_signal_handlers_true(run: Run) -> None:
    @run.app.task(name="probe")
    async def probe() -> None:
        loop = asyncio.get_running_loop()
        handlers = getattr(loop, "_signal_handlers", {})
        run.effects.append((signal.SIGINT in handlers, signal.SIGTERM in handlers))

    await probe.defer_async()
    await run.run_worker(wait=False, install_signal_handlers=True)
    loop = asyncio.get_running_loop()
    run.effects.append(signal.SIGINT in getattr(loop, "_signal_handlers", {}))


@scenario()
async def scenario_update_heartbeat_interval(run: Run) -> None:
    """With a short heartbeat interval, the worker's heartbeat moves while a job runs."""

    @run.app.task(name="watch", pass_context=True)
    async def watch(context: JobContext) -> None:
        worker_id = context.job.worker_id
        query = "SELECT last_heartbeat FROM procrastinate_workers WHERE id = %s"
        first = (await run.query(query, worker_id))[0][0]
        await run.until_db(
            "SELECT last_heartbeat > %s FROM procrastinate_workers WHERE id = %s",
            first,
            worker_id,
        )
        run.effects.append("heartbeat moved")

    await watch.defer_async()
    await run.run_worker(wait=False, update_heartbeat_interval=0.05)


async def _stalled_worker(run: Run) -> int:
    """A worker row with a heartbeat an hour old, holding a job in `doing`."""
    worker_id = (await run.query("SELECT procrastinate_register_worker_v1()"))[0][0]
    await run.query(
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
        " WHERE id = %s RETURNING id",
        worker_id,
    )
    return int(worker_id)


@scenario()
async def scenario_stalled_worker_pruned(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    stalled = await _stalled_worker(run)
    held = await record.defer_async(label="held by the stalled worker")
    await run.query(
        "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s WHERE id = %s RETURNING id",
        stalled,
        held,
    )
    await record.defer_async(label="fresh")
    # procrastinate leaves the held job `doing`; fastworker puts it back to run unless
    # recovery is off (a known difference, see the README).
    fastworker_only: dict[str, Any] = (
        {} if run.impl == "procrastinate" else {"recover_stalled_jobs": False}
    )
    await run.run_worker(wait=False, stalled_worker_timeout=60, **fastworker_only)


@scenario()
async def scenario_stalled_worker_kept(run: Run) -> None:
    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    await _stalled_worker(run)
    await record.defer_async(label="fresh")
    await run.run_worker(wait=False, stalled_worker_timeout=7200)


@scenario()
async def scenario_graceful_timeout_aborts_async(run: Run) -> None:
    @run.app.task(name="forever")
    async def forever() -> None:
        run.signal("started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            run.effects.append("cancelled")
            raise

    await forever.defer_async()
    await run.run_until(lambda: run.wait_signal("started"), shutdown_graceful_timeout=0.1)


@scenario()
async def scenario_graceful_timeout_aborts_async_with_retry(run: Run) -> None:
    """A job aborted by the shutdown may be retried: it goes back to todo."""

    @run.app.task(name="forever", retry=2)
    async def forever() -> None:
        run.signal("started")
        await asyncio.Event().wait()

    await forever.defer_async()
    await run.run_until(lambda: run.wait_signal("started"), shutdown_graceful_timeout=0.1)


@scenario()
async def scenario_graceful_timeout_sync_should_abort(run: Run) -> None:
    @run.app.task(name="polite", pass_context=True, retry=1)
    def polite(context: JobContext) -> None:
        run.signal("started")
        _wait_for_abort(context)
        reason = context.abort_reason()
        run.effects.append(("abort reason", reason.value if reason else None))
        raise exceptions.JobAborted()

    await polite.defer_async()
    await run.run_until(lambda: run.wait_signal("started"), shutdown_graceful_timeout=0.1)


@scenario()
async def scenario_graceful_no_timeout_waits(run: Run) -> None:
    """Without a graceful timeout, stopping waits for the running job to finish."""

    @run.app.task(name="slow")
    async def slow() -> str:
        run.signal("started")
        await run.wait_signal("release")
        run.effects.append("finished")
        return "done"

    @run.app.task(name="never")
    async def never() -> None:
        run.effects.append("never should run")

    await slow.defer_async()
    await never.configure(priority=-1).defer_async()
    worker = run.worker(wait=True)
    task = asyncio.create_task(worker.run())
    await run.wait_signal("started")
    worker.stop()
    await run.wait_log("ending_job")
    run.signal("release")
    async with asyncio.timeout(20):
        await task


# --- middleware ------------------------------------------------------------------------


def _sync_mw(run: Run, label: str) -> Any:
    def middleware(call_next: Any, context: JobContext, worker: Any) -> Any:
        run.effects.append(("enter", label, context.job.task_name))
        result = call_next()
        run.effects.append(
            ("exit", label, "<awaitable>" if inspect.isawaitable(result) else result)
        )
        return result

    middleware.__name__ = f"sync_{label}"
    return middleware


def _async_mw(run: Run, label: str) -> Any:
    async def middleware(call_next: Any, context: JobContext, worker: Any) -> Any:
        run.effects.append(("enter", label, context.job.task_name))
        result = await call_next()
        run.effects.append(("exit", label, result))
        return result

    middleware.__name__ = f"async_{label}"
    return middleware


@scenario()
async def scenario_task_middleware_order(run: Run) -> None:
    @run.app.task(name="a_task", task_middleware=[_async_mw(run, "task-level-async")])
    async def a_task() -> str:
        run.effects.append("a_task body")
        return "a"

    @run.app.task(name="s_task", task_middleware=[_sync_mw(run, "task-level-sync")])
    def s_task() -> str:
        run.effects.append("s_task body")
        return "s"

    await a_task.defer_async()
    await s_task.defer_async()
    await run.run_worker(
        wait=False,
        task_middleware=[
            _sync_mw(run, "w1"),
            _async_mw(run, "w2"),
            _sync_mw(run, "w3"),
            _async_mw(run, "w4"),
        ],
    )


@scenario()
async def scenario_worker_middleware_order(run: Run) -> None:
    @run.app.task(name="a_task")
    async def a_task() -> str:
        run.effects.append("a_task body")
        return "a"

    @run.app.task(name="s_task")
    def s_task() -> str:
        run.effects.append("s_task body")
        return "s"

    await a_task.defer_async()
    await s_task.defer_async()
    await run.run_worker(
        wait=False,
        worker_middleware=[_async_mw(run, "outer"), _async_mw(run, "inner")],
        task_middleware=[_sync_mw(run, "task-sync"), _async_mw(run, "task-async")],
    )


@scenario()
async def scenario_middleware_sees_worker(run: Run) -> None:
    async def inspect_worker(call_next: Any, context: JobContext, worker: Any) -> Any:
        run.effects.append(
            (
                isinstance(worker, procrastinate_worker.Worker),
                worker.worker_name,
                worker.concurrency,
                worker.worker_id == context.job.worker_id,
            )
        )
        return await call_next()

    @run.app.task(name="a_task")
    async def a_task() -> None:
        pass

    await a_task.defer_async()
    await run.run_until(
        _until_succeeded(run, 1), name="seen", concurrency=2, worker_middleware=[inspect_worker]
    )


@scenario()
async def scenario_middleware_raises_and_replaces(run: Run) -> None:
    async def failing(call_next: Any, context: JobContext, worker: Any) -> Any:
        if context.job.task_kwargs.get("fail"):
            raise RuntimeError("middleware failed")
        return "replaced: " + str(await call_next())

    @run.app.task(name="a_task", retry=1)
    async def a_task(fail: bool) -> str:
        run.effects.append(("body", fail))
        return "body"

    await a_task.defer_async(fail=False)
    await a_task.defer_async(fail=True)
    await run.run_worker(wait=False, worker_middleware=[failing])


@scenario()
async def scenario_middleware_stops_worker_from_thread(run: Run) -> None:
    """A sync task middleware calls worker.stop() from the task's thread."""

    def stopper(call_next: Any, context: JobContext, worker: Any) -> Any:
        result = call_next()
        worker.stop()
        # The job is still running while the worker stops: it waits for it.
        run.wait_signal_sync("log:ending_job")
        return result

    @run.app.task(name="s_task")
    def s_task(n: int) -> int:
        run.effects.append(n)
        return n

    await s_task.defer_async(n=1)
    await s_task.defer_async(n=2)
    await run.run_worker(wait=True, task_middleware=[stopper])


@scenario()
async def scenario_invalid_middleware(run: Run) -> None:
    def sync_worker_mw(call_next: Any, context: JobContext, worker: Any) -> Any:
        return call_next()

    for options in (
        {"worker_middleware": [sync_worker_mw]},
        {"task_middleware": ["not callable"]},
        {"worker_middleware": [42]},
    ):
        try:
            run.worker(**options)
        except Exception as exc:
            run.effects.append(type(exc).__name__)


# --- App.worker_defaults and the app's entry points --------------------------------------


@scenario(worker_defaults={"queues": ["dq"], "name": "from-defaults", "wait": False})
async def scenario_worker_defaults(run: Run) -> None:
    @run.app.task(name="who", pass_context=True)
    async def who(context: JobContext) -> None:
        run.effects.append((context.worker_name, list(context.worker_queues or [])))

    await who.configure(queue="dq").defer_async()
    await who.configure(queue="other").defer_async()
    with run.patched_worker_class():
        await run.app.run_worker_async(install_signal_handlers=False)


@scenario(worker_defaults={"queues": ["dq"], "name": "from-defaults", "concurrency": 3})
async def scenario_worker_defaults_overridden(run: Run) -> None:
    @run.app.task(name="who", pass_context=True)
    async def who(context: JobContext) -> None:
        run.effects.append((context.worker_name, list(context.worker_queues or [])))

    await who.configure(queue="dq").defer_async()
    await who.configure(queue="other").defer_async()
    await run.run_app_worker(
        queues=["other"], concurrency=1, wait=False, install_signal_handlers=False
    )


# --- aborts ----------------------------------------------------------------------------


async def _abort_async(run: Run, **options: Any) -> None:
    @run.app.task(name="forever")
    async def forever() -> None:
        run.signal("started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            run.effects.append("cancelled")
            raise

    @run.app.task(name="bystander")
    async def bystander() -> None:
        run.signal("bystander started")
        await run.wait_signal("bystander release")
        run.effects.append("bystander done")

    job_id = await forever.defer_async()
    await bystander.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.wait_signal("bystander started")
        if options.get("listen_notify", True):
            await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "aborted", "failed", "todo")
        run.signal("bystander release")
        await run.until_db("SELECT count(*) = 0 FROM procrastinate_jobs WHERE status = 'doing'")

    await run.run_until(steps, concurrency=2, **options)


@scenario()
async def scenario_abort_async_by_notification(run: Run) -> None:
    await _abort_async(run, abort_job_polling_interval=600)


@scenario()
async def scenario_abort_async_by_polling(run: Run) -> None:
    # (0.2 s rather than 0.05: see scenario_zero_polling_intervals for the race it avoids)
    await _abort_async(run, listen_notify=False, abort_job_polling_interval=0.2)


async def _abort_sync(run: Run, **options: Any) -> None:
    @run.app.task(name="polite", pass_context=True)
    def polite(context: JobContext) -> None:
        run.signal("started")
        _wait_for_abort(context)
        reason = context.abort_reason()
        run.effects.append(("abort reason", reason.value if reason else None))
        raise exceptions.JobAborted()

    job_id = await polite.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        if options.get("listen_notify", True):
            await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "aborted")

    await run.run_until(steps, **options)


@scenario()
async def scenario_abort_sync_by_notification(run: Run) -> None:
    await _abort_sync(run, abort_job_polling_interval=600)


@scenario()
async def scenario_abort_sync_by_polling(run: Run) -> None:
    await _abort_sync(run, listen_notify=False, abort_job_polling_interval=0.2)


@scenario()
async def scenario_abort_sync_ignored(run: Run) -> None:
    """A sync job that sees the abort request and finishes anyway: succeeded."""

    @run.app.task(name="stubborn", pass_context=True)
    def stubborn(context: JobContext) -> str:
        run.signal("started")
        _wait_for_abort(context)
        run.effects.append("saw the request, finishing anyway")
        return "finished"

    job_id = await stubborn.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "succeeded")

    await run.run_until(steps)


@scenario()
async def scenario_abort_async_with_retry_strategy(run: Run) -> None:
    """A user abort of an async job with a retry strategy: the CancelledError is offered to
    the strategy, and the retry of a job with abort_requested ends it `failed`."""

    @run.app.task(name="forever", retry=3)
    async def forever() -> None:
        run.signal("started")
        await asyncio.Event().wait()

    job_id = await forever.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "failed", "aborted", "todo")

    await run.run_until(steps)


@scenario()
async def scenario_abort_sync_self_requested(run: Run) -> None:
    """A sync job requests its own abort through the sync job manager API."""

    @run.app.task(name="self_abort", pass_context=True)
    def self_abort(context: JobContext) -> None:
        assert context.job.id is not None
        run.effects.append(context.app.job_manager.cancel_job_by_id(context.job.id, abort=True))
        _wait_for_abort(context)
        raise exceptions.JobAborted()

    job_id = await self_abort.defer_async()
    await run.run_until(lambda: run.until_status(job_id, "aborted"))


@scenario()
async def scenario_abort_todo_job_cancels_it(run: Run) -> None:
    @run.app.task(name="record")
    async def record() -> None:
        run.effects.append("ran")

    job_id = await record.defer_async()
    assert await run.cancel(job_id, abort=True)
    await record.defer_async()
    await run.run_worker(wait=False)


# --- periodic tasks --------------------------------------------------------------------


@scenario(periodic_defaults={"max_delay": 2 * 86400})
async def scenario_periodic_deferred_while_running(run: Run) -> None:
    @run.app.periodic(cron="0 0 * * *")
    @run.app.task(name="nightly", pass_context=True)
    async def nightly(context: JobContext, timestamp: int) -> None:
        run.effects.append(("nightly", timestamp % 86400, context.job.task_kwargs.keys()))
        run.signal("ran")

    await run.run_until(_until_succeeded(run, 1))


@scenario(periodic_defaults={"max_delay": 2 * 86400})
async def scenario_periodic_with_id_kwargs_and_lock(run: Run) -> None:
    @run.app.periodic(
        cron="0 0 * * *",
        periodic_id="with-kwargs",
        task_kwargs={"who": "cron"},
        queueing_lock="nightly-lock",
        priority=3,
    )
    @run.app.task(name="nightly", queue="cron")
    def nightly(timestamp: int, who: str) -> None:
        run.effects.append(("nightly", who))
        run.signal("ran")

    await run.run_until(_until_succeeded(run, 1))


@scenario(periodic_defaults={"max_delay": 60})
async def scenario_periodic_too_old_is_skipped(run: Run) -> None:
    @run.app.periodic(cron="0 0 1 1 *")
    @run.app.task(name="yearly")
    async def yearly(timestamp: int) -> None:
        run.effects.append("should not run")

    @run.app.task(name="record")
    async def record() -> None:
        run.signal("ran")

    async def steps() -> None:
        job_id = await record.defer_async()
        await run.until_status(job_id, "succeeded")

    await run.run_until(steps)


# --- edges ----------------------------------------------------------------------------


@scenario()
async def scenario_task_alias(run: Run) -> None:
    """A job deferred under a task's old name (an alias) runs the task."""

    @run.app.task(name="new_name", aliases=["old_name"])
    async def renamed(x: int) -> int:
        run.effects.append(("renamed", x))
        return x

    await run.app.configure_task(name="old_name").defer_async(x=1)
    await renamed.defer_async(x=2)
    await run.run_worker(wait=False)


@scenario()
async def scenario_many_jobs_in_batches(run: Run) -> None:
    """Enough jobs for several claims per round trip; every job ends once."""

    @run.app.task(name="square")
    async def square(n: int) -> int:
        run.effects.append(n)
        return n * n

    @run.app.task(name="fail_some", retry=1)
    def fail_some(n: int) -> None:
        run.effects.append(-n)
        if n % 3 == 0:
            raise ValueError(n)

    run.unordered_effects = True
    await square.batch_defer_async(*({"n": n} for n in range(40)))
    await fail_some.batch_defer_async(*({"n": n} for n in range(1, 16)))
    await run.run_until(
        lambda: run.until_db(
            "SELECT count(*) FILTER (WHERE status = 'succeeded') = 50"
            " AND count(*) FILTER (WHERE status = 'failed') = 5 FROM procrastinate_jobs"
        ),
        concurrency=5,
    )


@scenario()
async def scenario_sync_task_system_exit(run: Run) -> None:
    """A BaseException that is not an Exception, raised by a sync task: the job fails."""

    @run.app.task(name="exit_now")
    def exit_now() -> None:
        run.effects.append("exiting")
        raise SystemExit(3)

    @run.app.task(name="after")
    async def after() -> None:
        run.effects.append("after")

    await exit_now.defer_async()
    await after.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_retry_conflicts_with_queueing_lock(run: Run) -> None:
    """The retry of a job clashes with a todo job holding its queueing lock: the retry
    write fails and the job stays `doing` (procrastinate's worker lets the error through)."""
    # Known difference: procrastinate's worker logs "Acknowledged job completion"
    # (finish_task) only once its write succeeded; fastworker logs it when it hands the
    # outcome to the core, and reports the refused write as fastworker.core's
    # finish_task_failed error. Everything else is compared.
    run.ignored_job_actions = {"finish_task"}

    @run.app.task(name="clash", retry=1, queueing_lock="q-lock")
    async def clash(n: int) -> None:
        run.effects.append(n)
        if n == 1:
            await clash.defer_async(n=2)
            raise ValueError("retry me")

    @run.app.task(name="after")
    async def after() -> None:
        run.effects.append("after")

    first = await clash.defer_async(n=1)
    await after.configure(priority=-1).defer_async()
    await run.run_until(_until_succeeded(run, 2), concurrency=1)
    run.effects.append(
        await run.query("SELECT status::text FROM procrastinate_jobs WHERE id = %s", first)
    )


@scenario()
async def scenario_job_row_deleted_while_running(run: Run) -> None:
    """The job's row disappears while it runs: the finish write finds nothing."""
    # Known difference: procrastinate's worker logs "Acknowledged job completion"
    # (finish_task) only once its write succeeded; fastworker logs it when it hands the
    # outcome to the core, and reports the refused write as fastworker.core's
    # finish_task_failed error. Everything else is compared.
    run.ignored_job_actions = {"finish_task"}

    @run.app.task(name="vanish", pass_context=True)
    async def vanish(context: JobContext) -> None:
        await run.query("DELETE FROM procrastinate_jobs WHERE id = %s RETURNING id", context.job.id)
        run.effects.append("deleted myself")

    @run.app.task(name="after")
    async def after() -> None:
        run.effects.append("after")

    await vanish.defer_async()
    await after.configure(priority=-1).defer_async()
    await run.run_until(_until_succeeded(run, 1))


@scenario()
async def scenario_cancel_run_task(run: Run) -> None:
    """Cancelling the task running worker.run(): a graceful stop, then CancelledError."""

    @run.app.task(name="slow")
    async def slow() -> str:
        run.signal("started")
        await run.wait_signal("release")
        run.effects.append("finished")
        return "done"

    await slow.defer_async()
    worker = run.worker(wait=True)
    task = asyncio.create_task(worker.run())
    await run.wait_signal("started")
    task.cancel()
    await run.wait_log("ending_job")
    run.signal("release")
    try:
        async with asyncio.timeout(20):
            await task
    except asyncio.CancelledError:
        run.effects.append("run() raised CancelledError")


def _blocking_tasks(run: Run) -> threading.Event:
    """One task of each blocking kind (async / sync, with and without retries), plus a quick
    one. Async ones wait for the "release" signal; sync ones for the returned event, or
    until the worker asks them to abort (the reason goes to the effects)."""
    release_threads = threading.Event()

    async def block(name: str) -> None:
        run.signal(f"started {name}")
        await run.wait_signal("release")
        run.effects.append(f"{name} released")

    def block_sync(context: JobContext, name: str) -> None:
        run.signal(f"started {name}")
        deadline = time.monotonic() + GUARD_SECONDS
        while time.monotonic() < deadline:
            if release_threads.is_set():
                run.effects.append(f"{name} released")
                return
            if context.should_abort():
                run.effects.append((name, str(context.abort_reason())))
                raise exceptions.JobAborted()
            time.sleep(0.005)
        raise AssertionError(f"{name}: neither released nor asked to abort")

    @run.app.task(name="blocked")
    async def blocked() -> None:
        await block("blocked")

    @run.app.task(name="blocked_retry", retry=RetryStrategy(max_attempts=3))
    async def blocked_retry() -> None:
        await block("blocked_retry")

    @run.app.task(name="blocked_sync", pass_context=True)
    def blocked_sync(context: JobContext) -> None:
        block_sync(context, "blocked_sync")

    @run.app.task(name="blocked_sync_retry", pass_context=True, retry=3)
    def blocked_sync_retry(context: JobContext) -> None:
        block_sync(context, "blocked_sync_retry")

    @run.app.task(name="quick")
    async def quick() -> None:
        run.effects.append("quick ran")

    return release_threads


async def _start_blocking_jobs(run: Run, **options: Any) -> asyncio.Task[None]:
    """Defer one job of each blocking kind and a quick one (it must not start: the four
    fill the slots), run a worker, and return its task once the four have started."""
    for name in ("blocked", "blocked_retry", "blocked_sync", "blocked_sync_retry", "quick"):
        await run.app.tasks[name].defer_async()
    task = asyncio.create_task(run.worker(wait=True, concurrency=4, **options).run())
    for name in ("blocked", "blocked_retry", "blocked_sync", "blocked_sync_retry"):
        await run.wait_signal(f"started {name}")
    return task


@scenario()
async def scenario_cancel_with_every_kind_of_job_running(run: Run) -> None:
    """Cancelled while async and sync jobs run: nothing more is claimed, the running jobs
    finish and succeed, their ends are written, then run() raises CancelledError."""
    release_threads = _blocking_tasks(run)
    task = await _start_blocking_jobs(run)
    task.cancel()
    await run.wait_log("ending_job")
    doing = await run.query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")
    run.effects.append(("doing while stopping", doing))
    run.signal("release")
    release_threads.set()
    try:
        async with asyncio.timeout(GUARD_SECONDS):
            await task
    except asyncio.CancelledError:
        run.effects.append("run() raised CancelledError")
    run.unordered_effects = True
    statuses = await run.query("SELECT task_name, status::text FROM procrastinate_jobs ORDER BY id")
    assert statuses == [
        ("blocked", "succeeded"),
        ("blocked_retry", "succeeded"),
        ("blocked_sync", "succeeded"),
        ("blocked_sync_retry", "succeeded"),
        ("quick", "todo"),
    ], statuses


@scenario()
async def scenario_graceful_timeout_with_every_kind_of_job_running(run: Run) -> None:
    """Cancelled, and the jobs outlive `shutdown_graceful_timeout`: async jobs are cancelled,
    sync jobs see `should_abort()` (reason: shutdown); jobs without retry end `aborted`,
    jobs with a retry strategy go back to `todo` (procrastinate retries shutdown aborts)."""
    release_threads = _blocking_tasks(run)
    task = await _start_blocking_jobs(run, shutdown_graceful_timeout=0.1)
    task.cancel()
    try:
        async with asyncio.timeout(GUARD_SECONDS):
            await task
    except asyncio.CancelledError:
        run.effects.append("run() raised CancelledError")
    finally:
        run.signal("release")
        release_threads.set()
    run.unordered_effects = True
    statuses = await run.query(
        "SELECT task_name, status::text, attempts FROM procrastinate_jobs ORDER BY id"
    )
    assert statuses == [
        ("blocked", "aborted", 1),
        ("blocked_retry", "todo", 1),
        ("blocked_sync", "aborted", 1),
        ("blocked_sync_retry", "todo", 1),
        ("quick", "todo", 0),
    ], statuses
    reasons = sorted(effect for effect in run.effects if isinstance(effect, tuple))
    assert reasons == [
        ("blocked_sync", "AbortReason.SHUTDOWN"),
        ("blocked_sync_retry", "AbortReason.SHUTDOWN"),
    ], reasons


@scenario()
async def scenario_user_aborts_every_kind_of_job_running(run: Run) -> None:
    """`cancel_job_by_id(abort=True)` on running jobs of each kind: async jobs are cancelled,
    sync jobs see `should_abort()` (reason: user request). An aborted job is not retried,
    except that an async job with a retry strategy goes to `procrastinate_retry_job_v2`,
    which ends it `failed` because the abort was requested. The freed slots take the next
    job."""
    release_threads = _blocking_tasks(run)
    task = await _start_blocking_jobs(run, abort_job_polling_interval=0.05)
    try:
        for job_id in (1, 2, 3, 4):
            assert await run.cancel(job_id, abort=True)
        async with asyncio.timeout(GUARD_SECONDS):
            await run.until_db("SELECT status = 'succeeded' FROM procrastinate_jobs WHERE id = 5")
            # Every aborted job has ended (its outcome is written once its run is over).
            await run.until_db("SELECT count(*) = 0 FROM procrastinate_jobs WHERE status = 'doing'")
    finally:
        task.cancel()
        run.signal("release")
        release_threads.set()
    try:
        async with asyncio.timeout(GUARD_SECONDS):
            await task
    except asyncio.CancelledError:
        run.effects.append("run() raised CancelledError")
    run.unordered_effects = True
    statuses = await run.query(
        "SELECT task_name, status::text, attempts FROM procrastinate_jobs ORDER BY id"
    )
    assert statuses == [
        ("blocked", "aborted", 1),
        ("blocked_retry", "failed", 0),
        ("blocked_sync", "aborted", 1),
        ("blocked_sync_retry", "aborted", 1),
        ("quick", "succeeded", 1),
    ], statuses


@scenario()
async def scenario_run_twice(run: Run) -> None:
    """The same Worker object runs twice; a stop() between runs does not stick."""

    @run.app.task(name="record")
    async def record(n: int) -> None:
        run.effects.append(n)

    worker = run.worker(wait=False)
    await record.defer_async(n=1)
    async with asyncio.timeout(20):
        await worker.run()
    run.effects.append(("worker_id after run", worker.worker_id))
    worker.stop()
    await record.defer_async(n=2)
    async with asyncio.timeout(20):
        await worker.run()


@scenario()
async def scenario_abort_sync_with_retry_strategy(run: Run) -> None:
    """A user abort of a sync job with a retry strategy: JobAborted is not retried."""

    @run.app.task(name="polite", pass_context=True, retry=3)
    def polite(context: JobContext) -> None:
        run.signal("started")
        _wait_for_abort(context)
        raise exceptions.JobAborted()

    job_id = await polite.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "aborted", "failed", "todo")

    await run.run_until(steps)


@scenario()
async def scenario_notify_on_queue_channel(run: Run) -> None:
    """A worker on named queues (one with a quote and a space) is woken on their channels."""

    @run.app.task(name="record")
    async def record(label: str) -> None:
        run.effects.append(label)

    async def steps() -> None:
        await run.until_listening()
        first = await record.configure(queue='we"ird q').defer_async(label="weird")
        await run.until_status(first, "succeeded")
        await record.configure(queue="ignored").defer_async(label="other queue")
        second = await record.configure(queue="plain").defer_async(label="plain")
        await run.until_status(second, "succeeded")

    await run.run_until(steps, queues=['we"ird q', "plain"], fetch_job_polling_interval=600)


@scenario()
async def scenario_abort_on_queue_channel(run: Run) -> None:
    """The abort notification reaches a worker that listens on its queues' channels only."""

    @run.app.task(name="forever", queue="jobs")
    async def forever() -> None:
        run.signal("started")
        await asyncio.Event().wait()

    job_id = await forever.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.until_listening()
        assert await run.cancel(job_id)
        await run.until_status(job_id, "aborted")

    await run.run_until(steps, queues=["jobs"], abort_job_polling_interval=600)


@scenario()
async def scenario_task_defers_followup(run: Run) -> None:
    """A job defers another one; with wait=False the worker still runs it (a fetch after
    the first job ends finds it)."""

    @run.app.task(name="first")
    async def first() -> None:
        run.effects.append("first")
        await second.defer_async(n=2)

    @run.app.task(name="second")
    def second(n: int) -> None:
        run.effects.append(("second", n))

    await first.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_lock_retry_keeps_its_turn(run: Run) -> None:
    """A failing job with a lock is retried at once: it keeps its turn before the next job
    with the same lock (lower id), until it gives up."""

    @run.app.task(name="locked", retry=2, pass_context=True)
    async def locked(context: JobContext, label: str) -> None:
        run.effects.append((label, context.job.attempts))
        if label == "flaky":
            raise ValueError("again")

    await locked.configure(lock="L").defer_async(label="flaky")
    await locked.configure(lock="L").defer_async(label="steady")
    await run.run_worker(wait=False)


@scenario()
async def scenario_graceful_timeout_zero(run: Run) -> None:
    """shutdown_graceful_timeout=0: running jobs are aborted as soon as the worker stops."""

    @run.app.task(name="forever")
    async def forever() -> None:
        run.signal("started")
        await asyncio.Event().wait()

    @run.app.task(name="polite", pass_context=True)
    def polite(context: JobContext) -> None:
        run.signal("polite started")
        _wait_for_abort(context)
        raise exceptions.JobAborted()

    await forever.defer_async()
    await polite.defer_async()

    async def steps() -> None:
        await run.wait_signal("started")
        await run.wait_signal("polite started")

    await run.run_until(steps, concurrency=2, shutdown_graceful_timeout=0)


@scenario()
async def scenario_sync_awaitable_with_middleware(run: Run) -> None:
    """A sync task returning an awaitable: its sync middleware only wraps the creation."""

    async def later() -> str:
        run.effects.append("awaitable runs")
        return "late"

    @run.app.task(name="lazy", task_middleware=[_sync_mw(run, "sync")])
    def lazy() -> Any:
        run.effects.append("sync body")
        return later()

    await lazy.defer_async()
    await run.run_worker(wait=False, worker_middleware=[_async_mw(run, "worker")])


@scenario()
async def scenario_worker_middleware_short_circuit(run: Run) -> None:
    """A worker middleware that never calls the task: the job succeeds with its result."""

    async def skip(call_next: Any, context: JobContext, worker: Any) -> Any:
        return {"skipped": context.job.task_name}

    @run.app.task(name="never_body")
    async def never_body() -> None:
        run.effects.append("body ran")

    await never_body.defer_async()
    await run.run_worker(wait=False, worker_middleware=[skip])


@scenario()
async def scenario_zero_polling_intervals(run: Run) -> None:
    """Polling intervals of 0 (procrastinate polls back to back), without notifications: a
    job deferred later runs, and an abort request reaches a running sync job."""
    # procrastinate race, not compared here: an abort poll still in flight when the aborted
    # job's end is written finds the job again while its task is not yet done, and logs a
    # second abort_job (and would cancel an async job's task again). Back-to-back polling
    # makes it likely; fastworker's handover is quicker. Every other scenario compares
    # abort_job records.
    run.ignored_job_actions = {"abort_job"}

    @run.app.task(name="record")
    async def record() -> None:
        run.effects.append("record ran")

    @run.app.task(name="polite", pass_context=True)
    def polite(context: JobContext) -> None:
        run.signal("started")
        _wait_for_abort(context)
        raise exceptions.JobAborted()

    async def steps() -> None:
        first = await record.defer_async()
        await run.until_status(first, "succeeded")
        second = await polite.defer_async()
        await run.wait_signal("started")
        assert await run.cancel(second)
        await run.until_status(second, "aborted")

    await run.run_until(
        steps, listen_notify=False, fetch_job_polling_interval=0, abort_job_polling_interval=0
    )


@scenario(periodic_defaults={"max_delay": 2 * 86400})
async def scenario_periodic_deferrer_fails(run: Run) -> None:
    """The periodic deferrer fails (arguments that cannot be stored): the side task failure
    is logged and the worker stops."""

    @run.app.periodic(cron="0 0 * * *", task_kwargs={"unstorable": {1, 2}})
    @run.app.task(name="nightly")
    async def nightly(timestamp: int, unstorable: Any) -> None:
        run.effects.append("should not run")

    await run.run_worker(wait=True)


@scenario()
async def scenario_wrong_arguments_and_long_result(run: Run) -> None:
    """Arguments the task does not take: the job fails (TypeError). A long result is cut
    in the outcome's log message."""

    @run.app.task(name="strict")
    async def strict(a: int) -> str:
        run.effects.append(a)
        return "x" * 400

    await strict.defer_async(a=1)
    await run.app.configure_task(name="strict").defer_async(b=2)
    await run.app.configure_task(name="strict").defer_async()
    await run.run_worker(wait=False)


class NaiveStrategy(retry.BaseRetryStrategy):
    """Retries once at a naive datetime an hour ahead (PostgreSQL reads it in its zone)."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        if job.attempts:
            return None
        later = datetime.datetime.now() + datetime.timedelta(hours=1)
        return retry.RetryDecision(retry_at=later)


@scenario()
async def scenario_retry_at_naive_datetime(run: Run) -> None:
    @run.app.task(name="naive", retry=NaiveStrategy())
    def naive() -> None:
        run.effects.append("ran")
        raise ValueError("later")

    await naive.defer_async()
    await run.run_worker(wait=False)


@scenario()
async def scenario_huge_concurrency(run: Run) -> None:
    """An unbounded-looking concurrency (procrastinate's semaphore takes any int)."""

    @run.app.task(name="record")
    async def record(n: int) -> None:
        run.effects.append(n)

    run.unordered_effects = True
    await record.batch_defer_async(*({"n": n} for n in range(5)))
    await run.run_until(_until_succeeded(run, 5), concurrency=sys.maxsize)


@scenario()
async def scenario_infinite_intervals(run: Run) -> None:
    """Intervals of float("inf") (never poll, never beat): notifications do everything."""

    @run.app.task(name="record")
    async def record() -> None:
        run.effects.append("record ran")

    @run.app.task(name="forever")
    async def forever() -> None:
        run.signal("started")
        await asyncio.Event().wait()

    async def steps() -> None:
        await run.until_listening()
        first = await record.defer_async()
        await run.until_status(first, "succeeded")
        second = await forever.defer_async()
        await run.wait_signal("started")
        assert await run.cancel(second)
        await run.until_status(second, "aborted")

    inf = float("inf")
    # A worker that never beats looks stalled to the fleet: fastworker warns of it at start
    # (a known difference, see the README), and its own recovery is off here, as it has
    # nothing to recover.
    run.ignored_worker_actions = {"stalled_worker_timeout_too_short"}
    fastworker_only: dict[str, Any] = (
        {} if run.impl == "procrastinate" else {"recover_stalled_jobs": False}
    )
    await run.run_until(
        steps,
        fetch_job_polling_interval=inf,
        abort_job_polling_interval=inf,
        update_heartbeat_interval=inf,
        **fastworker_only,
    )


def _decimal_loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=decimal.Decimal)


def _decimal_dumps(value: Any) -> str:
    return json.dumps(value, default=str)


@scenario(connector_options={"json_loads": _decimal_loads, "json_dumps": _decimal_dumps})
async def scenario_connector_json_loads(run: Run) -> None:
    """The connector's own json_loads decodes the job's arguments (here: floats as Decimal)."""

    @run.app.task(name="money")
    async def money(amount: Any, items: Any) -> None:
        run.effects.append((type(amount).__name__, str(amount), [type(i).__name__ for i in items]))

    await money.defer_async(amount=decimal.Decimal("12.10"), items=[1.5, 2])
    await run.run_worker(wait=False)
