"""The core connects exactly where libpq would, or refuses: each case (a DSN plus the
environment) is tried with psycopg (libpq) and with the core's own connection code
(`fastworker.connection.params_from_dsn` + `_core.probe_connection`), against a private
cluster with TLS, a CA and a revocation list of the test's own, SCRAM for one role and
trust for another. Both must land on the same server, user and database with the same
TLS outcome, or both must refuse (fastworker with a clear error that shows no password).

Set FASTWORKER_PARITY_TABLE to a file to get the table of outcomes (for the issue notes).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import fastworker
from fastworker import _core
from fastworker.connection import params_from_dsn
from tests.reliability.helpers import PrivateCluster
from tests.reliability.test_tls import make_ca, make_server_cert, openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

SECRET = "pa?ss@wo:rd"
WHERE = (
    "SELECT current_user::text, current_database()::text, current_setting('port')::int,"
    " coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)"
)
HBA = (
    "local all all trust\n"
    "host all worker 127.0.0.1/32 scram-sha-256\n"
    "host all postgres 127.0.0.1/32 trust\n"
)


@dataclass
class Setup:
    cluster: PrivateCluster
    pki: Path
    home: Path

    @property
    def port(self) -> int:
        return self.cluster.port


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pki = tmp_path_factory.mktemp("parity-pki")
    make_ca(pki, "ca")
    make_server_cert(pki, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    # Revocation lists of the CA: one empty, one that revokes the server's certificate.
    (pki / "index.txt").touch()
    (pki / "crlnumber").write_text("1000\n")
    (pki / "ca.cnf").write_text(
        "[ca]\ndefault_ca = CA_default\n[CA_default]\ndatabase = index.txt\n"
        "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n"
        "certificate = ca.crt\nprivate_key = ca.key\n"
    )
    openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "empty.crl", cwd=pki)
    openssl("ca", "-config", "ca.cnf", "-revoke", "server.crt", cwd=pki)
    openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "revoked.crl", cwd=pki)
    (pki / "crldir").mkdir()
    shutil.copy(pki / "revoked.crl", pki / "crldir" / "revoked.crl")
    cluster = PrivateCluster(
        ssl_files={"server.crt": pki / "server.crt", "server.key": pki / "server.key"},
        hba=HBA,
    )
    try:
        with psycopg.connect(cluster.local_dsn(), autocommit=True) as connection:
            connection.execute(f"CREATE ROLE worker LOGIN PASSWORD '{SECRET}'")
            connection.execute("CREATE DATABASE parity")
        home = tmp_path_factory.mktemp("parity-home")
        yield Setup(cluster, pki, home)
    finally:
        cluster.destroy()


def libpq_outcome(dsn: str) -> tuple[object, ...] | str:
    try:
        with psycopg.connect(dsn, connect_timeout=10) as connection:
            row = connection.execute(WHERE).fetchone()
    except psycopg.Error:
        return "refused"
    assert row is not None
    return tuple(row)


async def fastworker_outcome(dsn: str) -> tuple[tuple[object, ...] | str, str]:
    """The core's outcome, and its error message ('' when it connected)."""
    try:
        params = params_from_dsn(dsn)
        landed = await _core.probe_connection(params)
    except fastworker.FastworkerError as error:
        return "refused", str(error)
    return (landed["user"], landed["database"], landed["server_port"], landed["ssl"]), ""


def case_text(template: str, setup: Setup) -> str:
    return template.format(
        port=setup.port,
        socket=setup.cluster.root,
        pki=setup.pki,
        secret=SECRET,
        home=setup.home,
        server_user=setup.cluster.data.owner(),
    )


