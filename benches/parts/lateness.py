"""lateness and lateness_paced: start minus `scheduled_at` of jobs scheduled ahead, and of
jobs whose first attempt fails and is retried RETRY_WAIT_S later."""

from __future__ import annotations

import argparse
import functools
import random
import time
from datetime import timedelta
from typing import Any

import psycopg

from benches import child
from benches.measure import quantiles_ms, run_stamp
from benches.parts import Bench, Part, ms
from benches.pgq import pgqueuer_sync_queries
from benches.tables import finish_serve, reset_queue, start_serve
from benches.workload import RETRY_WAIT_S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lateness-jobs", type=int, default=200, help="jobs scheduled ahead")
    parser.add_argument(
        "--lateness-retries", type=int, default=100, help="jobs retried after a failure"
    )
    parser.add_argument(
        "--lateness-seconds",
        type=float,
        default=10.0,
        help="schedules (lateness) or deferrals (lateness_paced) spread over this long",
    )


def lateness(
    dsn: str, system: str, scheduled: int, retries: int, seconds: float, paced: bool
) -> dict[str, Any]:
    """Start minus scheduled_at, for `scheduled` jobs deferred with a schedule and
    `retries` jobs whose first attempt fails and is retried RETRY_WAIT_S later.

    Not paced (an idle worker): all jobs are deferred at once (one statement) to a waiting
    worker, scheduled 1 s to 1 + `seconds` s ahead; retried jobs too (their first attempt
    at that time), and nothing else happens: no notification wakes the worker when a job
    falls due. Paced: over `seconds`, one deferral at a time at a steady pace, each
    scheduled 1-3 s ahead (retried jobs: not scheduled), so the deferrals' notifications
    also wake the worker."""
    if system == "pgqueuer":
        retries = 0  # its retries are in-process (no job scheduled in the database)
    reset_queue(dsn, 0, "late", system)
    rng = random.Random(12)
    plan = ["scheduled"] * scheduled + ["retry"] * retries
    rng.shuffle(plan)
    timeout = seconds + 3 + RETRY_WAIT_S + 60  # the last job's schedule, then slack
    process, stderr = start_serve(child.ServeChild(system, dsn, 10, "late", len(plan), timeout))
    with psycopg.connect(dsn, autocommit=True) as connection:
        queries = pgqueuer_sync_queries(connection) if system == "pgqueuer" else None
        if not paced:
            delays = [1.0 + rng.uniform(0.0, seconds) for _ in plan]
            if queries is not None:
                queries.enqueue(
                    ["late"] * len(plan),
                    [None] * len(plan),
                    [0] * len(plan),
                    execute_after=[timedelta(seconds=delay) for delay in delays],
                )
            else:
                connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)"
                    " SELECT 'default', 'late', jsonb_build_object('fail_first', fail),"
                    "  now() + delay * interval '1 second'"
                    " FROM unnest(%s::float8[], %s::bool[]) AS plan(delay, fail)",
                    (delays, [kind == "retry" for kind in plan]),
                )
        else:
            interval = seconds / max(1, len(plan))
            next_at = time.perf_counter()
            for kind in plan:
                if kind == "scheduled":
                    delay = rng.uniform(1.0, 3.0)
                    if queries is not None:
                        queries.enqueue(
                            ["late"], [None], [0], execute_after=[timedelta(seconds=delay)]
                        )
                    else:
                        connection.execute(
                            "INSERT INTO procrastinate_jobs"
                            " (queue_name, task_name, args, scheduled_at)"
                            " VALUES ('default', 'late', '{}', now() + %s * interval '1 second')",
                            (delay,),
                        )
                else:
                    connection.execute(
                        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                        " VALUES ('default', 'late', '{\"fail_first\": true}')"
                    )
                next_at += interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
    records = finish_serve(process, stderr, timeout + 60)
    measured: dict[str, Any] = {
        "mode": "paced" if paced else "at once, idle worker",
        "deferred": {"scheduled": scheduled, "retry": retries},
    }
    for kind in ("scheduled", "retry"):
        values = [r["lateness"] for r in records if r["kind"] == kind]
        measured[kind] = quantiles_ms(values) if values else None
    if system == "pgqueuer":
        measured["retry"] = "n/a: pgqueuer retries in-process, no job scheduled in the database"
    return measured


def run(bench: Bench, paced: bool) -> dict[str, Any]:
    name = "lateness_paced" if paced else "lateness"
    by_system = {}
    for system in bench.systems:
        stamp = run_stamp()
        by_system[system] = lateness(
            bench.dsn,
            system,
            bench.args.lateness_jobs,
            bench.args.lateness_retries,
            bench.args.lateness_seconds,
            paced=paced,
        )
        by_system[system]["run"] = stamp
        print(f"{name} {system:>13}: done", flush=True)
    return by_system


def report(by_system: dict[str, Any], bench: Bench, title: str, scheduled: str) -> list[str]:
    lines = [f"| {title} | jobs | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for system, measured in by_system.items():
        for kind, label in (("scheduled", scheduled), ("retry", "retry after 1 s")):
            value = measured[kind]
            if not isinstance(value, dict):
                lines.append(f"| {system}, {label} | n/a | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {system}, {label} | {value['count']} | {ms(value.get('p50_ms'))} | "
                f"{ms(value.get('p99_ms'))} | {ms(value.get('max_ms'))} |"
            )
    return lines


def panel(axis: Any, by_system: dict[str, Any]) -> None:
    systems = list(by_system)
    for offset, (quantile, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
        values = [
            (i, by_system[system]["scheduled"].get(quantile))
            for i, system in enumerate(systems)
            if isinstance(by_system[system]["scheduled"], dict)
        ]
        bars = axis.bar(
            [i + (offset - 0.5) * 0.4 for i, _ in values],
            [value for _, value in values],
            0.4,
            label=label,
        )
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(systems)), systems)
    axis.set_yscale("log")
    axis.set_ylabel("ms after scheduled_at (log)")
    axis.set_title("lateness of scheduled jobs, idle worker")
    axis.legend()


PART = Part(
    name="lateness",
    key="lateness",
    run=functools.partial(run, paced=False),
    report=functools.partial(
        report,
        title="lateness, idle worker (start - scheduled_at)",
        scheduled="scheduled 1-11 s ahead",
    ),
    add_arguments=add_arguments,
    per_system=True,
    panel=panel,
)
# The same jobs deferred one at a time: its options are lateness's.
PACED = Part(
    name="lateness_paced",
    key="lateness_paced",
    run=functools.partial(run, paced=True),
    report=functools.partial(
        report, title="lateness, paced deferrals", scheduled="schedule_in 1-3 s"
    ),
    per_system=True,
)
