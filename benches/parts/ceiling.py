"""ceiling: fastworker's drain at C=1 and C=100 against the ceiling of its own statements
run by a bare loop, no Python: pgbench runs the statement that ends the jobs the previous
run claimed and claims as many, one job per statement at C=1, batches of 100 at C=100,
under the core's session settings, with the texts the core sent in this run
(benches/statements.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benches import child
from benches.floor import pgbench_drain
from benches.parts import Bench, Part, int_list
from benches.parts.drain import measure_drain
from benches.parts.scale_out import figure
from benches.statements import capture
from benches.tables import reset_queue

CEILING = "ceiling"
WHO = (CEILING, "fastworker")


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


def ceiling_drain(dsn: str, concurrency: int, jobs: int) -> dict[str, Any]:
    statements = capture(dsn)
    reset_queue(dsn, jobs, "noop")
    return measure_drain(
        dsn,
        "procrastinate",
        jobs,
        lambda: pgbench_drain(
            dsn, statements.complete_and_claim, statements.settings, jobs, concurrency
        ),
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
    total = bench.args.ceiling_jobs or bench.args.jobs
    entries = []
    for concurrency in bench.args.ceiling_concurrency:
        jobs = total - total % concurrency  # whole batches, for pgbench's count
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
        for who in WHO:
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
        for who in WHO
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


def paired_bars(
    axis: Any, labels: list[str], series: list[tuple[str, list[float]]], fmt: str
) -> None:
    """Two bars per label, one of each series, with their values."""
    for index, (name, values) in enumerate(series):
        offsets = [i + (index - 0.5) * 0.4 for i in range(len(labels))]
        axis.bar_label(axis.bar(offsets, values, 0.4, label=name), fmt=fmt, fontsize=8)
    axis.set_xticks(range(len(labels)), labels)
    axis.legend()


def plot_floors(results: dict[str, Any], path: Path) -> None:
    """Pickup latency against its floor (idle, busy) and the drains against their
    ceilings, one panel each, for those in `results` (e2e-floors.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("latency", "latency_busy", "ceiling") if results.get(key)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for axis, key in zip(axes[0], panels, strict=True):
        if key == "ceiling":
            entries = results[key]
            series = [(who, [entry[who]["jobs_per_s"] for entry in entries]) for who in WHO]
            labels = [f"C={entry['concurrency']}" for entry in entries]
            paired_bars(axis, labels, series, "%.0f")
            axis.set_ylabel("jobs/s (no-op drain)")
            axis.set_title("Drain against its ceiling")
        else:
            by_system = results[key]
            series = [
                (quantile[:3], [figures[quantile] for figures in by_system.values()])
                for quantile in ("p50_ms", "p99_ms")
            ]
            paired_bars(axis, list(by_system), series, "%.1f")
            axis.set_ylabel("ms from defer to task start")
            axis.set_title("Pickup, busy (C=100, 90 held)" if key == "latency_busy" else "Pickup")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
