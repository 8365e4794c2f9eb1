"""Passwords go where libpq sends them, and show nowhere else.

- Each host of a host list gets what libpq sends it: the password given, else its own
  passfile entry. A fake server (it speaks the start-up exchange, asks for a cleartext
  password, records it and refuses the login) is the host that answers; the same conninfo
  goes through libpq (psycopg) and through the core's own connection code.
- A malformed connection string's password shows in no error (libpq's parse messages
  quote pieces of it; argparse quotes a mistyped flag's whole value), and a password on
  any connection flag of any entry point gets the `ps` warning.
- `ConnectionParams` never shows the password in its repr.
- On the app's psycopg-pool path the core gets libpq's whole host list, so it fails over
  as the pool's connections do.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import procrastinate
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import fastworker
from fastworker import _core, connection
from fastworker.connection import params_from_dsn, resolve_connection
from tests.faults.proxy import FaultProxy
from tests.reliability.helpers import REPO, free_port

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


class PasswordRecorder:
    """A fake PostgreSQL server: to each client, AuthenticationCleartextPassword; it
    records the password sent (``None``: the client sent none) and refuses the login."""

    def __init__(self, unix_directory: Path | None = None) -> None:
        if unix_directory is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
            self.path: Path | None = None
        else:
            self.port = free_port()
            self.path = unix_directory / f".s.PGSQL.{self.port}"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(self.path))
            self.listener.listen(16)
        self.received: list[str | None] = []
        self._started = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def take(self) -> list[str | None]:
        """What each client that started up sent, once each of them is done (a client
        gives up on reading the refusal, before this server's thread may have noted it)."""
        with self._done:
            self._done.wait_for(lambda: len(self.received) == self._started, timeout=20)
            received, self.received, self._started = self.received, [], 0
        return received

    def close(self) -> None:
        self.listener.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(20)
            if not self._start_up(connection):
                return  # closed before its start-up (libpq's PQconnectStart + finish)
            with self._done:
                self._started += 1
            try:
                password = self._password(connection)
            except (OSError, ValueError):
                password = None
            with self._done:
                self.received.append(password)
                self._done.notify_all()

    @staticmethod
    def _exactly(connection: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = connection.recv(size - len(data))
            if not chunk:
                raise ValueError("closed")
            data += chunk
        return data

    def _start_up(self, connection: socket.socket) -> bool:
        """Whether the client sent its start-up message."""
        try:
            while True:
                (length,) = struct.unpack("!i", self._exactly(connection, 4))
                body = self._exactly(connection, length - 4)
                (code,) = struct.unpack("!i", body[:4])
                if code not in (SSL_REQUEST, GSSENC_REQUEST):
                    return True
                connection.sendall(b"N")  # no TLS, no GSSAPI: go on in plain text
        except (OSError, ValueError):
            return False

    def _password(self, connection: socket.socket) -> str | None:
        connection.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind = connection.recv(1)
        if kind != b"p":
            return None
        (length,) = struct.unpack("!i", self._exactly(connection, 4))
        password = self._exactly(connection, length - 4).rstrip(b"\0").decode()
        fields = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0"
        connection.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
        return password


@pytest.fixture
def recorder() -> Iterator[PasswordRecorder]:
    server = PasswordRecorder()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_libpq_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the test's settings count: no PG* variable, and a home without a ~/.pgpass."""
    for variable in list(os.environ):
        if variable.startswith("PG"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write_passfile(path: Path, lines: list[str], mode: int = 0o600) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(mode)
    return path


def sent_by_libpq(conninfo: str, recorder: PasswordRecorder) -> list[str | None]:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo, connect_timeout=10).close()
    return recorder.take()


async def sent_by_the_core(conninfo: str, recorder: PasswordRecorder) -> list[str | None]:
    with pytest.raises(fastworker.FastworkerError):
        await _core.probe_connection(params_from_dsn(conninfo))
    return recorder.take()


async def test_with_a_host_list_each_host_gets_its_own_passfile_password(
    recorder: PasswordRecorder, tmp_path: Path
) -> None:
    """The issue's recipe: host a (down) and host b, a passfile line each. Host b must
    receive only its own password, from libpq and from the core alike."""
    down = free_port()
    passfile = write_passfile(
        tmp_path / "pgpass",
        [f"127.0.0.1:{down}:d:u:password-of-a", f"127.0.0.1:{recorder.port}:d:u:password-of-b"],
    )
    conninfo = (
        f"host=127.0.0.1,127.0.0.1 port={down},{recorder.port} user=u dbname=d passfile={passfile}"
    )
    assert sent_by_libpq(conninfo, recorder) == ["password-of-b"]
    assert await sent_by_the_core(conninfo, recorder) == ["password-of-b"]
    # The same when a worker starts (each of its connections, each attempt).
    with pytest.raises(fastworker.FastworkerError):
        await _core.WorkerCore.start(
            {"connection": params_from_dsn(conninfo), "reconnect_timeout": 1.0}
        )
    received = recorder.take()
    assert received and set(received) == {"password-of-b"}, received


@pytest.mark.parametrize(
    ("lines", "extra", "expected"),
    [
        # An explicit password goes to every host, whatever the passfile says.
        (["127.0.0.1:{b}:d:u:from-file"], "password=given", "given"),
        # `*` matches any field; `\` escapes `:` and `\` (in the password too).
        (["# a comment: *:*:*:*:commented", "*:{b}:*:u:p\\:w\\\\d"], "", "p:w\\d"),
        # The first matching line wins; a line for another host, port, database or user
        # does not match.
        (
            [
                "127.0.0.2:{b}:d:u:other-host",
                "127.0.0.1:{a}:d:u:other-port",
                "127.0.0.1:{b}:other:u:other-db",
                "127.0.0.1:{b}:d:other:other-user",
                "127.0.0.1:{b}:d:u:first",
                "127.0.0.1:{b}:d:u:second",
            ],
            "",
            "first",
        ),
        # No matching line: no password at all (both refuse to send one).
        (["127.0.0.1:{a}:d:u:only-a"], "", None),
        # `hostaddr` without `host`: the address is the host field.
        (["127.0.0.1:{b}:d:u:by-address"], "hostaddr=127.0.0.1,127.0.0.1 host=", "by-address"),
    ],
)
async def test_passfile_lines_match_as_in_libpq(
    recorder: PasswordRecorder,
    tmp_path: Path,
    lines: list[str],
    extra: str,
    expected: str | None,
) -> None:
    down = free_port()
    passfile = write_passfile(
        tmp_path / "pgpass", [line.format(a=down, b=recorder.port) for line in lines]
    )
    conninfo = (
        f"host=127.0.0.1,127.0.0.1 port={down},{recorder.port} user=u dbname=d "
        f"passfile={passfile} {extra}"
    )
    assert sent_by_libpq(conninfo, recorder) == [expected]
    assert await sent_by_the_core(conninfo, recorder) == [expected]


async def test_a_passfile_others_may_read_is_ignored_at_each_connection(
    recorder: PasswordRecorder, tmp_path: Path
) -> None:
    passfile = write_passfile(
        tmp_path / "pgpass", [f"*:{recorder.port}:*:*:readable-by-all"], mode=0o644
    )
    conninfo = f"host=127.0.0.1 port={recorder.port} user=u dbname=d passfile={passfile}"
    assert sent_by_libpq(conninfo, recorder) == [None]
    assert await sent_by_the_core(conninfo, recorder) == [None]


async def test_a_unix_socket_matches_its_directory_or_localhost_for_libpqs_default(
    tmp_path: Path,
) -> None:
    """A socket directory of one's own is the host field as written; `localhost` stands
    for libpq's default socket directory only."""
    socket_directory = tmp_path / "sockets"
    socket_directory.mkdir()
    server = PasswordRecorder(unix_directory=socket_directory)
    try:
        passfile = write_passfile(
            tmp_path / "pgpass",
            [
                f"localhost:{server.port}:d:u:localhost-line",
                f"{socket_directory}:{server.port}:d:u:directory-line",
            ],
        )
        conninfo = f"host={socket_directory} port={server.port} user=u dbname=d passfile={passfile}"
        assert sent_by_libpq(conninfo, server) == ["directory-line"]
        assert await sent_by_the_core(conninfo, server) == ["directory-line"]
    finally:
        server.close()

    default_directory = Path(psycopg.pq.PGconn.connect_start(b"host='' password=x").host.decode())
    if not os.access(default_directory, os.W_OK):
        pytest.skip(f"libpq's default socket directory {default_directory} is not writable")
    server = PasswordRecorder(unix_directory=default_directory)
    try:
        passfile = write_passfile(
            tmp_path / "pgpass",
            [
                f"{default_directory}:{server.port}:d:u:directory-line",
                f"localhost:{server.port}:d:u:localhost-line",
            ],
        )
        for host in (f"host={default_directory}", ""):
            conninfo = f"{host} port={server.port} user=u dbname=d passfile={passfile}"
            assert sent_by_libpq(conninfo, server) == ["localhost-line"]
            assert await sent_by_the_core(conninfo, server) == ["localhost-line"]
    finally:
        server.close()


# --- no password in errors, reprs or the process list -----------------------------------

PASSWORD = "Zq7xK9/wP2@vM4"


def password_pieces(text: str) -> list[str]:
    """The pieces (3 characters or more) of PASSWORD that `text` shows."""
    return [
        PASSWORD[start:end]
        for start in range(len(PASSWORD))
        for end in range(start + 3, len(PASSWORD) + 1)
        if PASSWORD[start:end] in text
    ]


MALFORMED = [
    # The password's `/` ends the URL's authority: libpq reads the rest as host and path.
    f"postgresql://u:{PASSWORD}@127.0.0.1:5432/d",
    f"postgresql://u:{PASSWORD}@127.0.0.1:badport/d",
    f"postgresql://u:{PASSWORD}@[::1/d",
    # A quote missing: libpq reads the password's second half as a keyword.
    f"host=127.0.0.1 password={PASSWORD[:7]} {PASSWORD[7:]}' dbname=d",
    f"host=127.0.0.1 password='{PASSWORD} dbname=d",
    f"host=127.0.0.1 port=5432x password={PASSWORD}",
]


@pytest.mark.parametrize("dsn", MALFORMED)
def test_a_malformed_dsn_shows_no_piece_of_its_password(dsn: str) -> None:
    with pytest.raises(fastworker.FastworkerError) as caught:
        params_from_dsn(dsn)
    for text in (str(caught.value), repr(caught.value)):
        assert password_pieces(text) == [], text


def test_the_redaction_keeps_the_useful_part_of_libpqs_words() -> None:
    dsn = f"postgresql://u:{PASSWORD}@127.0.0.1:badport/d"
    message = connection.redact_password('invalid port number: "badport"', dsn)
    assert message == 'invalid port number: "badport"'
    assert connection.redact_password(f'unexpected "{PASSWORD[3:9]}"', dsn) == 'unexpected "***"'
    # Connection strings quoted whole, without knowing which: each kind of password.
    for quoted, shown in [
        (f"postgresql://u:{PASSWORD}@h/d?sslmode=require", "postgresql://u:***@h/d"),
        (f"postgres://h/d?sslmode=require&password={PASSWORD}", "&password=***"),
        (f"host=h password='{PASSWORD}' dbname=d", "host=h password=*** dbname=d"),
        (f"host=h sslpassword={PASSWORD}", "host=h sslpassword=***"),
    ]:
        message = connection.redact_password(f"unrecognized arguments: --x {quoted}")
        assert shown in message and password_pieces(message) == [], message


def run_fastworker(*arguments: str, app_dsn: str = "") -> subprocess.CompletedProcess[str]:
    """The ``fastworker`` command; ``tests.reliability.cli_app.app`` on ``app_dsn``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FASTWORKER_")}
    return subprocess.run(
        [sys.executable, "-m", "fastworker", *arguments],
        cwd=REPO,
        env={**env, "FW_RELIABILITY_DSN": app_dsn},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "arguments",
    [
        # A mistyped flag: argparse quotes the unrecognized arguments whole.
        ["worker", "--dsnn", f"postgresql://u:{PASSWORD}@127.0.0.1/d"],
        ["worker", "--listen-dsnn", f"host=127.0.0.1 password={PASSWORD} dbname=d"],
        ["worker", "--concurrency", f"postgresql://u:{PASSWORD}@127.0.0.1/d"],
        # A malformed --dsn: libpq's parse message.
        ["--app", "tests.reliability.cli_app.app", "worker", "--dsn", MALFORMED[0]],
        ["--app", "tests.reliability.cli_app.app", "worker", "--dsn", MALFORMED[3]],
    ],
)
def test_cli_errors_show_no_piece_of_a_password(arguments: list[str], dsn: str) -> None:
    result = run_fastworker(*arguments, app_dsn=dsn)
    output = result.stdout + result.stderr
    assert result.returncode in (2, 3), output  # bad arguments; a host that is not one
    assert "error:" in output
    assert password_pieces(output) == [], output


@pytest.mark.parametrize("flag", ["--dsn", "--listen-dsn"])
def test_every_connection_flag_with_a_password_is_warned_about(flag: str, dsn: str) -> None:
    with_password = make_conninfo(dsn, password=PASSWORD)
    for arguments in ([flag, with_password], [f"{flag}={with_password}"]):
        result = run_fastworker(
            "--app",
            "tests.reliability.cli_app.app",
            "worker",
            "--one-shot",
            *arguments,
            app_dsn=dsn,
        )
        assert result.returncode == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if f"warning: {flag} " in line]
        assert len(warned) == 1, result.stderr
        assert "ps" in warned[0] and "PGPASSWORD" in warned[0]
        assert password_pieces(result.stdout + result.stderr) == []


def test_manage_py_fastworker_warns_about_a_password_in_dsn(dsn: str, tmp_path: Path) -> None:
    pytest.importorskip("django")
    from tests.test_django import manage_py, write_project

    write_project(tmp_path, dsn, tmp_path / "ran.txt")
    with_password = make_conninfo(dsn, password=PASSWORD)
    result = manage_py(tmp_path, "--one-shot", "--dsn", with_password, timeout=120)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "warning: --dsn " in line]
    assert len(warned) == 1, result.stderr
    assert password_pieces(result.stdout + result.stderr) == []


def test_connection_params_never_show_the_password() -> None:
    params = params_from_dsn(f"host=127.0.0.1 user=u password={PASSWORD} dbname=d")
    assert isinstance(params, connection.ConnectionParams)
    assert params["password"] == PASSWORD  # the core needs it
    for text in (repr(params), str(params), f"{params}", repr([params])):
        assert password_pieces(text) == [], text
        assert "'host': '127.0.0.1'" in text


# --- the pool path keeps libpq's host list ----------------------------------------------


async def test_the_pool_path_fails_over_like_the_pools_own_connections(dsn: str) -> None:
    """The app's pool lands on host b (host a refuses). Then a comes back and b goes: the
    core, given libpq's whole list, connects to a, as libpq would."""
    with FaultProxy("127.0.0.1", 5432) as first, FaultProxy("127.0.0.1", 5432) as second:
        first.unreachable()
        params = conninfo_to_dict(dsn)
        params.update(
            host="127.0.0.1,127.0.0.1",
            port=f"{first.port},{second.port}",
            sslmode="disable",
            target_session_attrs="read-write",
        )
        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=make_conninfo("", **params), min_size=1, max_size=1
            )
        )
        async with app.open_async():
            resolved = await resolve_connection(app)
        assert first.history == [] and second.history  # the pool landed on host b
        assert resolved["host"] == "127.0.0.1,127.0.0.1"
        assert resolved["port"] == f"{first.port},{second.port}"
        assert resolved["target_session_attrs"] == "read-write"
        first.unreachable(False)
        second.unreachable()
        seen_by_first, seen_by_second = len(first.history), len(second.history)
        landed = await _core.probe_connection(resolved)
        assert landed["database"] == params["dbname"]
        # The probe's statement went through host a.
        assert len(first.history) > seen_by_first
        assert len(second.history) == seen_by_second
