"""Prometheus metrics of a fastworker worker (extra ``procrastinate-fastworker[metrics]``),
and its health check.

The counters live in the Rust core, updated where the events happen (claims, written
outcomes, hand-offs, connections, heartbeats); this collector reads them only when
scraped, so running jobs costs nothing extra on the Python side. The endpoint serves
``/metrics`` (task and queue names, counts, durations, connection state: never job ids,
arguments or errors) and ``/healthz``. docs/operations.md is the reference.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastworker import _core

try:
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
        make_wsgi_app,
    )
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "metrics_port needs the prometheus-client package: "
        "pip install 'procrastinate-fastworker[metrics]'"
    ) from error

logger = logging.getLogger("fastworker.metrics")


def _buckets(histogram: _core.Histogram) -> tuple[list[tuple[str, float]], float]:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    bounds = [*(str(bound) for bound in histogram.bounds), "+Inf"]
    for bound, count in zip(bounds, histogram.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets, histogram.sum


class CoreCollector(Collector):
    """Reads a worker core's metrics at scrape time."""

    def __init__(self, core: Callable[[], _core.WorkerCore | None], running: Callable[[], int]):
        self._core = core
        self._running = running

    def collect(self) -> Iterator[Metric]:
        core = self._core()
        if core is None:
            return
        snapshot = core.metrics()
        claimed = CounterMetricFamily(
            "fastworker_jobs_claimed", "Jobs claimed by this worker.", labels=["task", "queue"]
        )
        for task, queue, count in snapshot.claimed:
            claimed.add_metric([task, queue], count)
        yield claimed
        completed = CounterMetricFamily(
            "fastworker_jobs_completed",
            "Job outcomes written by this worker (status: succeeded, failed, aborted, retried).",
            labels=["task", "queue", "status"],
        )
        for task, queue, status, count in snapshot.outcomes:
            completed.add_metric([task, queue, status], count)
        yield completed
        duration = HistogramMetricFamily(
            "fastworker_job_duration_seconds",
            "How long jobs ran, from start to outcome.",
            labels=["task", "queue"],
        )
        for task, queue, histogram in snapshot.job_duration:
            buckets, total = _buckets(histogram)
            duration.add_metric([task, queue], buckets, total)
        yield duration
        for name, histogram, documentation in (
            ("fastworker_claim_batch_size", snapshot.claim_batch_size, "Jobs per claim statement."),
            (
                "fastworker_completion_batch_size",
                snapshot.completion_batch_size,
                "Outcomes per completion statement.",
            ),
            (
                "fastworker_claim_to_start_seconds",
                snapshot.claim_to_start,
                "Time from a job's claim to its start in Python.",
            ),
        ):
            family = HistogramMetricFamily(name, documentation)
            buckets, total = _buckets(histogram)
            family.add_metric([], buckets, total)
            yield family
        yield GaugeMetricFamily(
            "fastworker_completer_backlog",
            "Outcomes reported and not yet written.",
            value=snapshot.completer_backlog,
        )
        yield GaugeMetricFamily(
            "fastworker_jobs_in_flight",
            "Jobs claimed by this worker and not yet completed in the database.",
            value=snapshot.in_flight,
        )
        yield GaugeMetricFamily(
            "fastworker_jobs_running", "Jobs running in Python now.", value=self._running()
        )
        connected = GaugeMetricFamily(
            "fastworker_connection_up",
            "Whether the connection of a role (dispatcher, registry, listener) is up.",
            labels=["role"],
        )
        for role, up in snapshot.connected.items():
            connected.add_metric([role], 1.0 if up else 0.0)
        yield connected
        reconnects = CounterMetricFamily(
            "fastworker_reconnects", "Connections re-established, by role.", labels=["role"]
        )
        for role, count in snapshot.reconnects.items():
            reconnects.add_metric([role], count)
        yield reconnects
        wait = HistogramMetricFamily(
            "fastworker_job_wait_seconds",
            "How long jobs waited to be claimed: from the later of their insertion and their "
            "scheduled_at to their claim (database time).",
            labels=["queue"],
        )
        for queue, histogram in snapshot.job_wait:
            buckets, total = _buckets(histogram)
            wait.add_metric([queue], buckets, total)
        yield wait
        if snapshot.heartbeat_age is not None:
            yield GaugeMetricFamily(
                "fastworker_heartbeat_age_seconds",
                "Seconds since this worker last wrote its heartbeat in procrastinate_workers.",
                value=snapshot.heartbeat_age,
            )
        for name, value, documentation in (
            (
                "fastworker_heartbeats_late",
                snapshot.heartbeats_late,
                "Times this worker's heartbeat was found older than stalled_worker_timeout "
                "(other workers may have taken it for stalled and run its jobs again).",
            ),
            (
                "fastworker_stalled_workers_pruned",
                snapshot.stalled_workers_pruned,
                "Stalled workers this worker pruned from procrastinate_workers.",
            ),
            (
                "fastworker_stalled_jobs_recovered",
                snapshot.stalled_jobs_recovered,
                "Jobs of stalled workers (or left without a worker) put back to run.",
            ),
            (
                "fastworker_stalled_jobs_failed",
                snapshot.stalled_jobs_failed,
                "Jobs of stalled workers that could not go back to todo and were failed.",
            ),
        ):
            yield CounterMetricFamily(name, documentation, value=value)
        if snapshot.queue_depth_age is not None:
            depth = GaugeMetricFamily(
                "fastworker_queue_jobs",
                "Jobs in the database by queue and status (todo, doing), as sampled every "
                "few seconds by this worker (all workers' jobs).",
                labels=["queue", "status"],
            )
            for queue, status, count in snapshot.queue_depth:
                depth.add_metric([queue, status], count)
            yield depth
            yield from _due_families(snapshot.queue_due)
            yield GaugeMetricFamily(
                "fastworker_queue_jobs_sample_age_seconds",
                "Seconds since fastworker_queue_jobs was sampled.",
                value=snapshot.queue_depth_age,
            )


