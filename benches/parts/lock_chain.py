"""lock_chain: no-op jobs on one `lock`, deferred at once (one INSERT) to an idle worker
with the default polling interval; seconds from the defer to the start of the last job,
and as its floor a C=1 drain of as many jobs without a lock."""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import psycopg

from benches import child
from benches.measure import quantiles_ms, run_stamp
from benches.parts import Bench, Part, ms
from benches.parts.drain import Setting, drain
from benches.pgq import enqueue_pgqueuer
from benches.tables import finish_serve, reset_queue, start_serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lock-chain-jobs",
        type=int,
        default=200,
        help="jobs on one lock (procrastinate's worker runs one per poll: about 5 s each)",
    )
    parser.add_argument("--lock-chain-concurrency", type=int, default=10)


def lock_chain(dsn: str, system: str, jobs: int, concurrency: int) -> dict[str, Any]:
    reset_queue(dsn, 0, "chain", system)
    timeout = jobs * 6.0 + 60  # procrastinate's worker: one job per poll (5 s)
    started = time.time()
    process, stderr = start_serve(
        child.ServeChild(system, dsn, concurrency, "chain", jobs, timeout)
    )
    with psycopg.connect(dsn, autocommit=True) as connection:
        deferred_at = time.time()
        if system == "pgqueuer":
            enqueue_pgqueuer(connection)("chain", [str(n).encode() for n in range(jobs)])
        else:
            connection.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, args)"
                " SELECT 'default', 'chain', 'one-lock', jsonb_build_object('n', n)"
                " FROM generate_series(0, %s - 1) AS n",
                (jobs,),
            )
    records = sorted(finish_serve(process, stderr, timeout + 120), key=lambda r: r["start"])
    starts = [r["start"] for r in records]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The floor of a chain: the same number of no-op jobs without a lock, drained at C=1
    # (one job per round trip), just after, in the same conditions.
    floor = drain(dsn, system, Setting("async", 1), jobs)
    assert floor is not None
    return {
        "jobs": jobs,
        "ran": len(records),
        "concurrency": concurrency,
        "polling_interval_s": 5.0,
        "seconds": (starts[-1] - deferred_at) if len(records) == jobs else None,
        "seconds_to_timeout": None if len(records) == jobs else time.time() - started,
        "in_order": [r["n"] for r in records] == list(range(len(records))),
        "gap": quantiles_ms(gaps),
        "c1_drain_ms_per_job": 1000 / floor["jobs_per_s"],
    }


def run(bench: Bench) -> dict[str, Any]:
    chains = {}
    for system in bench.systems:
        stamp = run_stamp()
        chain = lock_chain(
            bench.dsn, system, bench.args.lock_chain_jobs, bench.args.lock_chain_concurrency
        )
        chain["run"] = stamp
        chains[system] = chain
        print(f"lock chain {system:>13}: {chain['seconds']} s", flush=True)
    return chains


def report(chains: dict[str, Any], bench: Bench) -> list[str]:
    lines = [
        "| lock chain | jobs | seconds | in order | gap p50 ms | gap max ms | C=1 drain, ms/job |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for system, measured in chains.items():
        seconds = measured["seconds"]
        shown = (
            f"{seconds:.2f}"
            if seconds is not None
            else f"{measured['ran']} ran in {measured['seconds_to_timeout']:.0f}"
        )
        gap = measured["gap"]
        lines.append(
            f"| {system} | {measured['jobs']} | {shown} | "
            f"{'yes' if measured['in_order'] else 'no'} | {ms(gap.get('p50_ms'))} | "
            f"{ms(gap.get('max_ms'))} | {ms(measured.get('c1_drain_ms_per_job'))} |"
        )
    return lines


def panel(axis: Any, chains: dict[str, Any]) -> None:
    finished = {
        system: measured for system, measured in chains.items() if measured["seconds"] is not None
    }
    bars = axis.bar(list(finished), [m["seconds"] for m in finished.values()])
    axis.bar_label(bars, fmt="%.1f s", fontsize=8)
    axis.set_yscale("log")
    jobs = {m["jobs"] for m in finished.values()}
    axis.set_title(f"lock chain, {'/'.join(map(str, sorted(jobs)))} jobs on one lock")
    axis.set_ylabel("seconds (log)")


PART = Part(
    name="lock_chain",
    key="lock_chain",
    run=run,
    report=report,
    add_arguments=add_arguments,
    per_system=True,
    panel=panel,
)
