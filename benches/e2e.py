"""End-to-end benchmark: procrastinate's own worker vs fastworker, same database, one run.

    python benches/e2e.py [--dsn DSN] [--jobs 20000] [--concurrency 1,10,100] [--sync 10]

For each setting, the same pre-loaded queue of no-op jobs is drained by each system in
turn (each drain in its own process, so its CPU time is its own), and the script reports
per system: jobs/s, the ratio fastworker/procrastinate, worker CPU µs per job, PostgreSQL
server CPU µs per job (all backends, from /proc, when the server is local) and commits per
job (pg_stat_database.xact_commit). Then pickup latency: an idle listening worker, one job
deferred every 20 ms, time from defer to task start (p50/p90/p99/max). Then memory:
fastworker alone drains 200,000 jobs at concurrency 100 and 1,000, its RSS sampled from
/proc every 0.2 s.

Output: a table on stdout, `benches/results/e2e.json` and `benches/results/e2e.png`.
Without --dsn, a scratch database is created on the local server
(`host=127.0.0.1 user=postgres`) and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

SYSTEMS = ("procrastinate", "fastworker")
HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the app both systems run (imported by the child processes) -------------------------


def build_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop(**kwargs: Any) -> None:
        return None

    @app.task(name="noop_sync")
    def noop_sync(**kwargs: Any) -> None:
        return None

    @app.task(name="stamp")
    async def stamp(t: float) -> None:
        LATENCIES.append(time.time() - t)
        if len(LATENCIES) >= EXPECTED[0] > 0:
            ALL_STAMPED.set()

    return app


LATENCIES: list[float] = []
EXPECTED = [0]  # how many stamped jobs the latency run waits for
ALL_STAMPED = asyncio.Event()


# --- child: one drain or one latency run ------------------------------------------------


async def child_drain(system: str, dsn: str, concurrency: int) -> dict[str, float]:
    app = build_app(dsn)
    async with app.open_async():
        cpu = time.process_time()
        wall = time.perf_counter()
        if system == "fastworker":
            import fastworker

            await fastworker.run_async(
                app, concurrency=concurrency, wait=False, install_signal_handlers=False
            )
        else:
            await app.run_worker_async(
                concurrency=concurrency, wait=False, install_signal_handlers=False
            )
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return {"wall": wall, "cpu": cpu}


async def child_latency(system: str, dsn: str, expected: int) -> dict[str, Any]:
    app = build_app(dsn)
    async with app.open_async():
        if system == "fastworker":
            import fastworker

            worker: Any = fastworker.Worker(app=app, concurrency=10, install_signal_handlers=False)
        else:
            from procrastinate import worker as procrastinate_worker

            worker = procrastinate_worker.Worker(
                app=app, concurrency=10, install_signal_handlers=False
            )
        task = asyncio.create_task(worker.run())
        print("ready", flush=True)
        EXPECTED[0] = expected
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ALL_STAMPED.wait(), timeout=120)
        worker.stop()
        await task
    return {"latencies": LATENCIES}


# --- parent: measurements ---------------------------------------------------------------


def server_cpu_seconds(dsn: str) -> float | None:
    """CPU of the PostgreSQL server: postmaster (with reaped children) + live children."""
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            # Read while the backend lives: its parent is the postmaster.
            postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # not a local server

    def times(pid: int, with_children: bool) -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = int(fields[11]) + int(fields[12])  # utime, stime
        if with_children:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
        return total

    try:
        ticks = times(postmaster, True)
    except OSError:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLOCK_TICKS


def commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def reset_queue(dsn: str, jobs: int, task_name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "TRUNCATE procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs,"
            " procrastinate_workers RESTART IDENTITY CASCADE"
        )
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
            " SELECT 'default', %s, '{}' FROM generate_series(1, %s)",
            (task_name, jobs),
        )
        connection.execute("VACUUM ANALYZE procrastinate_jobs")
        connection.execute("VACUUM ANALYZE procrastinate_events")
        # Each measurement starts from the same state: the WAL of the previous drains (up to
        # a gigabyte) is not checkpointed in the middle of the next one.
        connection.execute("CHECKPOINT")


def run_child(*args: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def drain(dsn: str, system: str, concurrency: int, kind: str, jobs: int) -> dict[str, float]:
    reset_queue(dsn, jobs, "noop" if kind == "async" else "noop_sync")
    time.sleep(1.1)  # let the stats of the reset reach pg_stat_database
    commits_before = commits(dsn)
    server_before = server_cpu_seconds(dsn)
    result = run_child("_drain", system, dsn, str(concurrency))
    server_after = server_cpu_seconds(dsn)
    time.sleep(1.1)  # backends flush their stats when they exit, at most once a second
    commits_after = commits(dsn)
    with psycopg.connect(dsn, autocommit=True) as connection:
        left = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
        ).fetchone()[0]  # type: ignore[index]
    if left:
        raise RuntimeError(f"{system} left {left} jobs not succeeded")
    measured: dict[str, float] = {
        "jobs_per_s": jobs / result["wall"],
        "worker_cpu_us_per_job": result["cpu"] / jobs * 1e6,
        "commits_per_job": (commits_after - commits_before) / jobs,
        "wall_s": result["wall"],
    }
    if server_before is not None and server_after is not None:
        measured["server_cpu_us_per_job"] = (server_after - server_before) / jobs * 1e6
    return measured


def latency(dsn: str, system: str, seconds: float, interval: float) -> dict[str, float]:
    reset_queue(dsn, 0, "stamp")
    expected = int(seconds / interval)
    child = subprocess.Popen(
        [sys.executable, __file__, "_latency", system, dsn, str(expected)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(child.stderr.read() if child.stderr else "child failed")
    with psycopg.connect(dsn, autocommit=True) as connection:
        for _ in range(100):  # wait until the worker is registered, then a little more
            if connection.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]:  # type: ignore[index]
                break
            time.sleep(0.05)
        time.sleep(0.5)
        next_at = time.perf_counter()
        for _ in range(expected):
            connection.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " VALUES ('default', 'stamp', json_build_object('t', %s::float8))",
                (time.time(),),
            )
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    stdout, stderr = child.communicate(timeout=180)
    if child.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    values = sorted(json.loads(stdout.strip().splitlines()[-1])["latencies"])
    ms = [value * 1000 for value in values]
    quantiles = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": quantiles[89],
        "p99_ms": quantiles[98],
        "max_ms": ms[-1],
    }


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory(dsn: str, concurrency: int, jobs: int) -> dict[str, float]:
    """fastworker alone drains `jobs` jobs; its RSS is sampled every 0.2 s from /proc."""
    reset_queue(dsn, jobs, "noop")
    with open(os.devnull, "w") as devnull:
        child = subprocess.Popen(
            [sys.executable, __file__, "_drain", "fastworker", dsn, str(concurrency)],
            stdout=subprocess.PIPE,
            stderr=devnull,
            text=True,
        )
        samples: list[float] = []
        while child.poll() is None:
            rss = rss_mib(child.pid)
            if rss is not None:
                samples.append(rss)
            time.sleep(0.2)
        stdout, _ = child.communicate()
    if child.returncode != 0 or len(samples) < 5:
        raise RuntimeError(f"memory drain at C={concurrency} failed ({len(samples)} samples)")
    with psycopg.connect(dsn, autocommit=True) as connection:
        left = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
        ).fetchone()[0]  # type: ignore[index]
    if left:
        raise RuntimeError(f"fastworker left {left} jobs not succeeded")
    wall = json.loads(stdout.strip().splitlines()[-1])["wall"]

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


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [entry["label"] for entry in results["drain"]]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for offset, system in ((-width / 2, "procrastinate"), (width / 2, "fastworker")):
        values = [entry[system]["jobs_per_s"] for entry in results["drain"]]
        bars = axis.bar([i + offset for i in range(len(labels))], values, width, label=system)
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_ylabel("jobs/s (no-op jobs, drain)")
    axis.set_title(f"Drain throughput, {results['jobs']} jobs, same PostgreSQL, one run")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="database to use (its procrastinate tables are emptied)")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", default="1,10,100", help="async task concurrencies")
    parser.add_argument("--sync", default="10", help="sync task concurrencies ('' for none)")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--latency-interval", type=float, default=0.02)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--memory-jobs", type=int, default=200000, help="jobs per memory drain (0: skip)"
    )
    parser.add_argument(
        "--memory-concurrency", default="100,1000", help="concurrencies of the memory drains"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    systems = [system for system in args.systems.split(",") if system]

    scratch = None
    dsn = args.dsn
    if dsn is None:
        scratch = f"fw_bench_{uuid.uuid4().hex[:8]}"
        admin = "host=127.0.0.1 user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{scratch}"')
        dsn = make_conninfo(admin, dbname=scratch)
        from procrastinate import schema

        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]
    settings = [("async", int(c)) for c in args.concurrency.split(",") if c] + [
        ("sync", int(c)) for c in args.sync.split(",") if c
    ]
    results: dict[str, Any] = {"jobs": args.jobs, "drain": [], "latency": {}, "memory": []}
    try:
        for kind, concurrency in settings:
            entry: dict[str, Any] = {
                "label": f"C={concurrency} {kind}",
                "kind": kind,
                "concurrency": concurrency,
            }
            for system in systems:
                entry[system] = drain(dsn, system, concurrency, kind, args.jobs)
                print(
                    f"{entry['label']:>12} {system:>13}: {entry[system]['jobs_per_s']:8.0f} jobs/s",
                    flush=True,
                )
            if "procrastinate" in entry and "fastworker" in entry:
                entry["ratio"] = (
                    entry["fastworker"]["jobs_per_s"] / entry["procrastinate"]["jobs_per_s"]
                )
            results["drain"].append(entry)
        if args.latency_seconds > 0:
            for system in systems:
                results["latency"][system] = latency(
                    dsn, system, args.latency_seconds, args.latency_interval
                )
        if args.memory_jobs > 0 and "fastworker" in systems:
            for concurrency in [int(c) for c in args.memory_concurrency.split(",") if c]:
                results["memory"].append(memory(dsn, concurrency, args.memory_jobs))
                print(f"memory drain C={concurrency}: done", flush=True)
    finally:
        if scratch:
            with psycopg.connect(
                "host=127.0.0.1 user=postgres dbname=postgres", autocommit=True
            ) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(results, indent=2))
    print()
    print(report(results, systems))
    print(f"\nwrote {args.out / 'e2e.json'}")
    if "procrastinate" in systems and "fastworker" in systems:
        try:
            plot(results, args.out / "e2e.png")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'fastworker[bench]')")
        else:
            print(f"wrote {args.out / 'e2e.png'}")


def report(results: dict[str, Any], systems: list[str]) -> str:
    lines = [
        "| setting | system | jobs/s | ratio | worker CPU µs/job | server CPU µs/job "
        "| commits/job |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in results["drain"]:
        for system in systems:
            measured = entry[system]
            shown = system == "fastworker" and "ratio" in entry
            ratio = f"{entry['ratio']:.1f}x" if shown else ""
            server = measured.get("server_cpu_us_per_job")
            lines.append(
                f"| {entry['label']} | {system} | {measured['jobs_per_s']:.0f} | {ratio} | "
                f"{measured['worker_cpu_us_per_job']:.0f} | "
                f"{'n/a' if server is None else f'{server:.0f}'} | "
                f"{measured['commits_per_job']:.3f} |"
            )
    if results["latency"]:
        lines += [
            "",
            "| pickup latency | p50 ms | p90 ms | p99 ms | max ms | jobs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for system, measured in results["latency"].items():
            lines.append(
                f"| {system} | {measured['p50_ms']:.2f} | {measured['p90_ms']:.2f} | "
                f"{measured['p99_ms']:.2f} | {measured['max_ms']:.2f} | {measured['count']} |"
            )
    if results.get("memory"):
        lines += [
            "",
            "| fastworker RSS, drain | jobs | jobs/s | at 10% MiB | at 50% MiB | at end MiB "
            "| max MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for measured in results["memory"]:
            lines.append(
                f"| C={measured['concurrency']} | {measured['jobs']} | "
                f"{measured['jobs_per_s']:.0f} | {measured['rss_mib_at_10pct']:.1f} | "
                f"{measured['rss_mib_at_50pct']:.1f} | {measured['rss_mib_at_end']:.1f} | "
                f"{measured['rss_mib_max']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_drain":
        _, _, system, dsn, concurrency = sys.argv
        print(json.dumps(asyncio.run(child_drain(system, dsn, int(concurrency)))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_latency":
        _, _, system, dsn, expected = sys.argv
        print(json.dumps(asyncio.run(child_latency(system, dsn, int(expected)))))
    else:
        main()
