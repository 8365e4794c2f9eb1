"""TLS with libpq's sslmode meanings, against a private cluster with `ssl = on` that only
accepts TLS over TCP, with a throwaway CA made by `openssl` in the test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import (
    PrivateCluster,
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=fastworker test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def make_server_cert(directory: Path, name: str, ca: str, alt_names: str) -> None:
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={alt_names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=postgres test server",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other_ca")
    make_server_cert(directory, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    make_server_cert(directory, "misnamed", "ca", "DNS:not-this-host.example")
    return directory


@pytest.fixture(scope="module")
def tls_cluster(pki: Path) -> Iterator[PrivateCluster]:
    cluster = PrivateCluster(
        ssl_files={"server.crt": pki / "server.crt", "server.key": pki / "server.key"}
    )
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def tls_database(tls_cluster: PrivateCluster, request: pytest.FixtureRequest) -> str:
    name = f"tls_{abs(hash(request.node.name)) % 10**8}"
    tls_cluster.create_database(name)
    create_executions_table(tls_cluster.local_dsn(name))
    return name


def run_and_check(dsn: str, local_dsn: str, tmp_path: Path) -> None:
    """A worker on `dsn` drains 50 jobs over TLS; all its connections are encrypted."""
    defer_jobs(local_dsn, 50)
    worker = WorkerProcess(dsn, tmp_path / "worker.log", "--concurrency", "10")
    try:
        wait_until(lambda: statuses(local_dsn) == {"succeeded": 50}, timeout=60, what="the drain")
        encrypted = fetch_all(
            local_dsn,
            "SELECT s.ssl, count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.application_name = 'fastworker' GROUP BY 1",
        )
        assert encrypted and all(ssl for ssl, _ in encrypted), encrypted
        # listen + jobs + registry connections
        assert sum(count for _, count in encrypted) >= 3, encrypted
    finally:
        code = worker.stop()
    assert code == 0, worker.log()[-3000:]


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full", "prefer"])
def test_worker_runs_over_tls(
    tls_cluster: PrivateCluster, tls_database: str, pki: Path, tmp_path: Path, sslmode: str
) -> None:
    extra = {"sslmode": sslmode}
    if sslmode.startswith("verify"):
        extra["sslrootcert"] = str(pki / "ca.crt")
    run_and_check(
        tls_cluster.dsn(tls_database, **extra), tls_cluster.local_dsn(tls_database), tmp_path
    )


def failing_start(dsn: str, tmp_path: Path) -> str:
    worker = WorkerProcess(dsn, tmp_path / "worker.log", "--reconnect-timeout", "2")
    code = worker.wait(timeout=120)
    log = worker.log()
    assert code == 1, log[-3000:]
    return log


def test_plaintext_is_refused_by_a_tls_only_server(
    tls_cluster: PrivateCluster, tls_database: str, tmp_path: Path
) -> None:
    log = failing_start(tls_cluster.dsn(tls_database, sslmode="disable"), tmp_path)
    assert f"127.0.0.1:{tls_cluster.port}" in log
    assert "fastworker: error:" in log
    assert "no pg_hba.conf entry" in log


def test_verify_ca_refuses_an_unknown_ca(
    tls_cluster: PrivateCluster, tls_database: str, pki: Path, tmp_path: Path
) -> None:
    dsn = tls_cluster.dsn(tls_database, sslmode="verify-ca", sslrootcert=str(pki / "other_ca.crt"))
    log = failing_start(dsn, tmp_path)
    assert "invalid peer certificate" in log, log[-2000:]


def test_verify_full_checks_the_host_name_and_verify_ca_does_not(pki: Path, tmp_path: Path) -> None:
    cluster = PrivateCluster(
        ssl_files={"server.crt": pki / "misnamed.crt", "server.key": pki / "misnamed.key"}
    )
    try:
        cluster.create_database("misnamed")
        create_executions_table(cluster.local_dsn("misnamed"))
        root = str(pki / "ca.crt")
        log = failing_start(
            cluster.dsn("misnamed", sslmode="verify-full", sslrootcert=root), tmp_path
        )
        assert 'certificate not valid for name "127.0.0.1"' in log, log[-2000:]
        (tmp_path / "ca").mkdir()
        run_and_check(
            cluster.dsn("misnamed", sslmode="verify-ca", sslrootcert=root),
            cluster.local_dsn("misnamed"),
            tmp_path / "ca",
        )
    finally:
        cluster.destroy()


def test_verify_full_without_a_root_certificate_is_a_clear_error(
    tls_cluster: PrivateCluster, tls_database: str, tmp_path: Path
) -> None:
    log = failing_start(tls_cluster.dsn(tls_database, sslmode="verify-full"), tmp_path)
    assert "needs a root certificate" in log
