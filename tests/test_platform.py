"""fastworker is POSIX-only (Linux, macOS): on Windows it says so at start, clearly, in
Python and on the command line, instead of failing later in signal handling.

Windows itself is not available here: the tests run fastworker in a real interpreter whose
`sys.platform` reads "win32" (set after the imports, as the checks read it at start)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import procrastinate
import pytest

import fastworker
from tests.conftest import make_app

MESSAGE = (
    "fastworker runs on Linux and macOS only, not on Windows (win32); run procrastinate's "
    "own worker there (`procrastinate worker`, `app.run_worker_async()`)"
)


def test_the_worker_refuses_to_start_on_windows(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(dsn)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(fastworker.ConfigurationError) as raised:
        fastworker.Worker(app)
    assert str(raised.value) == MESSAGE


def test_the_worker_starts_on_posix(dsn: str) -> None:
    assert isinstance(fastworker.Worker(make_app(dsn)), procrastinate.worker.Worker)


def test_the_command_refuses_to_start_on_windows_with_one_line(dsn: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from fastworker.cli import main

        sys.platform = "win32"
        sys.exit(main(["--app", "nothing.to.load", "worker", "--dsn", {dsn!r}]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr == f"fastworker: error: {MESSAGE}\n"
