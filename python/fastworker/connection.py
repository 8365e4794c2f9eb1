"""Where the core's own connections get their settings: from libpq itself.

The source, in order: an explicit ``dsn``; the app's connector (psycopg and aiopg: the
parameters libpq used for one of the app's pooled connections, so callables, ``PG*``
variables and defaults all count; Django's: the database's connection parameters; else the
arguments the connector was built with); else nothing but libpq's defaults.

Whatever the source, libpq resolves it (``PQconnectStart``, which parses URLs and
``key=value`` strings, and applies the service file, the ``PG*`` variables, the passfile and
its defaults, with its own precedence: explicit values beat the environment), and the core
gets libpq's keywords as a mapping (``ConnectionParams`` on the Rust side). No string is
parsed a second time. A keyword the core does not know, set to anything but libpq's default,
is refused with a :class:`ConfigurationError` that names it; the core refuses the values of
known keywords that it cannot honour the same way. Nothing is dropped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from fastworker import _core, compat
from fastworker._core import ConfigurationError, DatabaseUnreachable

ConnectionParams = dict[str, str]

# libpq keywords that libpq has already applied by the time it reports the others: the
# service file's entries, the passfile's password.
_APPLIED_BY_LIBPQ = frozenset({"service", "servicefile", "passfile"})

# The defaults of keywords that a newer libpq (psycopg2's, for aiopg) knows and psycopg's
# may not: such a keyword at its default means nothing to refuse.
_NEWER_LIBPQ_DEFAULTS = {
    "sslcertmode": "allow",
    "sslnegotiation": "postgres",
    "load_balance_hosts": "disable",
    "gssdelegation": "0",
}

# libpq's messages of a failed connection attempt (as opposed to bad settings): libpq 14+
# says "connection to server at/on ... failed", older ones "could not connect to server";
# a host name that does not resolve: "could not translate host name".
_UNREACHABLE_MARKERS = (
    "connection to server",
    "could not connect to server",
    "could not translate host name",
    "Connection refused",
    "No such file or directory",
)


@functools.cache
def _compiled_defaults() -> dict[str, str | None]:
    """libpq's keywords with their built-in defaults (a property of the loaded libpq)."""
    return {
        option.keyword.decode(): option.compiled.decode() if option.compiled is not None else None
        for option in pq.Conninfo.get_defaults()
    }


def _libpq_resolve(conninfo: str) -> ConnectionParams:
    """What libpq makes of ``conninfo`` and the environment, without a round trip."""
    try:
        pq.Conninfo.parse(conninfo.encode())
    except Exception as error:  # psycopg.OperationalError: libpq's own words
        raise ConfigurationError(f"invalid connection settings: {error}") from None
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        if pgconn.status == pq.ConnStatus.BAD:
            message = pgconn.get_error_message().strip()
            if any(marker in message for marker in _UNREACHABLE_MARKERS):
                raise DatabaseUnreachable(message)
            raise ConfigurationError(f"invalid connection settings: {message}")
        resolved = {
            option.keyword.decode(): option.val.decode()
            for option in pgconn.info
            if option.val is not None
        }
        # The host and port of the attempt libpq starts with: its default socket
        # directory when no host is given (a build setting of libpq's).
        if not resolved.get("host") and not resolved.get("hostaddr"):
            resolved["host"] = pgconn.host.decode()
        # The password libpq will send: given, or the passfile's entry for that host.
        password = pgconn.password
        if password:
            resolved["password"] = password.decode()
        return resolved
    finally:
        pgconn.finish()


def _for_the_core(resolved: Mapping[str, str]) -> ConnectionParams:
    """libpq's keywords that the core takes, or a ConfigurationError naming one it cannot."""
    known = set(_core.CONNECTION_KEYWORDS)
    defaults = _compiled_defaults()
    params: ConnectionParams = {}
    for keyword, value in resolved.items():
        if keyword in known:
            if value != "":
                params[keyword] = value
        elif keyword in _APPLIED_BY_LIBPQ or value in (
            "",
            defaults.get(keyword, _NEWER_LIBPQ_DEFAULTS.get(keyword)),
        ):
            continue
        else:
            shown = keyword if "password" in keyword else f"{keyword}={value!r}"
            raise ConfigurationError(
                f"the connection setting {shown} is not supported by fastworker's core "
                "connections (it would be ignored): remove it, or run procrastinate's own "
                "worker for this database"
            )
    if params.get("sslrootcert") == "system" and pq.version() < 160000:
        # Before libpq 16, "system" is a file name like any other.
        params["sslrootcert"] = os.path.abspath("system")
    return params


