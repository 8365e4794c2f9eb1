"""What the fault tests share: the core's statements told apart on the wire, an app whose
tasks record every run (job and attempt) in the database, a worker run in this process with
its core's connections going through the fault proxy, and the invariant checks.

The tasks record their runs through the app's own pool, which connects to PostgreSQL
directly: only the core's connections (claims, completions, heartbeat, LISTEN) cross the
proxy, so a fault hits the worker and never the tests' own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import procrastinate
import psycopg
from procrastinate import JobContext, retry

import fastworker
from tests.conftest import fetch_all, make_app
from tests.faults.proxy import Fault, FaultProxy

#: Bounds of the waits (never a measured duration: only how long a failing test takes).
PATIENCE = 60.0

RUNS_TABLE = """
CREATE TABLE IF NOT EXISTS fw_runs (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempts integer NOT NULL,
    task text NOT NULL,
    run_id uuid UNIQUE,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS fw_gates (
    gate text NOT NULL,
    job_id bigint NOT NULL,
    attempts integer NOT NULL,
    PRIMARY KEY (gate, job_id, attempts)
)"""

# Markers of the core's statements (rust/core/src/sql.rs), most specific first.
_MARKERS: list[tuple[str, str]] = [
    ("retried AS", "complete"),  # also has the finish steps: before "complete_and_claim"
    ("finished AS", "complete_and_claim"),  # also has the claim's steps: before "claim"
    ("candidate AS", "claim"),
    ("procrastinate_finish_job_v1(claim.id", "finish_one"),
    ("procrastinate_retry_job_v2(claim.id", "retry_one"),
    ("NOT EXISTS (SELECT 1 FROM unnest($2", "orphans"),
    ("FROM unnest($1::bigint[], $2::int[]) AS known", "lost_claims"),
    ("SET last_heartbeat", "heartbeat"),
    ("abort_requested AND worker_id", "abort_poll"),
    ("FOR UPDATE SKIP LOCKED", "recover_lock"),
    (
        "WHERE worker_id = ANY($1::bigint[]) AND status = 'doing' FOR UPDATE",
        "recover_jobs",
    ),
    ("DELETE FROM procrastinate_workers WHERE id = ANY", "recover_delete"),
    ("procrastinate_retry_job_v2(id, now()", "recover_retry"),
    ("pg_terminate_backend", "terminate_backend"),
    ("backend_start = $2", "backend_alive"),
    ("pg_backend_pid()", "backend_identity"),
    ("procrastinate_prune_stalled_workers_v1", "prune"),
    ("procrastinate_defer_periodic_job", "defer_periodic"),
    ("procrastinate_register_worker_v1", "register"),
    ("procrastinate_unregister_worker_v1", "unregister"),
]


def classify(sql: str) -> str | None:
    """The kind of one of the core's statements (the proxy's classifier)."""
    for marker, kind in _MARKERS:
        if marker in sql:
            return kind
    words = sql.strip().split(None, 1)
    return words[0].rstrip(";").lower() if words else None


async def record_run(app: procrastinate.App, context: JobContext) -> None:
    """One row per run of a job attempt (the tasks' own record, read by the checks)."""
    job = context.job
    await app.connector.execute_query_async(
        "INSERT INTO fw_runs (job_id, attempts, task, run_id) "
        "VALUES (%(job_id)s, %(attempts)s, %(task)s, %(run_id)s)",
        job_id=job.id,
        attempts=job.attempts,
        task=job.task_name,
        run_id=str(uuid.uuid4()),
    )


async def pass_gate(app: procrastinate.App, context: JobContext, gate: str, size: int) -> None:
    """Wait until `size` jobs (this one included) are at `gate` at once."""
    await app.connector.execute_query_async(
        "INSERT INTO fw_gates (gate, job_id, attempts) VALUES (%(gate)s, %(id)s, %(a)s)",
        gate=gate,
        id=context.job.id,
        a=context.job.attempts,
    )
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        row = await app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM fw_gates WHERE gate = %(gate)s", gate=gate
        )
        if row["n"] >= size:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gate {gate}: never {size} jobs running at once")