def _due_families(queue_due: list[tuple[str, int, int, float | None]]) -> Iterator[Metric]:
    """The todo jobs of each sampled queue, due now or scheduled for later, and how long
    the oldest due one has waited: the signal of a stuck queue (jobs scheduled for later
    wait by design)."""
    due = GaugeMetricFamily(
        "fastworker_queue_jobs_due",
        "Todo jobs due now (no scheduled_at, or one past), by queue, as sampled.",
        labels=["queue"],
    )
    not_due = GaugeMetricFamily(
        "fastworker_queue_jobs_not_due",
        "Todo jobs scheduled for later (schedule_in, retries that wait), by queue, as sampled.",
        labels=["queue"],
    )
    oldest = GaugeMetricFamily(
        "fastworker_queue_oldest_due_job_age_seconds",
        "Seconds the oldest due job of the queue has been due (since its scheduled_at, else "
        "its insertion; database time); 0 when none is due.",
        labels=["queue"],
    )
    for queue, due_jobs, later_jobs, oldest_age in queue_due:
        due.add_metric([queue], due_jobs)
        not_due.add_metric([queue], later_jobs)
        if due_jobs == 0:
            oldest.add_metric([queue], 0.0)
        elif oldest_age is not None:  # unknown only if its events were deleted
            oldest.add_metric([queue], oldest_age)
    yield due
    yield not_due
    yield oldest


@dataclass(frozen=True)
class Health:
    """The answer of ``/healthz``."""

    healthy: bool
    problems: tuple[str, ...]
    heartbeat_age: float | None

    def body(self) -> bytes:
        return json.dumps(
            {
                "status": "ok" if self.healthy else "unhealthy",
                "problems": list(self.problems),
                "heartbeat_age_seconds": self.heartbeat_age,
            }
        ).encode()


