"""Behind a transaction pooler: a real PgBouncer in `pool_mode = transaction`, started by
the test in front of the test server, with the app's connector and the worker's core both
going through it (`pooler=True`), and LISTEN straight to the server (`listen_dsn`).

PgBouncer 1.18 (Debian 12's) passes no protocol-level prepared statement between server
connections, and hands each transaction to whichever server connection is free: with
`server_round_robin`, consecutive transactions of one client land on different ones, so
a statement prepared in one transaction is missing from the next (the last tests show
that without `pooler` the worker stops, and says so).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import fastworker
from tests.conftest import fetch_all, server_address
from tests.helpers import (
    PATIENCE,
    finish,
    numbered,
    wait_for_rows,
    wait_until_listening,
)


def _pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    candidate = Path("/usr/sbin/pgbouncer")
    return str(candidate) if os.access(candidate, os.X_OK) else None


PGBOUNCER = _pgbouncer_binary()
#: Server connections PgBouncer opens to the database, at most.
POOL_SIZE = 6

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; scripts/test.sh does)",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connects(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def _backend_pid(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def bouncer(dsn: str) -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test database; its DSN."""
    assert PGBOUNCER is not None
    server_host, server_port = server_address()
    user = str(conninfo_to_dict(dsn).get("user") or "postgres")
    port = _free_port()
    directory = Path(tempfile.mkdtemp(prefix="fastworker-pgbouncer-"))
    command = [PGBOUNCER]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root: it drops to the postgres user, which must read
        # its files and write its log.
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user for PgBouncer to run as")
        os.chmod(directory, 0o755)
        os.chown(directory, account.pw_uid, account.pw_gid)
        command += ["-u", "postgres"]
    # Trust, like the test server: PgBouncer still wants each user in its auth file.
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 100
server_round_robin = 1
ignore_startup_parameters = extra_float_digits
logfile = {directory / "pgbouncer.log"}
pidfile = {directory / "pgbouncer.pid"}
"""
    )
    if os.geteuid() == 0:
        for name in ("users.txt", "pgbouncer.ini"):
            os.chown(directory / name, account.pw_uid, account.pw_gid)
    output = (directory / "output.txt").open("wb")
    process = subprocess.Popen(
        [*command, str(directory / "pgbouncer.ini")],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    bouncer_dsn = make_conninfo(dsn, host="127.0.0.1", port=str(port))
    try:
        deadline = time.monotonic() + PATIENCE
        while not _connects(bouncer_dsn):
            if process.poll() is not None or time.monotonic() > deadline:
                said = [directory / "output.txt", directory / "pgbouncer.log"]
                raise AssertionError(
                    "PgBouncer did not start: "
                    + "".join(path.read_text() for path in said if path.exists())
                )
            time.sleep(0.05)
        _check_transaction_pooling(bouncer_dsn)
        yield bouncer_dsn
    finally:
        process.terminate()
        try:
            process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()
        shutil.rmtree(directory, ignore_errors=True)


def _check_transaction_pooling(bouncer_dsn: str) -> None:
    """What the tests rely on: one client's consecutive transactions run on different
    server connections (so nothing of a session carries over)."""
    with (
        psycopg.connect(bouncer_dsn, autocommit=True, prepare_threshold=None) as first,
        psycopg.connect(bouncer_dsn, autocommit=True, prepare_threshold=None) as second,
    ):
        # Two server connections in the pool: each client holds one in a transaction.
        first.execute("BEGIN")
        second.execute("BEGIN")
        assert _backend_pid(first) != _backend_pid(second)
        first.execute("COMMIT")
        second.execute("COMMIT")
        assert _backend_pid(first) != _backend_pid(first), "not a transaction pooler"


def _app(conninfo: str) -> procrastinate.App:
    # psycopg prepares a statement after 5 runs: no such thing behind PgBouncer 1.18.
    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=conninfo, kwargs={"prepare_threshold": None}
        )
    )


async def test_jobs_locks_and_retries_run_through_pgbouncer(bouncer: str, dsn: str) -> None:
    app = _app(bouncer)
    chain: list[int] = []
    tries: dict[int, int] = {}

    @app.task(name="plain")
    async def plain(i: int) -> int:
        return i

    @app.task(name="chained")
    async def chained(i: int) -> None:
        chain.append(i)
        await asyncio.sleep(0)

    @app.task(name="flaky", retry=procrastinate.RetryStrategy(max_attempts=3))
    async def flaky(i: int) -> None:
        tries[i] = tries.get(i, 0) + 1
        if tries[i] < 3:
            raise RuntimeError(f"attempt {tries[i]} fails")

    async with app.open_async():
        await plain.batch_defer_async(*numbered(40))
        for i in range(6):
            await chained.configure(lock="the chain").defer_async(i=i)
        for i in range(3):
            await flaky.defer_async(i=i)
        # Polling (no LISTEN here): each job found within a tenth of a second.
        worker = asyncio.create_task(
            fastworker.run_async(
                app,
                concurrency=4,
                max_batch_size=3,
                pooler=True,
                listen_notify=False,
                fetch_job_polling_interval=0.1,
                install_signal_handlers=False,
            )
        )
        await wait_for_rows(
            dsn,
            "SELECT task_name, status::text, attempts, count(*) FROM procrastinate_jobs"
            " GROUP BY 1, 2, 3 ORDER BY 1",
            [
                ("chained", "succeeded", 1, 6),
                ("flaky", "succeeded", 3, 3),
                ("plain", "succeeded", 1, 40),
            ],
        )
        worker.cancel()
        assert isinstance(await finish(worker), asyncio.CancelledError)

    assert chain == list(range(6))
    assert tries == {0: 3, 1: 3, 2: 3}
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
    # The core's settings were each transaction's own: none stayed on a server
    # connection that PgBouncer hands to other clients.
    with psycopg.connect(bouncer, autocommit=True, prepare_threshold=None) as client:
        for _ in range(6):
            settings = client.execute(
                "SELECT current_setting('plan_cache_mode'), current_setting('jit'),"
                " current_setting('enable_seqscan'), current_setting('enable_sort'),"
                " current_setting('lock_timeout'),"
                " current_setting('idle_in_transaction_session_timeout'),"
                " (SELECT count(*) FROM pg_prepared_statements)"
            ).fetchone()
            assert settings == ("auto", "on", "on", "on", "0", "0", 0)


async def test_listen_goes_straight_to_the_server_and_a_stop_waits_for_the_running_job(
    bouncer: str, dsn: str
) -> None:
    app = _app(bouncer)
    started = asyncio.Event()
    release = asyncio.Event()

    @app.task(name="slow")
    async def slow() -> str:
        started.set()
        await release.wait()
        return "done"

    async with app.open_async():
        worker = asyncio.create_task(
            fastworker.run_async(
                app,
                pooler=True,
                listen_dsn=dsn,
                # No polling: the job can only be found through its notification.
                fetch_job_polling_interval=float("inf"),
                install_signal_handlers=False,
            )
        )
        await wait_until_listening(dsn)
        job_id = await slow.defer_async()
        await asyncio.wait_for(started.wait(), PATIENCE)
        worker.cancel()  # a graceful stop: the running job goes on
        await asyncio.sleep(0)
        assert not worker.done()
        release.set()
        ended = await finish(worker)
    assert isinstance(ended, asyncio.CancelledError)
    assert fetch_all(dsn, "SELECT id, status::text FROM procrastinate_jobs") == [
        (job_id, "succeeded")
    ]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


async def test_listen_through_the_pooler_is_refused_at_start(bouncer: str) -> None:
    app = _app(bouncer)
    async with app.open_async():
        with pytest.raises(fastworker.ConfigurationError, match="listen_dsn"):
            await fastworker.run_async(app, pooler=True, install_signal_handlers=False)


async def test_without_pooler_mode_the_worker_stops_and_names_the_option(
    bouncer: str, dsn: str
) -> None:
    """The pooler above really breaks what `pooler=True` avoids: named prepared statements
    (the claim is prepared in one transaction, and run in another, on another server
    connection: "prepared statement ... does not exist"). The worker recognises it and
    stops with an error that says what to do, instead of retrying for ever; the jobs it
    claimed meanwhile still get their outcome written."""
    app = _app(bouncer)

    @app.task(name="plain")
    async def plain(i: int) -> int:
        return i

    async with app.open_async():
        await plain.batch_defer_async(*numbered(3))
        worker = asyncio.create_task(
            # A claim every 50 ms, each its own transaction, on whichever server
            # connection is next: the claim prepared on one is missing on another.
            fastworker.run_async(
                app,
                listen_notify=False,
                fetch_job_polling_interval=0.05,
                install_signal_handlers=False,
            )
        )
        ended = await finish(worker)
    assert isinstance(ended, fastworker.ConfigurationError), repr(ended)
    message = str(ended)
    assert "pooler=True" in message, message
    assert "prepared statement" in message, message
    # Nothing left claimed: a job ran to its end, or was never claimed.
    statuses = fetch_all(dsn, "SELECT DISTINCT status::text FROM procrastinate_jobs")
    assert {status for (status,) in statuses} <= {"todo", "succeeded"}, statuses
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


CLI_APP = """
import os

