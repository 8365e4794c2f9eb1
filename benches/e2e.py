"""End-to-end benchmark: procrastinate's own worker vs fastworker, same database, one run.

    python benches/e2e.py [--dsn DSN] [--jobs 20000] [--concurrency 1,10,100] [--sync 10]

For each setting, the same pre-loaded queue of no-op jobs is drained by each system in
turn (each drain in its own process, so its CPU time is its own), on a jobs table that
also holds `history` finished jobs (with their events: procrastinate's default,
`delete_jobs="never"`, grows tables so), or with `delete_jobs="successful"`, and the
script reports
per system: jobs/s, the ratio of its jobs/s to procrastinate's, worker CPU µs per job,
PostgreSQL server CPU µs per job (all backends, from /proc, when the server is local) and
commits per job (pg_stat_database.xact_commit). Then pickup latency: an idle listening
worker, one job deferred every 20 ms, time from defer to task start (p50/p90/p99/max).
Then memory: fastworker alone drains 200,000 jobs at concurrency 100 and 1,000, its RSS
sampled from /proc every 0.2 s.

When pgqueuer (another PostgreSQL job queue, with its own schema) and asyncpg are
installed, pgqueuer is a third system: its schema goes into the same database, next to
procrastinate's, and it drains its own pre-loaded queue of the same size the same way
(its QueueManager in drain mode, at most C jobs running at once). It has no sync
entrypoints, so its sync settings are n/a.

Then the idle-gap benchmarks, each worker waiting with the default polling interval (5 s):
- lock_chain: 200 no-op jobs on one `lock`, deferred at once (one INSERT) to an idle worker;
  seconds from the defer to the start of the last job, and as its floor a C=1 drain of as
  many jobs without a lock (one job per round trip). procrastinate's worker runs one job
  per poll there (about 1,000 s for 200 jobs); pgqueuer, which has no per-job lock, runs an
  entrypoint with concurrency_limit=1 (serialized dispatch) instead.
- lateness: an idle worker; 200 jobs deferred at once, scheduled 1 to 11 s ahead, and 100
  jobs (scheduled the same way) whose first attempt fails and is retried 1 s later; start
  minus `scheduled_at` (p50/p99/max). lateness_paced: the same jobs deferred one at a time
  over 10 s, each 1-3 s ahead (retried ones at once), so that the deferrals' notifications
  also wake the workers. pgqueuer: scheduled jobs only (its retries are in-process).
- io: 20,000 I/O-bound jobs (async: `asyncio.sleep` then one query through the app's
  connector, or a sleep alone, at C=100; sync: `time.sleep(0.005)` at C=10), set against
  the limit: the same callables run by a bare asyncio loop under a semaphore, no queue.
- scale_out: 1, 2 and 4 fastworker processes at C=100 drain one queue of 100,000 no-op
  jobs: jobs/s, worker and server CPU per job and in cores (where the ceiling is).
Each run records the commit, the versions (procrastinate, PostgreSQL, Python), the CPU
model and, per part (and per system where a part runs one system at a time), the load
average at its start. `--only lock_chain,lateness` runs a subset.

Output: tables on stdout, `benches/results/e2e.json` (the parts run replace theirs; the
others are kept), `benches/results/e2e.png` (drains) and `e2e-idle-gaps.png`.
Without --dsn, a scratch database is created on the local server
(`host=127.0.0.1 user=postgres`) and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SYSTEMS = ("procrastinate", "fastworker", "pgqueuer")  # pgqueuer: when installed
HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
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


# --- the app procrastinate and fastworker run (imported by the child processes) ---------


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
        LATENCIES.append(time.time() - t)
        if len(LATENCIES) >= EXPECTED[0] > 0:
            ALL_STAMPED.set()

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


LATENCIES: list[float] = []
EXPECTED = [0]  # how many stamped jobs (latency) or records (other runs) the child waits for
ALL_STAMPED = asyncio.Event()
RECORDS: list[dict[str, Any]] = []
APP: list[Any] = []  # the app of this process, for the I/O tasks' query
RETRY_WAIT_S = 1  # the delayed retries' wait, in the lateness run


def record(item: dict[str, Any]) -> None:
    RECORDS.append(item)
    if len(RECORDS) >= EXPECTED[0] > 0:
        ALL_STAMPED.set()


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
    IoVariant("sync, time.sleep 5 ms, C=10", "io_sync", "sync", 10, 10 / 0.005),
)
IO_WORK: dict[str, Callable[[], Any]] = {
    "io_sleep_query": io_sleep_query_work,
    "io_sleep": io_sleep_work,
    "io_sync": io_sync_work,
}


# --- pgqueuer: its queue manager, entrypoints and limits (also in the child processes) ---


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
            LATENCIES.append(time.time() - float(job.payload))
            if len(LATENCIES) >= EXPECTED[0] > 0:
                ALL_STAMPED.set()

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


def enqueue_pgqueuer(
    connection: psycopg.Connection[Any],
) -> Callable[[str, list[bytes | None]], Any]:
    """pgqueuer's own (sync) enqueue: job rows and their 'queued' log rows, one statement."""
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    queries = SyncQueries(SyncPsycopgDriver(connection))

    def enqueue(entrypoint: str, payloads: list[bytes | None]) -> Any:
        return queries.enqueue([entrypoint] * len(payloads), list(payloads), [0] * len(payloads))

    return enqueue


def pgqueuer_sync_queries(connection: psycopg.Connection[Any]) -> Any:
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    return SyncQueries(SyncPsycopgDriver(connection))


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


# --- child: one drain or one latency run ------------------------------------------------


async def child_drain(
    system: str, dsn: str, concurrency: int, delete_jobs: str = "never", entrypoint: str = "noop"
) -> dict[str, float]:
    if system == "pgqueuer":
        connection = await pgqueuer_connect(dsn)
        # The I/O entrypoints query through a procrastinate app's connector, as the other
        # systems' tasks do.
        app = build_app(dsn)
        try:
            async with app.open_async():
                manager = build_queue_manager(connection, concurrency, entrypoint)
                cpu = time.process_time()
                wall = time.perf_counter()
                await run_queue_manager(manager, concurrency, drain=True)
                wall = time.perf_counter() - wall
                cpu = time.process_time() - cpu
        finally:
            await connection.close()
        return {"wall": wall, "cpu": cpu}
    app = build_app(dsn)
    async with app.open_async():
        cpu = time.process_time()
        wall = time.perf_counter()
        if system == "fastworker":
            import fastworker

            await fastworker.run_async(
                app,
                concurrency=concurrency,
                wait=False,
                install_signal_handlers=False,
                delete_jobs=delete_jobs,
            )
        else:
            await app.run_worker_async(
                concurrency=concurrency,
                wait=False,
                install_signal_handlers=False,
                delete_jobs=delete_jobs,
            )
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu}


