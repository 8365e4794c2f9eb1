"""`/healthz` and a connection that died while idle: it must say so within the response
timeout, not at the connection's next statement (which may be a polling interval away).

Real parts only: the worker's idle backends are ended with `pg_terminate_backend`, and the
database refuses new connections meanwhile (`ALLOW_CONNECTIONS false`), so the worker
cannot replace them before `/healthz` is asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

import procrastinate
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fastworker
from tests.conftest import ADMIN_DSN, fetch_all
from tests.helpers import wait_for_rows, wait_until_listening

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


def idle_worker(
    app: procrastinate.App,
    *,
    polling: float,
    response_timeout: float,
    stalled_worker_timeout: float,
) -> fastworker.Worker:
    """A worker serving /healthz on a free port, whose connections see no statement for
    long: a claim poll every `polling` seconds, a heartbeat every 30 s."""
    return fastworker.Worker(
        app,
        metrics_port=0,
        metrics_address="127.0.0.1",
        install_signal_handlers=False,
        fetch_job_polling_interval=polling,
        update_heartbeat_interval=30,
        stalled_worker_timeout=stalled_worker_timeout,
        response_timeout=response_timeout,
        reconnect_timeout=120,
    )


async def started(worker: fastworker.Worker, run: asyncio.Task[None]) -> int:
    """The metrics port of `worker` (run by `run`), once it has registered."""
    deadline = time.monotonic() + PATIENCE
    while worker.metrics_server is None or worker.worker_id is None:
        assert not run.done(), run
        assert time.monotonic() < deadline, "the worker never started"
        await asyncio.sleep(0.05)
    return int(worker.metrics_server.port)


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

    worker = idle_worker(
        app, polling=60, response_timeout=RESPONSE_TIMEOUT, stalled_worker_timeout=120
    )
    run = asyncio.create_task(worker.run())
    try:
        port = await started(worker, run)
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


def terminate_listen_backend(database: str) -> int:
    """Ends the worker's LISTEN connection alone (through the admin database: the test's
    own may refuse connections); returns how many backends were ended."""
    rows = fetch_all(
        ADMIN_DSN,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'fastworker' "
        "AND position('LISTEN ' in query) = 1",
        database,
    )
    return sum(1 for (ended,) in rows if ended)


def listener_gauge(port: int) -> float | None:
    """`fastworker_connection_up{role="listener"}` as scraped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fastworker_connection_up" and sample.labels == {"role": "listener"}:
                return float(sample.value)
    return None


def status_of(job_id: int) -> str:
    return f"SELECT status::text FROM procrastinate_jobs WHERE id = {int(job_id)}"


#: The listener's ping (every response_timeout) would see a dead connection only this long
#: after it connected; the loss must show far sooner, without it.
SLOW_PING = 120.0
#: How long the loss of the LISTEN connection may take to show: generous, and far under
#: SLOW_PING (the listener's connection task ends with the connection, and says so).
LISTENER_NOTICED_WITHIN = 20.0


async def test_a_terminated_listen_connection_shows_at_once_and_listening_resumes(
    app: procrastinate.App, dsn: str, database_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 25, item 7: the LISTEN backend alone is ended by pg_terminate_backend while the
    database refuses new connections. The listener notices without waiting for its ping:
    connection_up{role="listener"} 0 and /healthz 503 naming it (and it alone). A job
    deferred meanwhile waits (polling is hourly), and is claimed as soon as the listener is
    back (it fetches once after LISTEN); a job deferred after that is claimed through a
    notification on the new connection."""
    caplog.set_level(logging.INFO)

    @app.task(name="ok")
    async def ok() -> None:
        return None

    worker = idle_worker(
        app, polling=3600, response_timeout=SLOW_PING, stalled_worker_timeout=SLOW_PING * 3
    )
    run = asyncio.create_task(worker.run())
    try:
        port = await started(worker, run)
        await wait_for_health(port, 200, "/healthz 200 at start")
        await wait_until_listening(dsn)
        assert await asyncio.to_thread(listener_gauge, port) == 1
        # Opened before the database refuses connections: to look at the job meanwhile.
        watcher = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        allow_connections(database_name, False)
        try:
            assert terminate_listen_backend(database_name) == 1
            # Deferred on the app's pool (connections it already holds): notified to nobody.
            deferred_while_down = await ok.defer_async()
            down = await wait_for_health(
                port,
                503,
                "/healthz 503 once the LISTEN connection died",
                patience=LISTENER_NOTICED_WITHIN,
            )
            assert down["problems"] == ["the listener connection is down"], down
            assert await asyncio.to_thread(listener_gauge, port) == 0
            # Nothing else woke the dispatcher: the job waits for the listener.
            looked_up = await watcher.execute(
                "SELECT status::text FROM procrastinate_jobs WHERE id = %s", (deferred_while_down,)
            )
            assert await looked_up.fetchall() == [("todo",)]
        finally:
            allow_connections(database_name, True)
            await watcher.close()
        # Back: LISTEN again, then one fetch that finds the job deferred while it was down.
        await wait_for_rows(dsn, status_of(deferred_while_down), [("succeeded",)])
        await wait_for_health(port, 200, "/healthz 200 once the listener is back")
        assert await asyncio.to_thread(listener_gauge, port) == 1
        await wait_until_listening(dsn)
        notified = await ok.defer_async()
        await wait_for_rows(dsn, status_of(notified), [("succeeded",)])
        assert not run.done(), run
    finally:
        worker.stop()
        await asyncio.wait_for(run, PATIENCE)
    # Said in the log, in that order, once each.
    actions = [
        action
        for record in caplog.records
        if (action := getattr(record, "action", None))
        in ("listener_connection_lost", "listener_reconnected")
    ]
    assert actions == ["listener_connection_lost", "listener_reconnected"], actions
