"""A hard stop (a second SIGTERM) gives up on what the database cannot take promptly, and
never waits for a connect (issue 20, items 3 and 6), with real signals to a worker process
whose core reaches PostgreSQL through the fault proxy (its app, and the tests, directly).

What a hard stop leaves is what a killed worker leaves: the outcome it could not write
stays unwritten, its job `doing`, for the stalled-job recovery. The waits are bounded only
to decide how long a failing test takes, far below the budgets the worker was given.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import fetch_all, server_address
from tests.faults.harness import black_hole_every_start_up
from tests.faults.proxy import FaultProxy
from tests.reliability.helpers import (
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    wait_until,
)

#: Longer than any wait of these tests.
FOREVER = 600

PATIENCE = 60


def start_worker(dsn: str, core_dsn: str, tmp_path: Path, reconnect_timeout: int) -> WorkerProcess:
    return WorkerProcess(
        dsn,
        tmp_path / "worker.log",
        "--core-dsn",
        core_dsn,
        "--concurrency",
        "1",
        "--heartbeat",
        "0.5",
        "--reconnect-timeout",
        str(reconnect_timeout),
    )


def stop_twice_while_its_outcome_waits(worker: WorkerProcess) -> None:
    """A first SIGTERM lets the running job end; its outcome cannot be written. A second
    SIGTERM must end the process."""
    worker.process.send_signal(signal.SIGTERM)
    wait_until(
        lambda: "ended with status" in worker.log() or not worker.alive(),
        timeout=PATIENCE,
        what="the job to end",
    )
    assert worker.alive(), worker.log()[-5000:]
    worker.process.send_signal(signal.SIGTERM)
    worker.wait(timeout=PATIENCE)


def job_statuses(dsn: str) -> list[str]:
    return [
        str(status) for (status,) in fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs")
    ]


@pytest.mark.slow
def test_a_hard_stop_while_the_database_refuses_connections_ends_the_process(
    dsn: str, tmp_path: Path
) -> None:
    """The database unreachable, every connect refused at once, a job ending after the
    first SIGTERM, reconnect_timeout 20 s: the second SIGTERM ends the process without
    spending the budget (this one already held before the fix; the connects that wait
    are the next test's)."""
    create_executions_table(dsn)
    with FaultProxy(*server_address()) as proxy:
        worker = start_worker(dsn, proxy.dsn(dsn), tmp_path, reconnect_timeout=20)
        try:
            defer_jobs(dsn, 1, args_sql="json_build_object('sleep', 2)")
            wait_until(
                lambda: fetch_all(dsn, "SELECT 1 FROM fw_executions"),
                timeout=PATIENCE,
                what="the job to start",
            )
            proxy.unreachable()
            stop_twice_while_its_outcome_waits(worker)
        finally:
            worker.kill()
    assert job_statuses(dsn) == ["doing"], worker.log()[-5000:]


@pytest.mark.slow
def test_a_hard_stop_during_black_holed_connects_ends_the_process(dsn: str, tmp_path: Path) -> None:
    """Every connection of the core is cut and every new one's start-up swallowed, with a
    connect_timeout and a reconnect budget longer than the test: the dispatcher (with an
    outcome to write), the heartbeat and the listener all wait on a connect. A second
    SIGTERM used to wait for them (for ever here: the runner also waited, for the end of
    claiming, behind the dispatcher's reconnect); it must end the process without them."""
    create_executions_table(dsn)
    with FaultProxy(*server_address()) as proxy:
        core_dsn = proxy.dsn(dsn) + f" connect_timeout={FOREVER}"
        worker = start_worker(dsn, core_dsn, tmp_path, reconnect_timeout=FOREVER)
        try:
            defer_jobs(dsn, 1, args_sql="json_build_object('sleep', 2)")
            wait_until(
                lambda: fetch_all(dsn, "SELECT 1 FROM fw_executions"),
                timeout=PATIENCE,
                what="the job to start",
            )
            black_holes = black_hole_every_start_up(proxy)
            proxy.cut_all()
            wait_until(
                lambda: sum(proxy.has_fired(fault) for fault in black_holes) >= 2,
                timeout=PATIENCE,
                what="reconnects waiting on swallowed start-ups",
            )
            stop_twice_while_its_outcome_waits(worker)
        finally:
            worker.kill()
    assert job_statuses(dsn) == ["doing"], worker.log()[-5000:]
