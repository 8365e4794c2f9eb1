"""The queues the parts drain: emptied and loaded before each measurement, checked after;
and the waiting workers the idle-gap parts defer to."""

from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Any

import psycopg

from benches import child
from benches.pgq import PGQUEUER_TABLES, enqueue_pgqueuer

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


def wait_registered(connection: psycopg.Connection[Any]) -> None:
    """Until a worker is registered (at most 5 s), then a little more."""
    for _ in range(100):
        if connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]:  # type: ignore[index]
            break
        time.sleep(0.05)
    time.sleep(0.5)


def start_serve(config: child.ServeChild) -> tuple[subprocess.Popen[str], Any]:
    """A waiting worker in a child process, ready (registered, or listening) on return.
    Its stderr goes to a file: failing jobs log tracebacks, more than a pipe holds."""
    stderr = tempfile.TemporaryFile("w+")
    process = child.start(config, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.wait()
        stderr.seek(0)
        raise RuntimeError(stderr.read()[-3000:])
    if config.system == "pgqueuer":  # its worker registers nowhere; it heard its own NOTIFY
        time.sleep(0.5)
    else:
        with psycopg.connect(config.dsn, autocommit=True) as connection:
            wait_registered(connection)
    return process, stderr


def finish_serve(
    process: subprocess.Popen[str], stderr: Any, timeout: float
) -> list[dict[str, Any]]:
    stdout, _ = process.communicate(timeout=timeout)
    stderr.seek(0)
    errors = stderr.read()
    stderr.close()
    if process.returncode != 0:
        raise RuntimeError(errors[-3000:])
    records: list[dict[str, Any]] = child.last_line(stdout)["records"]
    return records
