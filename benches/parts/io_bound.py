"""io (results key io_bound): I/O-bound jobs drained by each system, set against the limit,
the same callables run by a bare asyncio loop under a semaphore, no queue."""

from __future__ import annotations

import argparse
from typing import Any

from benches import child
from benches.parts import SYSTEMS, Bench, Part
from benches.tables import check_drained, reset_queue
from benches.workload import IO_VARIANTS, IoVariant

VARIANTS = {variant.task: variant for variant in IO_VARIANTS}


def variant_list(text: str) -> list[IoVariant]:
    """Comma-separated I/O-bound task names, as an argparse type."""
    chosen = []
    for task in (task for task in text.split(",") if task):
        if task not in VARIANTS:
            raise argparse.ArgumentTypeError(
                f"unknown I/O variant {task!r} (of {', '.join(VARIANTS)})"
            )
        chosen.append(VARIANTS[task])
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--io-jobs", type=int, default=20000, help="jobs per I/O-bound drain")
    parser.add_argument(
        "--io-variants",
        type=variant_list,
        default=",".join(variant.task for variant in IO_VARIANTS),
        help="I/O-bound tasks to run: "
        + "; ".join(f"{variant.task} ({variant.label})" for variant in IO_VARIANTS),
    )


def io_bound(dsn: str, variant: IoVariant, systems: list[str], jobs: int) -> dict[str, Any]:
    """The limit (the callable under a semaphore, no queue), then each system draining
    `jobs` jobs of the same callable at the same concurrency."""
    limit = child.run(child.LimitChild(dsn, variant.task, variant.concurrency, jobs))
    limit_rate = jobs / limit["wall"]
    entry: dict[str, Any] = {
        **variant._asdict(),
        "jobs": jobs,
        "limit": {
            "jobs_per_s": limit_rate,
            "cpu_us_per_job": limit["cpu"] / jobs * 1e6,
            "wall_s": limit["wall"],
        },
    }
    print(f"{variant.label:>40} {'limit':>13}: {limit_rate:8.0f} jobs/s", flush=True)
    for system in systems:
        if system == "pgqueuer" and variant.kind == "sync":
            entry[system] = None  # PGQUEUER_SYNC
            continue
        reset_queue(dsn, jobs, variant.task, system)
        result = child.run(
            child.DrainChild(system, dsn, variant.concurrency, "never", variant.task)
        )
        check_drained(dsn, system, jobs)
        rate = jobs / result["wall"]
        entry[system] = {
            "jobs_per_s": rate,
            "of_limit": rate / limit_rate,
            "worker_cpu_us_per_job": result["cpu"] / jobs * 1e6,
            "wall_s": result["wall"],
        }
        print(f"{variant.label:>40} {system:>13}: {rate:8.0f} jobs/s", flush=True)
    return entry


def run(bench: Bench) -> list[dict[str, Any]]:
    return [
        io_bound(bench.dsn, variant, bench.systems, bench.args.io_jobs)
        for variant in bench.args.io_variants
    ]


def report(entries: list[dict[str, Any]], bench: Bench) -> list[str]:
    lines = [
        "| I/O-bound tasks | system | jobs/s | of the limit | worker CPU µs/job |",
        "|---|---|---:|---:|---:|",
    ]
    for entry in entries:
        limit = entry["limit"]
        lines.append(
            f"| {entry['label']} | limit (bare loop) | {limit['jobs_per_s']:.0f} | 100% | "
            f"{limit['cpu_us_per_job']:.0f} |"
        )
        for system in SYSTEMS:
            if system not in entry:
                continue
            measured = entry[system]
            if measured is None:
                lines.append(f"| {entry['label']} | {system} | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {entry['label']} | {system} | {measured['jobs_per_s']:.0f} | "
                f"{measured['of_limit']:.0%} | {measured['worker_cpu_us_per_job']:.0f} |"
            )
    return lines


def panel(axis: Any, entries: list[dict[str, Any]]) -> None:
    systems = [s for s in SYSTEMS if any(entry.get(s) for entry in entries)]
    width = 0.8 / max(1, len(systems))
    for index, system in enumerate(systems):
        shown = [
            (i, entry[system]["of_limit"] * 100)
            for i, entry in enumerate(entries)
            if entry.get(system)
        ]
        bars = axis.bar(
            [i + (index - (len(systems) - 1) / 2) * width for i, _ in shown],
            [value for _, value in shown],
            width,
            label=system,
        )
        axis.bar_label(bars, fmt="%.0f%%", fontsize=7)
    axis.axhline(100, color="grey", linewidth=0.8)
    axis.axhline(80, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(
        range(len(entries)),
        [entry["label"].replace(", C=", "\nC=") for entry in entries],
        fontsize=7,
    )
    axis.set_ylabel("% of the limit (bare loop, same callable)")
    axis.set_title("I/O-bound tasks")
    axis.legend(fontsize=8)


PART = Part(
    name="io",
    key="io_bound",
    run=run,
    report=report,
    add_arguments=add_arguments,
    panel=panel,
)
