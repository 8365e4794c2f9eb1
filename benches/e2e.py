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

Output: a table on stdout, `benches/results/e2e.json` and `benches/results/e2e.png`.
Without --dsn, a scratch database is created on the local server
(`host=127.0.0.1 user=postgres`) and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
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

    return app


LATENCIES: list[float] = []
EXPECTED = [0]  # how many stamped jobs the latency run waits for
ALL_STAMPED = asyncio.Event()


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

    else:

        @manager.entrypoint("stamp", concurrency_limit=limit)
        async def stamp(job: Job) -> None:
            assert job.payload is not None
            LATENCIES.append(time.time() - float(job.payload))
            if len(LATENCIES) >= EXPECTED[0] > 0:
                ALL_STAMPED.set()

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
    system: str, dsn: str, concurrency: int, delete_jobs: str = "never"
) -> dict[str, float]:
    if system == "pgqueuer":
        connection = await pgqueuer_connect(dsn)
        try:
            manager = build_queue_manager(connection, concurrency, "noop")
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn", help="database to use (its procrastinate and pgqueuer tables are emptied)"
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
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    systems = [system for system in args.systems.split(",") if system]
    for system in systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}")
        if system == "pgqueuer" and not pgqueuer_available():
            parser.error("pgqueuer needs `pip install pgqueuer asyncpg`")

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
    results: dict[str, Any] = {
        "jobs": args.jobs,
        "systems": systems,
        "drain": [],
        "latency": {},
        "memory": [],
    }
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
        if args.latency_seconds > 0:
            for system in systems:
                results["latency"][system] = latency(
                    dsn, system, args.latency_seconds, args.latency_interval
                )
        if args.memory_jobs > 0 and "fastworker" in systems:
            for concurrency in [int(c) for c in args.memory_concurrency.split(",") if c]:
                results["memory"].append(memory(dsn, concurrency, args.memory_jobs))
                print(f"memory drain C={concurrency}: done", flush=True)
    finally:
        if scratch:
            with psycopg.connect(
                "host=127.0.0.1 user=postgres dbname=postgres", autocommit=True
            ) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(results, indent=2))
    print()
    print(report(results, systems))
    print(f"\nwrote {args.out / 'e2e.json'}")
    if results["drain"] and systems:
        try:
            plot(results, args.out / "e2e.png")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install -r requirements/bench.txt)")
        else:
            print(f"wrote {args.out / 'e2e.png'}")


def report(results: dict[str, Any], systems: list[str]) -> str:
    lines = [
        "| setting | system | jobs/s | ratio | worker CPU µs/job | server CPU µs/job "
        "| commits/job |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in results["drain"]:
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
    if results["latency"]:
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
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_drain":
        _, _, system, dsn, concurrency, *delete_jobs = sys.argv
        print(json.dumps(asyncio.run(child_drain(system, dsn, int(concurrency), *delete_jobs))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_latency":
        _, _, system, dsn, expected = sys.argv
        print(json.dumps(asyncio.run(child_latency(system, dsn, int(expected)))))
    else:
        main()
