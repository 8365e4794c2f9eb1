"""TLS where libpq and the core used to part ways, each case compared with libpq for real.

A private cluster with TLS and a CA of the test's own, whose `pg_hba.conf` gives each role
one TLS situation: `postgres` may connect with or without TLS, `certuser` only with a client
certificate (`cert`), `plainonly` only without TLS, `tlsonly` only with it. Each case (a DSN,
the files it names, `HOME`) is tried with psycopg (libpq) and with the core's own connection
code; both must land alike (same user, same TLS outcome) or both refuse. The worker
processes at the end check the same through every path a DSN takes (`--dsn`,
`--listen-dsn`, the API) and with `HOME` unset (libpq then looks in the user database's home
directory; `nss_wrapper` gives the test a user database of its own, so that no file is ever
put in the real home).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.reliability.helpers import REPO, PrivateCluster, WorkerProcess, create_executions_table
from tests.reliability.test_libpq_parity import fastworker_outcome, libpq_outcome
from tests.reliability.test_tls import make_ca, make_server_cert, openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

HBA = (
    "local all all trust\n"
    "host all postgres 127.0.0.1/32 trust\n"
    "hostssl all certuser 127.0.0.1/32 cert\n"
    "hostssl all plainonly 127.0.0.1/32 reject\n"
    "hostnossl all plainonly 127.0.0.1/32 trust\n"
    "hostnossl all tlsonly 127.0.0.1/32 reject\n"
    "hostssl all tlsonly 127.0.0.1/32 trust\n"
)
ROLES = ("certuser", "plainonly", "tlsonly")
# A user id other than ours, for key files that we can read but do not own (as root).
OTHER_UID = 65534
NSS_WRAPPER = next(
    (
        path
        for path in (
            "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
            "/usr/lib/aarch64-linux-gnu/libnss_wrapper.so",
            "/usr/lib64/libnss_wrapper.so",
            "/usr/lib/libnss_wrapper.so",
        )
        if os.path.exists(path)
    ),
    None,
)


def make_client_cert(directory: Path, name: str, user: str, *, version: int) -> None:
    """`name.crt` for `name.key`, signed by `ca`, for `user`: X.509 v1 (no extensions,
    as `openssl x509 -req` makes it) or v3."""
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={user}",
        cwd=directory,
    )  # fmt: skip
    extensions: list[str] = []
    if version == 3:
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
        )
        extensions = ["-extfile", f"{name}.ext"]
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extensions,
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.key").chmod(0o600)
    text = subprocess.run(
        ["openssl", "x509", "-in", directory / f"{name}.crt", "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Version: {version} " in text, text


def key_copy(pki: Path, name: str, mode: int, uid: int | None = None) -> Path:
    target = pki / "keys" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copy(pki / "client.key", target)
    target.chmod(mode)
    if uid is not None:
        os.chown(target, uid, -1)
    return target


@dataclass
class Setup:
    cluster: PrivateCluster
    pki: Path

    @property
    def port(self) -> int:
        return self.cluster.port

    def dsn(self, user: str = "postgres", **extra: str) -> str:
        return self.cluster.dsn("parity", host="localhost", user=user, **extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pki = tmp_path_factory.mktemp("tls-parity-pki")
    make_ca(pki, "ca")
    make_ca(pki, "other_ca")
    make_server_cert(pki, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    make_client_cert(pki, "client", "certuser", version=3)
    make_client_cert(pki, "client_v1", "certuser", version=1)
    openssl(
        "pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret",
        "-out", "encrypted.key", cwd=pki,
    )  # fmt: skip
    (pki / "encrypted.key").chmod(0o600)
    for name, mode in (("0600", 0o600), ("0640", 0o640), ("0660", 0o660), ("0644", 0o644)):
        key_copy(pki, name, mode)
    if os.geteuid() == 0:
        key_copy(pki, "other-0600", 0o600, OTHER_UID)
        key_copy(pki, "other-0640", 0o640, OTHER_UID)
    cluster = PrivateCluster(
        ssl_files={
            "server.crt": pki / "server.crt",
            "server.key": pki / "server.key",
            "client_ca.crt": pki / "ca.crt",
        },
        hba=HBA,
    )
    try:
        with psycopg.connect(cluster.local_dsn(), autocommit=True) as connection:
            # The CA that client certificates must chain to (for `cert`).
            connection.execute("ALTER SYSTEM SET ssl_ca_file = 'client_ca.crt'")
            for role in ROLES:
                # Superusers: the worker's statements need no grants of their own.
                connection.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
        cluster.restart()
        cluster.create_database("parity")
        create_executions_table(cluster.local_dsn("parity"))
        yield Setup(cluster, pki)
    finally:
        cluster.destroy()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PG* variables; HOME an empty directory of the test's own (no default files)."""
    for variable in list(os.environ):
        if variable.startswith("PG"):
            monkeypatch.delenv(variable)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# (id, user, extra keywords, libpq's outcome: "tls", "plain" or "refused"). {pki} and
