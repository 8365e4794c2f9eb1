"""scale_out: 1, 2 and 4 fastworker processes drain one queue of no-op jobs: jobs/s,
worker and server CPU per job and in cores (where the ceiling is)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from benches import child
from benches.measure import DatabaseCpu, commits, server_cpu_seconds
from benches.parts import Bench, Part, int_list
from benches.tables import check_drained, reset_queue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scale-processes",
        type=int_list,
        default="1,2,4",
        help="fastworker processes per scale-out drain",
    )
    parser.add_argument("--scale-concurrency", type=int, default=100)
    parser.add_argument("--scale-jobs", type=int, default=100000)


def scale_out(dsn: str, processes: int, concurrency: int, jobs: int) -> dict[str, Any]:
    """`processes` fastworker processes drain one queue of `jobs` no-op jobs, started
    together once all are ready; wall time from the first start to the last end."""
    reset_queue(dsn, jobs, "noop")
    time.sleep(1.1)
    commits_before = commits(dsn)
    with contextlib.ExitStack() as stack:
        children = child.start_ready([child.ScaleChild(dsn, concurrency)] * processes, stack)
        server_before = server_cpu_seconds(dsn)
        with DatabaseCpu(dsn) as database_cpu:
            for process, _ in children:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            results = []
            for process, stderr in children:
                stdout, _ = process.communicate(timeout=600)
                if process.returncode != 0:
                    raise RuntimeError(child.failure(stderr))
                results.append(child.last_line(stdout))
        server_after = server_cpu_seconds(dsn)
    time.sleep(1.1)
    commits_after = commits(dsn)
    check_drained(dsn, "fastworker", jobs)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    worker_cpu = sum(r["cpu"] for r in results)
    measured: dict[str, Any] = {
        "processes": processes,
        "concurrency": concurrency,
        "jobs": jobs,
        "jobs_per_s": jobs / wall,
        "wall_s": wall,
        "worker_cpu_us_per_job": worker_cpu / jobs * 1e6,
        "worker_cores": worker_cpu / wall,
        "commits_per_job": (commits_after - commits_before) / jobs,
    }
    if server_before is not None and server_after is not None:
        # All of the server's processes: other databases' clients too, on a shared server.
        measured["server_cpu_us_per_job"] = (server_after - server_before) / jobs * 1e6
        measured["server_cores"] = (server_after - server_before) / wall
    if database_cpu.last:
        # This database's backends only (when the server is local).
        measured["database_cpu_us_per_job"] = database_cpu.seconds / jobs * 1e6
        measured["database_cores"] = database_cpu.seconds / wall
    measured["machine_busy_cores"] = database_cpu.machine_busy_cores
    measured["machine_cores"] = os.cpu_count()
    return measured


def run(bench: Bench) -> list[dict[str, Any]]:
    drains = []
    for processes in bench.args.scale_processes:
        measured = scale_out(
            bench.dsn, processes, bench.args.scale_concurrency, bench.args.scale_jobs
        )
        drains.append(measured)
        print(f"scale-out {processes} processes: {measured['jobs_per_s']:.0f} jobs/s")
    return drains


def figure(value: float | None, format: str) -> str:
    return "n/a" if value is None else format.format(value)


def report(drains: list[dict[str, Any]], bench: Bench) -> list[str]:
    lines = [
        "| scale-out, fastworker | jobs/s | worker CPU µs/job | server CPU µs/job "
        "| this database's backends µs/job | worker cores | backends' cores "
        "| machine busy cores | commits/job |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for measured in drains:
        lines.append(
            f"| {measured['processes']} x C={measured['concurrency']} | "
            f"{measured['jobs_per_s']:.0f} | {measured['worker_cpu_us_per_job']:.0f} | "
            f"{figure(measured.get('server_cpu_us_per_job'), '{:.0f}')} | "
            f"{figure(measured.get('database_cpu_us_per_job'), '{:.0f}')} | "
            f"{measured['worker_cores']:.2f} | "
            f"{figure(measured.get('database_cores'), '{:.2f}')} | "
            f"{measured['machine_busy_cores']:.2f} of {measured['machine_cores']} | "
            f"{measured['commits_per_job']:.3f} |"
        )
    return lines


def panel(axis: Any, drains: list[dict[str, Any]]) -> None:
    bars = axis.bar(
        [f"{m['processes']} x C={m['concurrency']}" for m in drains],
        [m["jobs_per_s"] for m in drains],
    )
    axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_ylabel("jobs/s (no-op jobs, one queue)")
    axis.set_title("scale-out, fastworker processes")


PART = Part(
    name="scale_out",
    key="scale_out",
    run=run,
    report=report,
    add_arguments=add_arguments,
    panel=panel,
)
