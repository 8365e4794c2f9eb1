"""Where the core's own connections get their settings: from libpq itself.

The source, in order: an explicit ``dsn``; the app's connector (psycopg and aiopg: the
parameters libpq used for one of the app's pooled connections, so callables, ``PG*``
variables and defaults all count; Django's: the database's connection parameters; else the
arguments the connector was built with); else nothing but libpq's defaults.

Whatever the source, libpq resolves it (``PQconnectStart``, which parses URLs and
``key=value`` strings, and applies the service file, the ``PG*`` variables and its
defaults, with its own precedence: explicit values beat the environment), and the core
gets libpq's keywords as a mapping (``ConnectionParams`` on the Rust side). No string is
parsed a second time. The password goes over only when one is given; otherwise the core
gets libpq's ``passfile`` and reads each host's own line at each connection, as libpq does
(libpq's ``PQpass`` is one host's line, not the others'). A keyword the core does not
know, set to anything but libpq's default, is refused with a :class:`ConfigurationError`
that names it; the core refuses the values of known keywords that it cannot honour the
same way. Nothing is dropped.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from fastworker import _core, compat
from fastworker._core import ConfigurationError, DatabaseUnreachable


class ConnectionParams(dict[str, str]):
    """libpq's keywords for the core (a mapping, as the core takes it); its ``repr()``
    never shows the password."""

    def __repr__(self) -> str:
        shown = {key: "***" if key == "password" else value for key, value in self.items()}
        return f"ConnectionParams({shown!r})"

    __str__ = __repr__


# libpq keywords that libpq has already applied by the time it reports the others: the
# service file's entries. (The passfile goes to the core, which looks up each host's own
# entry at each connection, as libpq does.)
_APPLIED_BY_LIBPQ = frozenset({"service", "servicefile"})

# Not a libpq keyword: libpq's default socket directory, for the core's passfile lookup
# (libpq calls it `localhost` there).
_DEFAULT_SOCKET_DIRECTORY = "default_socket_directory"

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


@functools.cache
def _default_socket_directory() -> str:
    """libpq's default socket directory (a build setting of the loaded libpq): the host
    libpq picks when none is given (no variable, service or passfile consulted)."""
    pgconn = pq.PGconn.connect_start(b"host='' hostaddr='' password=unused")
    try:
        return pgconn.host.decode()
    finally:
        pgconn.finish()


def _libpq_resolve(conninfo: str) -> ConnectionParams:
    """What libpq makes of ``conninfo`` and the environment, without a round trip."""
    try:
        pq.Conninfo.parse(conninfo.encode())
    except Exception as error:  # psycopg.OperationalError: libpq's own words
        raise ConfigurationError(
            f"invalid connection settings: {redact_password(str(error), conninfo)}"
        ) from None
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        if pgconn.status == pq.ConnStatus.BAD:
            message = redact_password(pgconn.get_error_message().strip(), conninfo)
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
        # The password is the one given (keyword, URL, PGPASSWORD), never libpq's PQpass:
        # that is the first host's passfile entry, and each host gets its own (the core
        # reads the passfile that libpq reports).
        return ConnectionParams(resolved)
    finally:
        pgconn.finish()


def _for_the_core(resolved: Mapping[str, str]) -> ConnectionParams:
    """libpq's keywords that the core takes, or a ConfigurationError naming one it cannot."""
    known = set(_core.CONNECTION_KEYWORDS)
    defaults = _compiled_defaults()
    params = ConnectionParams()
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
    if params.get("passfile") and not params.get("password"):
        params[_DEFAULT_SOCKET_DIRECTORY] = _default_socket_directory()
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
        raise ConfigurationError(
            f"invalid connection settings: {redact_password(str(error), dsn)}"
        ) from None
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
        # psycopg connects to one host of the list at a time (one libpq conninfo per
        # host and address): the connection knows only the host it landed on. The core
        # gets the whole list, as libpq resolves the pool's settings, and tries it as
        # libpq would (with target_session_attrs): it fails over as the pool does.
        hosts = await _pool_host_list(pool)
        for keyword in ("host", "hostaddr", "port"):
            resolved.pop(keyword, None)
        if hosts is not None:
            resolved.update(hosts)
        else:  # settings libpq cannot read again (a callable's): the landed host
            info = connection.info
            resolved["host"] = info.host
            resolved["port"] = str(info.port)
        # The password is the one given: libpq's PQpass is the landed host's passfile
        # entry, and each host gets its own (the core reads the passfile).
    return _for_the_core(resolved)


