"""Scale-out: 4 worker processes drain one database; every job runs exactly once.

50,000 jobs by default (about 3-4 minutes on a 2-core machine shared with PostgreSQL);
10,000 under CI=true to keep the suite short; `FASTWORKER_SCALE_OUT_JOBS` overrides both."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import (
    IN_CI,
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    execution_histogram,
    statuses,
)

JOBS = int(os.environ.get("FASTWORKER_SCALE_OUT_JOBS", "10000" if IN_CI else "50000"))
WORKERS = 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_workers_run_every_job_exactly_once(dsn: str, tmp_path: Path) -> None:
    create_executions_table(dsn)
    defer_jobs(dsn, JOBS)
    started = time.monotonic()
    workers = [
        WorkerProcess(
            dsn,
            tmp_path / f"worker{index}.log",
            "--once",
            "--concurrency",
            "50",
            "--log-level",
            "WARNING",
        )
        for index in range(WORKERS)
    ]
    codes = [worker.wait(timeout=800) for worker in workers]
    elapsed = time.monotonic() - started
    assert codes == [0] * WORKERS, [worker.log()[-3000:] for worker in workers]

    assert statuses(dsn) == {"succeeded": JOBS}
    assert execution_histogram(dsn) == {1: JOBS}
    per_process = dict(fetch_all(dsn, "SELECT pid, count(*) FROM fw_executions GROUP BY 1"))
    # Every process took part (not a timing claim: each claimed at least one batch).
    assert set(per_process) == {worker.pid for worker in workers}
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
    # Each job went todo -> doing -> succeeded once: one started, one succeeded event.
    assert fetch_all(
        dsn,
        "SELECT type::text, count(*) FROM procrastinate_events GROUP BY 1 ORDER BY 1",
    ) == [("deferred", JOBS), ("started", JOBS), ("succeeded", JOBS)]
    print(
        f"\nscale-out: {JOBS} jobs, {WORKERS} processes, {elapsed:.1f} s "
        f"({JOBS / elapsed:.0f} jobs/s), per process {sorted(per_process.values())}"
    )