def health(core: _core.WorkerCore | None, roles: Iterable[str], heartbeat_timeout: float) -> Health:
    """Healthy while the core runs, the connections of ``roles`` are up and the heartbeat
    was written less than ``heartbeat_timeout`` seconds ago (beyond it, other workers take
    this one for stalled)."""
    if core is None:
        return Health(False, ("the worker is not running",), None)
    snapshot = core.metrics()
    problems = [
        f"the {role} connection is down"
        for role in roles
        if not snapshot.connected.get(role, False)
    ]
    age = snapshot.heartbeat_age
    if age is None or age > heartbeat_timeout:
        problems.append(
            f"the heartbeat is {'missing' if age is None else f'{age:.0f} s old'} "
            f"(stalled after {heartbeat_timeout:g} s)"
        )
    return Health(not problems, tuple(problems), age)


def _bind_error(port: int, address: str, error: OSError) -> _core.ConfigurationError:
    where = f"{address}:{port}"
    if error.errno == errno.EADDRINUSE:
        reason = "the port is already in use (another worker or process listens on it)"
    elif error.errno == errno.EACCES:
        reason = (
            "permission denied (ports below 1024 need privileges: use a port from 1024 up, "
            "e.g. 9100)"
        )
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no network interface of this machine has that address"
    else:
        reason = error.strerror or str(error)
    return _core.ConfigurationError(f"metrics_port: cannot serve metrics on {where}: {reason}")


#: At most this many clients are connected at once. One more closes the oldest that has
#: not sent its whole request yet (idle or slow clients cannot lock a probe out), or, when
#: every one is being answered, is closed at once.
MAX_CONNECTIONS = 64
#: Seconds a client has to send its whole request head (request line and headers).
REQUEST_TIMEOUT = 5.0
#: Seconds a client has to take the whole answer.
RESPONSE_TIMEOUT = 10.0
#: The longest request head read, in bytes; a longer one is answered 431.
MAX_REQUEST_HEAD = 16 * 1024
#: How long accepting pauses when the process has no descriptor left for a new client.
ACCEPT_PAUSE = 0.5

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Client:
    """A connected client: its request head as it arrives, then the answer as it leaves."""

    __slots__ = ("answer", "deadline", "received", "sock")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.answer: memoryview | None = None


