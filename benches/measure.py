"""Measurements taken by the parent: PostgreSQL's CPU and commits, a child's RSS, the
environment of a run and the load at the start of each part."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


def wait_for_clients_to_leave(dsn: str, timeout: float = 5.0) -> None:
    """Until no other client is connected to the database (at most `timeout` s), then a
    moment more: a backend's CPU counts in server_cpu_seconds while it runs and once its
    exit is reaped, not in between."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            others = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()[0]  # type: ignore[index]
            if not others:
                break
            time.sleep(0.02)
    time.sleep(0.2)


def commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


class DatabaseCpu:
    """CPU of the server's backends on this database (the server may be shared with other
    databases' clients), and of the whole machine, while it runs: backends are sampled from
    /proc every 20 ms (a backend that exits loses at most its last 20 ms), from a connection
    to another database."""

    def __init__(self, dsn: str) -> None:
        self.dbname = conninfo_to_dict(dsn).get("dbname")
        self.admin = make_conninfo(dsn, dbname="postgres")
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    @staticmethod
    def _ticks(pid: int) -> int | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _machine() -> tuple[int, int]:
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    def _sample(self, connection: psycopg.Connection[Any], baseline: bool) -> None:
        pids = [
            row[0]
            for row in connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.dbname,)
            )
        ]
        for pid in pids:
            ticks = self._ticks(pid)
            if ticks is None:
                continue
            if pid not in self.first:
                self.first[pid] = ticks if baseline else 0
            self.last[pid] = ticks

    def _run(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as connection:
            self._sample(connection, baseline=True)
            self.ready.set()
            while not self.stop.wait(0.02):
                self._sample(connection, baseline=False)
            self._sample(connection, baseline=False)

    def __enter__(self) -> DatabaseCpu:
        self.window = time.perf_counter()
        self.machine_before = self._machine()
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.machine_after = self._machine()
        self.window = time.perf_counter() - self.window

    @property
    def seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last) / CLOCK_TICKS

    @property
    def machine_busy_cores(self) -> float:
        """Busy CPUs of the whole machine, on average over the measured window."""
        total = self.machine_after[0] - self.machine_before[0]
        idle = self.machine_after[1] - self.machine_before[1]
        return (total - idle) / max(1, total) * (os.cpu_count() or 1)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def quantiles_ms(values: list[float]) -> dict[str, float]:
    ms = sorted(value * 1000 for value in values)
    if len(ms) < 2:
        return {"count": len(ms)}
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": cuts[98],
        "max_ms": ms[-1],
    }


def environment(dsn: str) -> dict[str, Any]:
    """What tells figures from different machines and commits apart."""
    from importlib import metadata

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return completed.stdout.strip()

    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(dsn, autocommit=True) as connection:
        server = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    versions = {}
    for package in ("fastworker", "procrastinate", "pgqueuer", "asyncpg", "psycopg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "psycopg_impl": psycopg.pq.__impl__,  # "python" (ctypes), "c" or "binary"
        "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions,
        "postgresql": server,
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        **run_stamp(),
    }


def run_stamp() -> dict[str, Any]:
    """When a part started, and the machine's load then (a shared machine is noisy)."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


class ServerStats:
    """Where the server's time goes, from pg_stat_statements and function tracking, when
    the server has them (`benches/e2e.py --scratch-server`): reset on creation, read by
    `per_job`. Statement times are wall times of execution (triggers included); what the
    statements do not cover (commit, WAL flush, parse/bind, the protocol) is in the
    server's CPU, not here."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        with psycopg.connect(dsn, autocommit=True) as connection:
            self.available = bool(
                connection.execute(
                    "SELECT to_regclass('pg_stat_statements') IS NOT NULL"
                    " AND current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'"
                    " AND current_setting('track_functions') <> 'none'"
                ).fetchone()[0]  # type: ignore[index]
            )
            if self.available:
                connection.execute("SELECT pg_stat_statements_reset()")
                connection.execute("SELECT pg_stat_reset()")

    def per_job(self, jobs: int) -> dict[str, Any] | None:
        """µs per job: top-level statements (the 4 costliest, then all), their WAL bytes,
        and procrastinate's functions (trigger functions) by their own time."""
        if not self.available:
            return None
        time.sleep(1.1)  # backends flush their function statistics at most once a second
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute("SELECT pg_stat_clear_snapshot()")
            statements = connection.execute(
                "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time,"
                " wal_bytes FROM pg_stat_statements"
                " WHERE toplevel AND dbid = (SELECT oid FROM pg_database"
                "  WHERE datname = current_database()) AND query NOT LIKE 'SELECT pg_stat%'"
                " ORDER BY total_exec_time DESC"
            ).fetchall()
            functions = connection.execute(
                "SELECT funcname, calls, self_time FROM pg_stat_user_functions"
                " WHERE funcname LIKE 'procrastinate%' AND calls > 0 ORDER BY self_time DESC"
            ).fetchall()
        scale = 1000 / jobs  # ms in all to µs per job
        return {
            "statements_us_per_job": sum(row[2] for row in statements) * scale,
            "wal_bytes_per_job": sum(int(row[3]) for row in statements) / jobs,
            "top_statements": [
                {
                    "query": query[:90],
                    "calls_per_job": calls / jobs,
                    "us_per_job": ms * scale,
                    "us_per_call": ms * 1000 / calls,
                }
                for query, calls, ms, _ in statements[:4]
            ],
            "procrastinate_functions_us_per_job": sum(row[2] for row in functions) * scale,
            "functions": [
                {"name": name, "calls_per_job": calls / jobs, "us_per_job": ms * scale}
                for name, calls, ms in functions
            ],
        }