async def child_latency_pgqueuer(dsn: str, expected: int) -> dict[str, Any]:
    from pgqueuer.errors import FailingListenerError

    connection = await pgqueuer_connect(dsn)
    try:
        manager = build_queue_manager(connection, 10, "stamp")
        task = asyncio.create_task(run_queue_manager(manager, 10, drain=False))
        # Ready once a NOTIFY sent now comes back through the worker's LISTEN.
        while True:
            try:
                await manager.listener_healthy(timeout=timedelta(seconds=0.5))
                break
            except FailingListenerError:
                if task.done():
                    await task  # raises what stopped it
        print("ready", flush=True)
        EXPECTED[0] = expected
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ALL_STAMPED.wait(), timeout=120)
        manager.shutdown.set()
        await task
    finally:
        await connection.close()
    return {"latencies": LATENCIES}


async def child_latency(system: str, dsn: str, expected: int) -> dict[str, Any]:
    if system == "pgqueuer":
        return await child_latency_pgqueuer(dsn, expected)
    app = build_app(dsn)
    async with app.open_async():
        if system == "fastworker":
            import fastworker

            worker: Any = fastworker.Worker(app=app, concurrency=10, install_signal_handlers=False)
        else:
            from procrastinate import worker as procrastinate_worker

            worker = procrastinate_worker.Worker(
                app=app, concurrency=10, install_signal_handlers=False
            )
        task = asyncio.create_task(worker.run())
        print("ready", flush=True)
        EXPECTED[0] = expected
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ALL_STAMPED.wait(), timeout=120)
        worker.stop()
        await task
    return {"latencies": LATENCIES}


async def child_serve(
    system: str, dsn: str, concurrency: int, entrypoint: str, expected: int, timeout: float
) -> dict[str, Any]:
    """A waiting worker (default polling interval) until `expected` records or `timeout`."""
    EXPECTED[0] = expected
    if system == "pgqueuer":
        from pgqueuer.errors import FailingListenerError

        connection = await pgqueuer_connect(dsn)
        try:
            manager = build_queue_manager(connection, concurrency, entrypoint)
            task = asyncio.create_task(run_queue_manager(manager, concurrency, drain=False))
            while True:
                try:
                    await manager.listener_healthy(timeout=timedelta(seconds=0.5))
                    break
                except FailingListenerError:
                    if task.done():
                        await task
            print("ready", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ALL_STAMPED.wait(), timeout=timeout)
            manager.shutdown.set()
            await task
        finally:
            await connection.close()
        return {"records": RECORDS}
    app = build_app(dsn)
    async with app.open_async():
        if system == "fastworker":
            import fastworker

            worker: Any = fastworker.Worker(
                app=app, concurrency=concurrency, install_signal_handlers=False
            )
        else:
            from procrastinate import worker as procrastinate_worker

            worker = procrastinate_worker.Worker(
                app=app, concurrency=concurrency, install_signal_handlers=False
            )
        task = asyncio.create_task(worker.run())
        print("ready", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ALL_STAMPED.wait(), timeout=timeout)
        worker.stop()
        await task
    return {"records": RECORDS}


async def child_limit(dsn: str, entrypoint: str, concurrency: int, jobs: int) -> dict[str, float]:
    """The limit: `jobs` calls of the I/O callable by a bare asyncio loop, at most
    `concurrency` at once (a semaphore), no queue; sync callables in a pool of
    `concurrency` threads. The app is open, for the query through its connector."""
    app = build_app(dsn)
    work = IO_WORK[entrypoint]
    semaphore = asyncio.Semaphore(concurrency)
    async with app.open_async():
        if asyncio.iscoroutinefunction(work):

            async def one() -> None:
                async with semaphore:
                    await work()

            cpu = time.process_time()
            wall = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(jobs)))
        else:
            loop = asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:

                async def one_sync() -> None:
                    async with semaphore:
                        await loop.run_in_executor(pool, work)

                cpu = time.process_time()
                wall = time.perf_counter()
                await asyncio.gather(*(one_sync() for _ in range(jobs)))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu}


async def child_scale(dsn: str, concurrency: int) -> dict[str, float]:
    """One of the scale-out workers: ready once imported with its app open, then drains
    (wait=False) when the parent writes a line to its stdin."""
    import fastworker

    app = build_app(dsn)
    async with app.open_async():
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu = time.process_time()
        start = time.time()
        await fastworker.run_async(
            app, concurrency=concurrency, wait=False, install_signal_handlers=False
        )
        end = time.time()
        cpu = time.process_time() - cpu
    return {"start": start, "end": end, "cpu": cpu}


# --- parent: measurements ---------------------------------------------------------------


def server_cpu_seconds(dsn: str) -> float | None:
    """CPU of the PostgreSQL server: postmaster (with reaped children) + live children."""
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            # Read while the backend lives: its parent is the postmaster.
            postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # not a local server

    def times(pid: int, with_children: bool) -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = int(fields[11]) + int(fields[12])  # utime, stime
        if with_children:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
        return total

    try:
        ticks = times(postmaster, True)
    except OSError:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLOCK_TICKS


def commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


HISTORY_QUEUE = "history"


def load_history(connection: psycopg.Connection[Any], history: int) -> None:
    """`history` finished jobs (queue `history`), each with its three events, as a table
    grown by procrastinate's default `delete_jobs="never"`: 90% succeeded, 10% failed.
    Loaded with procrastinate's triggers off (they would notify a million times)."""
    connection.execute("ALTER TABLE procrastinate_jobs DISABLE TRIGGER USER")
    try:
        for start in range(0, history, 200_000):
            count = min(200_000, history - start)
            connection.execute(
                "WITH jobs AS ("
                " INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)"
                " SELECT %s, 'noop', jsonb_build_object('n', n),"
                "  (CASE WHEN n %% 10 = 0 THEN 'failed' ELSE 'succeeded' END)"
                "   ::procrastinate_job_status, 1"
                " FROM generate_series(1, %s) AS n RETURNING id, status)"
                " INSERT INTO procrastinate_events (job_id, type)"
                " SELECT id, kind::procrastinate_job_event_type FROM jobs,"
                "  LATERAL (VALUES ('deferred'), ('started'), (status::text)) AS k(kind)",
                (HISTORY_QUEUE, count),
            )
    finally:
        connection.execute("ALTER TABLE procrastinate_jobs ENABLE TRIGGER USER")