# (id, DSN, environment): {placeholders} are filled in per run.
CASES: list[tuple[str, str, dict[str, str]]] = [
    ("key=value", "host=127.0.0.1 port={port} user=postgres dbname=parity", {}),
    ("URL", "postgresql://postgres@127.0.0.1:{port}/parity", {}),
    (
        "URL, unencoded ? and @ in the password",
        "postgresql://worker:{secret}@127.0.0.1:{port}/parity?sslmode=require",
        {},
    ),
    (
        "URL, percent-encoded password",
        "postgresql://worker:pa%3Fss%40wo%3Ard@127.0.0.1:{port}/parity?sslmode=require",
        {},
    ),
    (
        "URL, @ in the query string",
        "postgresql://postgres@127.0.0.1:{port}/parity?application_name=a@b",
        {},
    ),
    ("URL, malformed percent-escape", "postgresql://postgres@127.0.0.1:{port}/pa%zzrity", {}),
    (
        "repeated host: the last one counts",
        "host=nowhere.invalid host=127.0.0.1 port=1 port={port} user=postgres dbname=parity",
        {},
    ),
    (
        "PG* variables only",
        "",
        {"PGHOST": "127.0.0.1", "PGPORT": "{port}", "PGUSER": "postgres", "PGDATABASE": "parity"},
    ),
    (
        "explicit sslmode=prefer beats PGSSLMODE=disable",
        "host=127.0.0.1 port={port} user=postgres dbname=parity sslmode=prefer",
        {"PGSSLMODE": "disable"},
    ),
    (
        "PGSSLMODE=disable",
        "host=127.0.0.1 port={port} user=postgres dbname=parity",
        {"PGSSLMODE": "disable"},
    ),
    (
        "service file (PGSERVICEFILE)",
        "service=parity",
        {"PGSERVICEFILE": "{home}/services.conf"},
    ),
    ("service that does not exist", "service=nope", {"PGSERVICEFILE": "{home}/services.conf"}),
    (
        "PGSERVICE",
        "",
        {"PGSERVICEFILE": "{home}/services.conf", "PGSERVICE": "parity"},
    ),
    (
        "passfile (PGPASSFILE)",
        "host=127.0.0.1 port={port} user=worker dbname=parity",
        {"PGPASSFILE": "{home}/pgpass"},
    ),
    (
        "passfile keyword",
        "host=127.0.0.1 port={port} user=worker dbname=parity passfile={home}/pgpass",
        {},
    ),
    (
        "missing passfile",
        "host=127.0.0.1 port={port} user=worker dbname=parity passfile={home}/missing",
        {},
    ),
    (
        "passfile others may read (libpq ignores it)",
        "host=127.0.0.1 port={port} user=worker dbname=parity passfile={home}/pgpass-open",
        {},
    ),
    (
        "PGPASSWORD",
        "host=127.0.0.1 port={port} user=worker dbname=parity",
        {"PGPASSWORD": "{secret}"},
    ),
    (
        "wrong password",
        "host=127.0.0.1 port={port} user=worker dbname=parity password=wrong-{secret}",
        {},
    ),
    ("unknown keyword", "host=127.0.0.1 port={port} user=postgres bogus=1", {}),
    (
        "require_auth=scram-sha-256 on a trust login",
        "host=127.0.0.1 port={port} user=postgres dbname=parity require_auth=scram-sha-256",
        {},
    ),
    (
        "requirepeer",
        "host={socket} port={port} user=postgres dbname=parity requirepeer={server_user}",
        {},
    ),
    (
        "channel_binding=require on a trust login",
        "host=127.0.0.1 port={port} user=postgres dbname=parity channel_binding=require",
        {},
    ),
    (
        "PGCHANNELBINDING=require on a trust login",
        "host=127.0.0.1 port={port} user=postgres dbname=parity",
        {"PGCHANNELBINDING": "require"},
    ),
    (
        "channel_binding=require with SCRAM over TLS",
        "host=127.0.0.1 port={port} user=worker dbname=parity password={secret} "
        "sslmode=require channel_binding=require",
        {},
    ),
    (
        "Unix socket with sslmode=require",
        "host={socket} port={port} user=postgres dbname=parity sslmode=require",
        {},
    ),
    ("hostaddr only", "hostaddr=127.0.0.1 port={port} user=postgres dbname=parity", {}),
    (
        "verify-full by IP SAN, hostaddr only",
        "hostaddr=127.0.0.1 port={port} user=postgres dbname=parity sslmode=verify-full "
        "sslrootcert={pki}/ca.crt",
        {},
    ),
    (
        "verify-full, host name + hostaddr",
        "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=parity "
        "sslmode=verify-full sslrootcert={pki}/ca.crt",
        {},
    ),
    (
        "verify-full, a name the certificate lacks",
        "host=wrong.example hostaddr=127.0.0.1 port={port} user=postgres dbname=parity "
        "sslmode=verify-full sslrootcert={pki}/ca.crt",
        {},
    ),
    (
        "verify-full with an empty CRL",
        "host=localhost port={port} user=postgres dbname=parity sslmode=verify-full "
        "sslrootcert={pki}/ca.crt sslcrl={pki}/empty.crl",
        {},
    ),
    (
        "verify-full, sslcrl revokes the server",
        "host=localhost port={port} user=postgres dbname=parity sslmode=verify-full "
        "sslrootcert={pki}/ca.crt sslcrl={pki}/revoked.crl",
        {},
    ),
    (
        "verify-full, PGSSLCRL revokes the server",
        "host=localhost port={port} user=postgres dbname=parity sslmode=verify-full "
        "sslrootcert={pki}/ca.crt",
        {"PGSSLCRL": "{pki}/revoked.crl"},
    ),
    (
        "verify-ca, sslcrldir revokes the server",
        "host=localhost port={port} user=postgres dbname=parity sslmode=verify-ca "
        "sslrootcert={pki}/ca.crt sslcrldir={pki}/crldir",
        {},
    ),
    (
        "PGSSLROOTCERT makes require verify the chain (a wrong root)",
        "host=localhost port={port} user=postgres dbname=parity sslmode=require",
        {"PGSSLROOTCERT": "{pki}/server.crt"},
    ),
    (
        "sslrootcert=system",
        "host=localhost port={port} user=postgres dbname=parity sslmode=verify-full "
        "sslrootcert=system",
        {},
    ),
    (
        "ssl_max_protocol_version=TLSv1.2",
        "host=localhost port={port} user=postgres dbname=parity sslmode=require "
        "ssl_max_protocol_version=TLSv1.2",
        {},
    ),
    (
        "target_session_attrs=read-write",
        "host=127.0.0.1 port={port} user=postgres dbname=parity target_session_attrs=read-write",
        {},
    ),
]

