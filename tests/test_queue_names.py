"""A queue name with a NUL in it: PostgreSQL text cannot hold one, so no job can be in that
queue and every claim naming it fails, for ever. The worker refuses it at start, naming
the queue, on every path a queue name comes in by."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import procrastinate
import pytest

import fastworker
from tests.helpers import PATIENCE
from tests.reliability.helpers import REPO

NUL_QUEUE = "emails\x00urgent"


@pytest.mark.parametrize(
    "options",
    [
        {"queues": ["default", NUL_QUEUE]},
        {"queue_concurrency": {NUL_QUEUE: 2}},
    ],
    ids=["queues", "queue_concurrency"],
)
async def test_the_api_refuses_a_queue_name_with_a_nul(
    app: procrastinate.App, options: dict[str, Any]
) -> None:
    worker = fastworker.Worker(app, install_signal_handlers=False, **options)
    run = asyncio.create_task(worker.run())
    try:
        # Before: no error; the worker ran, and each claim failed ("invalid byte sequence").
        with pytest.raises(fastworker.ConfigurationError) as refused:
            await asyncio.wait_for(asyncio.shield(run), PATIENCE)
    finally:
        if not run.done():
            worker.stop()
            await asyncio.wait_for(run, PATIENCE)
    message = str(refused.value)
    assert "emails\\0urgent" in message, message  # the name, its NUL shown as \0
    assert "NUL" in message
    assert next(iter(options)) in message  # the option it came by


def test_the_cli_refuses_a_queue_name_with_a_nul_exit_2(dsn: str) -> None:
    """`-q`: the CLI's own parsing, in a process of its own (an argv cannot carry a NUL, so
    the arguments are handed to its `main`)."""
    script = (
        "import sys; from fastworker import cli; "
        "sys.exit(cli.main(['--app', 'tests.reliability.cli_app.app', 'worker', "
        f"'-q', {NUL_QUEUE!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "FW_RELIABILITY_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=PATIENCE * 2,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr[-4000:]
    assert "invalid worker settings: " in error_lines[0]
    assert "queues: the queue name" in error_lines[0]
    assert "emails\\0urgent" in error_lines[0]
