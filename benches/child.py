"""The child processes of the side-by-side benchmark: each drain or waiting worker runs in
its own process, so that its CPU time is its own.

The parent describes a child with one of the configs below, sent as JSON (`{"kind": ...,
fields}`) as the child's only argument; the child prints one JSON line of results last.

    python -m benches.child '{"kind": "drain", "system": "fastworker", ...}'
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benches.workload import (
    ALL_STAMPED,
    DEFERRED,
    EXPECTED,
    IO_WORK,
    LATENCIES,
    RECORDS,
    build_app,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DrainChild:
    """Drains the queue (wait=False, or pgqueuer's drain mode), timing wall and CPU."""

    system: str
    dsn: str
    concurrency: int
    delete_jobs: str = "never"
    entrypoint: str = "noop"


@dataclass(frozen=True)
class LatencyChild:
    """A listening worker at `concurrency` until `expected` stamped jobs ran (or 120 s);
    busy: jobs still running then are cancelled after 1 s (the 10 s `hold` jobs)."""

    system: str
    dsn: str
    expected: int
    concurrency: int = 10
    busy: bool = False


@dataclass(frozen=True)
class FloorChild:
    """The floor of pickup latency: a bare asyncio loop (no worker) that LISTENs, claims
    with the core's statements (`claim`, or `complete_and_claim` when jobs ended; under
    the session settings `settings`, `SET` statements) on each notification, and starts a
    task per job, at most `concurrency` at once; until `expected` stamped jobs ran (or
    120 s). See benches/floor.py."""

    dsn: str
    expected: int
    claim: str
    complete_and_claim: str
    settings: str
    concurrency: int


@dataclass(frozen=True)
class ServeChild:
    """A waiting worker (default polling interval) until `expected` records or `timeout`."""

    system: str
    dsn: str
    concurrency: int
    entrypoint: str
    expected: int
    timeout: float


@dataclass(frozen=True)
class LimitChild:
    """The limit of the I/O-bound runs: the callable under a semaphore, no queue."""

    dsn: str
    entrypoint: str
    concurrency: int
    jobs: int


@dataclass(frozen=True)
class ScaleChild:
    """One of the scale-out fastworker processes: drains when told on stdin."""

    dsn: str
    concurrency: int


@dataclass(frozen=True)
class FleetChild:
    """One worker of a fleet: a listening worker at `concurrency`, ready once its app is
    open, stopped when the parent closes its stdin; its stamped jobs' pickups."""

    system: str
    dsn: str
    concurrency: int = 10


ChildConfig = (
    DrainChild | LatencyChild | FloorChild | ServeChild | LimitChild | ScaleChild | FleetChild
)
KINDS: dict[str, type[ChildConfig]] = {
    "drain": DrainChild,
    "latency": LatencyChild,
    "floor": FloorChild,
    "serve": ServeChild,
    "limit": LimitChild,
    "scale": ScaleChild,
    "fleet": FleetChild,
}


def encode(config: ChildConfig) -> str:
    kind = next(name for name, cls in KINDS.items() if isinstance(config, cls))
    return json.dumps({"kind": kind, **dataclasses.asdict(config)})


def decode(text: str) -> ChildConfig:
    """The config `encode` wrote; a clear ValueError for anything else."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"child config is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"child config is not a JSON object: {text!r}")
    kind = data.pop("kind", None)
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown child kind {kind!r} (of {', '.join(KINDS)})")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(
        name
        for name, field in fields.items()
        if name not in data and field.default is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(f"{kind} child config: unknown fields {unknown}, missing {missing}")
    for name, value in data.items():
        expected = hints[name]
        # JSON has no int/float distinction for whole numbers: a float field takes an int.
        accepted = (int, float) if expected is float else (expected,)
        # A bool is an int to isinstance: only a bool field takes one.
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
            raise ValueError(f"{kind} child config: {name}={value!r} is not {expected.__name__}")
    return cls(**data)


def command(config: ChildConfig) -> list[str]:
    return [sys.executable, "-m", "benches.child", encode(config)]


def start(config: ChildConfig, **popen: Any) -> subprocess.Popen[str]:
    """The child, started from the repository root (where `benches` imports from)."""
    return subprocess.Popen(command(config), cwd=ROOT, text=True, **popen)


def start_ready(
    configs: list[ChildConfig], stack: contextlib.ExitStack
) -> list[tuple[subprocess.Popen[str], typing.IO[str]]]:
    """Each child started with its stdin and stdout piped and its stderr in a temporary file
    (a failing worker's tracebacks outgrow a pipe), returned once each said `ready`."""
    children = []
    for config in configs:
        stderr = stack.enter_context(tempfile.TemporaryFile("w+"))
        process = start(config, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        children.append((process, stderr))
    for process, stderr in children:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.wait()
            raise RuntimeError(failure(stderr))
    return children


def failure(stderr: typing.IO[str]) -> str:
    """The end of a failed child's stderr file."""
    stderr.seek(0)
    return stderr.read()[-3000:]


def run(config: ChildConfig) -> dict[str, Any]:
    """The child, run to its end: its results line."""
    completed = subprocess.run(
        command(config), cwd=ROOT, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{completed.stderr[-3000:]}")
    return last_line(completed.stdout)


def last_line(stdout: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


# --- in the child ----------------------------------------------------------------------


async def child_drain(config: DrainChild) -> dict[str, float]:
    from benches.pgq import build_queue_manager, pgqueuer_connect, run_queue_manager

    if config.system == "pgqueuer":
        connection = await pgqueuer_connect(config.dsn)
        # The I/O entrypoints query through a procrastinate app's connector, as the other
        # systems' tasks do.
        app = build_app(config.dsn)
        try:
            async with app.open_async():
                manager = build_queue_manager(connection, config.concurrency, config.entrypoint)
                cpu = time.process_time()
                wall = time.perf_counter()
                await run_queue_manager(manager, config.concurrency, drain=True)
                wall = time.perf_counter() - wall
                cpu = time.process_time() - cpu
        finally:
            await connection.close()
        return {"wall": wall, "cpu": cpu}
    app = build_app(config.dsn)
    async with app.open_async():
        cpu = time.process_time()
        wall = time.perf_counter()
        if config.system == "fastworker":
            import fastworker

            await fastworker.run_async(
                app,
                concurrency=config.concurrency,
                wait=False,
                install_signal_handlers=False,
                delete_jobs=config.delete_jobs,
            )
        else:
            await app.run_worker_async(
                concurrency=config.concurrency,
                wait=False,
                install_signal_handlers=False,
                delete_jobs=config.delete_jobs,
            )
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu}


async def wait_for_pgqueuer(
    dsn: str, concurrency: int, entrypoint: str, expected: int, timeout: float
) -> None:
    """A continuous pgqueuer worker, ready once listening, until `expected` or `timeout`."""
    from benches.pgq import build_queue_manager, pgqueuer_connect, run_queue_manager, wait_listening

    connection = await pgqueuer_connect(dsn)
    try:
        manager = build_queue_manager(connection, concurrency, entrypoint)
        task = asyncio.create_task(run_queue_manager(manager, concurrency, drain=False))
        await wait_listening(manager, task)
        print("ready", flush=True)
        EXPECTED[0] = expected
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ALL_STAMPED.wait(), timeout=timeout)
        manager.shutdown.set()
        await task
    finally:
        await connection.close()


async def wait_for_worker(
    system: str,
    dsn: str,
    concurrency: int,
    expected: int,
    timeout: float,
    shutdown_graceful_timeout: float | None = None,
    until_stdin_closes: bool = False,
) -> None:
    """procrastinate's worker or fastworker's, until `expected` or `timeout` (or, with
    `until_stdin_closes`, until the parent closes this process's stdin)."""
    app = build_app(dsn)
    options: dict[str, Any] = {
        "app": app,
        "concurrency": concurrency,
        "install_signal_handlers": False,
        "shutdown_graceful_timeout": shutdown_graceful_timeout,
    }
    async with app.open_async():
        if system == "fastworker":
            import fastworker

            worker: Any = fastworker.Worker(**options)
        else:
            from procrastinate import worker as procrastinate_worker

            worker = procrastinate_worker.Worker(**options)
        task = asyncio.create_task(worker.run())
        print("ready", flush=True)
        EXPECTED[0] = expected
        if until_stdin_closes:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ALL_STAMPED.wait(), timeout=timeout)
        worker.stop()
        await task


async def child_latency(config: LatencyChild) -> dict[str, Any]:
    if config.system == "pgqueuer":
        await wait_for_pgqueuer(config.dsn, 10, "stamp", config.expected, 120)
    else:
        await wait_for_worker(
            config.system,
            config.dsn,
            config.concurrency,
            config.expected,
            120,
            1.0 if config.busy else None,
        )
    return {"latencies": LATENCIES, "deferred": DEFERRED}


async def child_fleet(config: FleetChild) -> dict[str, Any]:
    await wait_for_worker(
        config.system, config.dsn, config.concurrency, 0, 0, until_stdin_closes=True
    )
    return {"latencies": LATENCIES, "deferred": DEFERRED}


async def child_serve(config: ServeChild) -> dict[str, Any]:
    if config.system == "pgqueuer":
        await wait_for_pgqueuer(
            config.dsn, config.concurrency, config.entrypoint, config.expected, config.timeout
        )
    else:
        await wait_for_worker(
            config.system, config.dsn, config.concurrency, config.expected, config.timeout
        )
    return {"records": RECORDS}


async def child_limit(config: LimitChild) -> dict[str, float]:
    """`jobs` calls of the I/O callable by a bare asyncio loop, at most `concurrency` at
    once (a semaphore), no queue; sync callables in a pool of `concurrency` threads. The
    app is open, for the query through its connector."""
    app = build_app(config.dsn)
    work = IO_WORK[config.entrypoint]
    semaphore = asyncio.Semaphore(config.concurrency)
    async with app.open_async():
        if asyncio.iscoroutinefunction(work):

            async def one() -> None:
                async with semaphore:
                    await work()

            cpu = time.process_time()
            wall = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(config.jobs)))
        else:
            loop = asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(max_workers=config.concurrency) as pool:

                async def one_sync() -> None:
                    async with semaphore:
                        await loop.run_in_executor(pool, work)

                cpu = time.process_time()
                wall = time.perf_counter()
                await asyncio.gather(*(one_sync() for _ in range(config.jobs)))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu}


async def child_scale(config: ScaleChild) -> dict[str, float]:
    """Ready once imported with its app open, then drains (wait=False) when the parent
    writes a line to its stdin."""
    import fastworker

    app = build_app(config.dsn)
    async with app.open_async():
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu = time.process_time()
        start = time.time()
        await fastworker.run_async(
            app, concurrency=config.concurrency, wait=False, install_signal_handlers=False
        )
        end = time.time()
        cpu = time.process_time() - cpu
    return {"start": start, "end": end, "cpu": cpu}


async def run_in_child(config: ChildConfig) -> dict[str, Any]:
    if isinstance(config, DrainChild):
        return await child_drain(config)
    if isinstance(config, LatencyChild):
        return await child_latency(config)
    if isinstance(config, FloorChild):
        from benches.floor import run_floor

        return await run_floor(config)
    if isinstance(config, ServeChild):
        return await child_serve(config)
    if isinstance(config, LimitChild):
        return await child_limit(config)
    if isinstance(config, FleetChild):
        return await child_fleet(config)
    return await child_scale(config)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benches.child CONFIG_JSON (started by benches/e2e.py)")
    try:
        child_config = decode(sys.argv[1])
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(asyncio.run(run_in_child(child_config))))
