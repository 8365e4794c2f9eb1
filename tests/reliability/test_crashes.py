"""A worker SIGKILLed mid-drain: its jobs stay `doing` under its worker_id; the next worker
prunes it and, with `recover_stalled_jobs` (the default), puts the jobs back to run with
procrastinate's retry semantics. With the option off, the end state is procrastinate's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import (
    REPO,
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    execution_histogram,
    statuses,
    wait_until,
)

HEARTBEAT = "0.5"
STALLED = "2"


def doing_by_worker(dsn: str) -> dict[int | None, int]:
    return dict(
        fetch_all(
            dsn,
            "SELECT worker_id, count(*) FROM procrastinate_jobs WHERE status = 'doing' GROUP BY 1",
        )
    )


def worker_ids(dsn: str) -> set[int]:
    return {row[0] for row in fetch_all(dsn, "SELECT id FROM procrastinate_workers")}


def stale(dsn: str, worker_id: int) -> bool:
    rows = fetch_all(
        dsn,
        "SELECT last_heartbeat < now() - %s::interval FROM procrastinate_workers WHERE id = %s",
        f"{STALLED} seconds",
        worker_id,
    )
    return bool(rows and rows[0][0])


def start_and_kill(dsn: str, log: Path, *extra: str) -> tuple[int, set[int]]:
    """Start a worker, let it get going, SIGKILL it with jobs in `doing`.
    Returns its worker id and the jobs it held."""
    before = worker_ids(dsn)
    worker = WorkerProcess(
        dsn,
        log,
        "--concurrency",
        "10",
        "--heartbeat",
        HEARTBEAT,
        "--stalled-timeout",
        STALLED,
        *extra,
    )
    try:
        new = wait_until(lambda: worker_ids(dsn) - before, timeout=60, what="registration")
        (worker_id,) = new
        # Mid-drain: some jobs done by this worker, some held.
        wait_until(
            lambda: (
                doing_by_worker(dsn).get(worker_id, 0) >= 5
                and fetch_all(
                    dsn,
                    "SELECT count(*) FROM fw_executions e "
                    "JOIN procrastinate_jobs j ON j.id = e.job_id WHERE j.status = 'succeeded'",
                )[0][0]
                > 0
            ),
            timeout=60,
            what="the worker to be mid-drain",
        )
    finally:
        worker.kill()
    held = {
        row[0]
        for row in fetch_all(
            dsn,
            "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %s",
            worker_id,
        )
    }
    return worker_id, held


def recovering_worker(dsn: str, log: Path, *extra: str) -> WorkerProcess:
    """A worker (C=50) that recovers stalled workers' jobs, with the tests' short timings."""
    return WorkerProcess(
        dsn,
        log,
        *extra,
        "--concurrency",
        "50",
        "--recover-stalled-jobs",
        "--heartbeat",
        HEARTBEAT,
        "--stalled-timeout",
        STALLED,
    )


def drain_with_recovery(dsn: str, log: Path) -> str:
    """A worker that recovers the dead one's jobs at start, drains the queue and exits 0.
    Returns its log."""
    last = recovering_worker(dsn, log, "--once")
    assert last.wait(timeout=240) == 0, last.log()
    return last.log()


@pytest.mark.slow
def test_sigkill_ten_times_with_recovery_loses_nothing(dsn: str, tmp_path: Path) -> None:
    create_executions_table(dsn)
    total = 1200
    defer_jobs(dsn, total, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    interrupted: set[int] = set()
    for round_number in range(10):
        worker_id, held = start_and_kill(
            dsn, tmp_path / f"worker{round_number}.log", "--recover-stalled-jobs"
        )
        # Killed: the held jobs stay `doing`, still under the dead worker's id and row.
        assert held, "the killed worker held no job"
        assert doing_by_worker(dsn) == {worker_id: len(held)}
        assert worker_id in worker_ids(dsn)
        interrupted |= held
        # Once its heartbeat is older than stalled_worker_timeout, the next start prunes it.
        wait_until(
            lambda worker_id=worker_id: stale(dsn, worker_id), timeout=30, what="stale heartbeat"
        )

    # The last worker drains what is left (recovering the tenth victim's jobs at start).
    last_log = drain_with_recovery(dsn, tmp_path / "last.log")

    assert statuses(dsn) == {"succeeded": total}
    assert worker_ids(dsn) == set()
    histogram = execution_histogram(dsn)
    # Every job ran to its end at least once; a second run only for a job killed after it
    # recorded its run but before its completion was written.
    assert 0 not in histogram
    assert sum(jobs for runs, jobs in histogram.items() if runs > 1) <= len(interrupted)
    # The interrupted jobs went back through procrastinate_retry_job_v2.
    retried = fetch_all(
        dsn,
        "SELECT j.id, j.attempts, array_agg(e.type::text ORDER BY e.id) FROM procrastinate_jobs j "
        "JOIN procrastinate_events e ON e.job_id = j.id WHERE j.id = ANY(%s) GROUP BY 1, 2",
        list(interrupted),
    )
    assert len(retried) == len(interrupted)
    for job_id, attempts, events in retried:
        assert "deferred_for_retry" in events, (job_id, events)
        assert events[-1] == "succeeded", (job_id, events)
        assert attempts == events.count("deferred_for_retry") + 1, (job_id, attempts, events)
    assert "stalled_jobs_retried" in last_log or len(interrupted) > 0


def test_sigkill_while_the_pool_threads_run_sync_jobs_loses_nothing(
    dsn: str, tmp_path: Path
) -> None:
    """Sync jobs run in the worker's own threads (`sync_executor="threads"`, the default).
    A SIGKILL takes those threads with the process: the jobs they ran stay `doing` under
    the dead worker, the next worker puts them back, and each job runs to its end, a
    second time only if it was held."""
    create_executions_table(dsn)
    defer_jobs(
        dsn, 200, task="sync_record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)"
    )
    worker_id, held = start_and_kill(dsn, tmp_path / "victim.log")
    assert len(held) >= 5, held
    assert doing_by_worker(dsn) == {worker_id: len(held)}
    wait_until(lambda: stale(dsn, worker_id), timeout=30, what="stale heartbeat")

    drain_with_recovery(dsn, tmp_path / "next.log")
    assert statuses(dsn) == {"succeeded": 200}
    assert worker_ids(dsn) == set()
    histogram = execution_histogram(dsn)
    assert 0 not in histogram, histogram
    assert sum(jobs for runs, jobs in histogram.items() if runs > 1) <= len(held), histogram
    for _job_id, status, held_by, attempts, events in end_state(dsn, held):
        assert status == "succeeded" and held_by is None and attempts == 2, events
        assert "deferred_for_retry" in events and events[-2:] == ["started", "succeeded"], events


def end_state(dsn: str, held: set[int]) -> list[tuple[object, ...]]:
    return fetch_all(
        dsn,
        "SELECT j.id, j.status::text, j.worker_id, j.attempts, "
        "array_agg(e.type::text ORDER BY e.id) FROM procrastinate_jobs j "
        "JOIN procrastinate_events e ON e.job_id = j.id "
        "WHERE j.id = ANY(%s) GROUP BY 1, 2, 3, 4 ORDER BY 1",
        list(held),
    )


@pytest.mark.parametrize("next_worker", ["fastworker", "procrastinate"])
async def test_with_the_option_off_stalled_jobs_stay_doing_like_procrastinate(
    dsn: str, tmp_path: Path, next_worker: str
) -> None:
    """The next worker, fastworker with `recover_stalled_jobs=False` or procrastinate's
    own, prunes the dead worker: its jobs stay `doing` (worker_id now NULL), never run
    again."""
    create_executions_table(dsn)
    defer_jobs(dsn, 200, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    worker_id, held = start_and_kill(dsn, tmp_path / "victim.log")
    assert held
    wait_until(lambda: stale(dsn, worker_id), timeout=30, what="stale heartbeat")

    if next_worker == "fastworker":
        last = WorkerProcess(
            dsn,
            tmp_path / "next.log",
            "--once",
            "--concurrency",
            "50",
            "--no-recover-stalled-jobs",
            "--stalled-timeout",
            STALLED,
        )
        assert last.wait(timeout=120) == 0, last.log()
    else:
        from tests.reliability.tasks import close_app, make_app, open_app

        app = make_app(dsn)
        await open_app(app)
        try:
            await app.run_worker_async(
                concurrency=50,
                wait=False,
                install_signal_handlers=False,
                stalled_worker_timeout=float(STALLED),
            )
        finally:
            await close_app(app)

    assert worker_ids(dsn) == set()
    assert doing_by_worker(dsn) == {None: len(held)}
    assert statuses(dsn) == {"succeeded": 200 - len(held), "doing": len(held)}
    for _job_id, status, held_by, attempts, events in end_state(dsn, held):
        assert (status, held_by, attempts, events) == ("doing", None, 0, ["deferred", "started"])


def test_cli_flag_recover_stalled_jobs(dsn: str, tmp_path: Path) -> None:
    """`fastworker worker --recover-stalled-jobs` (the default, still accepted): the CLI's
    next worker puts a killed worker's jobs back to run."""
    create_executions_table(dsn)
    defer_jobs(dsn, 200, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    worker_id, held = start_and_kill(dsn, tmp_path / "victim.log")
    assert held
    wait_until(lambda: stale(dsn, worker_id), timeout=30, what="stale heartbeat")
    command = [
        sys.executable,
        "-m",
        "fastworker",
        "worker",
        "--app",
        "tests.reliability.cli_app.app",
        "--one-shot",
        "--concurrency",
        "50",
        "--recover-stalled-jobs",
        "--stalled-worker-timeout",
        STALLED,
        "--update-heartbeat-interval",
        HEARTBEAT,
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "FW_RELIABILITY_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert statuses(dsn) == {"succeeded": 200}
    assert 0 not in execution_histogram(dsn)
    for _job_id, status, held_by, attempts, events in end_state(dsn, held):
        assert status == "succeeded" and held_by is None and attempts == 2, events
        # procrastinate_retry_job_v2's events (its scheduled_at also records `scheduled`).
        assert events[:2] == ["deferred", "started"], events
        assert "deferred_for_retry" in events and events[-2:] == ["started", "succeeded"], events


def test_jobs_whose_dead_worker_was_pruned_elsewhere_are_recovered(
    dsn: str, tmp_path: Path
) -> None:
    """A killed worker pruned by a worker without recovery (procrastinate's own
    function, as its worker runs at start): its jobs stay `doing` with no worker. A worker
    with `recover_stalled_jobs` used to leave them so forever; it puts them back to run
    once they have had no worker for `stalled_worker_timeout`."""
    create_executions_table(dsn)
    defer_jobs(dsn, 200, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    worker_id, held = start_and_kill(dsn, tmp_path / "victim.log")
    assert held
    wait_until(lambda: stale(dsn, worker_id), timeout=30, what="stale heartbeat")
    pruned = fetch_all(
        dsn, "SELECT worker_id FROM procrastinate_prune_stalled_workers_v1(%s)", float(STALLED)
    )
    assert pruned == [(worker_id,)]
    assert doing_by_worker(dsn) == {None: len(held)}
    recovering = recovering_worker(dsn, tmp_path / "next.log")
    try:
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 200}, timeout=120, what="every job to end"
        )
    finally:
        assert recovering.stop() == 0, recovering.log()
    assert 0 not in execution_histogram(dsn)
    for _job_id, status, held_by, attempts, events in end_state(dsn, held):
        assert status == "succeeded" and held_by is None and attempts == 2, events
        assert "deferred_for_retry" in events and events[-2:] == ["started", "succeeded"], events
    assert "stalled_jobs_retried" in recovering.log()


def test_recovery_is_on_by_default() -> None:
    """A fleet heals itself unless told not to (tests/faults/test_recovery.py runs it)."""
    import inspect

    import fastworker

    parameter = inspect.signature(fastworker.Worker.__init__).parameters["recover_stalled_jobs"]
    assert parameter.default is True


def test_a_stalled_job_whose_queueing_lock_is_taken_is_failed_not_lost(
    dsn: str, tmp_path: Path
) -> None:
    """Recovery cannot put a job back to `todo` while another job with its queueing_lock
    waits there (procrastinate's unique index): that job is marked failed and logged, the
    rest of the dead worker's jobs are retried, nothing stays `doing`."""
    create_executions_table(dsn)
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) "
            "VALUES (now() - interval '1 hour') RETURNING id"
        ).fetchone()
        assert row is not None
        dead = row[0]
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id, "
            "queueing_lock) VALUES ('default', 'record', '{}', 'doing', %s, 'only-one'), "
            "('default', 'record', '{}', 'doing', %s, NULL), "
            "('default', 'record', '{}', 'todo', NULL, 'only-one')",
            (dead, dead),
        )
    worker = WorkerProcess(
        dsn,
        tmp_path / "worker.log",
        "--once",
        "--recover-stalled-jobs",
        "--heartbeat",
        HEARTBEAT,
        "--stalled-timeout",
        STALLED,
    )
    assert worker.wait(timeout=120) == 0, worker.log()
    assert fetch_all(
        dsn, "SELECT id, status::text, queueing_lock FROM procrastinate_jobs ORDER BY id"
    ) == [(1, "failed", "only-one"), (2, "succeeded", None), (3, "succeeded", "only-one")]
    assert "action=stalled_job_failed" in worker.log()
    assert worker_ids(dsn) == set()
