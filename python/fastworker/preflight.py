"""The start-up check of the database, before the worker opens the app: are the servers the
app and the worker connect to reachable, and do they hold procrastinate's schema?

Without it, the app's pool would retry for 30 s and then time out vaguely. The check says
what it found as a small typed result (`DatabaseCheck`); the CLI (and so the Django
command) turns it into its message and exit code. Nothing here holds or says a password.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import procrastinate
import psycopg
from psycopg.conninfo import conninfo_to_dict

from fastworker import compat
from fastworker.connection import redact_password

# How long the check waits for the database before giving up (seconds).
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Ready:
    """Every server answered and holds procrastinate's schema."""


@dataclass(frozen=True)
class InvalidSettings:
    """libpq could not read the connection settings (``reason``: its words, redacted)."""

    reason: str


@dataclass(frozen=True)
class Unreachable:
    """No connection: ``where`` it was tried (hosts, database, user) and libpq's
    ``reason``, each without any part of the password."""

    where: str
    reason: str


@dataclass(frozen=True)
class SchemaMissing:
    """The server answered, but database ``database`` at ``where`` has no
    ``procrastinate_jobs`` table."""

    database: str
    where: str


DatabaseCheck = Ready | InvalidSettings | Unreachable | SchemaMissing


def _targets(params: dict[str, Any]) -> str:
    """``host:port`` of each host a conninfo names (never the password)."""
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    described = []
    for index, host in enumerate(hosts):
        port = ports[index] if index < len(ports) else ports[0]
        if not host:
            described.append(f"the local Unix socket (port {port})")
        elif host.startswith("/") or host.startswith("@"):
            described.append(f"{host}:{port} (Unix socket)")
        else:
            described.append(f"{host}:{port}")
    return ", ".join(described)


def _where(params: dict[str, Any]) -> str:
    database = params.get("dbname") or os.environ.get("PGDATABASE")
    user = params.get("user") or os.environ.get("PGUSER")
    details = ", ".join(
        f"{label} {value!r}" for label, value in (("database", database), ("user", user)) if value
    )
    return _targets(params) + (f" ({details})" if details else "")


def connect_reason(error: BaseException, password: str | None) -> str:
    """libpq's reason, on one line, without the parts the caller already says (which
    server, that the connection failed) and without ``password``."""
    text = str(error).strip() or type(error).__name__
    text = re.sub(r"^connection failed:\s*", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = []
    for line in lines:
        line = re.sub(
            r'^connection to server (at|on socket) ".*?"(, port \d+)? failed:\s*', "", line
        )
        line = re.sub(r"^multiple connection attempts failed\..*", "", line)
        if line and line not in reasons:
            reasons.append(line)
    reason = "; ".join(reasons) or text.replace("\n", " ")
    if password:
        reason = reason.replace(password, "***")
    return reason


def _connection_arguments(
    app: procrastinate.App, dsn: str | None
) -> list[tuple[str, dict[str, Any]]]:
    """(conninfo, kwargs) of the servers the app and the worker will connect to."""
    targets: list[tuple[str, dict[str, Any]]] = []
    connector = app.connector
    if isinstance(connector, procrastinate.PsycopgConnector):
        arguments = compat.connector_pool_args(connector) or {}
        conninfo = arguments.get("conninfo", "")
        kwargs = arguments.get("kwargs") or {}
        if isinstance(conninfo, str) and isinstance(kwargs, dict):
            targets.append((conninfo, dict(kwargs)))
    if dsn:
        # libpq resolves it (service file, PG* variables, passfile), as for the core.
        targets.append((dsn, {}))
    return targets


async def _check_one(conninfo: str, kwargs: dict[str, Any]) -> DatabaseCheck:
    try:
        params = conninfo_to_dict(conninfo, **kwargs)
    except psycopg.ProgrammingError as error:  # libpq's parser's words, which may quote
        return InvalidSettings(redact_password(str(error), conninfo))  # a piece of a password
    timeout = min(int(params.get("connect_timeout") or CONNECT_TIMEOUT), CONNECT_TIMEOUT)
    if timeout <= 0:
        timeout = CONNECT_TIMEOUT
    kwargs = {**kwargs, "connect_timeout": timeout, "autocommit": True}
    try:
        connection = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
    except psycopg.OperationalError as error:
        password = str(params.get("password") or os.environ.get("PGPASSWORD") or "")
        # A mistyped URL puts pieces of its password where the host or database goes.
        return Unreachable(
            where=redact_password(_where(params), conninfo),
            reason=redact_password(connect_reason(error, password), conninfo),
        )
    async with connection:
        cursor = await connection.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await cursor.fetchone()
        database = connection.info.dbname
        where = _targets({"host": connection.info.host, "port": connection.info.port})
    if not (row and row[0]):
        return SchemaMissing(database=database, where=where)
    return Ready()


async def check_database(app: procrastinate.App, dsn: str | None) -> DatabaseCheck:
    """What the worker would find at start: each server the app's connector and ``dsn``
    name, in that order, checked until one is not `Ready`."""
    for conninfo, kwargs in _connection_arguments(app, dsn):
        found = await _check_one(conninfo, kwargs)
        if not isinstance(found, Ready):
            return found
    return Ready()