# Where fastworker refuses a setting that libpq takes: the setting cannot be honoured by
# the core, and the start-up error says so by name.
REFUSED_BY_NAME = {"requirepeer": "requirepeer"}


@pytest.mark.parametrize(("dsn", "environment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_core_connects_where_libpq_does_or_refuses(
    setup: Setup,
    dsn: str,
    environment: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    for variable in list(os.environ):
        if variable.startswith("PG"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("HOME", str(setup.home))
    (setup.home / "services.conf").write_text(
        f"[parity]\nhost=127.0.0.1\nport={setup.port}\nuser=postgres\ndbname=parity\n"
    )
    pgpass = setup.home / "pgpass"
    pgpass.write_text(f"127.0.0.1:{setup.port}:*:worker:{SECRET.replace(':', chr(92) + ':')}\n")
    pgpass.chmod(0o600)
    open_pgpass = setup.home / "pgpass-open"
    open_pgpass.write_text(pgpass.read_text())
    open_pgpass.chmod(0o644)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, case_text(value, setup))
    dsn = case_text(dsn, setup)

    expected = libpq_outcome(dsn)
    actual, message = asyncio.run(fastworker_outcome(dsn))
    case = request.node.callspec.id
    keyword = REFUSED_BY_NAME.get(case)
    table = os.environ.get("FASTWORKER_PARITY_TABLE")
    if table:
        with open(table, "a") as out:
            out.write(f"| {case} | {expected} | {actual} | {message[:160]} |\n")
    assert SECRET not in message
    if keyword is not None:
        assert actual == "refused" and keyword in message, (expected, actual, message)
        return
    assert actual == expected, message
    if actual == "refused":
        assert message.strip(), "a refusal says why"
