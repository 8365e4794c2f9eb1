"""Connection faults: killed backends, a PostgreSQL restart, an unreachable server.

The fetch polling interval is set to an hour in these tests, so every job that gets picked
up was found through a notification or the wake-up the listener sends after each
reconnect: a missed wake-up shows as jobs left `todo` (the bounded waits fail)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from tests.reliability.helpers import (
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    execution_histogram,
    fastworker_backends,
    free_port,
    private_cluster,
    statuses,
    terminate_backend,
    wait_until,
)

NO_POLLING = "3600"


def pids(dsn: str, database: str, role: str) -> set[int]:
    return {pid for pid, kind in fastworker_backends(dsn, database) if kind == role}


def all_done(dsn: str) -> bool:
    current = statuses(dsn)
    return not current.get("todo") and not current.get("doing")


def start_worker(dsn: str, tmp_path: Path, polling: str) -> WorkerProcess:
    """20 slots, heartbeat and abort polling every second, a long reconnect budget."""
    return WorkerProcess(
        dsn,
        tmp_path / "worker.log",
        "--concurrency",
        "20",
        "--polling",
        polling,
        "--heartbeat",
        "1",
        "--abort-polling",
        "1",
        "--reconnect-timeout",
        "120",
    )


def stop_and_check_every_job_ran_once(worker: WorkerProcess, dsn: str, total: int) -> str:
    """Stop the worker (it must exit 0): every job succeeded and ran exactly once (no
    completion lost, no claim run twice). Returns the worker's log."""
    code = worker.stop()
    log = worker.log()
    assert code == 0, log[-5000:]
    assert statuses(dsn) == {"succeeded": total}
    assert execution_histogram(dsn) == {1: total}
    return log


@pytest.mark.slow
def test_killing_worker_connections_twenty_times_loses_nothing(
    dsn: str, database_name: str, tmp_path: Path
) -> None:
    create_executions_table(dsn)
    worker = start_worker(dsn, tmp_path, NO_POLLING)
    total = 0
    try:
        wait_until(
            lambda: pids(dsn, database_name, "listen") and pids(dsn, database_name, "jobs"),
            timeout=60,
            what="the worker's connections",
        )
        for _ in range(20):
            # A wave in flight, then the LISTEN connection goes ...
            defer_jobs(dsn, 150, args_sql="json_build_object('n', n, 'sleep', 0.02)")
            total += 150
            (listen,) = pids(dsn, database_name, "listen")
            assert terminate_backend(dsn, listen)
            # ... jobs deferred while it is down are not notified to anyone ...
            defer_jobs(dsn, 50)
            total += 50
            wait_until(
                lambda listen=listen: pids(dsn, database_name, "listen") - {listen},
                timeout=60,
                what="the listener to reconnect",
            )
            # ... then the job connection (claims and completions in flight) ...
            for pid in pids(dsn, database_name, "jobs"):
                terminate_backend(dsn, pid)
            defer_jobs(dsn, 50)
            total += 50
            # ... and the registry's (heartbeat, abort polling).
            for pid in pids(dsn, database_name, "registry"):
                terminate_backend(dsn, pid)
            wait_until(lambda: all_done(dsn), timeout=120, what="the wave to drain")

        # After all that, a lone job is still picked up through its notification.
        defer_jobs(dsn, 1)
        total += 1
        wait_until(lambda: all_done(dsn), timeout=60, what="a notified job")
    except BaseException:
        worker.stop()
        raise
    log = stop_and_check_every_job_ran_once(worker, dsn, total)
    assert log.count("action=listener_reconnected") >= 20
    assert "action=dispatcher_reconnected" in log
    assert "action=finish_task_failed" not in log


