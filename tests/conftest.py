"""Shared fixtures: every test gets its own fresh database with procrastinate's schema.

`FASTWORKER_TEST_DSN` points at a PostgreSQL server where databases may be created
(default: the local server on 127.0.0.1:5432 as `postgres`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import procrastinate
import psycopg
import pytest
from procrastinate import schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ADMIN_DSN = os.environ.get(
    "FASTWORKER_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


def dsn_for(database: str) -> str:
    return make_conninfo(ADMIN_DSN, dbname=database)


def create_database(name: str, *, with_schema: bool = True) -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_for(name)
    if with_schema:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]
    return dsn


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_name() -> Iterator[str]:
    name = f"fw_test_{uuid.uuid4().hex[:12]}"
    yield name
    drop_database(name)


@pytest.fixture
def dsn(database_name: str) -> str:
    """A fresh database with procrastinate's schema, dropped after the test."""
    return create_database(database_name)


def make_app(dsn: str, **app_options: Any) -> procrastinate.App:
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn), **app_options)


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[procrastinate.App]:
    """An open procrastinate app on the test database; register tasks on it in the test."""
    application = make_app(dsn)
    async with application.open_async():
        yield application


def fetch_all(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(query, params).fetchall()  # type: ignore[arg-type]


def server_address() -> tuple[str, int]:
    params = conninfo_to_dict(ADMIN_DSN)
    return str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))
