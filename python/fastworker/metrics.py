"""Prometheus metrics of a fastworker worker (extra ``fastworker[metrics]``).

The counters live in the Rust core, updated where the events happen (claims, written
outcomes, hand-offs, connections); this collector reads them only when scraped, so
running jobs costs nothing extra on the Python side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastworker import _core

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "metrics_port needs the prometheus-client package: pip install 'fastworker[metrics]'"
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


class MetricsServer:
    """An HTTP endpoint serving the worker's metrics at ``/metrics``, until closed."""

    def __init__(self, port: int, address: str, collector: CoreCollector):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server, self._thread = start_http_server(port, address, registry=self.registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
