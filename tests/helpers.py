"""Helpers for the behaviour tests: bounded waits, database snapshots, recorded log
actions. (Comparisons with procrastinate's worker are scenarios of the differential
harness, `tests/differential`.)

No timed assertions: waits are bounded polling loops with generous limits, which only
decide how long a failing test takes to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import fetch_all

T = TypeVar("T")

#: How long a bounded wait may last before the test fails (never a measured duration).
PATIENCE = 30.0


# --- processes ----------------------------------------------------------------------------


def run_process(
    command: Sequence[str] | str, *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`command` (its arguments, or a line for the shell) run to its end (within `timeout`),
    no stdin, its output captured as text."""
    return subprocess.run(
        command,
        shell=isinstance(command, str),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- waiting ------------------------------------------------------------------------------


async def wait_for(predicate: Callable[[], bool], what: str, *, patience: float = PATIENCE) -> None:
    """Poll `predicate` until it holds; fail (not hang) after `patience` seconds."""
    deadline = time.monotonic() + patience
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_value(
    value: Callable[[], Any], expected: Any, what: str, *, patience: float = PATIENCE
) -> None:
    """Poll `value()` until it equals `expected`; fail (not hang) after `patience` seconds."""
    deadline = time.monotonic() + patience
    while (current := value()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} == {expected!r} (is {current!r})")
        await asyncio.sleep(0.02)


def numbered(count: int) -> list[dict[str, Any]]:
    """Task arguments {"i": 0} ... {"i": count - 1}, for batch_defer_async."""
    return [{"i": i} for i in range(count)]


async def wait_for_rows(
    dsn: str, query: str, expected: list[tuple[Any, ...]], *, patience: float = PATIENCE
) -> None:
    """Poll a query (in a thread, so the worker keeps running) until it returns `expected`."""
    deadline = time.monotonic() + patience
    while True:
        rows = await asyncio.to_thread(fetch_all, dsn, query)
        if rows == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {query!r} to return {expected}: {rows}")
        await asyncio.sleep(0.05)


async def wait_until_listening(dsn: str, *, patience: float = PATIENCE) -> None:
    """Wait until a session of this database has run its LISTEN statements (a worker's
    listener), so a job deferred from now on is announced to it."""
    await wait_for_rows(
        dsn,
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'idle' AND position('LISTEN ' in query) = 1",
        [(True,)],
        patience=patience,
    )


def wait_in_thread(event: threading.Event, what: str) -> None:
    """For sync tasks: block on a threading.Event, bounded."""
    if not event.wait(PATIENCE):
        raise AssertionError(f"gave up waiting for {what}")


async def finish(task: asyncio.Task[Any]) -> BaseException | None:
    """Await a worker task; return how it ended (None, or the exception / cancellation)."""
    try:
        await asyncio.wait_for(asyncio.shield(task), PATIENCE)
    except asyncio.TimeoutError as error:
        task.cancel()
        raise AssertionError("the worker did not stop") from error
    except BaseException as error:
        return error
    return None


# --- what the database recorded -----------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    #: (id, task_name, queue_name, status, attempts, priority, lock, scheduled, abort_requested)
    #: ordered by id; `scheduled` is "none", "past" or "future".
    jobs: list[tuple[Any, ...]]
    #: Event types per job id, in the order they were recorded.
    events: dict[int, list[str]]
    #: Rows left in procrastinate_workers.
    workers: int
    #: Jobs left in `doing`.
    doing: int

    def statuses(self) -> dict[int, str]:
        return {row[0]: row[3] for row in self.jobs}


def snapshot(dsn: str) -> Snapshot:
    jobs = fetch_all(
        dsn,
        """SELECT id, task_name, queue_name, status::text, attempts, priority, lock,
                  CASE WHEN scheduled_at IS NULL THEN 'none'
                       WHEN scheduled_at > now() + interval '1 minute' THEN 'future'
                       ELSE 'past' END,
                  abort_requested
             FROM procrastinate_jobs ORDER BY id""",
    )
    events: dict[int, list[str]] = {}
    for job_id, event_type in fetch_all(
        dsn, "SELECT job_id, type::text FROM procrastinate_events ORDER BY id"
    ):
        events.setdefault(job_id, []).append(event_type)
    ((workers,),) = fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers")
    doing = sum(1 for row in jobs if row[3] == "doing")
    return Snapshot(jobs=jobs, events=events, workers=workers, doing=doing)


def doing_count(dsn: str) -> int:
    ((count,),) = fetch_all(dsn, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")
    return int(count)


# --- log records --------------------------------------------------------------------------

#: procrastinate's per-job log actions (the `action` extra of procrastinate.worker records).
JOB_ACTIONS = frozenset(
    {
        "loaded_job_info",
        "start_job",
        "job_success",
        "job_error",
        "job_error_retry",
        "job_aborted",
        "job_aborted_retry",
        "task_not_found",
        "finish_task",
        "abort_job",
    }
)


class ActionRecorder(logging.Handler):
    """Collects the `action` extra of procrastinate's log records."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def job_actions(self) -> dict[int, list[str]]:
        """Per job id, the job-level actions in the order they were logged.

        An `abort_job` logged after the job's `finish_task` is left out: procrastinate's
        worker logs one when its abort poller sees the job still in its running set after
        the outcome was written (a race, not a behaviour to reproduce)."""
        actions: dict[int, list[str]] = {}
        for record in self.records:
            action = getattr(record, "action", None)
            job = getattr(record, "job", None)
            if action in JOB_ACTIONS and isinstance(job, dict) and job.get("id") is not None:
                job_actions = actions.setdefault(job["id"], [])
                if action == "abort_job" and "finish_task" in job_actions:
                    continue
                job_actions.append(action)
        return actions

    def with_action(self, action: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "action", None) == action]


@contextlib.contextmanager
def record_actions() -> Iterator[ActionRecorder]:
    """Record procrastinate's log records and fastworker's own (`fastworker.core`)."""
    recorder = ActionRecorder()
    loggers = [logging.getLogger("procrastinate"), logging.getLogger("fastworker")]
    previous_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(recorder)
        logger.setLevel(logging.DEBUG)
    try:
        yield recorder
    finally:
        for logger, level in zip(loggers, previous_levels, strict=True):
            logger.removeHandler(recorder)
            logger.setLevel(level)