class MetricsServer:
    """An HTTP endpoint serving the worker's metrics at ``/metrics`` and its health at
    ``/healthz``, until closed. Binds when created: a port in use, a privileged port or an
    unknown address is a `ConfigurationError` then, naming the port.

    One thread serves every client through a selector, one request per connection
    (``Connection: close``), so that clients cannot take more of the process than
    `MAX_CONNECTIONS` sockets and that thread, whatever they do: a client has
    `REQUEST_TIMEOUT` seconds to send its request and `RESPONSE_TIMEOUT` to take the
    answer. The thread is not the worker's event loop, so a stalled loop (a task blocking
    it) does not silence ``/healthz``."""

    def __init__(
        self,
        port: int,
        address: str,
        collector: CoreCollector,
        health: Callable[[], Health],
    ):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        # prometheus_client's default process and GC collectors, on this registry.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                answer = health()
                start_response(
                    "200 OK" if answer.healthy else "503 Service Unavailable",
                    [("Content-Type", "application/json")],
                )
                return [answer.body()]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        self._app: WsgiApp = app
        self._listener = _listen(address, port)
        self.port = int(self._listener.getsockname()[1])
        self._wake_reader, self._wake_writer = socket.socketpair()
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        # Oldest first (dicts keep insertion order): the order clients are evicted in.
        self._clients: dict[socket.socket, _Client] = {}
        self._accepting_again_at: float | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="fastworker metrics", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        self._thread.join(timeout=5)
        self._wake_writer.close()

    # --- the serving thread ---------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closing:
                self._serve_once()
        except Exception:  # a bug here must not pass silently, nor take the worker down
            logger.exception("The metrics server stopped on an unexpected error")
        finally:
            for client in list(self._clients.values()):
                self._drop(client)
            self._selector.close()
            self._listener.close()
            self._wake_reader.close()

    def _serve_once(self) -> None:
        for key, events in self._selector.select(self._wait(time.monotonic())):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_reader:
                with contextlib.suppress(OSError):
                    self._wake_reader.recv(64)
            else:
                client: _Client = key.data
                if self._clients.get(client.sock) is not client:
                    continue  # dropped meanwhile (evicted by a newer client)
                if events & selectors.EVENT_READ:
                    self._read(client)
                else:
                    self._write(client)
        self._expire(time.monotonic())

    def _wait(self, now: float) -> float | None:
        """Seconds until the next deadline (None: none)."""
        deadlines = [client.deadline for client in self._clients.values()]
        if self._accepting_again_at is not None:
            deadlines.append(self._accepting_again_at)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _expire(self, now: float) -> None:
        for client in list(self._clients.values()):
            if client.deadline <= now:
                self._drop(client)
        if self._accepting_again_at is not None and self._accepting_again_at <= now:
            self._accepting_again_at = None
            self._selector.register(self._listener, selectors.EVENT_READ)

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):  # then the other clients get their turn
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: pause rather than spin on it.
                    self._selector.unregister(self._listener)
                    self._accepting_again_at = time.monotonic() + ACCEPT_PAUSE
                return  # (a client gone before being accepted: the next one, next turn)
            if len(self._clients) >= MAX_CONNECTIONS and not self._evict_one():
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._clients[sock] = client
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _evict_one(self) -> bool:
        """Close the oldest client still sending its request; False if there is none."""
        for client in self._clients.values():
            if client.answer is None:
                self._drop(client)
                return True
        return False

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.received += data
        end = _end_of_head(client.received)
        if end is not None:
            self._answer(client, self._respond(bytes(client.received[:end])))
        elif len(client.received) > MAX_REQUEST_HEAD:
            self._answer(client, _response("431 Request Header Fields Too Large", [], b""))

    def _answer(self, client: _Client, answer: bytes) -> None:
        client.received = bytearray()
        client.answer = memoryview(answer)
        client.deadline = time.monotonic() + RESPONSE_TIMEOUT
        self._selector.modify(client.sock, selectors.EVENT_WRITE, client)
        self._write(client)  # most answers leave at once

    def _write(self, client: _Client) -> None:
        assert client.answer is not None
        try:
            sent = client.sock.send(client.answer)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        client.answer = client.answer[sent:]
        if not client.answer:
            # Unread bytes at close would reset the connection, and the client could lose
            # the answer: take what it sent beyond its head first (bounded).
            with contextlib.suppress(OSError):
                for _ in range(4):
                    if not client.sock.recv(65536):
                        break
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def _respond(self, head: bytes) -> bytes:
        """The answer to one request head, from the WSGI app."""
        lines = head.decode("latin-1").splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", [], b"")
        method, target, version = parts
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": version,
            "SERVER_NAME": "fastworker",
            "SERVER_PORT": str(self.port),
            "wsgi.url_scheme": "http",
        }
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                key = name.strip().upper().replace("-", "_")
                prefix = "" if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_"
                environ[prefix + key] = value.strip()
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            started[:] = [status, headers]

        try:
            body = b"".join(self._app(environ, start_response))
        except Exception:
            logger.exception(f"Answering {method} {path} on the metrics port failed")
            return _response("500 Internal Server Error", [], b"")
        status, headers = started
        return _response(status, headers, b"" if method == "HEAD" else body, len(body))


def _end_of_head(received: bytearray) -> int | None:
    """Where the request head ends (after its blank line), if it has arrived."""
    for blank in (b"\r\n\r\n", b"\n\n"):
        found = received.find(blank)
        if found >= 0:
            return found + len(blank)
    return None


def _response(
    status: str, headers: list[tuple[str, str]], body: bytes, length: int | None = None
) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    lines += [
        f"{name}: {value}"
        for name, value in headers
        if name.lower() not in ("content-length", "connection")
    ]
    lines += [f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _listen(address: str, port: int) -> socket.socket:
    """A listening socket on ``address``:``port``, of the address's family (an IPv6 address,
    like ``::``, needs AF_INET6)."""
    try:
        family, kind, protocol, _, where = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise _core.ConfigurationError(
            f"metrics_address: {address!r} is not an address to listen on ({error})"
        ) from None
    listener = socket.socket(family, kind, protocol)
    try:
        # As http.server does: a restarted worker can bind while old connections linger.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(where)
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise _bind_error(port, address, error) from None
    return listener