async def _pool_host_list(pool: Any) -> dict[str, str] | None:
    """``host``, ``hostaddr`` and ``port`` of a psycopg pool's settings (its conninfo and
    keyword arguments, or what its callables return), as libpq resolves them."""
    settings = []
    for name in ("conninfo", "kwargs"):
        value = getattr(pool, name, None)
        if callable(value):
            value = value()
        if inspect.isawaitable(value):
            value = await value
        settings.append(value)
    conninfo, kwargs = settings
    if not isinstance(conninfo, str) or not isinstance(kwargs, Mapping | None):
        return None
    ours = _compiled_defaults()
    given = {k: v for k, v in (kwargs or {}).items() if k in ours and v is not None}
    try:
        resolved = _libpq_resolve(make_conninfo(conninfo, **given) if given else conninfo)
    except (psycopg.Error, ConfigurationError, DatabaseUnreachable):
        return None
    return {k: resolved[k] for k in ("host", "hostaddr", "port") if resolved.get(k)}


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


# Where a password sits in connection strings, written well or not (a malformed string
# is cut where libpq would not cut it: these spans err on the side of hiding more).
# A URL's user info: the password runs from the user's `:` to the last `@`.
_URL_PASSWORD = re.compile(r"(?i)\bpostgres(?:ql)?://[^:/?#@\s]*:([^\s]*)@")
# `password=` (or `sslpassword=`) of a key=value string: up to the next `keyword=`, or
# the end.
_KEY_VALUE_PASSWORD = re.compile(
    r"(?i)(?<![\w&?])(?:ssl)?password\s*=\s*(.*?)(?=\s+[a-z_]+\s*=|\s*$)", re.DOTALL
)
# The same in a URL's query: up to the next parameter.
_QUERY_PASSWORD = re.compile(r"(?i)[?&](?:ssl)?password=([^&#\s]*)")
# The fragments of the string that libpq's parse messages quote (and Python's reprs).
_QUOTED = re.compile(r""""([^"]+)"|'([^']+)'""")
# An unquoted run of characters this long that is part of a password is taken for one.
_SHORTEST_PIECE = 4
REDACTED = "***"


def _password_spans(text: str) -> list[tuple[int, int]]:
    return [
        match.span(1)
        for pattern in (_URL_PASSWORD, _KEY_VALUE_PASSWORD, _QUERY_PASSWORD)
        for match in pattern.finditer(text)
        if match.end(1) > match.start(1)
    ]


def redact_password(message: str, conninfo: str | None = None) -> str:
    """``message`` without any part of a password: of the connection strings it quotes,
    and of ``conninfo``, the string it is about (libpq's parse messages quote the part
    they could not read, which may be a piece of a mistyped password)."""
    if conninfo:
        spans = _password_spans(conninfo)

        def part_of_a_password(fragment: str) -> bool:
            start = conninfo.find(fragment)
            while start != -1:
                end = start + len(fragment)
                if any(start < span_end and span_start < end for span_start, span_end in spans):
                    return True
                start = conninfo.find(fragment, start + 1)
            return False

        def quoted(match: re.Match[str]) -> str:
            fragment = match.group(1) or match.group(2)
            if not part_of_a_password(fragment):
                return match.group(0)
            quote = match.group(0)[0]
            return f"{quote}{REDACTED}{quote}"

        message = _QUOTED.sub(quoted, message)
        secrets = [conninfo[start:end] for start, end in spans]
        message = _without(message, _pieces_of(message, secrets))
    return _without(message, _password_spans(message))


def _pieces_of(message: str, secrets: list[str]) -> list[tuple[int, int]]:
    """Spans of ``message`` that are runs of at least ``_SHORTEST_PIECE`` characters of
    one of ``secrets``."""
    spans = []
    start = 0
    while start < len(message):
        longest = 0
        for secret in secrets:
            length = longest + 1
            while start + length <= len(message) and message[start : start + length] in secret:
                longest = length
                length += 1
        if longest >= _SHORTEST_PIECE or (longest and message[start : start + longest] in secrets):
            spans.append((start, start + longest))
            start += longest
        else:
            start += 1
    return spans


def _without(message: str, spans: list[tuple[int, int]]) -> str:
    """``message`` with each of ``spans`` (merged where they overlap) replaced."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in reversed(merged):
        message = message[:start] + REDACTED + message[end:]
    return message


def conninfo_of(params: Mapping[str, str]) -> str:
    """The same parameters as a libpq string (for psycopg; holds the password)."""
    return make_conninfo("", **{k: v for k, v in params.items() if k != _DEFAULT_SOCKET_DIRECTORY})
