"""ceiling: fastworker's drain at C=1 and C=100 against the ceiling of its own statements
run by a bare loop, no Python hand-off: at C=1 pgbench runs the statement that ends the
previous job and claims the next, one per job; at C=100 a psycopg loop runs it on batches
of 100 (each round trip ends the batch the previous one claimed). Both under the core's
session settings, with the texts the core sent in this run (benches/statements.py)."""

from __future__ import annotations

import argparse
from typing import Any

import psycopg

from benches import child
from benches.floor import bare_drain, pgbench_drain
from benches.parts import Bench, Part, int_list
from benches.parts.drain import measure_drain
from benches.parts.scale_out import figure
from benches.statements import capture
from benches.tables import reset_queue

CEILING = "ceiling"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ceiling-concurrency",
        default="1,100",
        type=int_list,
        help="concurrencies of the ceiling rows ('' for none)",
    )
    parser.add_argument(
        "--ceiling-jobs", type=int, default=0, help="jobs per ceiling drain (default: --jobs)"
    )


def first_id(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "SELECT min(id) FROM procrastinate_jobs WHERE status = 'todo'"
        ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def ceiling_drain(dsn: str, concurrency: int, jobs: int) -> dict[str, Any]:
    statements = capture(dsn)
    reset_queue(dsn, jobs, "noop")
    if concurrency == 1:
        first = first_id(dsn)
        return measure_drain(
            dsn,
            "procrastinate",
            jobs,
            lambda: pgbench_drain(
                dsn, statements.complete_and_claim, statements.settings, jobs, first
            ),
        )
    return measure_drain(
        dsn,
        "procrastinate",
        jobs,
        lambda: bare_drain(dsn, statements.complete_and_claim, statements.settings, concurrency),
    )


def fastworker_drain(dsn: str, concurrency: int, jobs: int) -> dict[str, Any]:
    reset_queue(dsn, jobs, "noop")
    return measure_drain(
        dsn,
        "fastworker",
        jobs,
        lambda: child.run(child.DrainChild("fastworker", dsn, concurrency)),
    )


def run(bench: Bench) -> list[dict[str, Any]] | None:
    if not bench.args.ceiling_concurrency or "fastworker" not in bench.systems:
        return None
    jobs = bench.args.ceiling_jobs or bench.args.jobs
    entries = []
    for concurrency in bench.args.ceiling_concurrency:
        entry: dict[str, Any] = {"concurrency": concurrency, "jobs": jobs}
        entry[CEILING] = ceiling_drain(bench.dsn, concurrency, jobs)
        entry["fastworker"] = fastworker_drain(bench.dsn, concurrency, jobs)
        entry["fraction"] = entry["fastworker"]["jobs_per_s"] / entry[CEILING]["jobs_per_s"]
        print(
            f"C={concurrency}: ceiling {entry[CEILING]['jobs_per_s']:.0f} jobs/s, fastworker "
            f"{entry['fastworker']['jobs_per_s']:.0f} ({entry['fraction']:.0%})",
            flush=True,
        )
        entries.append(entry)
    return entries


COLUMNS = (
    "drain against its ceiling",
    "jobs/s",
    "of ceiling",
    "worker CPU µs/job",
    "server CPU µs/job",
    "commits/job",
    "statements µs/job",
    "procrastinate functions µs/job",
    "WAL bytes/job",
)


def report(entries: list[dict[str, Any]], bench: Bench) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    for entry in entries:
        for who in (CEILING, "fastworker"):
            measured = entry[who]
            split = measured.get("server_breakdown") or {}
            share = "" if who == CEILING else f"{entry['fraction']:.0%}"
            lines.append(
                f"| C={entry['concurrency']} {who} | {measured['jobs_per_s']:.0f} | {share} | "
                f"{measured['worker_cpu_us_per_job']:.0f} | "
                f"{figure(measured.get('server_cpu_us_per_job'), '{:.0f}')} | "
                f"{measured['commits_per_job']:.3f} | "
                f"{figure(split.get('statements_us_per_job'), '{:.0f}')} | "
                f"{figure(split.get('procrastinate_functions_us_per_job'), '{:.0f}')} | "
                f"{figure(split.get('wal_bytes_per_job'), '{:.0f}')} |"
            )
    details = [
        (entry["concurrency"], who, entry[who]["server_breakdown"])
        for entry in entries
        for who in (CEILING, "fastworker")
        if entry[who].get("server_breakdown")
    ]
    if details:
        lines += ["", "| server time per job (µs) | statement or function | calls/job | µs/job |"]
        lines.append("|---|---|---:|---:|")
        for concurrency, who, split in details:
            for statement in split["top_statements"]:
                lines.append(
                    f"| C={concurrency} {who} | `{statement['query'][:70]}` | "
                    f"{statement['calls_per_job']:.3f} | {statement['us_per_job']:.1f} |"
                )
            for function in split["functions"]:
                lines.append(
                    f"| C={concurrency} {who} | {function['name']} (own time) | "
                    f"{function['calls_per_job']:.3f} | {function['us_per_job']:.1f} |"
                )
    return lines


PART = Part(name="ceiling", key="ceiling", run=run, report=report, add_arguments=add_arguments)
