"""The differential harness: one scenario, run under procrastinate's `Worker` and under
`fastworker.Worker`, each on its own fresh database, reduced to a comparable `Outcome`.

A scenario is an ``async def scenario(run: Run) -> None``. It registers tasks on
``run.app`` (an open procrastinate app on the run's own database), defers jobs, runs a
worker through ``run.worker(...)`` / ``run.run_worker(...)`` / ``run.run_until(...)``
(which build procrastinate's or fastworker's class, depending on the run) and records its
side effects in ``run.effects``. Nothing in a scenario knows which worker it runs under.

What is compared (`Outcome`): every job row (status, attempts, queue, priority, lock,
queueing lock, arguments, abort flag, whether it is scheduled, held by a worker), the order
of the scheduled ones, the ordered event types per job, the worker rows left, the side
effects, and the log records of procrastinate's loggers that carry an ``action`` extra:
per job, the ordered (logger, level, action, job fields) records; for the worker, the
ordered (logger, level, action) records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import procrastinate
import psycopg
import pytest
from procrastinate import utils
from procrastinate import worker as procrastinate_worker

import fastworker
from tests.conftest import create_database, drop_database

Impl = Literal["procrastinate", "fastworker"]
IMPLEMENTATIONS: tuple[Impl, ...] = ("procrastinate", "fastworker")

#: A guard against hangs, never an assertion about speed.
GUARD_SECONDS = 20.0

#: Short intervals so that a scenario takes about a second (overridable per scenario).
FAST_OPTIONS: dict[str, Any] = {
    "fetch_job_polling_interval": 0.05,
    # Aborts come by notification unless a scenario says otherwise; a slow abort poll
    # keeps procrastinate's end-of-job abort race (scenario_zero_polling_intervals) away.
    "abort_job_polling_interval": 1.0,
    "install_signal_handlers": False,
}

# Job fields of a log record's ``job`` extra that mean the same in both runs.
_LOGGED_JOB_FIELDS = (
    "task_name",
    "status",
    "attempts",
    "queue",
    "priority",
    "lock",
    "queueing_lock",
    "task_kwargs",
)


def worker_class(impl: Impl) -> type[procrastinate_worker.Worker]:
    return procrastinate_worker.Worker if impl == "procrastinate" else fastworker.Worker


@dataclass
class Outcome:
    jobs: list[dict[str, Any]]
    scheduled_order: list[int]
    events: dict[int, list[str]]
    workers_left: int
    effects: list[Any]
    job_logs: dict[int, list[tuple[Any, ...]]]
    worker_logs: list[tuple[str, str, str, str, Any]]
    #: procrastinate.signals records, compared as a sorted list: fastworker installs its
    #: handlers before connecting (so a signal during start-up stops it cleanly), hence
    #: earlier in the sequence than procrastinate's worker does.
    signal_logs: list[tuple[str, str, str, str, Any]]


@dataclass
class Run:
    """One run of a scenario under one implementation."""

    impl: Impl
    dsn: str
    app: procrastinate.App
    effects: list[Any] = field(default_factory=list)
    #: Set by a scenario whose side effects happen in a nondeterministic order.
    unordered_effects: bool = False
    #: Worker-level log actions a scenario does not compare (timing-dependent ones).
    ignored_worker_actions: set[str] = field(default_factory=set)
    #: Per-job log actions a scenario does not compare (a documented difference).
    ignored_job_actions: set[str] = field(default_factory=set)
    _signals: dict[str, asyncio.Event] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None

    # --- workers ----------------------------------------------------------------------

    @property
    def worker_class(self) -> type[procrastinate_worker.Worker]:
        return worker_class(self.impl)

    def worker(self, *, fast: bool = True, **options: Any) -> procrastinate_worker.Worker:
        """This run's worker class, built like procrastinate's ``App._worker`` does."""
        final = {**(FAST_OPTIONS if fast else {}), **options}
        return self.worker_class(app=self.app, **final)

    async def run_worker(self, *, fast: bool = True, **options: Any) -> None:
        """Run a worker to its end (scenarios pass ``wait=False`` or stop it themselves)."""
        worker = self.worker(fast=fast, **options)
        async with asyncio.timeout(GUARD_SECONDS):
            await worker.run()

    async def run_until(
        self,
        until: Callable[[], Awaitable[Any]],
        *,
        fast: bool = True,
        worker: procrastinate_worker.Worker | None = None,
        **options: Any,
    ) -> procrastinate_worker.Worker:
        """Run a waiting worker, await ``until()`` while it runs, then stop it."""
        if worker is None:
            worker = self.worker(fast=fast, wait=True, **options)
        task = asyncio.create_task(worker.run(), name=f"{self.impl} worker")
        try:
            async with asyncio.timeout(GUARD_SECONDS):
                until_task = asyncio.ensure_future(until())
                done, _ = await asyncio.wait(
                    [until_task, task], return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    until_task.cancel()
                    task.result()
                    raise AssertionError("the worker stopped before the scenario's condition")
                until_task.result()
                worker.stop()
                await task
        finally:
            if not task.done():
                # The scenario failed: stop the worker without waiting on stuck jobs.
                task.cancel()
                await asyncio.wait([task], timeout=5)
        return worker

    @contextlib.contextmanager
    def patched_worker_class(self) -> Iterator[None]:
        """For the fastworker run, ``procrastinate.worker.Worker`` is fastworker's class
        (what a user patching procrastinate does); ``App.run_worker_async`` then uses it."""
        original = procrastinate_worker.Worker
        procrastinate_worker.Worker = self.worker_class  # type: ignore[misc]
        try:
            yield
        finally:
            procrastinate_worker.Worker = original  # type: ignore[misc]

    async def run_app_worker(self, **options: Any) -> None:
        """The app-level entry point: ``app.run_worker_async`` or ``fastworker.run_async``."""
        async with asyncio.timeout(GUARD_SECONDS):
            if self.impl == "procrastinate":
                await self.app.run_worker_async(**options)
            else:
                await fastworker.run_async(self.app, **options)

    # --- synchronisation between tasks and the scenario --------------------------------

    def _event(self, name: str) -> asyncio.Event:
        if name not in self._signals:
            self._signals[name] = asyncio.Event()
        return self._signals[name]

    def signal(self, name: str) -> None:
        """Set the named event; callable from the loop or from a sync task's thread."""
        assert self._loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._event(name).set()
        else:
            self._loop.call_soon_threadsafe(lambda: self._event(name).set())

    async def wait_signal(self, name: str) -> None:
        await self._event(name).wait()

    async def wait_log(self, action: str) -> None:
        """Wait until a procrastinate logger has emitted a record with this ``action``."""
        await self.wait_signal(f"log:{action}")

    def wait_signal_sync(self, name: str) -> None:
        """Block a sync task's thread until the named event is set."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.wait_signal(name), self._loop).result(GUARD_SECONDS)

    # --- the database ------------------------------------------------------------------

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cursor = await conn.execute(sql, params)  # type: ignore[arg-type]
            return await cursor.fetchall()

    async def until_db(self, sql: str, *params: Any, interval: float = 0.02) -> None:
        """Wait until ``sql`` returns a true first column (polled; guarded by the caller)."""
        while True:
            rows = await self.query(sql, *params)
            if rows and rows[0][0]:
                return
            await asyncio.sleep(interval)

    async def until_status(self, job_id: int, *statuses: str) -> None:
        await self.until_db(
            "SELECT status::text = ANY(%s) FROM procrastinate_jobs WHERE id = %s",
            list(statuses),
            job_id,
        )

    async def until_listening(self) -> None:
        """Wait until some connection to this database has subscribed to notifications."""
        await self.until_db(
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE '%%LISTEN %%'"
            " AND state = 'idle'"
            " AND pid <> pg_backend_pid()"
        )

    async def cancel(self, job_id: int, *, abort: bool = True) -> bool:
        """``app.job_manager.cancel_job_by_id``, called the way sync code would call it."""
        return await utils.sync_to_async(self.app.job_manager.cancel_job_by_id, job_id, abort=abort)

    # --- the outcome -------------------------------------------------------------------

    async def outcome(self, records: Iterable[logging.LogRecord]) -> Outcome:
        rows = await self.query(
            "SELECT id, task_name, status::text, attempts, queue_name, priority, lock,"
            " queueing_lock, args, abort_requested, scheduled_at IS NOT NULL,"
            " scheduled_at > now(), worker_id IS NOT NULL"
            " FROM procrastinate_jobs ORDER BY id"
        )
        keys = (
            "id",
            "task_name",
            "status",
            "attempts",
            "queue",
            "priority",
            "lock",
            "queueing_lock",
            "args",
            "abort_requested",
            "scheduled",
            "scheduled_in_future",
            "held_by_worker",
        )
        jobs = [dict(zip(keys, row, strict=True)) for row in rows]
        scheduled = await self.query(
            "SELECT id FROM procrastinate_jobs WHERE scheduled_at IS NOT NULL"
            " ORDER BY scheduled_at, id"
        )
        event_rows = await self.query(
            "SELECT job_id, type::text FROM procrastinate_events ORDER BY id"
        )
        events: dict[int, list[str]] = {}
        for job_id, kind in event_rows:
            events.setdefault(job_id, []).append(kind)
        workers_left = (await self.query("SELECT count(*) FROM procrastinate_workers"))[0][0]
        effects = sorted(self.effects, key=repr) if self.unordered_effects else list(self.effects)
        job_logs, worker_logs = _log_summary(
            records, self.ignored_worker_actions, self.ignored_job_actions
        )
        signal_logs = sorted(entry for entry in worker_logs if entry[0] == _SIGNALS_LOGGER)
        worker_logs = [entry for entry in worker_logs if entry[0] != _SIGNALS_LOGGER]
        return Outcome(
            jobs=jobs,
            scheduled_order=[row[0] for row in scheduled],
            events=events,
            workers_left=workers_left,
            effects=effects,
            job_logs=job_logs,
            worker_logs=worker_logs,
            signal_logs=signal_logs,
        )


_PLAIN_RECORD_KEYS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_SIGNALS_LOGGER = "procrastinate.signals"
# The loggers of the worker's own records (procrastinate.jobs etc. log the scenario's calls).
_WORKER_LOGGERS = ("procrastinate.worker", _SIGNALS_LOGGER, "procrastinate.periodic")


_DURATION = re.compile(r"\d+(?:\.\d+)? s\b")
_NUMBERS_AFTER = re.compile(r"(timestamp |next tasks to defer \(|worker )\d+")


def _message(record: logging.LogRecord) -> str:
    """The record's text, with durations and other run-dependent numbers masked."""
    text = _DURATION.sub("<duration>", record.getMessage())
    return _NUMBERS_AFTER.sub(r"\1<n>", text)