def block_until_claimed(dsn: str, job_id: int) -> None:
    """Blocking (the point, from a task: the event loop stands still meanwhile) until the
    core has claimed the job."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        deadline = time.monotonic() + PATIENCE
        while connection.execute(
            "SELECT status = 'doing' FROM procrastinate_jobs WHERE id = %s", (job_id,)
        ).fetchone() != (True,):
            assert time.monotonic() < deadline, f"the core never claimed job {job_id}"
            time.sleep(0.02)


# Set by `release_row_locks`: the row locks held "until released" end.
_ROW_LOCKS_RELEASED = threading.Event()


def release_row_locks() -> None:
    _ROW_LOCKS_RELEASED.set()


def fault_app(dsn: str) -> procrastinate.App:
    """The app of the fault tests. Every task records its run first.

    - ``ok``: nothing else;
    - ``flaky``: fails its first attempt, succeeds its second (a retry, always);
    - ``sleepy``: sleeps ``seconds``; ``sleepy_sync``: the same in a thread, deaf to aborts;
    - ``gate``: waits until ``size`` jobs of its ``gate`` run at once (so a gate of
      ``concurrency`` jobs only opens if no slot of the worker was lost);
    - ``locked_ok`` / ``locked_flaky``: like ok / flaky, but another session keeps the
      job's own row locked for ``hold`` seconds from the moment it ends (its terminal write
      waits for the lock, then fails and is sent again).
    """
    app = make_app(dsn)
    _ROW_LOCKS_RELEASED.clear()

    @app.task(name="ok", pass_context=True)
    async def ok(context: JobContext, n: int = 0) -> int:
        await record_run(app, context)
        return n

    @app.task(name="flaky", pass_context=True, retry=retry.RetryStrategy(max_attempts=2))
    async def flaky(context: JobContext, n: int = 0) -> int:
        await record_run(app, context)
        if context.job.attempts == 0:
            raise RuntimeError(f"first attempt of job {context.job.id} fails")
        return n

    @app.task(name="sleepy", pass_context=True)
    async def sleepy(context: JobContext, seconds: float = 0.2) -> None:
        await record_run(app, context)
        await asyncio.sleep(seconds)

    @app.task(name="sleepy_sync", pass_context=True)
    def sleepy_sync(context: JobContext, seconds: float = 0.2) -> None:
        """Sleeps in a thread and does not look at should_abort(): nothing stops it."""
        job = context.job
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO fw_runs (job_id, attempts, task) VALUES (%s, %s, %s)",
                (job.id, job.attempts, job.task_name),
            )
        time.sleep(seconds)

    @app.task(name="gate", pass_context=True)
    async def gate(context: JobContext, gate: str, size: int) -> None:
        await record_run(app, context)
        await pass_gate(app, context, gate, size)

    def hold_row_lock(job_id: int, seconds: float) -> asyncio.Event:
        """Another session locks the job's row, for `seconds` (a negative number: until
        `release_row_locks()`, a fault's firing rather than a duration); set once it
        holds it."""
        locked = asyncio.Event()
        loop = asyncio.get_running_loop()

        def hold() -> None:
            with psycopg.connect(dsn) as connection:
                connection.execute(
                    "SELECT 1 FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (job_id,)
                )
                loop.call_soon_threadsafe(locked.set)
                if seconds < 0:
                    _ROW_LOCKS_RELEASED.wait(PATIENCE)
                else:
                    time.sleep(seconds)
                connection.rollback()

        threading.Thread(target=hold, daemon=True).start()
        return locked

    @app.task(name="locked_ok", pass_context=True)
    async def locked_ok(context: JobContext, hold: float = 3.0) -> None:
        await record_run(app, context)
        assert context.job.id is not None
        await hold_row_lock(context.job.id, hold).wait()

    @app.task(name="locked_flaky", pass_context=True, retry=retry.RetryStrategy(max_attempts=2))
    async def locked_flaky(context: JobContext, hold: float = 3.0) -> None:
        await record_run(app, context)
        if context.job.attempts == 0:
            assert context.job.id is not None
            await hold_row_lock(context.job.id, hold).wait()
            raise RuntimeError("first attempt fails while its row is locked")

    return app


def add_stalled_worker_with_a_job(dsn: str) -> int:
    """A worker silent for an hour, holding one job in `doing` that it ran once (its run
    recorded). Returns the job's id."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        worker = connection.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) "
            "VALUES (now() - interval '1 hour') RETURNING id"
        ).fetchone()
        assert worker is not None
        job = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id) "
            "VALUES ('default', 'ok', '{}', 'doing', %s) RETURNING id",
            (worker[0],),
        ).fetchone()
        assert job is not None
        connection.execute(
            "INSERT INTO fw_runs (job_id, attempts, task) VALUES (%s, 0, 'ok')", (job[0],)
        )
    return int(job[0])


