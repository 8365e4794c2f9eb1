"""The metrics port under clients that connect and say nothing, or say it slowly: the worker
keeps answering /healthz, keeps its descriptors for its database connections, and keeps
running jobs.

Real sockets and a real worker: in-process for the server's own limits, and in a process of
its own, with a low descriptor limit, for the starvation an audit reproduced (242 idle
sockets silenced /healthz, and the worker then could not reconnect: "Too many open files").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import procrastinate
import pytest

import fastworker
from fastworker import metrics
from tests.conftest import fetch_all
from tests.helpers import PATIENCE
from tests.reliability.helpers import (
    REPO,
    create_executions_table,
    defer_jobs,
    fastworker_backends,
    free_port,
    terminate_backend,
    wait_until,
)

#: Idle clients the tests open: far more than the server keeps, and than the worker's
#: descriptor limit below.
IDLE_CLIENTS = 400
#: The worker process's descriptor limit (the audit's).
WORKER_FILE_LIMIT = 256


def healthz(port: int) -> int | None:
    """The status /healthz answers, or None if it does not answer within 5 s."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            json.loads(response.read())
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


@contextlib.contextmanager
def idle_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """Up to `count` connections to the port that never send a byte, opened one after the
    other. A connection not made within 5 seconds means the server no longer accepts any:
    no more are tried (the checks after this say what that costs)."""
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except TimeoutError:
                break
        for client in clients:
            client.setblocking(False)
        yield clients
    finally:
        for client in clients:
            client.close()


def closed_by_server(client: socket.socket) -> bool:
    """Whether the server closed this connection (end of stream, or a reset)."""
    readable, _, _ = select.select([client], [], [], 0)
    if not readable:
        return False
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def exchange(port: int, request: bytes) -> bytes:
    """Send a raw request; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as client:
        client.sendall(request)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


# --- the server's own limits, on an in-process worker ----------------------------------------


@pytest.fixture
async def serving(app: procrastinate.App) -> AsyncIterator[fastworker.Worker]:
    """A running worker, healthy (connected, its heartbeat written)."""
    worker = fastworker.Worker(
        app, metrics_port=0, metrics_address="127.0.0.1", install_signal_handlers=False
    )
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: worker.metrics_server is not None and worker._core is not None,
            timeout=PATIENCE,
            what="the metrics server",
        )
        port = worker.metrics_server.port
        await asyncio.to_thread(
            wait_until, lambda: healthz(port) == 200, timeout=PATIENCE, what="a healthy worker"
        )
        yield worker
    finally:
        worker.stop()
        await run


async def test_idle_clients_are_capped_and_closed_and_health_still_answers(
    serving: fastworker.Worker,
) -> None:
    port = serving.metrics_server.port
    with idle_clients(port, IDLE_CLIENTS) as clients:
        assert len(clients) == IDLE_CLIENTS
        # A probe among idle clients is answered: they do not lock it out.
        assert await asyncio.to_thread(healthz, port) == 200
        # The server closes every idle client: beyond the cap at once, the others when
        # their time to send a request is up. (Before: none was ever closed.)
        await asyncio.to_thread(
            wait_until,
            lambda: all(closed_by_server(client) for client in clients),
            timeout=PATIENCE,
            what="the server to close every idle client",
        )
        assert serving.metrics_server.connections <= metrics.MAX_CONNECTIONS
        assert await asyncio.to_thread(healthz, port) == 200


def trickle(port: int, head: bytes) -> bool:
    """Send `head` a byte at a time, 0.1 s apart; whether the server closed the connection
    before the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as client:
        for byte in head:
            try:
                client.sendall(bytes([byte]))
            except OSError:
                return True  # reset by the server
            readable, _, _ = select.select([client], [], [], 0.1)
            if readable and closed_by_server(client):
                return True
    return False


async def test_a_client_trickling_its_request_is_closed_at_its_deadline(
    serving: fastworker.Worker,
) -> None:
    """A client that keeps sending, too slowly to finish its request head (before: held
    for as long as it kept sending, a thread and a descriptor each)."""
    head = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"x" * 500 + b"\r\n\r\n"
    assert await asyncio.to_thread(trickle, serving.metrics_server.port, head)
    assert await asyncio.to_thread(healthz, serving.metrics_server.port) == 200


async def test_one_request_per_connection_and_bad_requests(serving: fastworker.Worker) -> None:
    port = serving.metrics_server.port
    # Two requests on one connection: one answer, then the server closes.
    answer = await asyncio.to_thread(
        exchange, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["status"] == "ok"
    # HEAD: the head alone.
    answer = await asyncio.to_thread(exchange, port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n"), answer
    # Not HTTP, and a head too long: answered and closed, the server goes on.
    answer = await asyncio.to_thread(exchange, port, b"hello\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    answer = await asyncio.to_thread(
        exchange, port, b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 20_000
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    scraped = await asyncio.to_thread(exchange, port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert b"fastworker_jobs_running 0.0" in scraped


# --- the audit's recipe: a worker process with few descriptors ------------------------------


def few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_FILE_LIMIT, WORKER_FILE_LIMIT))


def executions(dsn: str) -> int:
    return int(fetch_all(dsn, "SELECT count(*) FROM fw_executions")[0][0])


def succeeded(dsn: str) -> int:
    query = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
    return int(fetch_all(dsn, query)[0][0])


@pytest.mark.slow
def test_idle_metrics_clients_do_not_starve_the_worker_of_descriptors(
    dsn: str, database_name: str, tmp_path: Path
) -> None:
    create_executions_table(dsn)
    port = free_port()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastworker",
                "worker",
                "--app",
                "tests.reliability.cli_app.app",
                "--concurrency",
                "10",
                "--metrics-port",
                str(port),
                "--metrics-address",
                "127.0.0.1",
                "--reconnect-timeout",
                "30",
            ],
            cwd=REPO,
            env={**os.environ, "FW_RELIABILITY_DSN": dsn},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=few_descriptors,
        )
    try:
        wait_until(lambda: healthz(port) == 200, timeout=60, what="the worker to be healthy")
        defer_jobs(dsn, 5)
        wait_until(lambda: executions(dsn) == 5, timeout=60, what="the first jobs")

        with idle_clients(port, IDLE_CLIENTS):
            # Before: the server held a thread and a descriptor per idle client, and ran
            # out of descriptors: /healthz was never answered.
            wait_until(lambda: healthz(port) == 200, timeout=60, what="/healthz among idle clients")
            # Every session of the worker's core cut: it must open new ones (before: "Too
            # many open files", and the worker exited once reconnect_timeout ran out).
            backends = fastworker_backends(dsn, database_name)
            assert backends
            for pid, _ in backends:
                terminate_backend(dsn, pid)
            defer_jobs(dsn, 20)
            wait_until(
                lambda: succeeded(dsn) == 25 or worker.poll() is not None,
                timeout=120,
                what="the jobs deferred after the sessions were cut",
            )
            assert worker.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert executions(dsn) == 25
            wait_until(lambda: healthz(port) == 200, timeout=60, what="/healthz after reconnecting")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    assert code == 0, log_path.read_text(errors="replace")[-4000:]
