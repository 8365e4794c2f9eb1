"""Shared machinery of the reliability tests: worker processes, bounded waits, database
probes, and a private PostgreSQL cluster (for restarts and TLS, without touching the
server other tests share)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from procrastinate import schema

from tests.conftest import fetch_all

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds.
    A bound on a loop, not an assertion on how long something took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class WorkerProcess:
    """One `tests.reliability.worker_process` in its own process, its log in a file."""

    def __init__(self, dsn: str, log_path: Path, *args: str, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in wait() / kill()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.worker_process", "--dsn", dsn, *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.returncode is not None:
                self._log.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye, nothing written, the worker row stays."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, the graceful stop; SIGKILL if it does not end in `timeout`."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def defer_jobs(
    dsn: str,
    count: int,
    *,
    task: str = "record",
    args_sql: str = "json_build_object('n', n)",
    queue: str = "default",
) -> None:
    """Insert `count` jobs in one statement (procrastinate's triggers notify as usual)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            f"SELECT %s, %s, {args_sql} FROM generate_series(1, %s) AS n",
            (queue, task, count),
        )


def statuses(dsn: str) -> dict[str, int]:
    return dict(fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"))


def execution_histogram(dsn: str, task: str | None = None) -> dict[int, int]:
    """{number of executions: how many jobs ran that many times}, over every job."""
    rows = fetch_all(
        dsn,
        """SELECT coalesce(e.runs, 0), count(*) FROM procrastinate_jobs j
             LEFT JOIN (SELECT job_id, count(*) AS runs FROM fw_executions GROUP BY 1) e
               ON e.job_id = j.id
            WHERE %s::text IS NULL OR j.task_name = %s::text
            GROUP BY 1""",
        task,
        task,
    )
    return {int(runs): int(jobs) for runs, jobs in rows}


def create_executions_table(dsn: str) -> None:
    from tests.reliability.tasks import EXECUTIONS_TABLE

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(EXECUTIONS_TABLE)


def fastworker_backends(dsn: str, database: str) -> list[tuple[int, str]]:
    """(pid, role) of the worker's connections: `listen`, `jobs` (claims and
    completions) or `registry` (heartbeat, abort polling), told apart by their last query."""
    rows = fetch_all(
        dsn,
        """SELECT pid, query FROM pg_stat_activity
            WHERE datname = %s AND application_name = 'fastworker' AND pid <> pg_backend_pid()""",
        database,
    )
    result = []
    for pid, query in rows:
        text = (query or "").strip()
        if text.startswith("LISTEN"):
            role = "listen"
        elif "candidate" in text or "finished" in text or "ORPHAN" in text.upper():
            role = "jobs"
        else:
            role = "registry"
        result.append((int(pid), role))
    return result


def terminate_backend(dsn: str, pid: int) -> bool:
    rows = fetch_all(dsn, "SELECT pg_terminate_backend(%s)", pid)
    return bool(rows and rows[0][0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _postgres_bindir() -> Path:
    configured = os.environ.get("FASTWORKER_PG_BINDIR")
    if configured:
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config:
        output = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if output and (Path(output) / "initdb").exists():
            return Path(output)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("initdb not found: set FASTWORKER_PG_BINDIR")


class PrivateCluster:
    """A throwaway PostgreSQL cluster on a free loopback port, owned by this test only.

    As root, the server runs as the `postgres` OS user (PostgreSQL refuses root)."""

    def __init__(
        self,
        *,
        ssl_files: dict[str, Path] | None = None,
        hba: str | None = None,
        max_connections: int = 50,
    ) -> None:
        self.bindir = _postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="fw-cluster-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
            self._uid, self._gid = user.pw_uid, user.pw_gid
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "fsync = off",
            f"max_connections = {max_connections}",
        ]
        if ssl_files:
            for name, source in ssl_files.items():
                target = self.data / name
                shutil.copy(source, target)
                os.chmod(target, 0o600)
                if self._as_user:
                    os.chown(target, self._uid, self._gid)
            settings += [
                "ssl = on",
                "ssl_cert_file = 'server.crt'",
                "ssl_key_file = 'server.key'",
            ]
            # Only TLS connections over TCP: a plaintext attempt is refused.
            (self.data / "pg_hba.conf").write_text(
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
            )
        if hba is not None:
            (self.data / "pg_hba.conf").write_text(hba)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        )

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        params = {"host": "127.0.0.1", "port": str(self.port), "user": "postgres", "dbname": dbname}
        params.update(extra)
        return " ".join(f"{key}={value}" for key, value in params.items())

    def local_dsn(self, dbname: str = "postgres") -> str:
        """Over the Unix socket (plaintext allowed there even with TLS-only TCP)."""
        return f"host={self.root} port={self.port} user=postgres dbname={dbname}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.local_dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.local_dsn(name), autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster(**options: Any) -> Iterator[PrivateCluster]:
    cluster = PrivateCluster(**options)
    try:
        yield cluster
    finally:
        cluster.destroy()