# {home} are filled in per run; the outcome is checked against libpq too, so that each case
# shows what it is meant to.
CASES: list[tuple[str, str, dict[str, str], str]] = [
    # item 13: prefer goes on without TLS after a failed handshake or a refused session
    (
        "prefer, the server's certificate fails the root certificate: plaintext",
        "postgres",
        {"sslmode": "prefer", "sslrootcert": "{pki}/other_ca.crt"},
        "plain",
    ),
    (
        "prefer, the server refuses TLS for the role: plaintext",
        "plainonly",
        {"sslmode": "prefer"},
        "plain",
    ),
    ("prefer, TLS when the server takes it", "postgres", {"sslmode": "prefer"}, "tls"),
    ("prefer, TLS-only role", "tlsonly", {"sslmode": "prefer"}, "tls"),
    ("require, plaintext-only role", "plainonly", {"sslmode": "require"}, "refused"),
    # item 13: allow tries plaintext first, then TLS
    ("allow, plaintext first", "postgres", {"sslmode": "allow"}, "plain"),
    ("allow, TLS when plaintext is refused", "tlsonly", {"sslmode": "allow"}, "tls"),
    ("allow, plaintext-only role", "plainonly", {"sslmode": "allow"}, "plain"),
    # item 13: missing root certificate and revocation list files
    (
        "require, sslrootcert that does not exist: ignored",
        "postgres",
        {"sslmode": "require", "sslrootcert": "{home}/missing-root.crt"},
        "tls",
    ),
    (
        "require, sslcrl that does not exist: ignored",
        "postgres",
        {"sslmode": "require", "sslrootcert": "{pki}/ca.crt", "sslcrl": "{home}/missing.crl"},
        "tls",
    ),
    (
        "verify-full, sslcrl that does not exist: ignored",
        "postgres",
        {"sslmode": "verify-full", "sslrootcert": "{pki}/ca.crt", "sslcrl": "{home}/missing.crl"},
        "tls",
    ),
    (
        "verify-ca, sslrootcert that does not exist: refused",
        "postgres",
        {"sslmode": "verify-ca", "sslrootcert": "{home}/missing-root.crt"},
        "refused",
    ),
    (
        "require, sslrootcert of another CA: refused",
        "postgres",
        {"sslmode": "require", "sslrootcert": "{pki}/other_ca.crt"},
        "refused",
    ),
    # item 13: X.509 v1 client certificates
    (
        "client certificate, X.509 v3",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/client.key"},
        "tls",
    ),
    (
        "client certificate, X.509 v1",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client_v1.crt", "sslkey": "{pki}/client_v1.key"},
        "tls",
    ),
    (
        "client certificate with another key: refused",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client_v1.crt", "sslkey": "{pki}/client.key"},
        "refused",
    ),
    (
        "sslcert that does not exist: no client certificate",
        "postgres",
        {"sslmode": "require", "sslcert": "{home}/missing.crt", "sslkey": "{home}/missing.key"},
        "tls",
    ),
    (
        "sslcert without its key file: refused",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{home}/missing.key"},
        "refused",
    ),
    # item 12: the key file's permissions (we are its owner, or root is)
    (
        "key file 0600",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/0600"},
        "tls",
    ),
    (
        "key file 0644: refused",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/0644"},
        "refused",
    ),
    (
        "key file 0660: refused",
        "certuser",
        {
            "sslmode": "verify-full",
            "sslrootcert": "{pki}/ca.crt",
            "sslcert": "{pki}/client.crt",
            "sslkey": "{pki}/keys/0660",
        },
        "refused",
    ),
    (
        "key file 0644 under prefer: plaintext without the certificate",
        "postgres",
        {"sslmode": "prefer", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/0644"},
        "plain",
    ),
    # item 13: an encrypted key (libpq: no sslpassword, no key)
    (
        "encrypted key: refused",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/encrypted.key"},
        "refused",
    ),
]
ROOT_CASES: list[tuple[str, str, dict[str, str], str]] = [
    # root-owned keys may be 0640 (a group shares a system-wide key); others' may not
    (
        "key file 0640 owned by root",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/0640"},
        "tls",
    ),
    (
        "key file 0600 owned by another user",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/other-0600"},
        "tls",
    ),
    (
        "key file 0640 owned by another user: refused",
        "certuser",
        {"sslmode": "require", "sslcert": "{pki}/client.crt", "sslkey": "{pki}/keys/other-0640"},
        "refused",
    ),
]
# What the core's refusal must say (libpq's words where it has them).
MESSAGES = {
    "key file 0644: refused": "has group or world access",
    "key file 0660: refused": "has group or world access",
    "key file 0640 owned by another user: refused": "has group or world access",
    "encrypted key: refused": "encrypted private keys are not supported",
    "client certificate with another key: refused": "certificate does not match private key",
    "sslcert without its key file: refused": "certificate present, but not private key file",
}


def outcome_kind(outcome: tuple[object, ...] | str) -> str:
    if outcome == "refused":
        return "refused"
    assert isinstance(outcome, tuple)
    return "tls" if outcome[3] else "plain"


def fill(extra: dict[str, str], setup: Setup, home: Path) -> dict[str, str]:
    return {key: value.format(pki=setup.pki, home=home) for key, value in extra.items()}


def check_case(
    setup: Setup, home: Path, case: str, user: str, extra: dict[str, str], expected: str
) -> None:
    dsn = setup.dsn(user, **fill(extra, setup, home))
    libpq = libpq_outcome(dsn)
    assert outcome_kind(libpq) == expected, f"libpq: {libpq} (the case's premise)"
    ours, message = asyncio.run(fastworker_outcome(dsn))
    assert ours == libpq, message
    if case in MESSAGES:
        assert MESSAGES[case] in message, message


@pytest.mark.parametrize(
    ("user", "extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_core_negotiates_tls_as_libpq_does(
    setup: Setup,
    clean_environment: Path,
    user: str,
    extra: dict[str, str],
    expected: str,
    request: pytest.FixtureRequest,
) -> None:
    check_case(setup, clean_environment, request.node.callspec.id, user, extra, expected)


@pytest.mark.skipif(os.geteuid() != 0, reason="key files of another owner need root")
@pytest.mark.parametrize(
    ("user", "extra", "expected"), [c[1:] for c in ROOT_CASES], ids=[c[0] for c in ROOT_CASES]
)
def test_key_file_ownership_as_libpq(
    setup: Setup,
    clean_environment: Path,
    user: str,
    extra: dict[str, str],
    expected: str,
    request: pytest.FixtureRequest,
) -> None:
    check_case(setup, clean_environment, request.node.callspec.id, user, extra, expected)


def test_default_client_certificate_from_home(setup: Setup, clean_environment: Path) -> None:
    directory = clean_environment / ".postgresql"
    directory.mkdir()
    shutil.copy(setup.pki / "client_v1.crt", directory / "postgresql.crt")
    shutil.copy(setup.pki / "client_v1.key", directory / "postgresql.key")
    check_case(setup, clean_environment, "", "certuser", {"sslmode": "require"}, "tls")
    # The default key open to others: libpq refuses, and so does the core.
    (directory / "postgresql.key").chmod(0o644)
    check_case(setup, clean_environment, "", "certuser", {"sslmode": "require"}, "refused")


# --- worker processes: every path a DSN takes, and HOME unset ------------------------------


def test_an_open_key_is_refused_on_every_path(setup: Setup, tmp_path: Path) -> None:
    """`--dsn`, `--listen-dsn` (the CLI) and `dsn` (the API, as `run_async(app, dsn=...)`):
    a key file open to others stops the worker with libpq's words."""
    open_key = setup.dsn(
        "certuser",
        sslmode="require",
        sslcert=str(setup.pki / "client.crt"),
        sslkey=str(setup.pki / "keys" / "0644"),
    )
    good = setup.dsn(
        "certuser",
        sslmode="require",
        sslcert=str(setup.pki / "client.crt"),
        sslkey=str(setup.pki / "keys" / "0600"),
    )
    local = setup.cluster.local_dsn("parity")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FASTWORKER_", "PG"))},
        "FW_RELIABILITY_DSN": local,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fastworker", "--app", "tests.reliability.cli_app.app"]
        return subprocess.run(
            [*command, "worker", "--one-shot", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    # The good key runs (so that a refusal below is the open key's doing).
    result = cli("--dsn", good)
    assert result.returncode == 0, result.stderr[-3000:]
    refused = {}
    for path, args in (
        ("--dsn", ("--dsn", open_key)),
        ("--listen-dsn", ("--dsn", good, "--listen-dsn", open_key)),
    ):
        result = cli(*args)
        refused[path] = result.returncode != 0 and "has group or world access" in result.stderr
    worker = WorkerProcess(local, tmp_path / "api.log", "--core-dsn", open_key, "--once")
    code = worker.wait(timeout=120)
    refused["run_async(dsn=...)"] = code != 0 and "has group or world access" in worker.log()
    assert refused == dict.fromkeys(refused, True), refused


def nss_environment(tmp_path: Path, home: Path) -> dict[str, str]:
    """A user database of the test's own (nss_wrapper), where our user's home is `home`."""
    assert NSS_WRAPPER is not None
    passwd = tmp_path / "passwd"
    group = tmp_path / "group"
    uid, gid = os.geteuid(), os.getegid()
    passwd.write_text(f"fwtest:x:{uid}:{gid}:fastworker test:{home}:/bin/sh\n")
    group.write_text(f"fwtest:x:{gid}:\n")
    env = {k: v for k, v in os.environ.items() if k != "HOME" and not k.startswith("PG")}
    env.update(LD_PRELOAD=NSS_WRAPPER, NSS_WRAPPER_PASSWD=str(passwd), NSS_WRAPPER_GROUP=str(group))
    seen = subprocess.run(
        [sys.executable, "-c", "import os, pwd; print(pwd.getpwuid(os.geteuid()).pw_dir)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert seen == str(home), f"nss_wrapper did not take: {seen!r}"
    return env


def libpq_in(env: dict[str, str], dsn: str) -> subprocess.CompletedProcess[str]:
    """psycopg (libpq) connecting in a process of its own with `env`."""
    script = (
        "import sys, psycopg\n"
        "with psycopg.connect(sys.argv[1], connect_timeout=10) as c:\n"
        "    print(c.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')"
        ".fetchone()[0])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, dsn], env=env, capture_output=True, text=True, timeout=60
    )


def worker_in(env: dict[str, str], setup: Setup, dsn: str, log: Path) -> tuple[int, str]:
    """A worker whose core connects with `dsn`, in a process with exactly `env`."""
    local = setup.cluster.local_dsn("parity")
    with open(log, "wb") as out:
        process = subprocess.run(
            [sys.executable, "-m", "tests.reliability.worker_process", "--dsn", local,
             "--core-dsn", dsn, "--once", "--reconnect-timeout", "2"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
    return process.returncode, log.read_text(errors="replace")


@pytest.mark.skipif(
    NSS_WRAPPER is None, reason="needs nss_wrapper (apt-get install libnss-wrapper)"
)
def test_home_unset_uses_the_user_database_home_as_libpq(setup: Setup, tmp_path: Path) -> None:
    """Item 10: with HOME unset, libpq finds ~/.postgresql/ through getpwuid: its root.crt
    makes `require` verify the server, its postgresql.crt/.key are the client certificate,
    its root.crl revokes."""
    home = tmp_path / "passwd-home"
    (home / ".postgresql").mkdir(parents=True)
    env = nss_environment(tmp_path, home)

    # A root certificate the server's does not chain to: libpq refuses, so must the core.
    shutil.copy(setup.pki / "other_ca.crt", home / ".postgresql" / "root.crt")
    dsn = setup.dsn("postgres", sslmode="require")
    libpq = libpq_in(env, dsn)
    assert libpq.returncode != 0 and "certificate verify failed" in libpq.stderr, libpq
    code, log = worker_in(env, setup, dsn, tmp_path / "refused.log")
    assert code != 0 and "invalid peer certificate" in log, log[-3000:]

    # The right root, and a client certificate there: both connect with it.
    shutil.copy(setup.pki / "ca.crt", home / ".postgresql" / "root.crt")
    shutil.copy(setup.pki / "client.crt", home / ".postgresql" / "postgresql.crt")
    shutil.copy(setup.pki / "client.key", home / ".postgresql" / "postgresql.key")
    (home / ".postgresql" / "postgresql.key").chmod(0o600)
    dsn = setup.dsn("certuser", sslmode="require")
    libpq = libpq_in(env, dsn)
    assert libpq.returncode == 0 and libpq.stdout.strip() == "True", libpq
    code, log = worker_in(env, setup, dsn, tmp_path / "connected.log")
    assert code == 0, log[-3000:]

    # A revocation list there that revokes the server's certificate: both refuse.
    authority = tmp_path / "authority"
    authority.mkdir()
    for name in ("ca.crt", "ca.key", "server.crt"):
        shutil.copy(setup.pki / name, authority / name)
    (authority / "index.txt").touch()
    (authority / "crlnumber").write_text("1000\n")
    (authority / "ca.cnf").write_text(
        "[ca]\ndefault_ca = CA_default\n[CA_default]\ndatabase = index.txt\n"
        "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n"
        "certificate = ca.crt\nprivate_key = ca.key\n"
    )
    openssl("ca", "-config", "ca.cnf", "-revoke", "server.crt", cwd=authority)
    openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "revoked.crl", cwd=authority)
    shutil.copy(authority / "revoked.crl", home / ".postgresql" / "root.crl")
    libpq = libpq_in(env, dsn)
    assert libpq.returncode != 0 and "certificate verify failed" in libpq.stderr, libpq
    code, log = worker_in(env, setup, dsn, tmp_path / "revoked.log")
    assert code != 0 and "Revoked" in log, log[-3000:]
