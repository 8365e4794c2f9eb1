"""A worker that starts while the database refuses its statements for a passing reason: a
migration holding a lock on procrastinate's jobs table, a `pg_cancel_backend`. Each used to
end the worker at once ("preparing the claim statements: ERROR 57014", exit 1); the start
now tries again, as at any other time, within `reconnect_timeout`.

Real parts only: a session that really holds the lock, real cancels of the worker's own
backends found in `pg_stat_activity`, the CLI as a process where the exit code matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg

import fastworker
from tests.conftest import fetch_all
from tests.faults.harness import (
    PATIENCE,
    check_runs,
    create_tables,
    defer,
    fault_app,
    settled,
    wait_until,
)
from tests.helpers import record_actions
from tests.reliability.helpers import (
    REPO,
    create_executions_table,
    defer_jobs,
    execution_histogram,
    statuses,
)

#: The worker's backends that wait for a lock (its statements on the locked table).
WAITING_ON_A_LOCK = """
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND application_name = 'fastworker'
   AND wait_event_type = 'Lock'"""


@contextlib.contextmanager
def jobs_table_locked(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A session holding `procrastinate_jobs` as a migration would (ACCESS EXCLUSIVE),
    until the block ends or the caller rolls back."""
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
        try:
            yield holder
        finally:
            holder.rollback()


def lock_waiters(dsn: str) -> set[int]:
    return {int(pid) for (pid,) in fetch_all(dsn, WAITING_ON_A_LOCK)}


def test_a_migration_locking_the_jobs_table_as_the_cli_starts_delays_the_worker(
    dsn: str,
) -> None:
    """The lock is held while `fastworker worker --one-shot` starts: its first prepare of
    the claim waits for `lock_timeout` and fails with 55P03. The worker used to exit 1 on
    it; now it tries again until the lock is gone, then runs every job once and exits 0."""
    create_executions_table(dsn)
    defer_jobs(dsn, 5)
    with jobs_table_locked(dsn) as holder:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastworker",
                "--app",
                "tests.reliability.cli_app.app",
                "worker",
                "--dsn",
                dsn,
                "--one-shot",
                # lock_timeout is a quarter of it: 0.5 s.
                "--response-timeout",
                "2",
                "--reconnect-timeout",
                "120",
            ],
            cwd=REPO,
            env={**os.environ, "FW_RELIABILITY_DSN": dsn},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Two backends of the worker seen waiting for the lock, one after the other:
            # the first one's wait ended (lock timeout) and the worker went on.
            seen: set[int] = set()
            deadline = time.monotonic() + PATIENCE
            while len(seen) < 2 and process.poll() is None:
                assert time.monotonic() < deadline, "the worker never waited for the lock"
                seen |= lock_waiters(dsn)
                time.sleep(0.02)
            if process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(
                    f"the worker ended (exit {process.returncode}) while the jobs table was "
                    f"locked:\n{stderr[-3000:]}"
                )
        except BaseException:
            process.kill()
            process.wait(PATIENCE)
            raise
        holder.rollback()  # the migration is done
    try:
        _, stderr = process.communicate(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"the worker never ended:\n{stderr[-3000:]}") from None
    assert process.returncode == 0, stderr[-3000:]
    assert "55P03" in stderr, stderr[-3000:]
    assert statuses(dsn) == {"succeeded": 5}
    assert execution_histogram(dsn) == {1: 5}


async def test_a_cancel_of_the_first_prepare_is_tried_again(dsn: str) -> None:
    """While a lock holds the worker's first prepare of the claim, a DBA cancels it
    (`pg_cancel_backend`: 57014). The worker used to stop with that error; it now sets up
    its job connection again, and runs the jobs once the lock is gone."""
    create_tables(dsn)
    app = fault_app(dsn)
    jobs = defer(dsn, "ok", 3)
    with record_actions() as recorder, jobs_table_locked(dsn) as holder:
        async with app.open_async():
            # The default response_timeout: a lock is waited for 2 s, time to cancel.
            worker = fastworker.Worker(
                app, install_signal_handlers=False, fetch_job_polling_interval=3600
            )
            task = asyncio.create_task(worker.run())
            try:
                cancelled: set[int] = set()

                def cancel_a_waiter() -> bool:
                    """Cancel a waiting backend of the worker; True once a later one waits
                    (the worker went on after a cancel), or the worker ended."""
                    if task.done():
                        return True
                    waiting = lock_waiters(dsn)
                    if cancelled and waiting - cancelled:
                        return True
                    for pid in waiting - cancelled:
                        if fetch_all(dsn, "SELECT pg_cancel_backend(%s)", pid) == [(True,)]:
                            cancelled.add(pid)
                    return False

                await wait_until(cancel_a_waiter, "a cancel of the worker's first prepare")
                assert not task.done(), f"the worker stopped: {task.exception()!r}"
                holder.rollback()
                await wait_until(lambda: settled(dsn) or task.done(), "the jobs")
                assert not task.done(), f"the worker stopped: {task.exception()!r}"
            finally:
                worker.stop()
                await asyncio.wait_for(task, PATIENCE)
    check_runs(dsn)
    assert len(jobs) == 3
    messages = [record.getMessage() for record in recorder.records]
    assert any("57014" in message for message in messages), messages


async def test_a_lock_on_the_workers_table_at_start_delays_the_registration(dsn: str) -> None:
    """A migration holds `procrastinate_workers` as the worker starts: its registration
    waits for `lock_timeout` and fails with 55P03. The start used to fail with that error;
    it now registers once the lock is gone, and the worker runs the jobs."""
    create_tables(dsn)
    app = fault_app(dsn)
    defer(dsn, "ok", 3)
    with record_actions() as recorder, psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE procrastinate_workers IN ACCESS EXCLUSIVE MODE")
        async with app.open_async():
            worker = fastworker.Worker(
                app,
                install_signal_handlers=False,
                fetch_job_polling_interval=3600,
                response_timeout=2,  # lock_timeout: 0.5 s
            )
            task = asyncio.create_task(worker.run())
            try:
                # Statements of the worker that waited for the lock, told apart by when
                # they started: the prune, the registration (both fail after lock_timeout),
                # and a third one only if the start went on after that.
                waits: set[Any] = set()

                def third_wait() -> bool:
                    waits.update(
                        started
                        for (started,) in fetch_all(
                            dsn, WAITING_ON_A_LOCK.replace("SELECT pid", "SELECT query_start")
                        )
                    )
                    return task.done() or len(waits) >= 3

                await wait_until(third_wait, "the start to try again after a lock timeout")
                assert not task.done(), f"the worker stopped: {task.exception()!r}"
                assert worker.worker_id is None  # not registered yet
                holder.rollback()
                await wait_until(lambda: settled(dsn) or task.done(), "the jobs")
                assert not task.done(), f"the worker stopped: {task.exception()!r}"
                assert worker.worker_id is not None
            finally:
                holder.rollback()
                worker.stop()
                await asyncio.wait_for(task, PATIENCE)
    check_runs(dsn)
    # Logged once the worker runs (the start's records reach Python then).
    refused = recorder.with_action("start_statement_refused")
    assert refused and "55P03" in refused[0].getMessage(), refused
