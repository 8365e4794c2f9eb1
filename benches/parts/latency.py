"""latency: an idle listening worker, one job deferred every `--latency-interval` s for
`--latency-seconds` s; time from defer to task start. latency_busy: the same with the
worker at C=100, 90 of its slots held by 10 s jobs.

Each is set against its floor, in the same run with the same producer: a bare loop that
LISTENs, claims with the core's own claim statement on each notification and starts an
asyncio task per job (benches/floor.py); its steps are timed, which says where a pickup's
time goes. The producer times its INSERT and commit for every system.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from typing import Any

import psycopg

from benches import child
from benches.floor import settings_sql
from benches.measure import ServerStats
from benches.parts import Bench, Part
from benches.pgq import enqueue_pgqueuer
from benches.statements import capture
from benches.tables import reset_queue, wait_registered
from benches.workload import HOLD_SECONDS

FLOOR = "floor"
BUSY_CONCURRENCY = 100
BUSY_HELD = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--latency-interval", type=float, default=0.02)
    parser.add_argument(
        "--busy-seconds",
        type=float,
        default=10.0,
        help="latency_busy: seconds of stamped jobs (one per --latency-interval)",
    )


def quantiles(values: list[float]) -> dict[str, Any]:
    ms = sorted(value * 1000 for value in values)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": cuts[89],
        "p99_ms": cuts[98],
        "max_ms": ms[-1],
    }


def start_child(dsn: str, system: str, expected: int, busy: bool) -> subprocess.Popen[str]:
    concurrency = BUSY_CONCURRENCY if busy else 10
    config: child.ChildConfig
    if system == FLOOR:
        statements = capture(dsn)
        config = child.FloorChild(
            dsn,
            expected,
            statements.claim,
            statements.complete_and_claim,
            settings_sql(statements.settings),
            concurrency,
        )
    else:
        config = child.LatencyChild(system, dsn, expected, concurrency, busy)
    process = child.start(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(process.stderr.read() if process.stderr else "child failed")
    return process


def hold_slots(connection: psycopg.Connection[Any]) -> None:
    """90 `hold` jobs, ending one after the other over 10 s (each defers its successor, of
    10 s, as it ends: 9 jobs/s in the background), once all of them run."""
    connection.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        " SELECT 'default', 'hold', json_build_object('seconds', %s * n / %s::float8)"
        " FROM generate_series(1, %s) AS n",
        (HOLD_SECONDS, BUSY_HELD, BUSY_HELD),
    )
    for _ in range(200):
        held = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'hold' AND status = 'doing'"
        ).fetchone()[0]  # type: ignore[index]
        if held >= BUSY_HELD:
            return
        time.sleep(0.05)
    raise RuntimeError(f"only {held} of {BUSY_HELD} hold jobs started")


def latency(
    dsn: str, system: str, seconds: float, interval: float, busy: bool = False
) -> dict[str, Any]:
    reset_queue(dsn, 0, "stamp", system)
    expected = int(seconds / interval)
    stats = ServerStats(dsn)
    process = start_child(dsn, system, expected, busy)
    committed: dict[int, float] = {}  # job id: when the producer's INSERT returned
    deferrals: dict[float, float] = {}  # the same by the job's stamp (its time of deferral)
    with psycopg.connect(dsn, autocommit=True) as connection:
        if system == "pgqueuer":
            # Its worker registers nowhere; the child said ready once it heard its own NOTIFY.
            enqueue = enqueue_pgqueuer(connection)
            time.sleep(0.5)
        else:
            wait_registered(connection)
        if busy:
            hold_slots(connection)
        next_at = time.perf_counter()
        insert_s = []
        for _ in range(expected):
            deferred = time.time()
            if system == "pgqueuer":
                enqueue("stamp", [repr(deferred).encode()])
            else:
                row = connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                    " VALUES ('default', 'stamp', json_build_object('t', %s::float8))"
                    " RETURNING id",
                    (deferred,),
                ).fetchone()
                assert row is not None
                committed[row[0]] = time.time()
            deferrals[deferred] = time.time()
            insert_s.append(deferrals[deferred] - deferred)
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    stdout, stderr = process.communicate(timeout=180)
    if process.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    result = child.last_line(stdout)
    server = stats.per_job(expected)
    if system == FLOOR:
        records = {int(job_id): times for job_id, times in result["records"].items()}
        measured = quantiles([times["started"] - times["deferred"] for times in records.values()])
        measured["breakdown"] = breakdown(records, committed)
        by_deferral = {times["deferred"]: times["started"] for times in records.values()}
    else:
        measured = quantiles(result["latencies"])
        by_deferral = {
            deferred: deferred + latency
            for deferred, latency in zip(result["deferred"], result["latencies"], strict=True)
        }
    measured["producer_insert_commit_p50_ms"] = statistics.median(insert_s) * 1000
    if server is not None:
        measured["server_statements"] = server["top_statements"]
    # From the producer's commit on (its reply), which takes out the producer's own time.
    after_commit = [
        by_deferral[deferred] - committed_at
        for deferred, committed_at in deferrals.items()
        if deferred in by_deferral
    ]
    if len(after_commit) > 1:
        after = quantiles(after_commit)
        measured["after_commit_p50_ms"] = after["p50_ms"]
        measured["after_commit_p99_ms"] = after["p99_ms"]
    return measured


def breakdown(
    records: dict[int, dict[str, float]], committed: dict[int, float]
) -> dict[str, float]:
    """The floor's pickups, step by step (medians, ms): the producer's INSERT and commit
    (until its reply), the NOTIFY's delivery (from that reply to the listener; negative
    when the listener heard first), the loop's wake-up (to the claim being sent), the
    claim and its commit (until its rows are read) and the hand-off (to the task's start).
    Jobs claimed before their own notification was read are left out."""
    steps: dict[str, list[float]] = {
        "insert_commit": [],
        "notify": [],
        "wake": [],
        "claim_commit": [],
        "hand_off": [],
    }
    for job_id, times in records.items():
        if math.isnan(times["notified"]) or job_id not in committed:
            continue
        steps["insert_commit"].append(committed[job_id] - times["deferred"])
        steps["notify"].append(times["notified"] - committed[job_id])
        steps["wake"].append(times["claim_sent"] - times["notified"])
        steps["claim_commit"].append(times["claimed"] - times["claim_sent"])
        steps["hand_off"].append(times["started"] - times["claimed"])
    medians = {
        f"{step}_p50_ms": statistics.median(values) * 1000 if values else float("nan")
        for step, values in steps.items()
    }
    return {**medians, "jobs": len(steps["hand_off"])}


def with_ratios(measured: dict[str, Any]) -> dict[str, Any]:
    """Each system's p50/p90/p99 over the floor's."""
    floor = measured.get(FLOOR)
    if floor:
        for system, figures in measured.items():
            if system != FLOOR:
                figures["to_floor"] = {
                    key: figures[key] / floor[key] for key in ("p50_ms", "p90_ms", "p99_ms")
                }
    return measured


def run(bench: Bench) -> dict[str, Any] | None:
    if bench.args.latency_seconds <= 0:
        return None
    measured = {
        system: latency(bench.dsn, system, bench.args.latency_seconds, bench.args.latency_interval)
        for system in [*bench.systems, FLOOR]
    }
    return with_ratios(measured)


def run_busy(bench: Bench) -> dict[str, Any] | None:
    if bench.args.busy_seconds <= 0:
        return None
    systems = [system for system in bench.systems if system != "pgqueuer"]
    measured = {
        system: latency(
            bench.dsn, system, bench.args.busy_seconds, bench.args.latency_interval, busy=True
        )
        for system in [*systems, FLOOR]
    }
    return with_ratios(measured)


def after_commit(measured: dict[str, Any]) -> str:
    if "after_commit_p50_ms" not in measured:
        return "n/a"
    return f"{measured['after_commit_p50_ms']:.2f} / {measured['after_commit_p99_ms']:.2f}"


def report(measured_by_system: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "| pickup latency | p50 ms | p90 ms | p99 ms | max ms | p50 / floor | p99 / floor "
        "| producer INSERT+commit ms | after commit p50 / p99 ms | jobs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system, measured in measured_by_system.items():
        ratios = measured.get("to_floor")
        p50 = f"{ratios['p50_ms']:.2f}x" if ratios else ""
        p99 = f"{ratios['p99_ms']:.2f}x" if ratios else ""
        lines.append(
            f"| {system} | {measured['p50_ms']:.2f} | {measured['p90_ms']:.2f} | "
            f"{measured['p99_ms']:.2f} | {measured['max_ms']:.2f} | {p50} | {p99} | "
            f"{measured['producer_insert_commit_p50_ms']:.2f} | "
            f"{after_commit(measured)} | {measured['count']} |"
        )
    statements = [
        (system, statement)
        for system, measured in measured_by_system.items()
        for statement in measured.get("server_statements", [])
    ]
    if statements:
        lines += [
            "",
            "| server, by statement (execution, triggers in) | statement | calls/job | µs/call |",
            "|---|---|---:|---:|",
        ]
        lines += [
            f"| {system} | `{statement['query'][:70]}` | {statement['calls_per_job']:.2f} | "
            f"{statement['us_per_call']:.0f} |"
            for system, statement in statements
        ]
    steps = measured_by_system.get(FLOOR, {}).get("breakdown")
    if steps:
        lines += [
            "",
            "| floor, step by step (p50 ms) | INSERT+commit | NOTIFY delivery | wake-up "
            "| claim+commit | hand-off | jobs |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| floor | {steps['insert_commit_p50_ms']:.2f} | {steps['notify_p50_ms']:.2f} | "
            f"{steps['wake_p50_ms']:.2f} | {steps['claim_commit_p50_ms']:.2f} | "
            f"{steps['hand_off_p50_ms']:.2f} | {steps['jobs']} |",
        ]
    return lines


def report_busy(measured_by_system: dict[str, Any], bench: Bench) -> list[str]:
    lines = report(measured_by_system, bench)
    lines[0] = lines[0].replace(
        "pickup latency", f"pickup latency, busy (C={BUSY_CONCURRENCY}, {BUSY_HELD} held)"
    )
    return lines


PART = Part(name="latency", key="latency", run=run, report=report, add_arguments=add_arguments)
BUSY = Part(name="latency_busy", key="latency_busy", run=run_busy, report=report_busy)
