"""Prometheus metrics of a fastworker worker (extra ``procrastinate-fastworker[metrics]``),
and its health check.

The counters live in the Rust core, updated where the events happen (claims, written
outcomes, hand-offs, connections, heartbeats); this collector reads them only when
scraped, so running jobs costs nothing extra on the Python side. The endpoint serves
``/metrics`` (task and queue names, counts, durations, connection state: never job ids,
arguments or errors) and ``/healthz``. docs/operations.md is the reference.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

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
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "metrics_port needs the prometheus-client package: "
        "pip install 'procrastinate-fastworker[metrics]'"
    ) from error


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
            "Whether the connection of a role (dispatcher, listener) is up.",
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
            yield GaugeMetricFamily(
                "fastworker_queue_jobs_sample_age_seconds",
                "Seconds since fastworker_queue_jobs was sampled.",
                value=snapshot.queue_depth_age,
            )


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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (scrapes and probes come every few seconds)."""


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


class MetricsServer:
    """An HTTP endpoint serving the worker's metrics at ``/metrics`` and its health at
    ``/healthz``, until closed. Binds when created: a port in use, a privileged port or an
    unknown address is a `ConfigurationError` then, naming the port."""

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

        server_class = _server_class(address)
        try:
            self._server = make_server(
                address, port, app, server_class=server_class, handler_class=_QuietHandler
            )
        except (socket.gaierror, UnicodeError) as error:
            raise _core.ConfigurationError(
                f"metrics_address: {address!r} is not an address to listen on ({error})"
            ) from None
        except OSError as error:
            raise _bind_error(port, address, error) from None
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fastworker metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _server_class(address: str) -> type[ThreadingWSGIServer]:
    """prometheus_client's threading server, for the address family of ``address`` (an
    IPv6 address, like ``::``, needs AF_INET6)."""
    try:
        family = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        family = socket.AF_INET

    class Server(ThreadingWSGIServer):
        address_family = family

    return Server