def test_connections_killed_while_the_worker_sets_them_up_again(
    dsn: str, database_name: str, tmp_path: Path
) -> None:
    """Every connection of the worker but its LISTEN one is killed again and again, every
    few milliseconds, so new connections die while they are being set up (statements
    prepared, orphaned claims looked up): each loss means another reconnect, never a dead
    worker, and every job still runs exactly once."""
    create_executions_table(dsn)
    worker = start_worker(dsn, tmp_path, "0.5")
    total = 0
    try:
        wait_until(
            lambda: pids(dsn, database_name, "jobs"), timeout=60, what="the worker's connections"
        )
        for _ in range(5):
            defer_jobs(dsn, 100, args_sql="json_build_object('n', n, 'sleep', 0.01)")
            total += 100
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                for pid, role in fastworker_backends(dsn, database_name):
                    if role != "listen":
                        terminate_backend(dsn, pid)
                time.sleep(0.005)
            assert worker.alive(), worker.log()[-3000:]
            wait_until(lambda: all_done(dsn), timeout=120, what="the wave to drain")
    except BaseException:
        worker.stop()
        raise
    log = stop_and_check_every_job_ran_once(worker, dsn, total)
    assert "core_failed" not in log, log[-5000:]


@pytest.mark.slow
def test_postgres_restart_during_a_drain(tmp_path: Path) -> None:
    """A private cluster (other tests share the main server): restarted mid-drain, the
    worker reconnects by itself and finishes the queue."""
    with private_cluster() as cluster:
        cluster.create_database("restart")
        dsn = cluster.dsn("restart")
        create_executions_table(dsn)
        defer_jobs(dsn, 3000, args_sql="json_build_object('n', n, 'sleep', 0.01)")
        worker = WorkerProcess(
            dsn,
            tmp_path / "worker.log",
            "--concurrency",
            "20",
            "--polling",
            NO_POLLING,
            "--heartbeat",
            "1",
            "--reconnect-timeout",
            "120",
        )
        try:
            wait_until(
                lambda: statuses(dsn).get("succeeded", 0) >= 300,
                timeout=120,
                what="the drain to be under way",
            )
            for _ in range(2):
                cluster.restart()
                done_before = statuses(dsn).get("succeeded", 0)
                wait_until(
                    lambda done_before=done_before: (
                        statuses(dsn).get("succeeded", 0) > done_before + 100
                    ),
                    timeout=120,
                    what="progress after the restart",
                )
            wait_until(lambda: all_done(dsn), timeout=300, what="the drain to finish")
            # And it still listens: a new job is found through its notification.
            defer_jobs(dsn, 1)
            wait_until(lambda: all_done(dsn), timeout=60, what="a notified job")
        finally:
            code = worker.stop()
        log = worker.log()
        assert code == 0, log[-5000:]
        assert statuses(dsn) == {"succeeded": 3001}
        assert execution_histogram(dsn) == {1: 3001}
        assert "action=dispatcher_reconnected" in log
        assert "action=listener_reconnected" in log


def test_unreachable_database_at_start_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    secret = "pw-must-not-leak-7731"
    dsn = f"host=127.0.0.1 port={port} user=postgres password={secret} dbname=x connect_timeout=3"
    started = time.monotonic()
    worker = WorkerProcess(dsn, tmp_path / "worker.log", "--reconnect-timeout", "5")
    code = worker.wait(timeout=120)
    log = worker.log()
    assert code == 1, log
    assert f"127.0.0.1:{port}" in log
    assert "fastworker: error: cannot connect to PostgreSQL" in log
    assert "Connection refused" in log  # the cause, not just "error connecting to server"
    assert secret not in log
    print(f"\nunreachable: exit {code} after {time.monotonic() - started:.1f} s")


def test_database_lost_for_longer_than_reconnect_timeout_exits_non_zero(tmp_path: Path) -> None:
    """The server stops and stays down: after reconnect_timeout the worker gives up with
    ConnectionLost and a non-zero exit (no hang)."""
    with private_cluster() as cluster:
        cluster.create_database("gone")
        dsn = cluster.dsn("gone")
        create_executions_table(dsn)
        worker = WorkerProcess(
            dsn, tmp_path / "worker.log", "--reconnect-timeout", "3", "--polling", "1"
        )
        try:
            wait_until(
                lambda: (
                    psycopg.connect(dsn, autocommit=True)
                    .execute("SELECT count(*) FROM procrastinate_workers")
                    .fetchone()
                    == (1,)
                ),
                timeout=60,
                what="the worker to register",
            )
            cluster.stop()
            code = worker.wait(timeout=120)
        finally:
            if worker.alive():
                worker.kill()
        log = worker.log()
        assert code == 1, log[-3000:]
        assert "could not reconnect within" in log, log[-3000:]
        assert f"127.0.0.1:{cluster.port}" in log
