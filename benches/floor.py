"""The floors and ceilings the worker is set against: the core's own statements run by bare
loops, with no worker around them.

- `run_floor` (in a child process, benches/child.py `FloorChild`): pickup latency's floor.
  One connection LISTENs on procrastinate's channel; on each notification another one,
  under the core's session settings, runs the core's claim (one statement, one commit) for
  the free slots and an asyncio task starts per claimed job. Each step is timed, for the
  breakdown of where a pickup's time goes. A third connection finishes the jobs
  (`procrastinate_finish_job_v1`), off the timed path.
- `bare_drain`: the drain's ceiling at C=100, the core's statement that ends a batch and
  claims the next, one per round trip, from a psycopg loop (its Python costs about a
  microsecond per job at that batch size); `pgbench_drain` the same at C=1, where a Python
  loop's own time would count, from pgbench.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.numeric import Int4, Int8

from benches.child import FloorChild
from benches.workload import HOLD_SECONDS

CHANNEL = "procrastinate_any_queue_v1"


def settings_sql(settings: list[tuple[str, str]]) -> str:
    return "; ".join(f"SET {name} TO {value}" for name, value in settings)


async def run_floor(config: FloorChild) -> dict[str, Any]:
    """Until `expected` stamped jobs started (or 120 s): per stamped job, its times."""
    connect = psycopg.AsyncConnection.connect
    listen = await connect(config.dsn, autocommit=True)
    jobs = await connect(config.dsn, autocommit=True, cursor_factory=psycopg.AsyncRawCursor)
    done = await connect(config.dsn, autocommit=True)
    await jobs.execute(config.settings)  # type: ignore[arg-type]
    row = await (
        await done.execute("SELECT worker_id FROM procrastinate_register_worker_v1()")
    ).fetchone()
    assert row is not None
    worker_id = row[0]
    await listen.execute(f'LISTEN "{CHANNEL}"')
    notified: dict[int, float] = {}
    records: dict[int, dict[str, float]] = {}
    running: set[asyncio.Task[None]] = set()
    wake = asyncio.Event()
    more = [False]  # whether the last claim filled every free slot
    stamped = asyncio.Event()

    async def hear() -> None:
        async for notify in listen.notifies():
            received = time.time()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                notified[int(json.loads(notify.payload)["job_id"])] = received
            wake.set()

    async def run(job: tuple[Any, ...], sent: float, claimed: float) -> None:
        started = time.time()
        job_id, task_name, args = job[0], job[2], json.loads(job[6])
        if task_name == "stamp":
            records[job_id] = {
                "deferred": args["t"],
                "notified": notified.get(job_id, float("nan")),
                "claim_sent": sent,
                "claimed": claimed,
                "started": started,
            }
            if len(records) >= config.expected:
                stamped.set()
        elif task_name == "hold":
            await asyncio.sleep(args["seconds"])
            await done.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " VALUES ('default', 'hold', json_build_object('seconds', %s::float8))",
                (HOLD_SECONDS,),
            )
        await done.execute("SELECT procrastinate_finish_job_v1(%s, 'succeeded', false)", (job_id,))
        if more[0]:  # the last claim filled every free slot: there may be jobs left
            wake.set()

    async def claim_loop() -> None:
        while True:
            await wake.wait()
            wake.clear()
            while (free := config.concurrency - len(running)) > 0:
                sent = time.time()
                cursor = await jobs.execute(
                    config.claim,
                    (None, Int8(worker_id), Int8(free), Int8(config.concurrency), []),
                    prepare=True,
                )
                claimed_rows = await cursor.fetchall()
                claimed = time.time()
                for job in claimed_rows:
                    task = asyncio.create_task(run(job, sent, claimed))
                    running.add(task)
                    task.add_done_callback(running.discard)
                more[0] = len(claimed_rows) == free
                if not more[0]:
                    break

    hearing = asyncio.create_task(hear())
    claiming = asyncio.create_task(claim_loop())
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stamped.wait(), timeout=120)
    for task in (hearing, claiming, *running):
        task.cancel()
    await asyncio.gather(hearing, claiming, *running, return_exceptions=True)
    for connection in (listen, jobs, done):
        await connection.close()
    return {"records": records}


def claimed_ids(rows: list[tuple[Any, ...]]) -> tuple[list[Int8], int]:
    """Of the rows of the statement that ends a batch and claims: the claimed ids (last
    column true) and how many claims it ended. The parameters go as the types the
    statement casts them to (`bigint`, `int`): psycopg would send small numbers as
    `smallint`, and a cast of an array parameter is then computed for every row."""
    claimed = [Int8(row[0]) for row in rows if row[-1]]
    return claimed, len(rows) - len(claimed)


def bare_drain(
    dsn: str, statement: str, settings: list[tuple[str, str]], concurrency: int
) -> dict[str, float]:
    """Drain the queue with the core's statement that ends a batch and claims the next:
    each round trip ends every job the previous one claimed (succeeded) and claims up to
    `concurrency`. Wall and client CPU seconds, and the jobs ended."""
    with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.RawCursor) as connection:
        connection.execute(settings_sql(settings))  # type: ignore[arg-type]
        worker_id = connection.execute(
            "SELECT worker_id FROM procrastinate_register_worker_v1()"
        ).fetchone()[0]  # type: ignore[index]
        ended = 0
        running: list[Int8] = []
        cpu = time.process_time()
        wall = time.perf_counter()
        while True:
            rows = connection.execute(
                statement,  # type: ignore[arg-type]
                (
                    None,
                    Int8(worker_id),
                    Int8(concurrency),
                    Int8(concurrency),
                    [],
                    running,
                    [Int4(0)] * len(running),
                    ["succeeded"] * len(running),
                    [],
                    [],
                    [Int8(worker_id)],
                ),
                prepare=True,
            ).fetchall()
            running, count = claimed_ids(rows)
            ended += count
            if not running:
                break
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "ended": ended}


def pgbench_script(statement: str) -> str:
    """The statement as a pgbench script at C=1: the job it ends (`$6`) is the one the
    previous run of the script claimed, `:n` (ids are claimed in order; the script counts
    them), the other parameters pgbench variables set once (`-D`). `$1` (queues: all) is
    a NULL literal: pgbench variables cannot be NULL."""
    ids = {int(number) for number in re.findall(r"\$(\d+)", statement)}
    if ids != set(range(1, 12)) or re.search(r"\$6(?!::bigint\[\])", statement):
        raise RuntimeError("the statement that ends and claims has other parameters than $1-$11")
    text = statement.replace("$6::bigint[]", "ARRAY[:n::bigint]")
    text = re.sub(r"\$1(?!\d)", "NULL", text)
    text = re.sub(r"\$(\d+)", r":p\1", text)
    # pgbench reads a script line by line: one statement per line, `;` at its end.
    text = " ".join(line.split("--")[0].strip() for line in text.splitlines())
    return f"{text};\n\\set n :n + 1\n"


def pgbench_drain(
    dsn: str, statement: str, settings: list[tuple[str, str]], jobs: int, first_id: int
) -> dict[str, float]:
    """`jobs` + 1 runs of the C=1 script (the last ends the last job), one client, prepared
    statements, the session settings in PGOPTIONS. Wall and client CPU seconds."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        worker_id = connection.execute(
            "SELECT worker_id FROM procrastinate_register_worker_v1()"
        ).fetchone()[0]  # type: ignore[index]
    params = conninfo_to_dict(dsn)
    variables = {
        "n": str(first_id - 1),
        "p2": str(worker_id),
        "p3": "1",
        "p4": "1",
        "p5": "{}",
        "p7": "{0}",
        "p8": "{succeeded}",
        "p9": "{}",
        "p10": "{}",
        "p11": f"{{{worker_id}}}",
    }
    env = {
        **os.environ,
        "PGOPTIONS": " ".join(f"-c {name}={value}" for name, value in settings),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(pgbench_script(statement))
        script.flush()
        command = ["pgbench", "-n", "-M", "prepared", "-c", "1", "-t", str(jobs + 1)]
        command += ["-f", script.name]
        for name, value in variables.items():
            command += ["-D", f"{name}={value}"]
        for option, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
            if params.get(key):
                command += [option, str(params[key])]
        command.append(str(params.get("dbname") or "postgres"))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"pgbench failed:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall": wall, "cpu": cpu, "ended": jobs}
