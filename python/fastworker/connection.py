"""Where the core's own connections get their settings.

In order: an explicit ``dsn``; the app's connector (for psycopg and aiopg, the settings the
driver actually resolved for one of the app's pooled connections, so callables, ``PG*``
variables and defaults all count; for Django's, the database's connection parameters; else
the arguments the connector was built with); else the libpq ``PG*`` environment variables.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fastworker import compat

# Keys the core understands (tokio-postgres', plus the libpq TLS keys the core handles
# itself: sslmode's verify-ca / verify-full, sslrootcert, sslcert, sslkey); other
# libpq-only keys are dropped.
_SUPPORTED_KEYS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "user",
        "password",
        "dbname",
        "options",
        "application_name",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "connect_timeout",
        "tcp_user_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_retries",
        "target_session_attrs",
        "channel_binding",
        "load_balance_hosts",
    }
)

_ENVIRONMENT = {
    "PGHOST": "host",
    "PGHOSTADDR": "hostaddr",
    "PGPORT": "port",
    "PGUSER": "user",
    "PGPASSWORD": "password",
    "PGDATABASE": "dbname",
    "PGOPTIONS": "options",
    "PGSSLMODE": "sslmode",
    "PGSSLROOTCERT": "sslrootcert",
    "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey",
    "PGCONNECT_TIMEOUT": "connect_timeout",
    "PGTARGETSESSIONATTRS": "target_session_attrs",
}


def _finish(params: Mapping[str, Any]) -> str:
    resolved = {
        key: str(value)
        for key, value in params.items()
        if key in _SUPPORTED_KEYS and value not in (None, "")
    }
    for variable, key in _ENVIRONMENT.items():
        if key not in resolved and os.environ.get(variable):
            resolved[key] = os.environ[variable]
    resolved.setdefault("user", getpass.getuser())
    resolved.setdefault("dbname", resolved["user"])
    return make_conninfo("", **resolved)


def conninfo_from_dsn(dsn: str) -> str:
    """A libpq DSN or URL, completed with the ``PG*`` variables like libpq would."""
    return _finish(conninfo_to_dict(dsn))


async def _from_psycopg_connector(connector: Any) -> str | None:
    pool = compat.psycopg_async_pool(connector)
    if pool is None:
        return None
    async with pool.connection() as connection:
        info = connection.info
        params: dict[str, Any] = dict(info.get_parameters())
        params["host"] = info.host
        params["port"] = info.port
        params["dbname"] = info.dbname
        params["user"] = info.user
        if info.password:
            params["password"] = info.password
        hostaddr = getattr(info, "hostaddr", None)
        if hostaddr and not str(info.host).startswith("/"):
            params.setdefault("hostaddr", hostaddr)
    return _finish(params)


async def _from_aiopg_connector(connector: Any) -> str | None:
    """procrastinate's AiopgConnector: what psycopg2 resolved for one of the pool's
    connections (the pool exists once the app is open)."""
    pool = compat.aiopg_pool(connector)
    if pool is None or not hasattr(pool, "acquire"):
        return None
    async with pool.acquire() as connection:
        raw = getattr(connection, "raw", None)
        info = getattr(raw, "info", None)
        if raw is None or info is None:
            return None
        params: dict[str, Any] = dict(raw.get_dsn_parameters())
        # psycopg2's libpq may be newer than psycopg's: leave its defaults out.
        if params.get("load_balance_hosts") == "disable":
            del params["load_balance_hosts"]
        params["host"] = info.host
        params["port"] = info.port
        params["dbname"] = info.dbname
        params["user"] = info.user
        if info.password:
            params["password"] = info.password
    return _finish(params)


def _from_django_connector(connector: Any) -> str | None:
    """procrastinate's DjangoConnector: the Django database's connection parameters."""
    connection = getattr(connector, "connection", None)
    get_params = getattr(connection, "get_connection_params", None)
    if not callable(get_params) or getattr(connection, "vendor", None) != "postgresql":
        return None
    params: dict[str, Any] = dict(get_params())
    if "database" in params and "dbname" not in params:
        params["dbname"] = params.pop("database")
    return _finish(params)


def _from_connector_arguments(connector: Any) -> str | None:
    arguments = compat.connector_pool_args(connector)
    if arguments is None:
        return None
    params: dict[str, Any] = {}
    for key in ("conninfo", "dsn"):
        value = arguments.get(key)
        if isinstance(value, str) and value:
            params.update(conninfo_to_dict(value))
    kwargs = arguments.get("kwargs")
    if isinstance(kwargs, Mapping):
        params.update(kwargs)
    for key in ("host", "port", "user", "password", "dbname", "database"):
        if key in arguments and arguments[key] is not None:
            params["dbname" if key == "database" else key] = arguments[key]
    return _finish(params) if params else None


async def resolve_conninfo(app: Any, dsn: str | None = None) -> str:
    """The libpq connection string for the core's connections (never logged)."""
    if dsn:
        return conninfo_from_dsn(dsn)
    connector = app.connector
    resolved = await _from_psycopg_connector(connector)
    if resolved is None:
        resolved = await _from_aiopg_connector(connector)
    if resolved is None:
        resolved = _from_django_connector(connector)
    if resolved is None:
        resolved = _from_connector_arguments(connector)
    if resolved is None:
        resolved = _finish({})
    return resolved
