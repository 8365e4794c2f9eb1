"""A PostgreSQL cluster of the benchmark's own (`benches/e2e.py --scratch-server`): made
with initdb in a temporary directory, on a free port, with pg_stat_statements loaded and
function tracking on, so that the server's time per job can be split by statement,
trigger and commit without touching a shared server's configuration; removed at the end.
Run as root, the server runs as the `postgres` user (PostgreSQL refuses root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",  # the statements of functions (triggers) too
    "track_functions": "all",
    "track_io_timing": "on",
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "300",  # fleets of 16 workers (benches/parts/fleet.py)
}


def bindir() -> Path:
    """PostgreSQL's server programs: `pg_config --bindir` (the server's, not a wrapper's)."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        raise RuntimeError("--scratch-server needs PostgreSQL's pg_config on PATH")
    return Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def scratch_server() -> Iterator[str]:
    """A running cluster of its own, for its lifetime: its admin connection string."""
    programs = bindir()
    as_user: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="fw_bench_pg_"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = directory / "data"
    port = free_port()
    try:
        subprocess.run(
            [
                *as_user,
                str(programs / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\nunix_socket_directories = '{directory}'\n")
            for name, value in SETTINGS.items():
                conf.write(f"{name} = {value}\n")
        subprocess.run(
            [
                *as_user,
                str(programs / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(directory / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        try:
            yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        finally:
            subprocess.run(
                [*as_user, str(programs / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
