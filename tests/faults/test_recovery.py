"""Stalled-job recovery: a passing error never loses a job, and a fleet heals by default.

- A recovery that meets a passing error (another session's open transaction holding the
  job's queueing lock past the core's `lock_timeout`) leaves the job for the next round,
  on both of its paths (the jobs of pruned workers, the jobs left without a worker). It
  used to mark the job `failed`: never run again.
- With the default options, a SIGKILLed worker's running jobs run again (none is left
  `doing`), each put back once, whoever recovers them: two fastworkers at once, or after
  procrastinate's own worker pruned the dead one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from procrastinate import App

import fastworker
from fastworker.cli import create_parser
from tests.conftest import fetch_all
from tests.faults.harness import PATIENCE, check_runs, create_tables, fault_app, running, wait_until
from tests.reliability import helpers
from tests.reliability.helpers import WorkerProcess, create_executions_table, defer_jobs

# Short, so that the tests are (the fleet tests leave every other option at its default).
HEARTBEAT = 0.5
STALLED = 2.0
SHORT = {"update_heartbeat_interval": HEARTBEAT, "stalled_worker_timeout": STALLED}
SHORT_FLAGS = ("--heartbeat", str(HEARTBEAT), "--stalled-timeout", str(STALLED))
# Past two of the core's `lock_timeout`s (2 s): the batch retry's and the one-by-one's.
HOLD_SECONDS = 6.0


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(record, "action", "")) for record in caplog.records]


def stalled_job_with_queueing_lock(dsn: str, *, with_worker: bool) -> int:
    """A `doing` job of task `ok` with `queueing_lock='q'`, its first run recorded (the
    run its worker was killed in). Held by a worker silent for an hour, or by no worker
    (its worker pruned by procrastinate's own worker)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        worker_id = None
        if with_worker:
            row = connection.execute(
                "INSERT INTO procrastinate_workers (last_heartbeat) "
                "VALUES (now() - interval '1 hour') RETURNING id"
            ).fetchone()
            assert row is not None
            worker_id = row[0]
        job = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id, "
            "queueing_lock) VALUES ('default', 'ok', '{}', 'doing', %s, 'q') RETURNING id",
            (worker_id,),
        ).fetchone()
        assert job is not None
        connection.execute(
            "INSERT INTO fw_runs (job_id, attempts, task) VALUES (%s, 0, 'ok')", (job[0],)
        )
    return int(job[0])


def recovery_waiting_for_a_lock(dsn: str) -> bool:
    return bool(
        fetch_all(
            dsn,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'fastworker' "
            "AND wait_event_type = 'Lock'",
        )
    )


class QueueingLockHolder:
    """Another session defers a job with queueing lock `q` in a transaction it keeps
    open until the recovery has waited for it, then `HOLD_SECONDS` more, then rolls
    back (the lock was never taken for good)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.holding = threading.Event()
        self.recovery_waited = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        with psycopg.connect(self.dsn) as connection:
            connection.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, queueing_lock) "
                "VALUES ('default', 'ok', '{}', 'q')"
            )
            self.holding.set()
            if self.recovery_waited.wait(PATIENCE):
                threading.Event().wait(HOLD_SECONDS)
            connection.rollback()
        self.done.set()

    async def __aenter__(self) -> QueueingLockHolder:
        self.thread.start()
        await asyncio.to_thread(self.holding.wait, PATIENCE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.recovery_waited.set()
        await asyncio.to_thread(self.thread.join, PATIENCE)


# --- item 1: a passing error leaves the job for the next round ---------------------------


@pytest.mark.parametrize("with_worker", [True, False], ids=["pruned worker", "no worker"])
async def test_a_recovery_meeting_a_lock_timeout_runs_the_job_once_later(
    dsn: str, caplog: pytest.LogCaptureFixture, with_worker: bool
) -> None:
    """The stalled job's retry waits for another session's uncommitted job with the same
    queueing lock, past the core's lock_timeout. The job used to be marked `failed` ("could
    not be retried and was marked failed: canceling statement due to lock timeout") and
    never ran. It is left `doing`, then put back to run once the session rolled back: it
    runs exactly once more. (`pruned worker`: the start-up recovery meets it; `no worker`,
    its worker pruned by procrastinate's own worker: the recovery rounds do.)"""
    caplog.set_level(logging.INFO, logger="fastworker.core")
    create_tables(dsn)
    job_id = stalled_job_with_queueing_lock(dsn, with_worker=with_worker)
    other = fastworker_free_job(dsn)
    app = fault_app(dsn)
    options = {"recover_stalled_jobs": True, **SHORT}
    async with QueueingLockHolder(dsn) as holder, app.open_async(), running(app, **options):
        # (A job failed instead of left ends the waits: the checks below say so.)
        await wait_until(
            lambda: recovery_waiting_for_a_lock(dsn) or "stalled_job_failed" in actions(caplog),
            "the recovery to wait",
        )
        holder.recovery_waited.set()
        await wait_until(
            lambda: {"stalled_job_left", "stalled_job_failed"} & set(actions(caplog)),
            "the job to be left",
        )
        await asyncio.to_thread(holder.done.wait, PATIENCE)
        await wait_until(
            lambda: fetch_all(
                dsn,
                "SELECT status::text IN ('succeeded', 'failed') FROM procrastinate_jobs "
                "WHERE id = %s",
                job_id,
            )[0][0],
            "the stalled job to end",
        )
    failed = [
        record.getMessage() for record in caplog.records if "marked failed" in record.getMessage()
    ]
    assert not failed, failed
    # Run once more (attempt 1), and so was the other job: nothing else went wrong.
    runs = check_runs(dsn)
    assert runs[job_id] == [0, 1], runs
    assert runs[other] == [0], runs


def fastworker_free_job(dsn: str) -> int:
    """A plain job to run alongside."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "VALUES ('default', 'ok', '{}') RETURNING id"
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- item 8: heal by default --------------------------------------------------------------


def doing_of(dsn: str, worker_id: int) -> set[int]:
    return {
        int(row[0])
        for row in fetch_all(
            dsn,
            "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %s",
            worker_id,
        )
    }


def worker_ids(dsn: str) -> set[int]:
    return {int(row[0]) for row in fetch_all(dsn, "SELECT id FROM procrastinate_workers")}


def start_workers(dsn: str, tmp_path: Path, names: list[str]) -> list[WorkerProcess]:
    return [
        WorkerProcess(dsn, tmp_path / f"{name}.log", "--concurrency", "10", *SHORT_FLAGS)
        for name in names
    ]


def registered(dsn: str, worker: WorkerProcess, known: set[int]) -> int:
    """The worker id `worker` registered (`known`: the ids there before it started)."""
    try:
        (worker_id,) = helpers.wait_until(
            lambda: worker_ids(dsn) - known, timeout=60, what="the worker's registration"
        )
    except BaseException:
        worker.kill()
        raise
    return int(worker_id)


def kill_mid_run(dsn: str, victim: WorkerProcess, worker_id: int) -> set[int]:
    """SIGKILL `victim` once it runs jobs. Returns the jobs it held."""
    try:
        helpers.wait_until(
            lambda: len(doing_of(dsn, worker_id)) >= 3, timeout=60, what="the victim's jobs"
        )
    finally:
        victim.kill()
    return doing_of(dsn, worker_id)


def every_job_ends(dsn: str, total: int) -> None:
    try:
        helpers.wait_until(
            lambda: helpers.statuses(dsn) == {"succeeded": total},
            timeout=120,
            what="every job to end",
        )
    except AssertionError as error:
        raise AssertionError(f"{error}: {helpers.statuses(dsn)}") from None


def check_healed(dsn: str, total: int, held: set[int]) -> None:
    """Every job succeeded; each job the killed worker held was put back once (one
    `deferred_for_retry`) and ran to its end."""
    assert helpers.statuses(dsn) == {"succeeded": total}
    assert 0 not in helpers.execution_histogram(dsn)
    rows = fetch_all(
        dsn,
        "SELECT j.id, j.attempts, array_agg(e.type::text ORDER BY e.id) "
        "FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id "
        "WHERE j.id = ANY(%s) GROUP BY 1, 2",
        list(held),
    )
    assert len(rows) == len(held)
    for job_id, attempts, events in rows:
        # One retry (put back once), then its run's end (procrastinate_finish_job_v1
        # counts it too).
        assert attempts == 2, (job_id, attempts, events)
        assert events.count("deferred_for_retry") == 1, (job_id, events)
        assert events[-2:] == ["started", "succeeded"], (job_id, events)


@pytest.mark.slow
def test_with_the_defaults_a_sigkilled_workers_jobs_run_again(dsn: str, tmp_path: Path) -> None:
    """Two fastworkers with the default options; one is SIGKILLed while it runs jobs. The
    other puts them back to run: none left `doing`. (They used to stay `doing` for ever
    unless `recover_stalled_jobs` was set.)"""
    create_executions_table(dsn)
    total = 300
    defer_jobs(dsn, total, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    (victim,) = start_workers(dsn, tmp_path, ["victim"])
    victim_id = registered(dsn, victim, set())
    (survivor,) = start_workers(dsn, tmp_path, ["survivor"])
    try:
        held = kill_mid_run(dsn, victim, victim_id)
        assert held
        every_job_ends(dsn, total)
    finally:
        assert survivor.stop() == 0, survivor.log()
    check_healed(dsn, total, held)
    assert "stalled_jobs_retried" in survivor.log()


@pytest.mark.slow
@pytest.mark.parametrize("pruned_by", ["nobody", "procrastinate"])
async def test_each_job_is_recovered_once_by_a_fleet_recovering_at_once(
    dsn: str, tmp_path: Path, pruned_by: str
) -> None:
    """A worker is SIGKILLed with running jobs. Then two fastworkers (default options)
    start at once and both recover; or procrastinate's own worker runs first (it prunes
    the dead worker at its start: its jobs stay `doing` without a worker) and the two
    fastworkers come after. Each job is put back once, and runs again."""
    from tests.reliability.tasks import close_app, make_app, open_app

    create_executions_table(dsn)
    total = 300
    defer_jobs(dsn, total, task="record_after", args_sql="json_build_object('n', n, 'sleep', 0.3)")
    (victim,) = start_workers(dsn, tmp_path, ["victim"])
    worker_id = await asyncio.to_thread(registered, dsn, victim, set())
    held = await asyncio.to_thread(kill_mid_run, dsn, victim, worker_id)
    assert held
    await asyncio.to_thread(
        helpers.wait_until,
        lambda: fetch_all(
            dsn,
            "SELECT last_heartbeat < now() - %s::interval FROM procrastinate_workers WHERE id = %s",
            f"{STALLED} seconds",
            worker_id,
        )[0][0],
        timeout=30,
        what="the victim's heartbeat to age",
    )
    if pruned_by == "procrastinate":
        app: App = make_app(dsn)
        await open_app(app)
        try:
            await app.run_worker_async(
                concurrency=50,
                wait=False,
                install_signal_handlers=False,
                stalled_worker_timeout=STALLED,
            )
        finally:
            await close_app(app)
        assert worker_ids(dsn) == set()
        assert helpers.statuses(dsn) == {"succeeded": total - len(held), "doing": len(held)}
    fleet = start_workers(dsn, tmp_path, ["first", "second"])
    try:
        await asyncio.to_thread(every_job_ends, dsn, total)
    finally:
        for worker in fleet:
            assert worker.stop() == 0, worker.log()
    check_healed(dsn, total, held)


def test_recovery_is_on_by_default_and_can_be_turned_off() -> None:
    import inspect

    parameter = inspect.signature(fastworker.Worker.__init__).parameters["recover_stalled_jobs"]
    assert parameter.default is True
    parser = create_parser()

    def parsed(*flags: str) -> Any:
        return getattr(parser.parse_args(["worker", *flags]), "recover_stalled_jobs", None)

    assert parsed() is None  # the default: the Worker's
    assert parsed("--no-recover-stalled-jobs") is False
    assert parsed("--recover-stalled-jobs") is True