def _params_from_libpq_keywords(conninfo: str, params: Mapping[str, Any]) -> ConnectionParams:
    """``conninfo`` with those of ``params`` that are libpq keywords (connectors also carry
    their driver's own, such as psycopg's ``context``)."""
    ours = _compiled_defaults()
    return params_from_dsn(conninfo, **{k: v for k, v in params.items() if k in ours})


def params_from_dsn(dsn: str, **overrides: Any) -> ConnectionParams:
    """A libpq DSN or URL (plus keyword overrides), resolved by libpq for the core."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        conninfo = make_conninfo(dsn, **given) if given else dsn
    except psycopg.ProgrammingError as error:  # libpq's parser's words
        raise ConfigurationError(f"invalid connection settings: {error}") from None
    return _for_the_core(_libpq_resolve(conninfo))


async def _from_psycopg_connector(connector: Any) -> ConnectionParams | None:
    pool = compat.psycopg_async_pool(connector)
    if pool is None:
        return None
    async with pool.connection() as connection:
        pgconn = connection.pgconn
        resolved = {
            option.keyword.decode(): option.val.decode()
            for option in pgconn.info
            if option.val is not None
        }
        # The server of this connection (libpq may have tried several), with its password.
        info = connection.info
        resolved["host"] = info.host
        resolved["port"] = str(info.port)
        hostaddr = getattr(info, "hostaddr", "")
        if resolved.get("hostaddr") and hostaddr:
            resolved["hostaddr"] = hostaddr
        else:
            resolved.pop("hostaddr", None)
        if info.password:
            resolved["password"] = info.password
    return _for_the_core(resolved)


async def _from_aiopg_connector(connector: Any) -> ConnectionParams | None:
    """procrastinate's AiopgConnector: what psycopg2's libpq used for one of the pool's
    connections (the pool exists once the app is open), resolved again by psycopg's."""
    pool = compat.aiopg_pool(connector)
    if pool is None or not hasattr(pool, "acquire"):
        return None
    async with pool.acquire() as connection:
        raw = getattr(connection, "raw", None)
        info = getattr(raw, "info", None)
        if raw is None or info is None:
            return None
        params: dict[str, Any] = dict(raw.get_dsn_parameters())
        params["host"] = info.host
        params["port"] = info.port
        params["dbname"] = info.dbname
        params["user"] = info.user
        if info.password:
            params["password"] = info.password
    # psycopg2's libpq may know keywords that psycopg's does not: those are checked
    # as they are (taken by the core, at their default, or refused).
    ours = _compiled_defaults()
    resolved = _libpq_resolve(
        make_conninfo("", **{k: v for k, v in params.items() if k in ours and v is not None})
    )
    resolved.update({k: str(v) for k, v in params.items() if k not in ours and v is not None})
    return _for_the_core(resolved)


def _from_django_connector(connector: Any) -> ConnectionParams | None:
    """procrastinate's DjangoConnector: the Django database's connection parameters."""
    connection = getattr(connector, "connection", None)
    get_params = getattr(connection, "get_connection_params", None)
    if not callable(get_params) or getattr(connection, "vendor", None) != "postgresql":
        return None
    params: dict[str, Any] = dict(get_params())
    if "database" in params and "dbname" not in params:
        params["dbname"] = params.pop("database")
    conninfo = params.pop("conninfo", "") or ""
    # Only libpq's keywords go to libpq (Django adds psycopg's own, such as `context`).
    return _params_from_libpq_keywords(conninfo, params)


def _from_connector_arguments(connector: Any) -> ConnectionParams | None:
    arguments = compat.connector_pool_args(connector)
    if arguments is None:
        return None
    conninfo = ""
    for key in ("conninfo", "dsn"):
        value = arguments.get(key)
        if isinstance(value, str) and value:
            conninfo = value
    params: dict[str, Any] = {}
    kwargs = arguments.get("kwargs")
    if isinstance(kwargs, Mapping):
        params.update(kwargs)
    for key in ("host", "port", "user", "password", "dbname", "database"):
        if key in arguments and arguments[key] is not None:
            params["dbname" if key == "database" else key] = arguments[key]
    if not conninfo and not params:
        return None
    return _params_from_libpq_keywords(conninfo, params)


async def resolve_connection(app: Any, dsn: str | None = None) -> ConnectionParams:
    """The core's connection parameters (never logged: they hold the password)."""
    if dsn:
        return params_from_dsn(dsn)
    connector = app.connector
    resolved = await _from_psycopg_connector(connector)
    if resolved is None:
        resolved = await _from_aiopg_connector(connector)
    if resolved is None:
        resolved = _from_django_connector(connector)
    if resolved is None:
        resolved = _from_connector_arguments(connector)
    if resolved is None:
        resolved = params_from_dsn("")
    return resolved


def conninfo_of(params: Mapping[str, str]) -> str:
    """The same parameters as a libpq string (for psycopg; holds the password)."""
    return make_conninfo("", **params)