def reset_queue(
    dsn: str, jobs: int, task_name: str, system: str = "procrastinate", history: int = 0
) -> None:
    """Empty both systems' queues, load `jobs` jobs for `system` (over `history` finished
    jobs, kept from one drain to the next), VACUUM, ANALYZE and CHECKPOINT."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        held = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = %s", (HISTORY_QUEUE,)
        ).fetchone()[0]  # type: ignore[index]
        if held == history:
            connection.execute(
                "DELETE FROM procrastinate_jobs WHERE queue_name <> %s", (HISTORY_QUEUE,)
            )
            connection.execute(
                "TRUNCATE procrastinate_periodic_defers, procrastinate_workers CASCADE"
            )
        else:
            connection.execute(
                "TRUNCATE procrastinate_events, procrastinate_periodic_defers,"
                " procrastinate_jobs, procrastinate_workers RESTART IDENTITY CASCADE"
            )
            load_history(connection, history)
        tables = ["procrastinate_jobs", "procrastinate_events"]
        if connection.execute("SELECT to_regclass('pgqueuer_log')").fetchone()[0]:  # type: ignore[index]
            connection.execute(f"TRUNCATE {', '.join(PGQUEUER_TABLES)} RESTART IDENTITY")
            tables += ["pgqueuer", "pgqueuer_log"]
        if system == "pgqueuer":
            enqueue = enqueue_pgqueuer(connection)
            for start in range(0, jobs, 10000):
                enqueue(task_name, [None] * min(10000, jobs - start))
        else:
            connection.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " SELECT 'default', %s, '{}' FROM generate_series(1, %s)",
                (task_name, jobs),
            )
        for table in tables:
            connection.execute(f"VACUUM ANALYZE {table}")
        # Each measurement starts from the same state: the WAL of the previous drains (up to
        # a gigabyte) is not checkpointed in the middle of the next one.
        connection.execute("CHECKPOINT")


def check_drained(dsn: str, system: str, jobs: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        if system == "pgqueuer":
            # A finished job's row is deleted from pgqueuer and its status logged in
            # pgqueuer_log; the aggregation into pgqueuer_statistics only marks log rows.
            left = connection.execute("SELECT count(*) FROM pgqueuer").fetchone()[0]  # type: ignore[index]
            done = connection.execute(
                "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
            ).fetchone()[0]  # type: ignore[index]
            if left or done != jobs:
                raise RuntimeError(f"pgqueuer left {left} jobs, {done} of {jobs} successful")
            return
        left = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
            " AND queue_name <> %s",
            (HISTORY_QUEUE,),
        ).fetchone()[0]  # type: ignore[index]
    if left:
        raise RuntimeError(f"{system} left {left} jobs not succeeded")


def run_child(*args: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


class Setting(NamedTuple):
    kind: str  # "async" or "sync" tasks
    concurrency: int
    history: int = 0  # finished jobs in the table
    delete_jobs: str = "never"

    @property
    def label(self) -> str:
        label = f"C={self.concurrency} {self.kind}"
        if self.history:
            label += f", {self.history:,} finished"
        if self.delete_jobs != "never":
            label += f", delete {self.delete_jobs}"
        return label


def drain(dsn: str, system: str, setting: Setting, jobs: int) -> dict[str, float] | None:
    kind, concurrency = setting.kind, setting.concurrency
    if system == "pgqueuer" and (kind == "sync" or setting != Setting(kind, concurrency)):
        return None  # PGQUEUER_SYNC, or a setting of procrastinate's schema
    task = "noop" if kind == "async" else "noop_sync"
    reset_queue(dsn, jobs, task, system, setting.history)
    time.sleep(1.1)  # let the stats of the reset reach pg_stat_database
    commits_before = commits(dsn)
    server_before = server_cpu_seconds(dsn)
    result = run_child("_drain", system, dsn, str(concurrency), setting.delete_jobs)
    server_after = server_cpu_seconds(dsn)
    time.sleep(1.1)  # backends flush their stats when they exit, at most once a second
    commits_after = commits(dsn)
    check_drained(dsn, system, jobs)
    measured: dict[str, float] = {
        "jobs_per_s": jobs / result["wall"],
        "worker_cpu_us_per_job": result["cpu"] / jobs * 1e6,
        "commits_per_job": (commits_after - commits_before) / jobs,
        "wall_s": result["wall"],
    }
    if server_before is not None and server_after is not None:
        measured["server_cpu_us_per_job"] = (server_after - server_before) / jobs * 1e6
    return measured


def latency(dsn: str, system: str, seconds: float, interval: float) -> dict[str, float]:
    reset_queue(dsn, 0, "stamp", system)
    expected = int(seconds / interval)
    child = subprocess.Popen(
        [sys.executable, __file__, "_latency", system, dsn, str(expected)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(child.stderr.read() if child.stderr else "child failed")
    with psycopg.connect(dsn, autocommit=True) as connection:
        if system == "pgqueuer":
            # Its worker registers nowhere; the child said ready once it heard its own NOTIFY.
            enqueue = enqueue_pgqueuer(connection)
        else:
            for _ in range(100):  # wait until the worker is registered, then a little more
                if connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]:  # type: ignore[index]
                    break
                time.sleep(0.05)
        time.sleep(0.5)
        next_at = time.perf_counter()
        for _ in range(expected):
            if system == "pgqueuer":
                enqueue("stamp", [repr(time.time()).encode()])
            else:
                connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                    " VALUES ('default', 'stamp', json_build_object('t', %s::float8))",
                    (time.time(),),
                )
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    stdout, stderr = child.communicate(timeout=180)
    if child.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    values = sorted(json.loads(stdout.strip().splitlines()[-1])["latencies"])
    ms = [value * 1000 for value in values]
    quantiles = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": quantiles[89],
        "p99_ms": quantiles[98],
        "max_ms": ms[-1],
    }


def start_serve(
    system: str, dsn: str, concurrency: int, entrypoint: str, expected: int, timeout: float
) -> tuple[subprocess.Popen[str], Any]:
    """A waiting worker in a child process, ready (registered, or listening) on return.
    Its stderr goes to a file: failing jobs log tracebacks, more than a pipe holds."""
    stderr = tempfile.TemporaryFile("w+")
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "_serve",
            system,
            dsn,
            str(concurrency),
            entrypoint,
            str(expected),
            str(timeout),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.wait()
        stderr.seek(0)
        raise RuntimeError(stderr.read()[-3000:])
    if system != "pgqueuer":  # pgqueuer's worker registers nowhere; it heard its own NOTIFY
        with psycopg.connect(dsn, autocommit=True) as connection:
            for _ in range(100):
                if connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]:  # type: ignore[index]
                    break
                time.sleep(0.05)
    time.sleep(0.5)
    return child, stderr


def finish_serve(child: subprocess.Popen[str], stderr: Any, timeout: float) -> list[dict[str, Any]]:
    stdout, _ = child.communicate(timeout=timeout)
    stderr.seek(0)
    errors = stderr.read()
    stderr.close()
    if child.returncode != 0:
        raise RuntimeError(errors[-3000:])
    records: list[dict[str, Any]] = json.loads(stdout.strip().splitlines()[-1])["records"]
    return records


def quantiles_ms(values: list[float]) -> dict[str, float]:
    ms = sorted(value * 1000 for value in values)
    if len(ms) < 2:
        return {"count": len(ms)}
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": cuts[98],
        "max_ms": ms[-1],
    }


def lock_chain(dsn: str, system: str, jobs: int, concurrency: int) -> dict[str, Any]:
    """`jobs` no-op jobs on one lock, deferred at once (one INSERT) to an idle worker with
    the default polling interval: seconds from the defer to the start of the last job."""
    reset_queue(dsn, 0, "chain", system)
    timeout = jobs * 6.0 + 60  # procrastinate's worker: one job per poll (5 s)
    started = time.time()
    child, stderr = start_serve(system, dsn, concurrency, "chain", jobs, timeout)
    with psycopg.connect(dsn, autocommit=True) as connection:
        deferred_at = time.time()
        if system == "pgqueuer":
            enqueue_pgqueuer(connection)("chain", [str(n).encode() for n in range(jobs)])
        else:
            connection.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, args)"
                " SELECT 'default', 'chain', 'one-lock', jsonb_build_object('n', n)"
                " FROM generate_series(0, %s - 1) AS n",
                (jobs,),
            )
    records = sorted(finish_serve(child, stderr, timeout + 120), key=lambda r: r["start"])
    starts = [r["start"] for r in records]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The floor of a chain: the same number of no-op jobs without a lock, drained at C=1
    # (one job per round trip), just after, in the same conditions.
    floor = drain(dsn, system, Setting("async", 1), jobs)
    assert floor is not None
    return {
        "jobs": jobs,
        "ran": len(records),
        "concurrency": concurrency,
        "polling_interval_s": 5.0,
        "seconds": (starts[-1] - deferred_at) if len(records) == jobs else None,
        "seconds_to_timeout": None if len(records) == jobs else time.time() - started,
        "in_order": [r["n"] for r in records] == list(range(len(records))),
        "gap": quantiles_ms(gaps),
        "c1_drain_ms_per_job": 1000 / floor["jobs_per_s"],
    }


def lateness(
    dsn: str, system: str, scheduled: int, retries: int, seconds: float, paced: bool
) -> dict[str, Any]:
    """Start minus scheduled_at, for `scheduled` jobs deferred with a schedule and
    `retries` jobs whose first attempt fails and is retried RETRY_WAIT_S later.

    Not paced (an idle worker): all jobs are deferred at once (one statement) to a waiting
    worker, scheduled 1 s to 1 + `seconds` s ahead; retried jobs too (their first attempt
    at that time), and nothing else happens: no notification wakes the worker when a job
    falls due. Paced: over `seconds`, one deferral at a time at a steady pace, each
    scheduled 1-3 s ahead (retried jobs: not scheduled), so the deferrals' notifications
    also wake the worker."""
    if system == "pgqueuer":
        retries = 0  # its retries are in-process (no job scheduled in the database)
    reset_queue(dsn, 0, "late", system)
    rng = random.Random(12)
    plan = ["scheduled"] * scheduled + ["retry"] * retries
    rng.shuffle(plan)
    timeout = seconds + 3 + RETRY_WAIT_S + 60  # the last job's schedule, then slack
    child, stderr = start_serve(system, dsn, 10, "late", len(plan), timeout)
    with psycopg.connect(dsn, autocommit=True) as connection:
        queries = pgqueuer_sync_queries(connection) if system == "pgqueuer" else None
        if not paced:
            delays = [1.0 + rng.uniform(0.0, seconds) for _ in plan]
            if queries is not None:
                queries.enqueue(
                    ["late"] * len(plan),
                    [None] * len(plan),
                    [0] * len(plan),
                    execute_after=[timedelta(seconds=delay) for delay in delays],
                )
            else:
                connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)"
                    " SELECT 'default', 'late', jsonb_build_object('fail_first', fail),"
                    "  now() + delay * interval '1 second'"
                    " FROM unnest(%s::float8[], %s::bool[]) AS plan(delay, fail)",
                    (delays, [kind == "retry" for kind in plan]),
                )
        else:
            interval = seconds / max(1, len(plan))
            next_at = time.perf_counter()
            for kind in plan:
                if kind == "scheduled":
                    delay = rng.uniform(1.0, 3.0)
                    if queries is not None:
                        queries.enqueue(
                            ["late"], [None], [0], execute_after=[timedelta(seconds=delay)]
                        )
                    else:
                        connection.execute(
                            "INSERT INTO procrastinate_jobs"
                            " (queue_name, task_name, args, scheduled_at)"
                            " VALUES ('default', 'late', '{}', now() + %s * interval '1 second')",
                            (delay,),
                        )
                else:
                    connection.execute(
                        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                        " VALUES ('default', 'late', '{\"fail_first\": true}')"
                    )
                next_at += interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
    records = finish_serve(child, stderr, timeout + 60)
    measured: dict[str, Any] = {
        "mode": "paced" if paced else "at once, idle worker",
        "deferred": {"scheduled": scheduled, "retry": retries},
    }
    for kind in ("scheduled", "retry"):
        values = [r["lateness"] for r in records if r["kind"] == kind]
        measured[kind] = quantiles_ms(values) if values else None
    if system == "pgqueuer":
        measured["retry"] = "n/a: pgqueuer retries in-process, no job scheduled in the database"
    return measured


def io_bound(dsn: str, variant: IoVariant, systems: list[str], jobs: int) -> dict[str, Any]:
    """The limit (the callable under a semaphore, no queue), then each system draining
    `jobs` jobs of the same callable at the same concurrency."""
    limit = run_child("_limit", dsn, variant.task, str(variant.concurrency), str(jobs))
    limit_rate = jobs / limit["wall"]
    entry: dict[str, Any] = {
        **variant._asdict(),
        "jobs": jobs,
        "limit": {
            "jobs_per_s": limit_rate,
            "cpu_us_per_job": limit["cpu"] / jobs * 1e6,
            "wall_s": limit["wall"],
        },
    }
    print(f"{variant.label:>40} {'limit':>13}: {limit_rate:8.0f} jobs/s", flush=True)
    for system in systems:
        if system == "pgqueuer" and variant.kind == "sync":
            entry[system] = None  # PGQUEUER_SYNC
            continue
        reset_queue(dsn, jobs, variant.task, system)
        result = run_child("_drain", system, dsn, str(variant.concurrency), "never", variant.task)
        check_drained(dsn, system, jobs)
        rate = jobs / result["wall"]
        entry[system] = {
            "jobs_per_s": rate,
            "of_limit": rate / limit_rate,
            "worker_cpu_us_per_job": result["cpu"] / jobs * 1e6,
            "wall_s": result["wall"],
        }
        print(f"{variant.label:>40} {system:>13}: {rate:8.0f} jobs/s", flush=True)
    return entry


def scale_out(dsn: str, processes: int, concurrency: int, jobs: int) -> dict[str, Any]:
    """`processes` fastworker processes drain one queue of `jobs` no-op jobs, started
    together once all are ready; wall time from the first start to the last end."""
    reset_queue(dsn, jobs, "noop")
    time.sleep(1.1)
    commits_before = commits(dsn)
    children = []
    with contextlib.ExitStack() as stack:
        for _ in range(processes):
            stderr = stack.enter_context(tempfile.TemporaryFile("w+"))
            child = subprocess.Popen(
                [sys.executable, __file__, "_scale", dsn, str(concurrency)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            children.append((child, stderr))
        for child, stderr in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                child.wait()
                stderr.seek(0)
                raise RuntimeError(stderr.read()[-3000:])
        server_before = server_cpu_seconds(dsn)
        with DatabaseCpu(dsn) as database_cpu:
            for child, _ in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            results = []
            for child, stderr in children:
                stdout, _ = child.communicate(timeout=600)
                if child.returncode != 0:
                    stderr.seek(0)
                    raise RuntimeError(stderr.read()[-3000:])
                results.append(json.loads(stdout.strip().splitlines()[-1]))
        server_after = server_cpu_seconds(dsn)
    time.sleep(1.1)
    commits_after = commits(dsn)
    check_drained(dsn, "fastworker", jobs)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    worker_cpu = sum(r["cpu"] for r in results)
    measured: dict[str, Any] = {
        "processes": processes,
        "concurrency": concurrency,
        "jobs": jobs,
        "jobs_per_s": jobs / wall,
        "wall_s": wall,
        "worker_cpu_us_per_job": worker_cpu / jobs * 1e6,
        "worker_cores": worker_cpu / wall,
        "commits_per_job": (commits_after - commits_before) / jobs,
    }
    if server_before is not None and server_after is not None:
        # All of the server's processes: other databases' clients too, on a shared server.
        measured["server_cpu_us_per_job"] = (server_after - server_before) / jobs * 1e6
        measured["server_cores"] = (server_after - server_before) / wall
    if database_cpu.last:
        # This database's backends only (when the server is local).
        measured["database_cpu_us_per_job"] = database_cpu.seconds / jobs * 1e6
        measured["database_cores"] = database_cpu.seconds / wall
    measured["machine_busy_cores"] = database_cpu.machine_busy_cores
    measured["machine_cores"] = os.cpu_count()
    return measured


class DatabaseCpu:
    """CPU of the server's backends on this database (the server may be shared with other
    databases' clients), and of the whole machine, while it runs: backends are sampled from
    /proc every 20 ms (a backend that exits loses at most its last 20 ms), from a connection
    to another database."""

    def __init__(self, dsn: str) -> None:
        self.dbname = conninfo_to_dict(dsn).get("dbname")
        self.admin = make_conninfo(dsn, dbname="postgres")
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    @staticmethod
    def _ticks(pid: int) -> int | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _machine() -> tuple[int, int]:
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    def _sample(self, connection: psycopg.Connection[Any], baseline: bool) -> None:
        pids = [
            row[0]
            for row in connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.dbname,)
            )
        ]
        for pid in pids:
            ticks = self._ticks(pid)
            if ticks is None:
                continue
            if pid not in self.first:
                self.first[pid] = ticks if baseline else 0
            self.last[pid] = ticks

    def _run(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as connection:
            self._sample(connection, baseline=True)
            self.ready.set()
            while not self.stop.wait(0.02):
                self._sample(connection, baseline=False)
            self._sample(connection, baseline=False)

    def __enter__(self) -> DatabaseCpu:
        self.window = time.perf_counter()
        self.machine_before = self._machine()
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.machine_after = self._machine()
        self.window = time.perf_counter() - self.window

    @property
    def seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last) / CLOCK_TICKS

    @property
    def machine_busy_cores(self) -> float:
        """Busy CPUs of the whole machine, on average over the measured window."""
        total = self.machine_after[0] - self.machine_before[0]
        idle = self.machine_after[1] - self.machine_before[1]
        return (total - idle) / max(1, total) * (os.cpu_count() or 1)


def environment(dsn: str) -> dict[str, Any]:
    """What tells figures from different machines and commits apart."""
    from importlib import metadata

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=False
        )
        return completed.stdout.strip()

    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(dsn, autocommit=True) as connection:
        server = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    versions = {}
    for package in ("fastworker", "procrastinate", "pgqueuer", "asyncpg", "psycopg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions,
        "postgresql": server,
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        **run_stamp(),
    }


def run_stamp() -> dict[str, Any]:
    """When a part started, and the machine's load then (a shared machine is noisy)."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory(dsn: str, concurrency: int, jobs: int) -> dict[str, float]:
    """fastworker alone drains `jobs` jobs; its RSS is sampled every 0.2 s from /proc."""
    reset_queue(dsn, jobs, "noop")
    with open(os.devnull, "w") as devnull:
        child = subprocess.Popen(
            [sys.executable, __file__, "_drain", "fastworker", dsn, str(concurrency)],
            stdout=subprocess.PIPE,
            stderr=devnull,
            text=True,
        )
        samples: list[float] = []
        while child.poll() is None:
            rss = rss_mib(child.pid)
            if rss is not None:
                samples.append(rss)
            time.sleep(0.2)
        stdout, _ = child.communicate()
    if child.returncode != 0 or len(samples) < 5:
        raise RuntimeError(f"memory drain at C={concurrency} failed ({len(samples)} samples)")
    check_drained(dsn, "fastworker", jobs)
    wall = json.loads(stdout.strip().splitlines()[-1])["wall"]

    def at(fraction: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * fraction))]

    return {
        "concurrency": concurrency,
        "jobs": jobs,
        "jobs_per_s": jobs / wall,
        "samples": len(samples),
        "rss_mib_at_10pct": at(0.1),
        "rss_mib_at_50pct": at(0.5),
        "rss_mib_at_end": samples[-1],
        "rss_mib_max": max(samples),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [entry["label"] for entry in results["drain"]]
    systems = results["systems"]
    figure, axis = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 5))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        offset = (index - (len(systems) - 1) / 2) * width
        shown = [
            (i, entry[system])
            for i, entry in enumerate(results["drain"])
            if entry[system] is not None
        ]
        bars = axis.bar(
            [i + offset for i, _ in shown],
            [measured["jobs_per_s"] for _, measured in shown],
            width,
            label=system,
        )
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("jobs/s (no-op jobs, drain)")
    axis.set_title(f"Drain throughput, {results['jobs']} jobs, same PostgreSQL, one run")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


