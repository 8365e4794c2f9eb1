"""pgqueuer, the third system: its queue manager, entrypoints, limits and enqueueing (used
by the parent and by the child processes). Not named pgqueuer: the scripts run with
benches/ first on sys.path, where that name would hide the package."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict

from benches.workload import IO_WORK, record, stamp_latency

# pgqueuer's tables under its default names (no PGQUEUER_* settings in the environment).
PGQUEUER_TABLES = ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics", "pgqueuer_schedules")
# pgqueuer 1.x runs async entrypoints only: registering a plain function raises TypeError
# ("Sync entrypoints are no longer supported", its EntrypointExecutor). Its own advice is
# an async entrypoint around asyncio.to_thread, which is not a sync entrypoint, so the
# sync settings report n/a for pgqueuer.
PGQUEUER_SYNC = "n/a: pgqueuer has no sync entrypoints"


def pgqueuer_available() -> bool:
    """pgqueuer runs here on its asyncpg driver (see pgqueuer_connect), so both must import."""
    try:
        import asyncpg  # noqa: F401
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


class PgqueuerLimits(NamedTuple):
    concurrency_limit: int  # QueueManager.entrypoint(concurrency_limit=)
    batch_size: int  # QueueManager.run(batch_size=)
    max_concurrent_tasks: int | None  # QueueManager.run(max_concurrent_tasks=)


def pgqueuer_limits(concurrency: int) -> PgqueuerLimits:
    """At most `concurrency` jobs picked, hence running, at once.

    max_concurrent_tasks is pgqueuer's cap on one worker's picked jobs, enforced by its
    dequeue statement, like procrastinate's concurrency; it must be at least twice the
    batch size, so the batch is half of it. At 1 it cannot be used: the entrypoint's
    concurrency_limit (picked jobs of the entrypoint, enforced in SQL too) caps instead,
    with batches of 1. A job stays picked until its completion is written, so a finished
    job still holds its place until then.
    """
    if concurrency >= 2:
        return PgqueuerLimits(0, concurrency // 2, concurrency)
    return PgqueuerLimits(concurrency, 1, None)


def describe(concurrencies: Iterable[int]) -> dict[str, Any]:
    """What the results record of pgqueuer: version, driver, limits per concurrency."""
    import asyncpg
    import pgqueuer

    return {
        "version": pgqueuer.__version__,
        "driver": f"asyncpg {asyncpg.__version__}",
        "limits": {f"C={c}": pgqueuer_limits(c)._asdict() for c in concurrencies},
        "sync": PGQUEUER_SYNC,
    }


async def pgqueuer_connect(dsn: str) -> Any:
    """An asyncpg connection, for pgqueuer's AsyncpgDriver.

    Not its PsycopgDriver: that one waits for notifications in connection.notifies(timeout=
    1.0) while holding the connection's lock, so each query of the worker can wait up to a
    second (measured: 20 jobs/s at C=10, well under 1 job/s at C=1). asyncpg takes URIs
    only.
    """
    import asyncpg

    return await asyncpg.connect("postgresql://?" + urlencode(conninfo_to_dict(dsn)))


def build_queue_manager(connection: Any, concurrency: int, entrypoint: str) -> Any:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job

    manager = QueueManager(Queries(AsyncpgDriver(connection)))
    limit = pgqueuer_limits(concurrency).concurrency_limit
    # Only the entrypoint in use: the dequeue statement looks at each registered one.
    if entrypoint == "noop":

        @manager.entrypoint("noop", concurrency_limit=limit)
        async def noop(job: Job) -> None:
            return None

    elif entrypoint == "stamp":

        @manager.entrypoint("stamp", concurrency_limit=limit)
        async def stamp(job: Job) -> None:
            assert job.payload is not None
            stamp_latency(float(job.payload))

    elif entrypoint == "chain":
        # pgqueuer has no per-job lock; an entrypoint with concurrency_limit=1 (one of its
        # jobs picked at a time, across workers) is its way to run jobs one after another.
        @manager.entrypoint("chain", concurrency_limit=1)
        async def chain(job: Job) -> None:
            assert job.payload is not None
            record({"n": int(job.payload), "start": time.time()})

    elif entrypoint == "late":

        @manager.entrypoint("late", concurrency_limit=limit)
        async def late(job: Job) -> None:
            now = time.time()
            record({"kind": "scheduled", "lateness": now - job.execute_after.timestamp()})

    else:
        work = IO_WORK[entrypoint]

        @manager.entrypoint(entrypoint, concurrency_limit=limit)
        async def io(job: Job) -> None:
            await work()

    return manager


async def run_queue_manager(manager: Any, concurrency: int, drain: bool) -> None:
    from pgqueuer.types import QueueExecutionMode

    limits = pgqueuer_limits(concurrency)
    await manager.run(
        batch_size=limits.batch_size,
        max_concurrent_tasks=limits.max_concurrent_tasks,
        # drain: returns once no job is queued and its tasks have finished.
        mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous,
    )


async def wait_listening(manager: Any, task: asyncio.Task[None]) -> None:
    """Until a NOTIFY sent now comes back through the worker's LISTEN (pgqueuer's worker
    registers nowhere); raises what stopped the worker if it stops first."""
    from datetime import timedelta

    from pgqueuer.errors import FailingListenerError

    while True:
        try:
            await manager.listener_healthy(timeout=timedelta(seconds=0.5))
            return
        except FailingListenerError:
            if task.done():
                await task  # raises what stopped it


def pgqueuer_sync_queries(connection: psycopg.Connection[Any]) -> Any:
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    return SyncQueries(SyncPsycopgDriver(connection))


def enqueue_pgqueuer(
    connection: psycopg.Connection[Any],
) -> Callable[[str, list[bytes | None]], Any]:
    """pgqueuer's own (sync) enqueue: job rows and their 'queued' log rows, one statement."""
    queries = pgqueuer_sync_queries(connection)

    def enqueue(entrypoint: str, payloads: list[bytes | None]) -> Any:
        return queries.enqueue([entrypoint] * len(payloads), list(payloads), [0] * len(payloads))

    return enqueue


def install_pgqueuer(dsn: str) -> None:
    from pgqueuer import AsyncpgDriver, Queries

    async def install() -> None:
        connection = await pgqueuer_connect(dsn)
        try:
            queries = Queries(AsyncpgDriver(connection))
            if not await queries.schema_is_installed():
                await queries.install()  # what `pgq install` runs
        finally:
            await connection.close()

    asyncio.run(install())
