"""fleet: what a fleet of listening workers costs the database per job under a trickle.

`--fleet-sizes` worker processes of each system (C=10 each, LISTEN/NOTIFY on) wait on one
queue; a producer defers `--fleet-jobs` stamped jobs at `--fleet-rate` per second, one
transaction each. Per job: the transactions of the fleet's own sessions, the server's CPU
and the pickup (from the deferral to the task's start).

Transactions are read from `pg_stat_database` on another database, so that the reads do
not count; the producer's are subtracted. Every LISTENing backend runs a transaction of
its own for each notification it takes in while idle (PostgreSQL reads the notification
queue in one), so a fleet of N listening workers costs N transactions per job before any
of them claims: both systems pay it. With `pg_stat_statements` (`--scratch-server`), the
statements the fleet sent per job are given too, which leaves those out.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from benches import child
from benches.measure import server_cpu_seconds
from benches.parts import Bench, Part, int_list
from benches.tables import reset_queue

CONCURRENCY = 10
# Idle backends flush their statistics within 10 s (PostgreSQL's PGSTAT_IDLE_INTERVAL):
# the start-up's transactions are counted before the measured window opens.
STATS_SETTLE_S = 11.0
PRODUCER_SQL = (
    "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
    " VALUES ('default', 'stamp', json_build_object('t', %s::float8))"
)
DONE_SQL = (
    "SELECT count(*) FROM procrastinate_jobs"
    " WHERE task_name = 'stamp' AND status IN ('todo', 'doing')"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fleet-sizes",
        type=int_list,
        default="1,8",
        help="worker processes per fleet (16 needs more than 100 connections: "
        "--scratch-server allows 300)",
    )
    parser.add_argument("--fleet-jobs", type=int, default=1000)
    parser.add_argument("--fleet-rate", type=float, default=200.0, help="jobs deferred per second")


def other_database(dsn: str) -> str:
    """The same server, its `postgres` database: reads there do not count in the bench's."""
    return make_conninfo(**{**conninfo_to_dict(dsn), "dbname": "postgres"})


def transactions(observer: psycopg.Connection[Any], database: str) -> int:
    observer.execute("SELECT pg_stat_clear_snapshot()")
    row = observer.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


def statements_of_the_fleet(dsn: str) -> int | None:
    """Top-level statements run in the bench's database since the last reset, but the
    producer's and this part's own; None without pg_stat_statements."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        if not connection.execute(
            "SELECT to_regclass('pg_stat_statements') IS NOT NULL"
        ).fetchone()[0]:  # type: ignore[index]
            return None
        row = connection.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE toplevel AND dbid = (SELECT oid FROM pg_database"
            "  WHERE datname = current_database())"
            " AND query NOT LIKE 'INSERT INTO procrastinate_jobs (queue_name, task_name, args)%%'"
            " AND query NOT LIKE 'SELECT count(*) FROM procrastinate_jobs WHERE task_name%%'"
            " AND query NOT LIKE '%%pg_stat_statements%%'"
        ).fetchone()
    return int(row[0]) if row else 0


def wait_registered(connection: psycopg.Connection[Any], size: int) -> None:
    """Until `size` workers are registered (at most 30 s)."""
    registered = 0
    for _ in range(300):
        registered = connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]  # type: ignore[index]
        if registered >= size:
            return
        time.sleep(0.1)
    raise RuntimeError(f"only {registered} of {size} workers registered")


def fleet(dsn: str, system: str, size: int, jobs: int, rate: float) -> dict[str, Any]:
    reset_queue(dsn, 0, "stamp", system)
    database = conninfo_to_dict(dsn).get("dbname") or "postgres"
    with contextlib.ExitStack() as stack:
        children = child.start_ready([child.FleetChild(system, dsn, CONCURRENCY)] * size, stack)
        observer = stack.enter_context(psycopg.connect(other_database(dsn), autocommit=True))
        producer = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        wait_registered(producer, size)
        time.sleep(STATS_SETTLE_S)
        with contextlib.suppress(psycopg.Error):
            producer.execute("SELECT pg_stat_statements_reset()")
        before = transactions(observer, database)
        own = 1  # the reset (or its failure, a rolled back transaction)
        server_before = server_cpu_seconds(dsn)
        wall = time.perf_counter()
        next_at = wall
        for _ in range(jobs):
            producer.execute(PRODUCER_SQL, (time.time(),))
            own += 1
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.perf_counter()))
        for _ in range(600):
            own += 1
            if not producer.execute(DONE_SQL).fetchone()[0]:  # type: ignore[index]
                break
            time.sleep(0.05)
        wall = time.perf_counter() - wall
        server_after = server_cpu_seconds(dsn)
        producer.close()  # its backend exits: its statistics are flushed
        latencies: list[float] = []
        for process, _ in children:
            assert process.stdin is not None
            process.stdin.close()
        for process, stderr in children:
            assert process.stdout is not None
            stdout = process.stdout.read()
            if process.wait(timeout=60) != 0:
                raise RuntimeError(child.failure(stderr))
            latencies += child.last_line(stdout)["latencies"]
        # Every client of the bench's database gone: their statistics are flushed.
        for _ in range(250):
            observer.execute("SELECT pg_stat_clear_snapshot()")
            left = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND backend_type = 'client backend'",
                (database,),
            ).fetchone()[0]  # type: ignore[index]
            if not left:
                break
            time.sleep(0.02)
        after = transactions(observer, database)
    statements = statements_of_the_fleet(dsn)
    ms = sorted(latency * 1000 for latency in latencies)
    server = (
        None
        if server_before is None or server_after is None
        else (server_after - server_before) / jobs * 1000
    )
    return {
        "size": size,
        "jobs": jobs,
        "started": len(ms),
        "wall_s": wall,
        "transactions_per_job": (after - before - own) / jobs,
        "statements_per_job": None if statements is None else statements / jobs,
        "server_cpu_ms_per_job": server,
        "pickup_p50_ms": statistics.median(ms) if ms else None,
        "pickup_p99_ms": statistics.quantiles(ms, n=100)[98] if len(ms) > 1 else None,
    }


def run(bench: Bench) -> dict[str, Any] | None:
    sizes = bench.args.fleet_sizes
    if not sizes or bench.args.fleet_jobs <= 0:
        return None
    systems = [system for system in bench.systems if system != "pgqueuer"]
    measured: dict[str, Any] = {system: [] for system in systems}
    for size in sizes:
        for system in systems:
            figures = fleet(bench.dsn, system, size, bench.args.fleet_jobs, bench.args.fleet_rate)
            measured[system].append(figures)
            print(
                f"fleet {size:>3} {system:>13}: {figures['transactions_per_job']:.2f} tx/job",
                flush=True,
            )
    return measured


def figure(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(measured: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "| fleet (C=10 each, a trickle) | system | transactions/job | statements/job "
        "| server CPU ms/job | pickup p50 ms | pickup p99 ms | jobs started |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        (figures["size"], system, figures) for system in measured for figures in measured[system]
    ]
    for size, system, figures in sorted(rows, key=lambda row: (row[0], row[1])):
        lines.append(
            f"| {size} | {system} | {figures['transactions_per_job']:.2f} | "
            f"{figure(figures['statements_per_job'])} | "
            f"{figure(figures['server_cpu_ms_per_job'])} | {figure(figures['pickup_p50_ms'])} | "
            f"{figure(figures['pickup_p99_ms'])} | {figures['started']} |"
        )
    return lines


PART = Part(name="fleet", key="fleet", run=run, report=report, add_arguments=add_arguments)
