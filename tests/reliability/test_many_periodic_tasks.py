"""Many periodic tasks in a fleet (issue 22, item 3; procrastinate's issue #1464: with 70
or more periodic tasks, some were never deferred). 200 tasks, each every minute, and 4
worker processes: every minute that passes while the fleet runs, each task is deferred,
once.

`FASTWORKER_PERIODIC_MINUTES` sets how long the fleet runs (2 minutes by default; the
closing notes' long form ran 10)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import WorkerProcess, wait_until

TASKS = 200
WORKERS = 4
MINUTES = float(os.environ.get("FASTWORKER_PERIODIC_MINUTES", "2"))
# A minute's tick counts once the fleet had this long after it to defer its 200 jobs.
DEFER_ALLOWANCE_S = 10


@pytest.mark.slow
@pytest.mark.timeout(int(MINUTES * 60) + 300)
def test_a_fleet_defers_each_of_200_periodic_tasks_once_every_minute(
    dsn: str, tmp_path: Path
) -> None:
    workers = [
        WorkerProcess(
            dsn,
            tmp_path / f"worker{index}.log",
            "--every-minute",
            str(TASKS),
            "--concurrency",
            "10",
        )
        for index in range(WORKERS)
    ]
    try:
        wait_until(
            lambda: fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers")[0][0] == WORKERS,
            timeout=120,
            what="every worker registered",
        )
        started = time.time()
        time.sleep(MINUTES * 60)  # how long the fleet runs, not a measurement
        ended = time.time()
    finally:
        codes = [worker.stop() for worker in workers]
    assert codes == [0] * WORKERS, [worker.log()[-3000:] for worker in workers]

    rows = fetch_all(
        dsn,
        "SELECT task_name, (args->>'timestamp')::bigint, count(*) FROM procrastinate_jobs"
        " WHERE task_name LIKE 'every_minute_%%' GROUP BY 1, 2",
    )
    twice = [(task, minute, count) for task, minute, count in rows if count != 1]
    assert twice == [], f"deferred more than once: {twice[:10]}"
    deferred: dict[int, set[str]] = {}
    for task, minute, _ in rows:
        deferred.setdefault(int(minute), set()).add(task)
    # The tick before the start (deferred as the workers start, within procrastinate's
    # `max_delay`), then each tick the fleet ran past.
    ticks = range(int(started // 60 * 60), int(ended - DEFER_ALLOWANCE_S) + 1, 60)
    assert len(ticks) >= int(MINUTES)
    every_task = {f"every_minute_{index}" for index in range(TASKS)}
    for tick in ticks:
        missing = every_task - deferred.get(tick, set())
        assert not missing, f"{len(missing)} tasks not deferred for {tick}: {sorted(missing)[:10]}"
    print(
        f"\n{TASKS} periodic tasks, {WORKERS} workers, {MINUTES:g} min: {len(ticks)} minutes"
        f" checked, {sum(len(tasks) for tasks in deferred.values())} jobs deferred, none twice"
    )
