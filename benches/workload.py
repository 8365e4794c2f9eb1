"""The app procrastinate and fastworker run, and the callables every system runs: imported
by the child processes (benches/child.py), where the records they collect live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple

LATENCIES: list[float] = []
DEFERRED: list[float] = []  # the stamps of the jobs of LATENCIES, in the same order
EXPECTED = [0]  # how many stamped jobs (latency) or records (other runs) the child waits for
ALL_STAMPED = asyncio.Event()
RECORDS: list[dict[str, Any]] = []
APP: list[Any] = []  # the app of this process, for the I/O tasks' query
RETRY_WAIT_S = 1  # the delayed retries' wait, in the lateness run
HOLD_SECONDS = 10.0  # the busy latency run's background jobs


def record(item: dict[str, Any]) -> None:
    RECORDS.append(item)
    if len(RECORDS) >= EXPECTED[0] > 0:
        ALL_STAMPED.set()


def stamp_latency(deferred_at: float) -> None:
    LATENCIES.append(time.time() - deferred_at)
    DEFERRED.append(deferred_at)
    if len(LATENCIES) >= EXPECTED[0] > 0:
        ALL_STAMPED.set()


def build_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop(**kwargs: Any) -> None:
        return None

    @app.task(name="noop_sync")
    def noop_sync(**kwargs: Any) -> None:
        return None

    @app.task(name="stamp")
    async def stamp(t: float) -> None:
        stamp_latency(t)

    @app.task(name="hold")
    async def hold(seconds: float) -> None:
        """Busy background: holds a slot for `seconds`, then defers its successor (10 s)."""
        await asyncio.sleep(seconds)
        await hold.defer_async(seconds=HOLD_SECONDS)

    @app.task(name="chain")
    async def chain(n: int) -> None:
        record({"n": n, "start": time.time()})

    @app.task(
        name="late",
        pass_context=True,
        retry=procrastinate.RetryStrategy(max_attempts=2, wait=RETRY_WAIT_S),
    )
    async def late(context: procrastinate.JobContext, fail_first: bool = False) -> None:
        now = time.time()
        job = context.job
        if fail_first and job.attempts == 0:
            raise RuntimeError("first attempt fails, to be retried")
        assert job.scheduled_at is not None
        record(
            {
                "kind": "retry" if fail_first else "scheduled",
                "lateness": now - job.scheduled_at.timestamp(),
            }
        )

    @app.task(name="io_sleep_query")
    async def io_sleep_query() -> None:
        await io_sleep_query_work()

    @app.task(name="io_sleep")
    async def io_sleep() -> None:
        await io_sleep_work()

    @app.task(name="io_sync")
    def io_sync() -> None:
        io_sync_work()

    APP[:] = [app]
    return app


# The I/O-bound callables: the same functions run by each system's task (or pgqueuer's
# entrypoint) and by the limit, a bare asyncio loop under a semaphore.
async def io_sleep_query_work() -> None:
    await asyncio.sleep(0.01)
    await APP[0].connector.execute_query_one_async("SELECT 1 AS one")


async def io_sleep_work() -> None:
    await asyncio.sleep(0.005)


def io_sync_work() -> None:
    time.sleep(0.005)


class IoVariant(NamedTuple):
    label: str
    task: str  # the task (and pgqueuer entrypoint) name
    kind: str  # "async" or "sync"
    concurrency: int
    ideal_jobs_per_s: float  # concurrency / sleep: the bound with free queueing and queries


IO_VARIANTS = (
    IoVariant("async, sleep 10 ms + 1 query, C=100", "io_sleep_query", "async", 100, 100 / 0.01),
    IoVariant("async, sleep 5 ms, C=100", "io_sleep", "async", 100, 100 / 0.005),
    IoVariant("sync, time.sleep 5 ms, C=50", "io_sync", "sync", 50, 50 / 0.005),
)
IO_WORK: dict[str, Callable[[], Any]] = {
    "io_sleep_query": io_sleep_query_work,
    "io_sleep": io_sleep_work,
    "io_sync": io_sync_work,
}
