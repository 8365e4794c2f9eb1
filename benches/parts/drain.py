"""drain: the same pre-loaded queue of no-op jobs drained by each system in turn, per
setting (async or sync tasks, a concurrency, a table of finished jobs, delete_jobs)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benches import child
from benches.measure import (
    ServerStats,
    commits,
    server_cpu_seconds,
    wait_for_clients_to_leave,
)
from benches.parts import Bench, Part, int_list
from benches.tables import check_drained, reset_queue


class Setting(NamedTuple):
    kind: str  # "async" or "sync" tasks
    concurrency: int
    history: int = 0  # finished jobs in the table
    delete_jobs: str = "never"

    @property
    def label(self) -> str:
        label = f"C={self.concurrency} {self.kind}"
        if self.history:
            label += f", {self.history:,} finished"
        if self.delete_jobs != "never":
            label += f", delete {self.delete_jobs}"
        return label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument(
        "--concurrency", type=int_list, default="1,10,100", help="async task concurrencies"
    )
    parser.add_argument(
        "--sync", type=int_list, default="10", help="sync task concurrencies ('' for none)"
    )
    parser.add_argument(
        "--history",
        type=int_list,
        default="20000,1000000",
        help="sizes of a table of finished jobs to drain over ('' for none)",
    )
    parser.add_argument(
        "--history-concurrency",
        type=int_list,
        default="1,100",
        help="concurrencies of those drains",
    )
    parser.add_argument(
        "--delete-successful",
        type=int_list,
        default="1",
        help="concurrencies of drains with delete_jobs='successful' ('' for none)",
    )


def settings(args: argparse.Namespace) -> list[Setting]:
    chosen = [Setting("async", c) for c in args.concurrency]
    chosen += [Setting("sync", c) for c in args.sync]
    chosen += [
        Setting("async", c, history) for history in args.history for c in args.history_concurrency
    ]
    chosen += [Setting("async", c, 0, "successful") for c in args.delete_successful]
    return chosen


def drain(dsn: str, system: str, setting: Setting, jobs: int) -> dict[str, float] | None:
    kind, concurrency = setting.kind, setting.concurrency
    if system == "pgqueuer" and (kind == "sync" or setting != Setting(kind, concurrency)):
        return None  # PGQUEUER_SYNC, or a setting of procrastinate's schema
    task = "noop" if kind == "async" else "noop_sync"
    reset_queue(dsn, jobs, task, system, setting.history)
    return measure_drain(
        dsn,
        system,
        jobs,
        lambda: child.run(child.DrainChild(system, dsn, concurrency, setting.delete_jobs)),
    )


def measure_drain(
    dsn: str, system: str, jobs: int, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`run` (wall and client CPU seconds) drains the loaded queue: jobs/s, CPU and commits
    per job, and where the server's time went when it can say (see ServerStats)."""
    time.sleep(1.1)  # let the stats of the reset reach pg_stat_database
    stats = ServerStats(dsn)
    commits_before = commits(dsn)
    server_before = server_cpu_seconds(dsn)
    result = run()
    wait_for_clients_to_leave(dsn)
    server_after = server_cpu_seconds(dsn)
    breakdown = stats.per_job(jobs)
    time.sleep(1.1)  # backends flush their stats when they exit, at most once a second
    commits_after = commits(dsn)
    check_drained(dsn, system, jobs)
    measured: dict[str, Any] = {
        "jobs_per_s": jobs / result["wall"],
        "worker_cpu_us_per_job": result["cpu"] / jobs * 1e6,
        "commits_per_job": (commits_after - commits_before) / jobs,
        "wall_s": result["wall"],
    }
    if server_before is not None and server_after is not None:
        measured["server_cpu_us_per_job"] = (server_after - server_before) / jobs * 1e6
    if breakdown is not None:
        measured["server_breakdown"] = breakdown
    return measured


def header(bench: Bench) -> dict[str, Any]:
    return {"jobs": bench.args.jobs, "systems": bench.systems, "drain": []}


def run(bench: Bench) -> list[dict[str, Any]]:
    entries = []
    for setting in settings(bench.args):
        entry: dict[str, Any] = {"label": setting.label, **setting._asdict()}
        for system in bench.systems:
            measured = entry[system] = drain(bench.dsn, system, setting, bench.args.jobs)
            speed = "n/a" if measured is None else f"{measured['jobs_per_s']:8.0f} jobs/s"
            print(f"{entry['label']:>12} {system:>13}: {speed}", flush=True)
        if "procrastinate" in entry:
            for system in bench.systems:
                if system != "procrastinate" and entry[system] is not None:
                    entry[system]["ratio"] = (
                        entry[system]["jobs_per_s"] / entry["procrastinate"]["jobs_per_s"]
                    )
        entries.append(entry)
    return entries


def report(entries: list[dict[str, Any]], bench: Bench) -> list[str]:
    lines = [
        "| setting | system | jobs/s | ratio | worker CPU µs/job | server CPU µs/job "
        "| commits/job |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        for system in bench.systems:
            measured = entry[system]
            if measured is None:
                if entry.get("history") or entry.get("delete_jobs", "never") != "never":
                    continue  # a setting of procrastinate's schema only
                lines.append(f"| {entry['label']} | {system} | n/a |  | n/a | n/a | n/a |")
                continue
            ratio = f"{measured['ratio']:.1f}x" if "ratio" in measured else ""
            server = measured.get("server_cpu_us_per_job")
            lines.append(
                f"| {entry['label']} | {system} | {measured['jobs_per_s']:.0f} | {ratio} | "
                f"{measured['worker_cpu_us_per_job']:.0f} | "
                f"{'n/a' if server is None else f'{server:.0f}'} | "
                f"{measured['commits_per_job']:.3f} |"
            )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """The drains' jobs/s, one bar per system and setting (its own figure, e2e.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [entry["label"] for entry in results["drain"]]
    systems = results["systems"]
    figure, axis = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 5))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        offset = (index - (len(systems) - 1) / 2) * width
        shown = [
            (i, entry[system])
            for i, entry in enumerate(results["drain"])
            if entry[system] is not None
        ]
        bars = axis.bar(
            [i + offset for i, _ in shown],
            [measured["jobs_per_s"] for _, measured in shown],
            width,
            label=system,
        )
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("jobs/s (no-op jobs, drain)")
    axis.set_title(f"Drain throughput, {results['jobs']} jobs, same PostgreSQL, one run")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


PART = Part(
    name="drain",
    key="drain",
    run=run,
    report=report,
    add_arguments=add_arguments,
    header=header,
)