PARTS = (
    "drain",
    "latency",
    "memory",
    "lock_chain",
    "lateness",
    "lateness_paced",
    "io",
    "scale_out",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="database to use (its procrastinate and pgqueuer tables are emptied)"
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", default="1,10,100", help="async task concurrencies")
    parser.add_argument("--sync", default="10", help="sync task concurrencies ('' for none)")
    parser.add_argument(
        "--history",
        default="20000,1000000",
        help="sizes of a table of finished jobs to drain over ('' for none)",
    )
    parser.add_argument(
        "--history-concurrency", default="1,100", help="concurrencies of those drains"
    )
    parser.add_argument(
        "--delete-successful",
        default="1",
        help="concurrencies of drains with delete_jobs='successful' ('' for none)",
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--latency-interval", type=float, default=0.02)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS if pgqueuer_available() else SYSTEMS[:2]),
        help=f"comma-separated, of {', '.join(SYSTEMS)} (default: pgqueuer only when it and"
        " asyncpg are installed)",
    )
    parser.add_argument(
        "--memory-jobs", type=int, default=200000, help="jobs per memory drain (0: skip)"
    )
    parser.add_argument(
        "--memory-concurrency", default="100,1000", help="concurrencies of the memory drains"
    )
    parser.add_argument(
        "--lock-chain-jobs",
        type=int,
        default=200,
        help="jobs on one lock (procrastinate's worker runs one per poll: about 5 s each)",
    )
    parser.add_argument("--lock-chain-concurrency", type=int, default=10)
    parser.add_argument("--lateness-jobs", type=int, default=200, help="jobs scheduled ahead")
    parser.add_argument(
        "--lateness-retries", type=int, default=100, help="jobs retried after a failure"
    )
    parser.add_argument(
        "--lateness-seconds",
        type=float,
        default=10.0,
        help="schedules (lateness) or deferrals (lateness_paced) spread over this long",
    )
    parser.add_argument("--io-jobs", type=int, default=20000, help="jobs per I/O-bound drain")
    parser.add_argument(
        "--io-variants",
        default=",".join(variant.task for variant in IO_VARIANTS),
        help="I/O-bound tasks to run: "
        + "; ".join(f"{variant.task} ({variant.label})" for variant in IO_VARIANTS),
    )
    parser.add_argument(
        "--scale-processes", default="1,2,4", help="fastworker processes per scale-out drain"
    )
    parser.add_argument("--scale-concurrency", type=int, default=100)
    parser.add_argument("--scale-jobs", type=int, default=100000)
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory of e2e.json (the parts run replace theirs, the others are kept),"
        " e2e.png and e2e-idle-gaps.png",
    )
    args = parser.parse_args()
    systems = [system for system in args.systems.split(",") if system]
    for system in systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}")
        if system == "pgqueuer" and not pgqueuer_available():
            parser.error("pgqueuer needs `pip install pgqueuer asyncpg`")
    parts = [part for part in args.only.split(",") if part]
    for part in parts:
        if part not in PARTS:
            parser.error(f"unknown part {part!r} (--only takes {', '.join(PARTS)})")
    variants = {variant.task: variant for variant in IO_VARIANTS}
    io_variants = [task for task in args.io_variants.split(",") if task]
    for task in io_variants:
        if task not in variants:
            parser.error(f"unknown I/O variant {task!r} (of {', '.join(variants)})")

    scratch = None
    dsn = args.dsn
    if dsn is None:
        scratch = f"fw_bench_{uuid.uuid4().hex[:8]}"
        admin = "host=127.0.0.1 user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{scratch}"')
        dsn = make_conninfo(admin, dbname=scratch)
        from procrastinate import schema

        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]
    if "pgqueuer" in systems:
        install_pgqueuer(dsn)

    def numbers(text: str) -> list[int]:
        return [int(value) for value in text.split(",") if value]

    settings = [Setting("async", c) for c in numbers(args.concurrency)]
    settings += [Setting("sync", c) for c in numbers(args.sync)]
    settings += [
        Setting("async", c, history)
        for history in numbers(args.history)
        for c in numbers(args.history_concurrency)
    ]
    settings += [Setting("async", c, 0, "successful") for c in numbers(args.delete_successful)]
    results: dict[str, Any] = {"environment": environment(dsn), "runs": {}}
    if "drain" in parts:
        results["jobs"] = args.jobs
        results["systems"] = systems
        results["drain"] = []
    if "pgqueuer" in systems:
        import asyncpg
        import pgqueuer

        results["pgqueuer"] = {
            "version": pgqueuer.__version__,
            "driver": f"asyncpg {asyncpg.__version__}",
            "limits": {
                f"C={s.concurrency}": pgqueuer_limits(s.concurrency)._asdict() for s in settings
            },
            "sync": PGQUEUER_SYNC,
        }
    try:
        if "drain" in parts:
            results["runs"]["drain"] = run_stamp()
            for setting in settings:
                entry: dict[str, Any] = {"label": setting.label, **setting._asdict()}
                for system in systems:
                    measured = entry[system] = drain(dsn, system, setting, args.jobs)
                    speed = "n/a" if measured is None else f"{measured['jobs_per_s']:8.0f} jobs/s"
                    print(f"{entry['label']:>12} {system:>13}: {speed}", flush=True)
                if "procrastinate" in entry:
                    for system in systems:
                        if system != "procrastinate" and entry[system] is not None:
                            entry[system]["ratio"] = (
                                entry[system]["jobs_per_s"] / entry["procrastinate"]["jobs_per_s"]
                            )
                results["drain"].append(entry)
        if "latency" in parts and args.latency_seconds > 0:
            results["runs"]["latency"] = run_stamp()
            results["latency"] = {
                system: latency(dsn, system, args.latency_seconds, args.latency_interval)
                for system in systems
            }
        if "memory" in parts and args.memory_jobs > 0 and "fastworker" in systems:
            results["runs"]["memory"] = run_stamp()
            results["memory"] = []
            for concurrency in numbers(args.memory_concurrency):
                results["memory"].append(memory(dsn, concurrency, args.memory_jobs))
                print(f"memory drain C={concurrency}: done", flush=True)
        if "lock_chain" in parts:
            results["runs"]["lock_chain"] = run_stamp()
            results["lock_chain"] = {}
            for system in systems:
                stamp = run_stamp()
                chain = lock_chain(dsn, system, args.lock_chain_jobs, args.lock_chain_concurrency)
                chain["run"] = stamp
                results["lock_chain"][system] = chain
                print(f"lock chain {system:>13}: {chain['seconds']} s", flush=True)
        for part in ("lateness", "lateness_paced"):
            if part not in parts:
                continue
            results["runs"][part] = run_stamp()
            results[part] = {}
            for system in systems:
                stamp = run_stamp()
                results[part][system] = lateness(
                    dsn,
                    system,
                    args.lateness_jobs,
                    args.lateness_retries,
                    args.lateness_seconds,
                    paced=part == "lateness_paced",
                )
                results[part][system]["run"] = stamp
                print(f"{part} {system:>13}: done", flush=True)
        if "io" in parts:
            results["runs"]["io_bound"] = run_stamp()
            results["io_bound"] = [
                io_bound(dsn, variants[task], systems, args.io_jobs) for task in io_variants
            ]
        if "scale_out" in parts:
            results["runs"]["scale_out"] = run_stamp()
            results["scale_out"] = []
            for processes in numbers(args.scale_processes):
                measured = scale_out(dsn, processes, args.scale_concurrency, args.scale_jobs)
                results["scale_out"].append(measured)
                print(f"scale-out {processes} processes: {measured['jobs_per_s']:.0f} jobs/s")
    finally:
        if scratch:
            with psycopg.connect(
                "host=127.0.0.1 user=postgres dbname=postgres", autocommit=True
            ) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "e2e.json"
    merged = merge_results(path, results)
    path.write_text(json.dumps(merged, indent=2))
    print()
    print(report(results, systems))
    print(f"\nwrote {path}")
    try:
        if merged.get("drain") and merged.get("systems"):
            plot(merged, args.out / "e2e.png")
            print(f"wrote {args.out / 'e2e.png'}")
        if any(merged.get(key) for key in NEW_PARTS):
            plot_idle_gaps(merged, args.out / "e2e-idle-gaps.png")
            print(f"wrote {args.out / 'e2e-idle-gaps.png'}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -r requirements/bench.txt)")