def _record_job_id(record: logging.LogRecord) -> int | None:
    job = getattr(record, "job", None)
    if isinstance(job, dict) and job.get("id") is not None:
        return int(job["id"])
    worker = getattr(record, "worker", None)
    if isinstance(worker, dict) and worker.get("job_id") is not None:
        return int(worker["job_id"])
    return None


def _log_summary(
    records: Iterable[logging.LogRecord], ignored: set[str], ignored_job_actions: set[str]
) -> tuple[dict[int, list[tuple[Any, ...]]], list[tuple[str, str, str, str, Any]]]:
    job_logs: dict[int, list[tuple[Any, ...]]] = {}
    worker_logs: list[tuple[str, str, str, str, Any]] = []
    acknowledged: set[int] = set()
    for record in records:
        if not record.name.startswith("procrastinate"):
            continue
        action = getattr(record, "action", None)
        if action is None:
            continue
        job_id = _record_job_id(record)
        if job_id is None:
            if action not in ignored and record.name.startswith(_WORKER_LOGGERS):
                worker = getattr(record, "worker", None)
                worker_id = worker.get("worker_id") if isinstance(worker, dict) else None
                worker_logs.append(
                    (record.name, record.levelname, action, _message(record), worker_id)
                )
            continue
        if action in ignored_job_actions:
            continue
        if action == "abort_job" and job_id in acknowledged:
            # procrastinate's race: its abort poll can answer after a job's end is written
            # (the id leaves `_job_ids_to_abort`) and before the job leaves `_running_jobs`
            # (a done callback, one loop turn later), and then logs the request again.
            continue
        if action == "finish_task":
            acknowledged.add(job_id)
        job = getattr(record, "job", None)
        fields: dict[str, Any] = {}
        if isinstance(job, dict):
            fields = {key: job.get(key) for key in _LOGGED_JOB_FIELDS}
            fields["scheduled"] = job.get("scheduled_at") is not None
        worker = getattr(record, "worker", None)
        if isinstance(worker, dict):
            fields["worker"] = (worker.get("name"), worker.get("queues"), worker.get("worker_id"))
        # Which extras the record carries (job_result's timestamps, exception, status...).
        fields["extras"] = sorted(set(record.__dict__) - _PLAIN_RECORD_KEYS)
        fields["exc_info"] = record.exc_info[0].__name__ if record.exc_info else None
        entry: tuple[Any, ...] = (record.name, record.levelname, action, _message(record), fields)
        if action == "job_success":
            entry += (repr(getattr(record, "result", None)),)
        job_logs.setdefault(job_id, []).append(entry)
    return job_logs, worker_logs


