"""End-to-end benchmark: procrastinate's own worker vs fastworker, same database, one run.

    python benches/e2e.py [--dsn DSN] [--jobs 20000] [--concurrency 1,10,100] [--sync 10]

For each setting, the same pre-loaded queue of no-op jobs is drained by each system in
turn (each drain in its own process, so its CPU time is its own), on a jobs table that
also holds `history` finished jobs (with their events: procrastinate's default,
`delete_jobs="never"`, grows tables so), or with `delete_jobs="successful"`, and the
script reports
per system: jobs/s, the ratio of its jobs/s to procrastinate's, worker CPU µs per job,
PostgreSQL server CPU µs per job (all backends, from /proc, when the server is local) and
commits per job (pg_stat_database.xact_commit). Then pickup latency: an idle listening
worker, one job deferred every 20 ms, time from defer to task start (p50/p90/p99/max).
Then memory: fastworker alone drains 200,000 jobs at concurrency 100 and 1,000, its RSS
sampled from /proc every 0.2 s.

When pgqueuer (another PostgreSQL job queue, with its own schema) and asyncpg are
installed, pgqueuer is a third system: its schema goes into the same database, next to
procrastinate's, and it drains its own pre-loaded queue of the same size the same way
(its QueueManager in drain mode, at most C jobs running at once). It has no sync
entrypoints, so its sync settings are n/a.

Then the idle-gap benchmarks, each worker waiting with the default polling interval (5 s):
- lock_chain: 200 no-op jobs on one `lock`, deferred at once (one INSERT) to an idle worker;
  seconds from the defer to the start of the last job, and as its floor a C=1 drain of as
  many jobs without a lock (one job per round trip). procrastinate's worker runs one job
  per poll there (about 1,000 s for 200 jobs); pgqueuer, which has no per-job lock, runs an
  entrypoint with concurrency_limit=1 (serialized dispatch) instead.
- lateness: an idle worker; 200 jobs deferred at once, scheduled 1 to 11 s ahead, and 100
  jobs (scheduled the same way) whose first attempt fails and is retried 1 s later; start
  minus `scheduled_at` (p50/p99/max). lateness_paced: the same jobs deferred one at a time
  over 10 s, each 1-3 s ahead (retried ones at once), so that the deferrals' notifications
  also wake the workers. pgqueuer: scheduled jobs only (its retries are in-process).
- io: 20,000 I/O-bound jobs (async: `asyncio.sleep` then one query through the app's
  connector, or a sleep alone, at C=100; sync: `time.sleep(0.005)` at C=50), set against
  the limit: the same callables run by a bare asyncio loop under a semaphore, no queue.
- scale_out: 1, 2 and 4 fastworker processes at C=100 drain one queue of 100,000 no-op
  jobs: jobs/s, worker and server CPU per job and in cores (where the ceiling is).
Floors and ceilings, the same SQL with no worker around it (the statements the core sent
in this run, read off the wire; benches/statements.py, benches/floor.py):
- latency's `floor` row: a bare loop that LISTENs, claims with the core's claim on each
  notification and starts an asyncio task per job; each system's quantiles over its, and
  its pickups timed step by step. latency_busy: the same at C=100 with 90 slots held by
  10 s jobs.
- ceiling: fastworker's drain at C=1 and C=100 against the core's complete-and-claim
  statement run by pgbench, one job per statement (C=1) or batches of 100 (C=100).
`--scratch-server` runs on a PostgreSQL cluster of the benchmark's own, with
pg_stat_statements and track_functions, and splits every drain's server time per job by
statement, procrastinate's functions (its triggers) and WAL.
Each run records the commit, the versions (procrastinate, PostgreSQL, Python), the CPU
model and, per part (and per system where a part runs one system at a time), the load
average at its start. `--only lock_chain,lateness` runs a subset.

The parts are modules of benches/parts/, registered in benches/parts/__init__.py; each
child process is started with a typed config (benches/child.py).

Output: tables on stdout, `benches/results/e2e.json` (the parts run replace theirs; the
others are kept), `benches/results/e2e.png` (drains), `e2e-floors.png` (pickup against its
floor, drains against their ceilings) and `e2e-idle-gaps.png`.
Without --dsn, a scratch database is created on the local server
(`host=127.0.0.1 user=postgres`) and dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `benches` imports from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from psycopg.conninfo import make_conninfo

from benches.measure import environment, run_stamp
from benches.parts import SYSTEMS, Bench, Part, registry
from benches.parts.ceiling import plot_floors
from benches.parts.drain import plot as plot_drains
from benches.parts.drain import settings as drain_settings
from benches.pgq import describe as describe_pgqueuer
from benches.pgq import install_pgqueuer, pgqueuer_available

HERE = Path(__file__).resolve().parent
LOCAL_ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"


def build_parser(parts: tuple[Part, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [part.name for part in parts]
    parser.add_argument(
        "--dsn", help="database to use (its procrastinate and pgqueuer tables are emptied)"
    )
    parser.add_argument(
        "--only",
        default=",".join(names),
        help=f"comma-separated parts to run, of {', '.join(names)} (default: all)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS if pgqueuer_available() else SYSTEMS[:2]),
        help=f"comma-separated, of {', '.join(SYSTEMS)} (default: pgqueuer only when it and"
        " asyncpg are installed)",
    )
    for part in parts:
        part.add_arguments(parser)
    parser.add_argument(
        "--scratch-server",
        action="store_true",
        help="run on a PostgreSQL cluster of the benchmark's own (initdb, a free port,"
        " pg_stat_statements and function tracking on: the ceiling part then splits the"
        " server's time per job by statement, trigger and commit), removed at the end",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        help="directory of e2e.json (the parts run replace theirs, the others are kept),"
        " e2e.png and e2e-idle-gaps.png",
    )
    return parser


def main() -> None:
    parts = registry()
    parser = build_parser(parts)
    args = parser.parse_args()
    systems = [system for system in args.systems.split(",") if system]
    for system in systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}")
        if system == "pgqueuer" and not pgqueuer_available():
            parser.error("pgqueuer needs `pip install pgqueuer asyncpg`")
    by_name = {part.name: part for part in parts}
    only = [name for name in args.only.split(",") if name]
    for name in only:
        if name not in by_name:
            parser.error(f"unknown part {name!r} (--only takes {', '.join(by_name)})")
    selected = [part for part in parts if part.name in only]

    if args.scratch_server and args.dsn:
        parser.error("--scratch-server makes its own database: no --dsn with it")
    with contextlib.ExitStack() as stack:
        admin = LOCAL_ADMIN
        if args.scratch_server:
            from benches.scratch import scratch_server

            admin = stack.enter_context(scratch_server())
        results = run_parts(args, systems, selected, admin)
    write_results(args, results, parts, systems)


def run_parts(
    args: argparse.Namespace, systems: list[str], selected: list[Part], admin: str
) -> dict[str, Any]:
    """The selected parts, on `args.dsn` or a scratch database on the server of `admin`."""
    scratch = None
    dsn = args.dsn
    if dsn is None:
        scratch = f"fw_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{scratch}"')
        dsn = make_conninfo(admin, dbname=scratch)
        from procrastinate import schema

        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]
            if args.scratch_server:
                connection.execute("CREATE EXTENSION pg_stat_statements")
    bench = Bench(dsn=dsn, args=args, systems=systems)
    try:
        if "pgqueuer" in systems:
            install_pgqueuer(dsn)
        results: dict[str, Any] = {
            "environment": {**environment(dsn), "scratch_server": args.scratch_server},
            "runs": {},
        }
        for part in selected:
            results.update(part.header(bench))
        if "pgqueuer" in systems:
            concurrencies = [setting.concurrency for setting in drain_settings(args)]
            results["pgqueuer"] = describe_pgqueuer(concurrencies)
        for part in selected:
            stamp = run_stamp()
            measured = part.run(bench)
            if measured is not None:
                results["runs"][part.key] = stamp
                results[part.key] = measured
    finally:
        if scratch:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    return results


def write_results(
    args: argparse.Namespace, results: dict[str, Any], parts: tuple[Part, ...], systems: list[str]
) -> None:
    bench = Bench(dsn=args.dsn or "", args=args, systems=systems)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "e2e.json"
    merged = merge_results(path, results, parts)
    path.write_text(json.dumps(merged, indent=2))
    print()
    print(report(results, bench, parts))
    print(f"\nwrote {path}")
    try:
        if merged.get("drain") and merged.get("systems"):
            plot_drains(merged, args.out / "e2e.png")
            print(f"wrote {args.out / 'e2e.png'}")
        if any(merged.get(key) for key in ("latency", "latency_busy", "ceiling")):
            plot_floors(merged, args.out / "e2e-floors.png")
            print(f"wrote {args.out / 'e2e-floors.png'}")
        if any(merged.get(part.key) for part in parts if part.panel is not None):
            plot_idle_gaps(merged, args.out / "e2e-idle-gaps.png", parts)
            print(f"wrote {args.out / 'e2e-idle-gaps.png'}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -r requirements/bench.txt)")


def merge_results(path: Path, results: dict[str, Any], parts: tuple[Part, ...]) -> dict[str, Any]:
    """The results of this run over those already in `path`: the parts run here replace
    theirs, the others are kept, each with its `runs` stamp (when and under what load)."""
    merged: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            merged = json.loads(path.read_text())
    runs = {**merged.get("runs", {}), **results["runs"]}
    for key in results["runs"]:  # each part also records the environment it ran in
        runs[key] = {**results["environment"], **results["runs"][key]}
    for part in parts:  # per system, each stamped: the systems not run here are kept
        if part.per_system and part.key in results:
            for measured in results[part.key].values():
                measured.setdefault("run", {}).setdefault(
                    "commit", results["environment"]["commit"]
                )
            results[part.key] = {**merged.get(part.key, {}), **results[part.key]}
    merged.update(results)
    merged["runs"] = runs
    return merged


def report(results: dict[str, Any], bench: Bench, parts: tuple[Part, ...]) -> str:
    """Each part's table, then the environment and when each part started."""
    sections = [part.report(results[part.key], bench) for part in parts if results.get(part.key)]
    environment = results["environment"]
    footer = [
        f"commit {environment['commit'][:12]}{' (dirty)' if environment['commit_dirty'] else ''}"
        f", procrastinate {environment['versions'].get('procrastinate')}, PostgreSQL "
        f"{environment['postgresql']}, Python {environment['python']}, "
        f"{environment['cpus']} x {environment['cpu_model']}",
    ]
    for part, stamp in results["runs"].items():
        load = ", ".join(f"{value:.2f}" for value in stamp["load_average_at_start"])
        footer.append(f"{part}: started {stamp['started_at']}, load average {load}")
    return "\n\n".join("\n".join(lines) for lines in [*sections, footer])


def plot_idle_gaps(results: dict[str, Any], path: Path, parts: tuple[Part, ...]) -> None:
    """One panel per idle-gap part present in `results`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [part for part in parts if part.panel is not None and results.get(part.key)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for axis, part in zip(axes[0], panels, strict=True):
        assert part.panel is not None
        part.panel(axis, results[part.key])
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
