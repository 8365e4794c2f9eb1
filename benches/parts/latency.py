"""latency: an idle listening worker, one job deferred every `--latency-interval` s for
`--latency-seconds` s; time from defer to task start."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

import psycopg

from benches import child
from benches.parts import Bench, Part
from benches.pgq import enqueue_pgqueuer
from benches.tables import reset_queue, wait_registered


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--latency-interval", type=float, default=0.02)


def latency(dsn: str, system: str, seconds: float, interval: float) -> dict[str, float]:
    reset_queue(dsn, 0, "stamp", system)
    expected = int(seconds / interval)
    process = child.start(
        child.LatencyChild(system, dsn, expected),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(process.stderr.read() if process.stderr else "child failed")
    with psycopg.connect(dsn, autocommit=True) as connection:
        if system == "pgqueuer":
            # Its worker registers nowhere; the child said ready once it heard its own NOTIFY.
            enqueue = enqueue_pgqueuer(connection)
            time.sleep(0.5)
        else:
            wait_registered(connection)
        next_at = time.perf_counter()
        for _ in range(expected):
            if system == "pgqueuer":
                enqueue("stamp", [repr(time.time()).encode()])
            else:
                connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                    " VALUES ('default', 'stamp', json_build_object('t', %s::float8))",
                    (time.time(),),
                )
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    stdout, stderr = process.communicate(timeout=180)
    if process.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    values = sorted(child.last_line(stdout)["latencies"])
    ms = [value * 1000 for value in values]
    quantiles = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": quantiles[89],
        "p99_ms": quantiles[98],
        "max_ms": ms[-1],
    }


def run(bench: Bench) -> dict[str, Any] | None:
    if bench.args.latency_seconds <= 0:
        return None
    return {
        system: latency(bench.dsn, system, bench.args.latency_seconds, bench.args.latency_interval)
        for system in bench.systems
    }


def report(measured_by_system: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "| pickup latency | p50 ms | p90 ms | p99 ms | max ms | jobs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for system, measured in measured_by_system.items():
        lines.append(
            f"| {system} | {measured['p50_ms']:.2f} | {measured['p90_ms']:.2f} | "
            f"{measured['p99_ms']:.2f} | {measured['max_ms']:.2f} | {measured['count']} |"
        )
    return lines


PART = Part(name="latency", key="latency", run=run, report=report, add_arguments=add_arguments)
