"""The floors and ceilings the worker is set against: the core's own statements run by bare
loops, with no worker around them.

- `run_floor` (in a child process, benches/child.py `FloorChild`): pickup latency's floor.
  One connection LISTENs on procrastinate's channel; on each notification another one,
  under the core's session settings, claims for the free slots with one statement and one
  commit, the core's claim. An asyncio task starts per claimed job. A job that ended is
  written at once on the same connection by the core's statement that ends jobs and
  claims, as the core does (its queries show the same: per job, one claim and one end).
  Each step of a pickup is timed, for the breakdown of where its time goes.
- `pgbench_drain`: the drain's ceiling, the core's statement that ends a batch and claims
  the next, one per round trip, run by pgbench (no Python anywhere).
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
    ended: list[tuple[int, int]] = []  # jobs run, with their attempts, not yet written
    wake = asyncio.Event()
    stamped = asyncio.Event()
    # As the core: a notification may be of a job scheduled for later, so the next claim
    # also looks at the schedule if it comes back short (the claim's last parameter).
    schedule_changed = [True]

    async def hear() -> None:
        async for notify in listen.notifies():
            received = time.time()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                notified[int(json.loads(notify.payload)["job_id"])] = received
            schedule_changed[0] = True
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
        ended.append((job_id, job[9]))
        wake.set()  # written at once, by the statement that ends and claims, as the core does

    async def claim(free: int) -> list[tuple[Any, ...]]:
        """The core's claim, or, with jobs ended since the last one, its statement that
        ends them and claims: one statement, one commit, either way. The claimed jobs
        (`true` in the next to last column; the other rows are ended claims and the look
        at the schedule)."""
        params: tuple[Any, ...] = (None, Int8(worker_id), Int8(free), Int8(config.concurrency), [])
        look = schedule_changed[0]
        if not ended:
            cursor = await jobs.execute(config.claim, (*params, look), prepare=True)
        else:
            ending = list(ended)
            ended.clear()
            cursor = await jobs.execute(
                config.complete_and_claim,
                (
                    *params,
                    [Int8(job_id) for job_id, _ in ending],
                    [Int4(attempts) for _, attempts in ending],
                    ["succeeded"] * len(ending),
                    [],
                    [],
                    [Int8(worker_id)],
                    look,
                ),
                prepare=True,
            )
        rows = await cursor.fetchall()
        claimed = [row for row in rows if row[-2]]
        if len(claimed) < free:  # the look was made
            schedule_changed[0] = False
        return claimed

    async def claim_loop() -> None:
        while True:
            await wake.wait()
            wake.clear()
            while True:
                free = max(0, config.concurrency - len(running))
                if not free and not ended:
                    break
                sent = time.time()
                claimed_rows = await claim(free)
                claimed = time.time()
                for job in claimed_rows:
                    task = asyncio.create_task(run(job, sent, claimed))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if len(claimed_rows) < free:  # none left for now
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


def pgbench_script(statement: str, batch: int) -> str:
    """The statement as a pgbench script that ends `batch` jobs and claims as many: the
    jobs it ends (`$6`) are those the previous run of the script claimed, `:n + 1` to
    `:n + batch` (ids are claimed in order; the script counts them: one job, an array of
    it; a batch, the array of a series, computed once per statement). The other
    parameters are pgbench variables set once (`-D`); `$1` (queues: all) is a NULL
    literal, pgbench variables cannot be NULL."""
    ids = {int(number) for number in re.findall(r"\$(\d+)", statement)}
    if ids != set(range(1, 13)) or re.search(r"\$6(?!::bigint\[\])", statement):
        raise RuntimeError("the statement that ends and claims has other parameters than $1-$12")
    ending = (
        "ARRAY[:n::bigint + 1]"
        if batch == 1
        else f"ARRAY(SELECT generate_series(:n::bigint + 1, :n::bigint + {batch}))"
    )
    text = statement.replace("$6::bigint[]", ending)
    text = re.sub(r"\$1(?!\d)", "NULL", text)
    text = re.sub(r"\$(\d+)", r":p\1", text)
    # pgbench reads a script line by line: one statement per line, `;` at its end.
    text = " ".join(line.split("--")[0].strip() for line in text.splitlines())
    return f"{text};\n\\set n :n + {batch}\n"


def pgbench_drain(
    dsn: str, statement: str, settings: list[tuple[str, str]], jobs: int, batch: int
) -> dict[str, float]:
    """The loaded queue (`jobs` jobs, consecutive ids), `batch` jobs per statement (the
    first run ends none, the last claims none), one client, prepared statements, the
    session settings in PGOPTIONS. Wall and client CPU seconds."""
    if jobs % batch:
        raise ValueError(f"{jobs} jobs do not make batches of {batch}")
    with psycopg.connect(dsn, autocommit=True) as connection:
        worker_id = connection.execute(
            "SELECT worker_id FROM procrastinate_register_worker_v1()"
        ).fetchone()[0]  # type: ignore[index]
        first = connection.execute(
            "SELECT min(id), max(id) - min(id) + 1 FROM procrastinate_jobs WHERE status = 'todo'"
        ).fetchone()
    if first is None or first[1] != jobs:
        raise RuntimeError(f"the queue is not {jobs} jobs of consecutive ids: {first}")
    params = conninfo_to_dict(dsn)
    variables = {
        "n": str(first[0] - 1 - batch),
        "p2": str(worker_id),
        "p3": str(batch),
        "p4": str(batch),
        "p5": "{}",
        "p7": "{" + ",".join(["0"] * batch) + "}",
        "p8": "{" + ",".join(["succeeded"] * batch) + "}",
        "p9": "{}",
        "p10": "{}",
        "p11": f"{{{worker_id}}}",
        # As the core in a drain: asked to look at the schedule, and only the last claim,
        # short, makes the look.
        "p12": "true",
    }
    env = {
        **os.environ,
        "PGOPTIONS": " ".join(f"-c {name}={value}" for name, value in settings),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(pgbench_script(statement, batch))
        script.flush()
        runs = jobs // batch + 1
        command = ["pgbench", "-n", "-M", "prepared", "-c", "1", "-t", str(runs)]
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
