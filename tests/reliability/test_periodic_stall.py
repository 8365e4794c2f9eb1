"""A periodic task in a fleet with a stalled worker (issue 20, item 7): each second is
deferred at most once.

procrastinate's `procrastinate_defer_periodic_job_v2` deletes the marks of the seconds
before the one it defers. A worker stopped (SIGSTOP) while the others go on resumes with
its own idea of the last second it deferred, finds no mark for the seconds deferred
meanwhile, and used to defer them again (procrastinate's own deferrer does the same).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import WorkerProcess, create_executions_table, wait_until

WORKERS = 3
STALLS = 4
STALL_SECONDS = 2.5
# Running between two stalls: the stalled worker catches up, the fleet goes on.
RUN_SECONDS = 1.5
# The periodic deferrer's log of one second: deferred, or skipped as already deferred.
DEFER_LOG = re.compile(r"Periodic job periodic_tick\S* (?:deferred|skipped) for timestamp (\d+)")


def periodic_seconds(dsn: str) -> dict[int, int]:
    """{second: jobs deferred for it} of the periodic task, from the jobs' own arguments."""
    rows = fetch_all(
        dsn,
        "SELECT (args->>'timestamp')::bigint, count(*) FROM procrastinate_jobs "
        "WHERE task_name = 'periodic_tick' GROUP BY 1",
    )
    return {int(second): int(count) for second, count in rows}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stalled_worker_never_defers_a_second_the_fleet_has_passed(
    dsn: str, tmp_path: Path
) -> None:
    create_executions_table(dsn)
    workers = [
        WorkerProcess(
            dsn,
            tmp_path / f"worker{index}.log",
            "--periodic",
            "--concurrency",
            "4",
            # The stalled one tells which seconds its deferrer tried (debug records).
            "--log-level",
            "DEBUG" if index == 0 else "INFO",
        )
        for index in range(WORKERS)
    ]
    stalled = workers[0]
    stalls: list[tuple[float, float]] = []
    try:
        wait_until(
            lambda: fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers")[0][0] == WORKERS,
            timeout=120,
            what="every worker registered",
        )
        # Every deferrer has deferred (or skipped) a second or two: each has a last one.
        wait_until(
            lambda: len(DEFER_LOG.findall(stalled.log())) >= 2,
            timeout=60,
            what="the stalled worker's deferrer at work",
        )
        for _ in range(STALLS):
            stopped_at = time.time()
            os.kill(stalled.pid, signal.SIGSTOP)
            time.sleep(STALL_SECONDS)  # the fault's shape, not a measurement
            os.kill(stalled.pid, signal.SIGCONT)
            stalls.append((stopped_at, time.time()))
            time.sleep(RUN_SECONDS)
        # The stalled worker's deferrer has passed its last stall: it tried a second after
        # it (so its catch-up over the stall is behind it).
        last_resumed = stalls[-1][1]
        wait_until(
            lambda: any(int(second) > last_resumed for second in DEFER_LOG.findall(stalled.log())),
            timeout=60,
            what="the stalled worker's deferrer after its last stall",
        )
    finally:
        if stalled.alive():
            os.kill(stalled.pid, signal.SIGCONT)
        codes = [worker.stop() for worker in workers]
    assert codes == [0] * WORKERS, [worker.log()[-3000:] for worker in workers]

    # The setup did what it says: the fleet deferred seconds all along, and the stalled
    # worker, once resumed, tried seconds that the others had deferred during its stall.
    seconds = periodic_seconds(dsn)
    assert len(seconds) >= STALLS * (STALL_SECONDS + RUN_SECONDS) - 2, seconds
    tried = {int(second) for second in DEFER_LOG.findall(stalled.log())}
    during_stalls = {
        second for second in tried if any(start < second < end for start, end in stalls)
    }
    assert during_stalls, (sorted(tried), stalls)

    twice = {second: count for second, count in seconds.items() if count > 1}
    print(
        f"\nperiodic stall: {len(seconds)} seconds deferred, {len(during_stalls)} seconds of "
        f"the stalls tried again by the stalled worker, {len(twice)} deferred twice"
    )
    assert twice == {}, f"seconds deferred more than once: {twice}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_mark_from_a_clock_far_ahead_does_not_silence_the_task(dsn: str, tmp_path: Path) -> None:
    """A worker whose clock ran an hour ahead left the mark of a second an hour away. Taken
    as how far the fleet has gone, it would keep every other worker from deferring the task
    for that hour; a mark more than a minute ahead of the database's clock does not count."""
    create_executions_table(dsn)
    fetch_all(
        dsn,
        "INSERT INTO procrastinate_periodic_defers (task_name, periodic_id, defer_timestamp) "
        "VALUES ('periodic_tick', 'tick', extract(epoch FROM now())::bigint + 3600) "
        "RETURNING id",
    )
    worker = WorkerProcess(dsn, tmp_path / "worker.log", "--periodic", "--concurrency", "4")
    try:
        wait_until(
            lambda: len(periodic_seconds(dsn)) >= 3,
            timeout=120,
            what="three seconds of the periodic task deferred",
        )
    finally:
        code = worker.stop()
    assert code == 0, worker.log()[-3000:]