class _ActionSignals(logging.Handler):
    """Turns each ``action`` of procrastinate's log records into a `Run` signal."""

    def __init__(self, run: Run) -> None:
        super().__init__(logging.DEBUG)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        action = getattr(record, "action", None)
        if action is not None:
            self.run.signal(f"log:{action}")


Scenario = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    fn: Scenario
    app_options: dict[str, Any]
    connector_options: dict[str, Any] = field(default_factory=dict)


SCENARIOS: list[ScenarioSpec] = []


def scenario(
    connector_options: dict[str, Any] | None = None,
    **app_options: Any,
) -> Callable[[Scenario], Scenario]:
    """Register a scenario; ``app_options`` go to the `procrastinate.App` of each run,
    ``connector_options`` to its `procrastinate.PsycopgConnector`."""

    def register(fn: Scenario) -> Scenario:
        name = fn.__name__.removeprefix("scenario_")
        SCENARIOS.append(
            ScenarioSpec(
                name=name,
                fn=fn,
                app_options=app_options,
                connector_options=connector_options or {},
            )
        )
        return fn

    return register


@contextlib.asynccontextmanager
async def fresh_run(
    impl: Impl, connector_options: dict[str, Any] | None = None, **app_options: Any
) -> AsyncIterator[Run]:
    database = f"fw_diff_{impl[:4]}_{uuid.uuid4().hex[:10]}"
    dsn = await asyncio.to_thread(create_database, database)
    try:
        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=dsn, **(connector_options or {})),
            **app_options,
        )
        run = Run(impl=impl, dsn=dsn, app=app, _loop=asyncio.get_running_loop())
        handler = _ActionSignals(run)
        procrastinate_logger = logging.getLogger("procrastinate")
        procrastinate_logger.addHandler(handler)
        try:
            async with app.open_async():
                yield run
        finally:
            procrastinate_logger.removeHandler(handler)
    finally:
        await asyncio.to_thread(drop_database, database)


async def run_scenario(spec: ScenarioSpec, impl: Impl, caplog: pytest.LogCaptureFixture) -> Outcome:
    caplog.clear()
    async with fresh_run(impl, spec.connector_options, **spec.app_options) as run:
        try:
            async with asyncio.timeout(GUARD_SECONDS * 2):
                await spec.fn(run)
        except BaseException as exc:
            exc.add_note(f"in scenario {spec.name!r} under {impl}")
            raise
        outcome = await run.outcome(list(caplog.records))
    caplog.clear()
    return outcome


def in_thread(fn: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread
