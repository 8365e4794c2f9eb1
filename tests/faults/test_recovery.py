"""Stalled-job recovery: a passing error never loses a job.

- A recovery that meets a passing error (another session's open transaction holding the
  job's queueing lock past the core's `lock_timeout`) leaves the job for the next round,
  on both of its paths (the jobs of pruned workers, the jobs left without a worker). It
  used to mark the job `failed`: never run again.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import psycopg
import pytest

from tests.conftest import fetch_all
from tests.faults.harness import PATIENCE, check_runs, create_tables, fault_app, running, wait_until

# Short, so that the tests are.
HEARTBEAT = 0.5
STALLED = 2.0
SHORT = {"update_heartbeat_interval": HEARTBEAT, "stalled_worker_timeout": STALLED}
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
