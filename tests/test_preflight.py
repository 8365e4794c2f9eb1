"""The start-up check (`fastworker.preflight.check_database`) against a real server: what
it finds, as the typed result the CLI turns into its message and exit code, and never a
piece of the password in it."""

from __future__ import annotations

import procrastinate
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fastworker import preflight
from tests.conftest import create_database, drop_database, make_app

PASSWORD = "s3cr3t-pw"
UNREACHABLE = f"host=127.0.0.1 port=1 user=someone password={PASSWORD} dbname=nowhere"


def unconnected_app(conninfo: str) -> procrastinate.App:
    """An app whose connector is never opened: the check makes its own connections."""
    return make_app(conninfo)


async def test_a_database_with_the_schema_is_ready(dsn: str) -> None:
    assert await preflight.check_database(unconnected_app(dsn), None) == preflight.Ready()


async def test_a_database_without_the_schema_is_named_with_its_server(
    database_name: str,
) -> None:
    bare = create_database(database_name, with_schema=False)
    try:
        found = await preflight.check_database(unconnected_app(bare), None)
    finally:
        drop_database(database_name)
    params = conninfo_to_dict(bare)
    assert found == preflight.SchemaMissing(
        database=database_name, where=f"{params['host']}:{params['port']}"
    )


async def test_an_unreachable_server_says_where_and_why_without_the_password() -> None:
    found = await preflight.check_database(unconnected_app(UNREACHABLE), None)
    assert isinstance(found, preflight.Unreachable), found
    assert found.where == "127.0.0.1:1 (database 'nowhere', user 'someone')"
    assert found.reason and "failed:" not in found.reason
    assert PASSWORD not in repr(found)


async def test_the_workers_dsn_is_checked_after_the_apps(dsn: str) -> None:
    found = await preflight.check_database(unconnected_app(dsn), UNREACHABLE)
    assert isinstance(found, preflight.Unreachable), found
    assert found.where.startswith("127.0.0.1:1 ")


async def test_settings_libpq_cannot_read_are_invalid_without_a_piece_of_the_password(
    dsn: str,
) -> None:
    malformed = make_conninfo(dsn) + f" password='{PASSWORD}"  # the quote never closes
    found = await preflight.check_database(unconnected_app(dsn), malformed)
    assert isinstance(found, preflight.InvalidSettings), found
    assert found.reason
    assert "s3cr" not in found.reason and "3-pw" not in found.reason
