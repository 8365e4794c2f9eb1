"""The tasks the reliability tests and the soak run, on a procrastinate app of their own.

Every task that "runs" records it in `fw_executions` (one row per execution, with the job
id and the worker's pid), so a test counts executions from the database, whatever process
ran them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Any

import procrastinate
import psycopg
import psycopg_pool
from procrastinate import JobContext

EXECUTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS fw_executions (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempts integer,
    task text NOT NULL,
    pid integer NOT NULL,
    run_id uuid UNIQUE,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""

RECORD = (
    "INSERT INTO fw_executions (job_id, attempts, task, pid, run_id) "
    "VALUES (%(job_id)s, %(attempts)s, %(task)s, %(pid)s, %(run_id)s) "
    "ON CONFLICT (run_id) DO NOTHING"
)


class CustomBaseError(BaseException):
    """A BaseException that is neither Exception, KeyboardInterrupt nor SystemExit."""


class Unserializable:
    def __repr__(self) -> str:
        return "<Unserializable>"


def make_app(
    dsn: str, *, pool_size: int = 8, periodic: bool = False, every_minute: int = 0
) -> procrastinate.App:
    """The app; open it with `open_app` (a pool that does not block on an unreachable server).
    `periodic`: a task deferred every second; `every_minute`: that many tasks
    (`every_minute_0`, ...) deferred every minute."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    app.fw_dsn = dsn  # type: ignore[attr-defined]
    app.fw_pool_size = pool_size  # type: ignore[attr-defined]

    async def record(context: JobContext) -> None:
        """One row per execution. Retried while the database is away (a restart, a killed
        connection): the run id makes a retried insert that had committed count once."""
        assert context.job.id is not None
        run_id = str(uuid.uuid4())
        for attempt in range(240):
            try:
                await app.connector.execute_query_async(
                    RECORD,
                    job_id=context.job.id,
                    attempts=context.job.attempts,
                    task=context.job.task_name,
                    pid=os.getpid(),
                    run_id=run_id,
                )
                return
            except (procrastinate.exceptions.ConnectorException, psycopg.OperationalError):
                if attempt == 239:
                    raise
                await asyncio.sleep(0.25)

    @app.task(name="record", pass_context=True)
    async def record_task(context: JobContext, n: int = 0, sleep: float = 0.0) -> int:
        """Records its execution, then sleeps."""
        await record(context)
        if sleep:
            await asyncio.sleep(sleep)
        return n

    @app.task(name="record_after", pass_context=True)
    async def record_after_task(context: JobContext, n: int = 0, sleep: float = 0.0) -> int:
        """Sleeps, then records its execution (a job killed while sleeping records nothing)."""
        if sleep:
            await asyncio.sleep(sleep)
        await record(context)
        return n

    @app.task(name="sync_record", pass_context=True)
    def sync_record_task(context: JobContext, n: int = 0) -> int:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(
                RECORD,
                {
                    "job_id": context.job.id,
                    "attempts": context.job.attempts,
                    "task": context.job.task_name,
                    "pid": os.getpid(),
                    "run_id": None,
                },
            )
        return n

    @app.task(name="sync_record_after", pass_context=True)
    def sync_record_after_task(context: JobContext, n: int = 0, sleep: float = 0.0) -> int:
        """A sync task: sleeps in its thread, then records its execution (a job killed
        while sleeping records nothing)."""
        time.sleep(sleep)
        return sync_record_task(context, n)

    @app.task(name="flaky", pass_context=True, retry=procrastinate.RetryStrategy(max_attempts=3))
    async def flaky_task(context: JobContext, n: int = 0, fail_percent: int = 5) -> int:
        """Fails `fail_percent`% of its runs (then procrastinate's retry strategy retries)."""
        await record(context)
        if random.randrange(100) < fail_percent:
            raise RuntimeError(f"flaky failure of job {context.job.id}")
        return n

    @app.task(name="abortable", pass_context=True)
    async def abortable_task(context: JobContext, sleep: float = 30.0) -> None:
        await record(context)
        await asyncio.sleep(sleep)

    @app.task(name="big_args", pass_context=True)
    async def big_args_task(context: JobContext, blob: str) -> int:
        await record(context)
        return len(blob)

    @app.task(name="typed", pass_context=True)
    async def typed_task(context: JobContext, a: int, b: int) -> int:
        await record(context)
        return a + b

    @app.task(name="block_loop", pass_context=True)
    async def block_loop_task(context: JobContext, seconds: float = 2.0) -> None:
        await record(context)
        time.sleep(seconds)  # noqa: ASYNC251 (the point: it blocks the event loop)

    @app.task(name="raise_base", pass_context=True)
    async def raise_base_task(context: JobContext, kind: str) -> None:
        await record(context)
        errors: dict[str, BaseException] = {
            "KeyboardInterrupt": KeyboardInterrupt("from a task"),
            "SystemExit": SystemExit(3),
            "custom": CustomBaseError("from a task"),
            "GeneratorExit": GeneratorExit(),
        }
        raise errors[kind]

    @app.task(name="non_json", pass_context=True)
    async def non_json_task(context: JobContext) -> Any:
        await record(context)
        return Unserializable()

    if periodic:

        @app.periodic(cron="* * * * * *", periodic_id="tick")
        @app.task(name="periodic_tick", pass_context=True, queueing_lock="periodic_tick")
        async def periodic_tick_task(context: JobContext, timestamp: int) -> None:
            await record(context)

    for index in range(every_minute):
        add_every_minute_task(app, index)
    return app


def add_every_minute_task(app: procrastinate.App, index: int) -> None:
    @app.periodic(cron="* * * * *", periodic_id=f"minute_{index}")
    @app.task(name=f"every_minute_{index}")
    async def every_minute(timestamp: int) -> None:
        return None


async def open_app(app: procrastinate.App) -> None:
    """Open the app on a pool that connects in the background (never blocks the start)."""
    pool = psycopg_pool.AsyncConnectionPool(
        app.fw_dsn,  # type: ignore[attr-defined]
        min_size=1,
        max_size=app.fw_pool_size,  # type: ignore[attr-defined]
        open=False,
        # Recording an execution is a test probe: no need to wait for the WAL flush.
        kwargs={"options": "-c synchronous_commit=off"},
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        reconnect_timeout=300,
    )
    await pool.open(wait=False)
    await app.open_async(pool=pool)
    app.fw_pool = pool  # type: ignore[attr-defined]


async def close_app(app: procrastinate.App) -> None:
    await app.close_async()
    await app.fw_pool.close()  # type: ignore[attr-defined]