NEW_PARTS = ("lock_chain", "lateness", "lateness_paced", "io_bound", "scale_out")


def merge_results(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The results of this run over those already in `path`: the parts run here replace
    theirs, the others are kept, each with its `runs` stamp (when and under what load)."""
    merged: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            merged = json.loads(path.read_text())
    runs = {**merged.get("runs", {}), **results["runs"]}
    for part in results["runs"]:  # each part also records the environment it ran in
        runs[part] = {**results["environment"], **results["runs"][part]}
    for part in ("lock_chain", "lateness", "lateness_paced"):  # per system, each stamped
        if part in results:
            for measured in results[part].values():
                measured.setdefault("run", {}).setdefault(
                    "commit", results["environment"]["commit"]
                )
            results[part] = {**merged.get(part, {}), **results[part]}
    merged.update(results)
    merged["runs"] = runs
    return merged


def report(results: dict[str, Any], systems: list[str]) -> str:
    lines: list[str] = []
    if results.get("drain"):
        lines += [
            "| setting | system | jobs/s | ratio | worker CPU µs/job | server CPU µs/job "
            "| commits/job |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    for entry in results.get("drain", []):
        for system in systems:
            measured = entry[system]
            if measured is None:
                if entry.get("history") or entry.get("delete_jobs", "never") != "never":
                    continue  # a setting of procrastinate's schema only
                lines.append(f"| {entry['label']} | {system} | n/a |  | n/a | n/a | n/a |")
                continue
            ratio = f"{measured['ratio']:.1f}x" if "ratio" in measured else ""
            server = measured.get("server_cpu_us_per_job")
            lines.append(
                f"| {entry['label']} | {system} | {measured['jobs_per_s']:.0f} | {ratio} | "
                f"{measured['worker_cpu_us_per_job']:.0f} | "
                f"{'n/a' if server is None else f'{server:.0f}'} | "
                f"{measured['commits_per_job']:.3f} |"
            )
    if results.get("latency"):
        lines += [
            "",
            "| pickup latency | p50 ms | p90 ms | p99 ms | max ms | jobs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for system, measured in results["latency"].items():
            lines.append(
                f"| {system} | {measured['p50_ms']:.2f} | {measured['p90_ms']:.2f} | "
                f"{measured['p99_ms']:.2f} | {measured['max_ms']:.2f} | {measured['count']} |"
            )
    if results.get("memory"):
        lines += [
            "",
            "| fastworker RSS, drain | jobs | jobs/s | at 10% MiB | at 50% MiB | at end MiB "
            "| max MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for measured in results["memory"]:
            lines.append(
                f"| C={measured['concurrency']} | {measured['jobs']} | "
                f"{measured['jobs_per_s']:.0f} | {measured['rss_mib_at_10pct']:.1f} | "
                f"{measured['rss_mib_at_50pct']:.1f} | {measured['rss_mib_at_end']:.1f} | "
                f"{measured['rss_mib_max']:.1f} |"
            )
    lines += report_idle_gaps(results)
    environment = results["environment"]
    lines += [
        "",
        f"commit {environment['commit'][:12]}{' (dirty)' if environment['commit_dirty'] else ''}"
        f", procrastinate {environment['versions'].get('procrastinate')}, PostgreSQL "
        f"{environment['postgresql']}, Python {environment['python']}, "
        f"{environment['cpus']} x {environment['cpu_model']}",
    ]
    for part, stamp in results["runs"].items():
        load = ", ".join(f"{value:.2f}" for value in stamp["load_average_at_start"])
        lines.append(f"{part}: started {stamp['started_at']}, load average {load}")
    return "\n".join(lines)


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def report_idle_gaps(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if results.get("lock_chain"):
        lines += [
            "",
            "| lock chain | jobs | seconds | in order | gap p50 ms | gap max ms "
            "| C=1 drain, ms/job |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for system, measured in results["lock_chain"].items():
            seconds = measured["seconds"]
            shown = (
                f"{seconds:.2f}"
                if seconds is not None
                else f"{measured['ran']} ran in {measured['seconds_to_timeout']:.0f}"
            )
            gap = measured["gap"]
            lines.append(
                f"| {system} | {measured['jobs']} | {shown} | "
                f"{'yes' if measured['in_order'] else 'no'} | {ms(gap.get('p50_ms'))} | "
                f"{ms(gap.get('max_ms'))} | {ms(measured.get('c1_drain_ms_per_job'))} |"
            )
    for part, title, scheduled in (
        ("lateness", "lateness, idle worker (start - scheduled_at)", "scheduled 1-11 s ahead"),
        ("lateness_paced", "lateness, paced deferrals", "schedule_in 1-3 s"),
    ):
        if not results.get(part):
            continue
        lines += ["", f"| {title} | jobs | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
        for system, measured in results[part].items():
            for kind, label in (("scheduled", scheduled), ("retry", "retry after 1 s")):
                value = measured[kind]
                if not isinstance(value, dict):
                    lines.append(f"| {system}, {label} | n/a | n/a | n/a | n/a |")
                    continue
                lines.append(
                    f"| {system}, {label} | {value['count']} | {ms(value.get('p50_ms'))} | "
                    f"{ms(value.get('p99_ms'))} | {ms(value.get('max_ms'))} |"
                )
    if results.get("io_bound"):
        lines += [
            "",
            "| I/O-bound tasks | system | jobs/s | of the limit | worker CPU µs/job |",
            "|---|---|---:|---:|---:|",
        ]
        for entry in results["io_bound"]:
            limit = entry["limit"]
            lines.append(
                f"| {entry['label']} | limit (bare loop) | {limit['jobs_per_s']:.0f} | 100% | "
                f"{limit['cpu_us_per_job']:.0f} |"
            )
            for system in SYSTEMS:
                if system not in entry:
                    continue
                measured = entry[system]
                if measured is None:
                    lines.append(f"| {entry['label']} | {system} | n/a | n/a | n/a |")
                    continue
                lines.append(
                    f"| {entry['label']} | {system} | {measured['jobs_per_s']:.0f} | "
                    f"{measured['of_limit']:.0%} | {measured['worker_cpu_us_per_job']:.0f} |"
                )
    if results.get("scale_out"):
        lines += [
            "",
            "| scale-out, fastworker | jobs/s | worker CPU µs/job | server CPU µs/job "
            "| this database's backends µs/job | worker cores | backends' cores "
            "| machine busy cores | commits/job |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def figure(value: float | None, format: str) -> str:
            return "n/a" if value is None else format.format(value)

        for measured in results["scale_out"]:
            lines.append(
                f"| {measured['processes']} x C={measured['concurrency']} | "
                f"{measured['jobs_per_s']:.0f} | {measured['worker_cpu_us_per_job']:.0f} | "
                f"{figure(measured.get('server_cpu_us_per_job'), '{:.0f}')} | "
                f"{figure(measured.get('database_cpu_us_per_job'), '{:.0f}')} | "
                f"{measured['worker_cores']:.2f} | "
                f"{figure(measured.get('database_cores'), '{:.2f}')} | "
                f"{measured['machine_busy_cores']:.2f} of {measured['machine_cores']} | "
                f"{measured['commits_per_job']:.3f} |"
            )
    return lines


def plot_idle_gaps(results: dict[str, Any], path: Path) -> None:
    """One panel per idle-gap benchmark present in `results`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        key for key in ("lock_chain", "lateness", "io_bound", "scale_out") if results.get(key)
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for axis, key in zip(axes[0], panels, strict=True):
        if key == "lock_chain":
            chain = {
                system: measured
                for system, measured in results[key].items()
                if measured["seconds"] is not None
            }
            bars = axis.bar(list(chain), [m["seconds"] for m in chain.values()])
            axis.bar_label(bars, fmt="%.1f s", fontsize=8)
            axis.set_yscale("log")
            jobs = {m["jobs"] for m in chain.values()}
            axis.set_title(f"lock chain, {'/'.join(map(str, sorted(jobs)))} jobs on one lock")
            axis.set_ylabel("seconds (log)")
        elif key == "lateness":
            systems = list(results[key])
            for offset, (quantile, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
                values = [
                    (i, results[key][system]["scheduled"].get(quantile))
                    for i, system in enumerate(systems)
                    if isinstance(results[key][system]["scheduled"], dict)
                ]
                bars = axis.bar(
                    [i + (offset - 0.5) * 0.4 for i, _ in values],
                    [value for _, value in values],
                    0.4,
                    label=label,
                )
                axis.bar_label(bars, fmt="%.0f", fontsize=8)
            axis.set_xticks(range(len(systems)), systems)
            axis.set_yscale("log")
            axis.set_ylabel("ms after scheduled_at (log)")
            axis.set_title("lateness of scheduled jobs, idle worker")
            axis.legend()
        elif key == "io_bound":
            entries = results[key]
            systems = [s for s in SYSTEMS if any(entry.get(s) for entry in entries)]
            width = 0.8 / max(1, len(systems))
            for index, system in enumerate(systems):
                shown = [
                    (i, entry[system]["of_limit"] * 100)
                    for i, entry in enumerate(entries)
                    if entry.get(system)
                ]
                bars = axis.bar(
                    [i + (index - (len(systems) - 1) / 2) * width for i, _ in shown],
                    [value for _, value in shown],
                    width,
                    label=system,
                )
                axis.bar_label(bars, fmt="%.0f%%", fontsize=7)
            axis.axhline(100, color="grey", linewidth=0.8)
            axis.axhline(80, color="grey", linewidth=0.8, linestyle="--")
            axis.set_xticks(
                range(len(entries)),
                [entry["label"].replace(", C=", "\nC=") for entry in entries],
                fontsize=7,
            )
            axis.set_ylabel("% of the limit (bare loop, same callable)")
            axis.set_title("I/O-bound tasks")
            axis.legend(fontsize=8)
        else:
            rows = results[key]
            bars = axis.bar(
                [f"{m['processes']} x C={m['concurrency']}" for m in rows],
                [m["jobs_per_s"] for m in rows],
            )
            axis.bar_label(bars, fmt="%.0f", fontsize=8)
            axis.set_ylabel("jobs/s (no-op jobs, one queue)")
            axis.set_title("scale-out, fastworker processes")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_drain":
        _, _, system, dsn, concurrency, *delete_jobs = sys.argv
        print(json.dumps(asyncio.run(child_drain(system, dsn, int(concurrency), *delete_jobs))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_latency":
        _, _, system, dsn, expected = sys.argv
        print(json.dumps(asyncio.run(child_latency(system, dsn, int(expected)))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _, _, system, dsn, concurrency, entrypoint, expected, timeout = sys.argv
        print(
            json.dumps(
                asyncio.run(
                    child_serve(
                        system, dsn, int(concurrency), entrypoint, int(expected), float(timeout)
                    )
                )
            )
        )
    elif len(sys.argv) > 1 and sys.argv[1] == "_limit":
        _, _, dsn, entrypoint, concurrency, jobs = sys.argv
        print(json.dumps(asyncio.run(child_limit(dsn, entrypoint, int(concurrency), int(jobs)))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_scale":
        _, _, dsn, concurrency = sys.argv
        print(json.dumps(asyncio.run(child_scale(dsn, int(concurrency)))))
    else:
        main()
