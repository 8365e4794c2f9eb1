"""`/healthz` and a connection that died while idle: it must say so within the response
timeout, not at the connection's next statement (which may be a polling interval away).

Real parts only: the worker's idle backends are ended with `pg_terminate_backend`, and the
database refuses new connections meanwhile (`ALLOW_CONNECTIONS false`), so the worker
cannot replace them before `/healthz` is asked.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import procrastinate
import psycopg

import fastworker
from tests.conftest import ADMIN_DSN, fetch_all
from tests.helpers import wait_for_rows

#: Bounds of the waits (never a measured duration: only how long a failing test takes).
PATIENCE = 30.0
#: How long a dead idle connection may take to show: twice the response timeout the worker
#: gets below, far under its polling and heartbeat intervals.
RESPONSE_TIMEOUT = 5.0
NOTICED_WITHIN = 2 * RESPONSE_TIMEOUT


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def wait_for_health(
    port: int, status: int, what: str, *, patience: float = PATIENCE
) -> dict[str, Any]:
    deadline = time.monotonic() + patience
    while True:
        code, body = await asyncio.to_thread(healthz, port)
        if code == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {patience} s waiting for {what}: {code} {body}")
        await asyncio.sleep(0.05)


def allow_connections(database: str, allowed: bool) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as connection:
        connection.execute(
            f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
        )


def terminate_worker_backends(database: str) -> int:
    rows = fetch_all(
        ADMIN_DSN,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'fastworker'",
        database,
    )
    return sum(1 for (ended,) in rows if ended)


async def test_healthz_names_idle_connections_that_died_within_the_response_timeout(
    app: procrastinate.App, dsn: str, database_name: str
) -> None:
    """The worker is idle: no job, a claim poll every 60 s, a heartbeat every 30 s. Its
    three connections (jobs, registry, LISTEN) are ended by the server. `/healthz` used to
    stay 200 until the next poll or heartbeat; it now names every dead connection within
    the response timeout, and says 200 again once they are back."""

    @app.task(name="ok")
    async def ok() -> None:
        return None

    worker = fastworker.Worker(
        app,
        metrics_port=0,
        metrics_address="127.0.0.1",
        install_signal_handlers=False,
        fetch_job_polling_interval=60,
        update_heartbeat_interval=30,
        stalled_worker_timeout=120,
        response_timeout=RESPONSE_TIMEOUT,
        reconnect_timeout=120,
    )
    run = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + PATIENCE
        while worker.metrics_server is None or worker.worker_id is None:
            assert not run.done(), run
            assert time.monotonic() < deadline, "the worker never started"
            await asyncio.sleep(0.05)
        port = int(worker.metrics_server.port)
        healthy = await wait_for_health(port, 200, "/healthz 200 at start")
        assert healthy["problems"] == []
        # The three connections of the core are open.
        await wait_for_rows(
            dsn,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'fastworker'",
            [(3,)],
        )
        allow_connections(database_name, False)
        try:
            assert terminate_worker_backends(database_name) == 3
            down = await wait_for_health(
                port, 503, "/healthz 503 after the connections died", patience=NOTICED_WITHIN
            )
            # Every role's connection is named, at once or within the response timeout.
            named = {"dispatcher", "registry", "listener"}
            deadline = time.monotonic() + NOTICED_WITHIN
            while not all(any(role in p for p in down["problems"]) for role in named):
                assert time.monotonic() < deadline, f"not every dead connection named: {down}"
                await asyncio.sleep(0.05)
                _, down = await asyncio.to_thread(healthz, port)
            assert down["status"] == "unhealthy"
        finally:
            allow_connections(database_name, True)
        back = await wait_for_health(port, 200, "/healthz 200 once connections are allowed")
        assert back["problems"] == []
        # And the worker works: a new job is claimed (notified on the new LISTEN).
        job_id = await ok.defer_async()
        await wait_for_rows(
            dsn,
            f"SELECT status::text FROM procrastinate_jobs WHERE id = {int(job_id)}",
            [("succeeded",)],
        )
        assert not run.done(), run
    finally:
        worker.stop()
        await asyncio.wait_for(run, PATIENCE)
