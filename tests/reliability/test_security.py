"""The DSN's password never shows (logs, exceptions, repr, CLI errors), and user text
reaches SQL only as bound parameters or quoted identifiers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import fastworker
from fastworker import _core
from fastworker.connection import params_from_dsn
from tests.conftest import make_app
from tests.reliability.helpers import (
    REPO,
    PrivateCluster,
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    fastworker_backends,
    free_port,
    statuses,
    terminate_backend,
    wait_until,
)

SECRET = "Sup3r-s3cret-pw"
SCRAM_HBA = (
    "local all all trust\n"
    "host all postgres 127.0.0.1/32 trust\n"
    "host all worker 127.0.0.1/32 scram-sha-256\n"
)


async def start_error(conninfo: str) -> BaseException:
    with pytest.raises(fastworker.FastworkerError) as caught:
        await _core.WorkerCore.start(
            {"connection": params_from_dsn(conninfo), "reconnect_timeout": 1.0}
        )
    return caught.value


@pytest.mark.parametrize(
    "conninfo",
    [
        "host=127.0.0.1 port={port} user=u password={secret} dbname=d connect_timeout=2",
        "postgresql://u:{secret}@127.0.0.1:{port}/d",
        "host=127.0.0.1 port={port} password={secret} bogus_key=1",
        "host=127.0.0.1 port={port} password='{secret}' sslmode=sometimes",
        "host=127.0.0.1 port={port} password='{secret} sslmode=require",
        "host=127.0.0.1 port={port} password={secret} sslmode=verify-full sslrootcert=/nonexistent",
    ],
)
async def test_core_errors_never_show_the_password(conninfo: str) -> None:
    error = await start_error(conninfo.format(port=free_port(), secret=SECRET))
    for text in (str(error), repr(error), repr(error.args)):
        assert SECRET not in text


def test_the_worker_and_its_connection_settings_do_not_show_the_password() -> None:
    dsn = f"host=127.0.0.1 port=5432 user=u password={SECRET} dbname=d"
    worker = fastworker.Worker(make_app(dsn), dsn=dsn, install_signal_handlers=False)
    assert SECRET not in repr(worker)
    assert SECRET not in str(worker)
    # The resolved parameters do carry it (the core needs it), but are never logged.
    assert params_from_dsn(dsn)["password"] == SECRET


@pytest.mark.slow
def test_a_password_protected_run_never_logs_the_password(tmp_path: Path) -> None:
    """SCRAM authentication on a private cluster; a full run at DEBUG level with killed
    connections (reconnect logs), then a wrong password: the password is in no output."""
    cluster = PrivateCluster(hba=SCRAM_HBA)
    try:
        with psycopg.connect(cluster.local_dsn(), autocommit=True) as connection:
            connection.execute(f"CREATE ROLE worker LOGIN SUPERUSER PASSWORD '{SECRET}'")
        cluster.create_database("secure")
        local = cluster.local_dsn("secure")
        create_executions_table(local)
        dsn = cluster.dsn("secure", user="worker", password=SECRET)
        defer_jobs(local, 100)
        worker = WorkerProcess(
            dsn, tmp_path / "worker.log", "--log-level", "DEBUG", "--polling", "1"
        )
        try:
            wait_until(lambda: statuses(local) == {"succeeded": 100}, timeout=60, what="drain")
            for pid, _role in fastworker_backends(local, "secure"):
                terminate_backend(local, pid)
            defer_jobs(local, 10)
            wait_until(lambda: statuses(local) == {"succeeded": 110}, timeout=60, what="more")
        finally:
            code = worker.stop()
        log = worker.log()
        assert code == 0, log[-3000:]
        assert "action=dispatcher_reconnected" in log or "action=listener_reconnected" in log
        assert SECRET not in log

        wrong = cluster.dsn("secure", user="worker", password=SECRET + "-wrong")
        bad = WorkerProcess(wrong, tmp_path / "wrong.log", "--log-level", "DEBUG")
        assert bad.wait(timeout=60) == 1
        wrong_log = bad.log()
        assert "password authentication failed" in wrong_log
        assert SECRET not in wrong_log
    finally:
        cluster.destroy()


def test_cli_errors_never_show_the_password(tmp_path: Path) -> None:
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} user=u password={SECRET} dbname=d connect_timeout=2"
    result = subprocess.run(
        [sys.executable, "-m", "fastworker", "worker", "--app", "tests.reliability.cli_app.app"],
        cwd=REPO,
        env={**os.environ, "FW_RELIABILITY_DSN": dsn, "FASTWORKER_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"127.0.0.1:{port}" in output, output
    assert SECRET not in output


SQL_CALL = re.compile(
    r"(\w+)\s*\.(?:batch_execute|execute|query|query_one|query_opt|query_raw|prepare|simple_query)"
    r"\(\s*([^,)]+)"
)
# registry/mod.rs's `query_ids(client, STATEMENT, params)` helper: its statement is checked
# where it is called.
QUERY_IDS_CALL = re.compile(r"query_ids\(\s*[^,]+,\s*([^,)]+)")
CONSTANT = re.compile(r'&?(?:sql::)?[A-Z][A-Z0-9_]*|&self\.\w*(?:statement|_one)|"[A-Z ]*"')


# Statements built by the core from its own constants, or handed on unchanged by `Db`
# (whose statement parameters are `&'static str`: checked below, and by the compiler).
SETTINGS_AND_FORWARDING = {
    ("db.rs", "sql"),  # Db::batch_execute / query / prepare hand their statement on
    ("db.rs", "statement"),
    ("db.rs", "&settings"),  # SET LOCAL of SESSION_SETTINGS / CLAIM_SETTINGS, timeouts
    ("db.rs", "&begin"),  # BEGIN; and those SET LOCALs
    ("db.rs", '&format!("SET {name} TO {value}"'),  # Db::set(&'static str, &'static str)
    ("connect.rs", "&setup"),  # SET of SESSION_SETTINGS, and two timeouts in milliseconds
    ("dispatcher/mod.rs", "&begin_statement"),  # Db::begin_statement
}
STATIC_SQL = re.compile(r"pub (?:async )?fn (?:query|query_one|prepare|set)\([^)]*\)")


def test_rust_sql_is_constant_or_quoted() -> None:
    """Review as a tripwire: every statement the core sends is a constant (user values go
    as bound parameters) or the LISTEN list built from quoted identifiers."""
    offenders = []
    seen = 0
    source = REPO / "rust" / "core" / "src"
    for path in sorted(source.glob("**/*.rs")):
        name = path.relative_to(source).as_posix()
        for match in SQL_CALL.finditer(path.read_text()):
            receiver, argument = match.group(1), match.group(2).strip()
            if receiver == "self":  # the core's own methods (self.prepare(client)), not SQL
                continue
            seen += 1
            if CONSTANT.fullmatch(argument):
                continue
            if path.name == "listener.rs" and argument == "&listen_statements(&self.channels":
                continue
            if name == "registry/mod.rs" and argument == "statement":
                continue  # inside query_ids
            if (name, argument) in SETTINGS_AND_FORWARDING:
                continue
            offenders.append(f"{path.name}: {argument}")
        for match in QUERY_IDS_CALL.finditer(path.read_text()):
            argument = match.group(1).strip()
            if argument.startswith("statement:"):
                continue  # its definition
            seen += 1
            if not CONSTANT.fullmatch(argument):
                offenders.append(f"{path.name}: query_ids({argument})")
    assert seen > 10
    assert offenders == []
    # Db's statement parameters are static strings: no statement text built at run time.
    signatures = STATIC_SQL.findall((source / "db.rs").read_text())
    assert len(signatures) == 4, signatures
    for signature in signatures:
        assert "&'static str" in signature and ": &str" not in signature, signature