import procrastinate

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ["POOLER_TEST_APP_DSN"])
)


@app.task(name="plain")
async def plain(i: int) -> int:
    return i
"""


def _run_the_command_without_pooler(
    bouncer: str, dsn: str, directory: Path
) -> subprocess.CompletedProcess[str]:
    """`fastworker worker` with its connections through the pooler, without `--pooler`."""
    (directory / "pooler_test_app.py").write_text(CLI_APP)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROCRASTINATE_", "FASTWORKER_"))
    }
    env["POOLER_TEST_APP_DSN"] = dsn
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fastworker",
            "--app",
            "pooler_test_app.app",
            "worker",
            "--dsn",
            bouncer,
            "--fetch-job-polling-interval",
            "0.05",
        ],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=3 * PATIENCE,
        stdin=subprocess.DEVNULL,
    )


def _the_settings_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a worker that stopped for want of `--pooler`, with the exit
    code of bad settings."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("fastworker: error:")]
    assert line.startswith("fastworker: error: invalid worker settings: the server at "), line
    assert "pooler=True" in line and "--pooler" in line, line
    return line


def test_the_command_without_pooler_behind_pgbouncer_exits_with_one_line(
    bouncer: str, dsn: str, tmp_path: Path
) -> None:
    """The claim, prepared in one transaction, is missing in the next ("does not exist")."""
    line = _the_settings_error(_run_the_command_without_pooler(bouncer, dsn, tmp_path))
    assert "does not exist" in line, line


def _leave_statements_on_every_server_connection(bouncer: str, names: int) -> None:
    """What other clients (another worker, before this one) leave behind: named prepared
    statements `s0`, `s1`, ... on each server connection of the pool, which a transaction
    pooler passes on to the next client as they are."""
    connections = [
        psycopg.connect(bouncer, autocommit=True, prepare_threshold=None) for _ in range(POOL_SIZE)
    ]
    try:
        # Each client in a transaction holds a server connection of its own: all of them.
        for connection in connections:
            connection.execute("BEGIN")
        assert len({_backend_pid(connection) for connection in connections}) == POOL_SIZE
        for connection in connections:
            for number in range(names):
                connection.execute(f"PREPARE s{number} AS SELECT {number}")
            connection.execute("COMMIT")
    finally:
        for connection in connections:
            connection.close()


def test_the_command_without_pooler_meeting_another_clients_statement_exits_with_one_line(
    bouncer: str, dsn: str, tmp_path: Path
) -> None:
    """The worker's first named statement meets one of the same name on the server
    connection the pooler gives it ("already exists", 42P05): at start, not a crash (exit
    1) but the error that names `--pooler`."""
    _leave_statements_on_every_server_connection(bouncer, names=50)
    line = _the_settings_error(_run_the_command_without_pooler(bouncer, dsn, tmp_path))
    assert "already exists" in line, line
