"""memory: fastworker alone drains `--memory-jobs` jobs per concurrency; its RSS is sampled
every 0.2 s from /proc."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

from benches import child
from benches.measure import rss_mib
from benches.parts import Bench, Part, int_list
from benches.tables import check_drained, reset_queue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-jobs", type=int, default=200000, help="jobs per memory drain (0: skip)"
    )
    parser.add_argument(
        "--memory-concurrency",
        type=int_list,
        default="100,1000",
        help="concurrencies of the memory drains",
    )


def memory(dsn: str, concurrency: int, jobs: int) -> dict[str, float]:
    reset_queue(dsn, jobs, "noop")
    with open(os.devnull, "w") as devnull:
        process = child.start(
            child.DrainChild("fastworker", dsn, concurrency),
            stdout=subprocess.PIPE,
            stderr=devnull,
        )
        samples: list[float] = []
        while process.poll() is None:
            rss = rss_mib(process.pid)
            if rss is not None:
                samples.append(rss)
            time.sleep(0.2)
        stdout, _ = process.communicate()
    if process.returncode != 0 or len(samples) < 5:
        raise RuntimeError(f"memory drain at C={concurrency} failed ({len(samples)} samples)")
    check_drained(dsn, "fastworker", jobs)
    wall = child.last_line(stdout)["wall"]

    def at(fraction: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * fraction))]

    return {
        "concurrency": concurrency,
        "jobs": jobs,
        "jobs_per_s": jobs / wall,
        "samples": len(samples),
        "rss_mib_at_10pct": at(0.1),
        "rss_mib_at_50pct": at(0.5),
        "rss_mib_at_end": samples[-1],
        "rss_mib_max": max(samples),
    }


def run(bench: Bench) -> list[dict[str, float]] | None:
    if bench.args.memory_jobs <= 0 or "fastworker" not in bench.systems:
        return None
    measured = []
    for concurrency in bench.args.memory_concurrency:
        measured.append(memory(bench.dsn, concurrency, bench.args.memory_jobs))
        print(f"memory drain C={concurrency}: done", flush=True)
    return measured


def report(drains: list[dict[str, Any]], bench: Bench) -> list[str]:
    lines = [
        "| fastworker RSS, drain | jobs | jobs/s | at 10% MiB | at 50% MiB | at end MiB "
        "| max MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for measured in drains:
        lines.append(
            f"| C={measured['concurrency']} | {measured['jobs']} | "
            f"{measured['jobs_per_s']:.0f} | {measured['rss_mib_at_10pct']:.1f} | "
            f"{measured['rss_mib_at_50pct']:.1f} | {measured['rss_mib_at_end']:.1f} | "
            f"{measured['rss_mib_max']:.1f} |"
        )
    return lines


PART = Part(name="memory", key="memory", run=run, report=report, add_arguments=add_arguments)