def create_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(RUNS_TABLE)


def defer(dsn: str, task: str, count: int = 1, **args: Any) -> list[int]:
    """Insert `count` jobs of `task` (procrastinate's triggers notify as usual)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "SELECT 'default', %s, %s::jsonb FROM generate_series(1, %s) RETURNING id",
            (task, psycopg.types.json.Jsonb(args), count),
        ).fetchall()
    return [int(row[0]) for row in rows]


async def wait_until(predicate: Callable[[], Any], what: str, *, patience: float = PATIENCE) -> Any:
    """Poll `predicate` (run in a thread: it may query the database) until truthy."""
    deadline = time.monotonic() + patience
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {patience} s waiting for {what}")
        await asyncio.sleep(0.05)


def statuses(dsn: str) -> dict[str, int]:
    return {
        str(status): int(count)
        for status, count in fetch_all(
            dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"
        )
    }


def settled(dsn: str, allowed_doing: int = 0) -> bool:
    """No job waiting or running (but `allowed_doing` that are expected to stay doing)."""
    current = statuses(dsn)
    return not current.get("todo") and current.get("doing", 0) <= allowed_doing


@contextlib.asynccontextmanager
async def running(app: procrastinate.App, **options: Any) -> AsyncIterator[fastworker.Worker]:
    """A fastworker worker on `app` in this process; stopped (gracefully) at the end. It
    must still be running then: a worker that ended by itself is a failure."""
    worker = fastworker.Worker(app, install_signal_handlers=False, **options)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.worker_id is not None or task.done(), "the start")
        if task.done():
            task.result()
            raise AssertionError("the worker stopped at once")
        yield worker
        assert not task.done(), f"the worker stopped on its own: {task}"
    finally:
        worker.stop()
        await asyncio.wait_for(task, PATIENCE)


async def all_slots_work(dsn: str, concurrency: int, name: str = "final") -> None:
    """`concurrency` gate jobs must all run at once: no slot of the worker was lost."""
    ids = defer(dsn, "gate", concurrency, gate=name, size=concurrency)
    await wait_until(
        lambda: all(
            status == "succeeded"
            for (status,) in fetch_all(
                dsn,
                "SELECT status::text FROM procrastinate_jobs WHERE id = ANY(%s)",
                ids,
            )
        ),
        f"{concurrency} jobs running at once (a lost slot blocks them)",
    )


def check_runs(dsn: str, *, stuck: frozenset[int] = frozenset()) -> dict[int, list[int]]:
    """Every job ended `succeeded` (but `stuck` ones, expected to stay `doing`), and ran
    attempts 0..k-1 once each, in order, where k is its final `attempts`: no run skipped,
    none twice. Returns the runs by job."""
    jobs = fetch_all(dsn, "SELECT id, status::text, attempts FROM procrastinate_jobs ORDER BY id")
    runs: dict[int, list[int]] = {}
    for job_id, attempts in fetch_all(dsn, "SELECT job_id, attempts FROM fw_runs ORDER BY id"):
        runs.setdefault(int(job_id), []).append(int(attempts))
    problems = []
    for job_id, status, attempts in jobs:
        ran = runs.get(int(job_id), [])
        if job_id in stuck:
            if status != "doing" or ran != [0]:
                problems.append(f"job {job_id} (refused): {status}, runs {ran}")
            continue
        if status != "succeeded":
            problems.append(f"job {job_id} is {status} (attempts {attempts}), runs {ran}")
        elif ran != list(range(attempts)):
            problems.append(f"job {job_id}: runs of attempts {ran}, attempts {attempts}")
    assert not problems, "\n".join(problems)
    return runs


#: Longer than any test: a request swallowed this long is never answered.
FOREVER = 600.0


def black_hole_of(kind: str, occurrence: int = 1) -> Fault:
    """The `occurrence`-th next request of `kind` swallowed before the server sees it, its
    connection left half-open for longer than the test."""
    return Fault(
        kind=kind,
        occurrence=occurrence,
        point="before_request",
        action="blackhole",
        blackhole_seconds=FOREVER,
    )


def black_hole_every_start_up(proxy: FaultProxy) -> list[Fault]:
    """Every new connection's start-up swallowed from now on (the next 199 of them): the
    roles that reconnect wait on connects that never answer."""
    return [proxy.add_fault(black_hole_of("startup", n)) for n in range(1, 200)]
