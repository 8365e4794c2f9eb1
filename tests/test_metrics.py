"""The Prometheus endpoint, scraped over HTTP while a real worker drains real jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fastworker
from fastworker.metrics import health
from tests.conftest import fetch_all, server_address
from tests.faults.proxy import FaultProxy

# The core's cap on task and queue label values (rust/core/src/metrics.rs).
MAX_LABEL_VALUES = 100


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = scrape_text(port)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_endpoint_counts_claims_and_outcomes(app: procrastinate.App) -> None:
    release = asyncio.Event()

    @app.task(name="ok", queue="q1")
    async def ok() -> None:
        await asyncio.sleep(0)

    @app.task(name="bad", queue="q2")
    async def bad() -> None:
        raise ValueError("boom")

    @app.task(name="held", queue="q1")
    async def held() -> None:
        await release.wait()

    await ok.batch_defer_async(*({} for _ in range(7)))
    await bad.batch_defer_async(*({} for _ in range(3)))
    await held.defer_async()

    worker = fastworker.Worker(
        app,
        concurrency=4,
        metrics_port=0,
        metrics_address="127.0.0.1",
        install_signal_handlers=False,
    )
    run = asyncio.create_task(worker.run())
    try:
        samples: dict = {}
        for _ in range(400):  # bounded wait for the 10 quick jobs to be written
            await asyncio.sleep(0.025)
            if worker.metrics_server is None:
                continue
            samples = await asyncio.to_thread(scrape, worker.metrics_server.port)
            done = sum(
                value
                for (name, _), value in samples.items()
                if name == "fastworker_jobs_completed_total"
            )
            if done >= 10:
                break
        key = "fastworker_jobs_completed_total"
        assert samples[(key, (("queue", "q1"), ("status", "succeeded"), ("task", "ok")))] == 7
        assert samples[(key, (("queue", "q2"), ("status", "failed"), ("task", "bad")))] == 3
        claimed = "fastworker_jobs_claimed_total"
        assert samples[(claimed, (("queue", "q1"), ("task", "held")))] == 1
        assert samples[("fastworker_jobs_running", ())] == 1  # `held` still runs
        assert samples[("fastworker_jobs_in_flight", ())] == 1
        assert samples[("fastworker_connection_up", (("role", "dispatcher"),))] == 1
        assert samples[("fastworker_connection_up", (("role", "listener"),))] == 1
        duration_count = samples[
            ("fastworker_job_duration_seconds_count", (("queue", "q1"), ("task", "ok")))
        ]
        assert duration_count == 7
        assert samples[("fastworker_claim_batch_size_count", ())] >= 1
        assert samples[("fastworker_claim_to_start_seconds_count", ())] == 11
    finally:
        release.set()
        worker.stop()
        await run
    assert worker.metrics_server is None  # closed with the worker


# --- health, bad ports, and the production metrics ------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def poll(check: Callable[[], Awaitable[Any]], what: str, tries: int = 600) -> Any:
    """`check()` until it returns something true, at most `tries` times 50 ms apart."""
    for _ in range(tries):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def running_worker(app: procrastinate.App, **options: Any) -> fastworker.Worker:
    return fastworker.Worker(
        app, metrics_port=0, metrics_address="127.0.0.1", install_signal_handlers=False, **options
    )


async def served_port(worker: fastworker.Worker) -> int:
    async def port() -> int | None:
        server = worker.metrics_server
        return None if server is None or worker._core is None else int(server.port)

    return int(await poll(port, "the metrics server"))


async def scrape_until(port: int, ready: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `ready` holds for the samples; those samples."""

    async def scraped() -> Samples | None:
        samples = await asyncio.to_thread(scrape, port)
        return samples if ready(samples) else None

    found: Samples = await poll(scraped, what)
    return found


async def test_healthz_is_200_while_connected_and_503_while_the_database_is_cut(
    app: procrastinate.App, dsn: str
) -> None:
    """A real outage: the fault proxy cuts every connection of the worker and refuses new
    ones; /healthz answers 503 naming the connections down, then 200 once they are back."""
    with FaultProxy(*server_address()) as proxy:
        worker = running_worker(app, dsn=proxy.dsn(dsn), reconnect_timeout=120.0)
        run = asyncio.create_task(worker.run())
        try:
            port = await served_port(worker)

            async def answer(expected: int) -> dict[str, Any] | None:
                status, body = await asyncio.to_thread(healthz, port)
                return body if status == expected else None

            healthy = await poll(lambda: answer(200), "/healthz 200")
            assert healthy["status"] == "ok" and healthy["problems"] == []
            assert 0 <= healthy["heartbeat_age_seconds"] < 30
            proxy.unreachable()
            down = await poll(lambda: answer(503), "/healthz 503 during the outage")
            assert down["status"] == "unhealthy"
            assert any("connection is down" in problem for problem in down["problems"]), down

            # Each role sees its connection die on its own (within a second when idle).
            async def dispatcher_down() -> bool:
                samples = await asyncio.to_thread(scrape, port)
                return samples[("fastworker_connection_up", (("role", "dispatcher"),))] == 0

            await poll(dispatcher_down, "the dispatcher's connection_up at 0")
            proxy.unreachable(False)
            back = await poll(lambda: answer(200), "/healthz 200 after the outage")
            assert back["problems"] == []
        finally:
            proxy.unreachable(False)
            worker.stop()
            await run
    # Not running any more: nothing listens.
    with pytest.raises(urllib.error.URLError):
        healthz(port)


def test_healthz_is_503_when_the_heartbeat_is_stale() -> None:
    """The heartbeat rule alone, on the core's real snapshot type: a worker whose heartbeat
    is older than stalled_worker_timeout is taken for stalled by the others."""

    class Snapshot:
        connected = {"dispatcher": True, "listener": True}
        heartbeat_age: float | None = 45.0

    class Core:
        def metrics(self) -> Snapshot:
            return Snapshot()

    stale = health(Core(), ("dispatcher", "listener"), 30.0)  # type: ignore[arg-type]
    assert not stale.healthy and "45 s old" in stale.problems[0]
    Snapshot.heartbeat_age = 3.0
    assert health(Core(), ("dispatcher", "listener"), 30.0).healthy  # type: ignore[arg-type]
    assert not health(None, ("dispatcher",), 30.0).healthy


async def test_a_metrics_port_in_use_is_a_clear_error_before_the_worker_starts(
    app: procrastinate.App, dsn: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = fastworker.Worker(
            app, metrics_port=port, metrics_address="127.0.0.1", install_signal_handlers=False
        )
        with pytest.raises(fastworker.ConfigurationError, match="already in use") as raised:
            await worker.run()
    assert f"127.0.0.1:{port}" in str(raised.value)
    # Nothing started: no worker registered, no connection left.
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
    assert worker.metrics_server is None


async def test_serving_metrics_is_logged_on_fastworkers_own_logger(
    app: procrastinate.App, caplog: pytest.LogCaptureFixture
) -> None:
    """procrastinate's worker serves no metrics: the line saying where they are served is
    fastworker's (`fastworker.metrics`), not on the `procrastinate.worker` logger."""
    caplog.set_level(logging.INFO)
    worker = running_worker(app)
    run = asyncio.create_task(worker.run())
    try:
        port = await served_port(worker)
    finally:
        worker.stop()
        await run
    served = [
        record
        for record in caplog.records
        if getattr(record, "action", None) == "metrics_server_started"
    ]
    assert [record.name for record in served] == ["fastworker.metrics"], served
    assert f"127.0.0.1:{port}/metrics" in served[0].getMessage()


def test_a_privileged_or_busy_metrics_port_is_one_line_from_the_cli(
    tmp_path: Path, dsn: str
) -> None:
    """The command exits 2 with one error line (no traceback), before taking any job. The
    privileged port is refused for real: the command runs without CAP_NET_BIND_SERVICE."""
    (tmp_path / "metrics_app.py").write_text(
        "import os, procrastinate\n"
        "app = procrastinate.App(connector=procrastinate.PsycopgConnector("
        "conninfo=os.environ['APP_DSN']))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PROCRASTINATE_", "FASTWORKER_"))
    }
    env["APP_DSN"] = dsn
    command = [sys.executable, "-m", "fastworker", "--app", "metrics_app.app", "worker"]
    unprivileged = ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            (
                [*command, "--metrics-port", str(busy), "--metrics-address", "127.0.0.1"],
                "already in use",
            ),
            ([*unprivileged, *command, "--metrics-port", "81"], "permission denied"),
        ]
        for args, expected in cases:
            result = subprocess.run(
                args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr
            errors = [line for line in result.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and expected in errors[0], result.stderr
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


async def test_production_metrics_waits_queue_depth_heartbeat_and_collectors(
    app: procrastinate.App, dsn: str
) -> None:
    """Waits measured from the later of insertion and scheduled_at (events moved back in
    time, for real rows), the queue depth of a queue no worker serves, the heartbeat age,
    configured duration buckets reaching hours, process and GC collectors."""

    @app.task(name="ok", queue="waits")
    async def ok() -> None:
        await asyncio.sleep(0)

    # Inserted 2 h ago; inserted 2 h ago and scheduled 30 min ago: waits of about 2 h and
    # 30 min.
    with psycopg.connect(dsn, autocommit=True) as connection:
        ids = [
            row[0]
            for row in connection.execute(
                """INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)
                   VALUES ('waits', 'ok', '{}', NULL),
                          ('waits', 'ok', '{}', now() - interval '30 minutes')
                   RETURNING id"""
            ).fetchall()
        ]
        connection.execute(
            "UPDATE procrastinate_events SET at = now() - interval '2 hours'"
            " WHERE job_id = ANY(%s) AND type = 'deferred'",
            (ids,),
        )
        connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               SELECT 'elsewhere', 'ok', '{}' FROM generate_series(1, 5)"""
        )
    worker = running_worker(
        app, queues=["waits"], metrics_duration_buckets=[1.0, 600.0, 5400.0, 14400.0]
    )
    run = asyncio.create_task(worker.run())
    try:
        port = await served_port(worker)

        waits = ("fastworker_job_wait_seconds_count", (("queue", "waits"),))
        samples = await scrape_until(
            port, lambda samples: samples.get(waits) == 2, "both waits measured"
        )
    finally:
        worker.stop()
        await run
    wait = "fastworker_job_wait_seconds_bucket"
    le = {
        bound: samples[(wait, (("le", bound), ("queue", "waits")))]
        for bound in ("1.0", "600.0", "5400.0", "14400.0", "+Inf")
    }
    assert le == {"1.0": 0, "600.0": 0, "5400.0": 1, "14400.0": 2, "+Inf": 2}, le
    duration = "fastworker_job_duration_seconds_bucket"
    assert samples[(duration, (("le", "14400.0"), ("queue", "waits"), ("task", "ok")))] == 2
    assert samples[("fastworker_queue_jobs", (("queue", "elsewhere"), ("status", "todo")))] == 5
    assert 0 <= samples[("fastworker_heartbeat_age_seconds", ())] < 30
    assert samples[("fastworker_stalled_workers_pruned_total", ())] == 0
    assert samples[("fastworker_stalled_jobs_recovered_total", ())] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert ("python_gc_collections_total", (("generation", "0"),)) in samples


async def test_jobs_scheduled_for_later_are_not_due_and_the_oldest_due_job_shows_its_wait(
    app: procrastinate.App, dsn: str
) -> None:
    """Issue 25, item 3: a queue holding only a job scheduled for later and a retry that
    waits has no job due (and an oldest due age of 0), though it has todo jobs; a due job
    shows, with how long it has been due: since its insertion (unscheduled), or since its
    scheduled_at."""

    @app.task(
        name="flaky",
        queue="later",
        retry=procrastinate.RetryStrategy(max_attempts=2, wait=3600),
    )
    async def flaky() -> None:
        raise ValueError("fails once, retried in an hour")

    @app.task(name="ok", queue="later")
    async def ok() -> None:
        await asyncio.sleep(0)

    retried = await flaky.defer_async()
    await ok.configure(schedule_in={"hours": 1}).defer_async()
    with psycopg.connect(dsn, autocommit=True) as connection:
        # Queue `inserted`: due since its insertion 2 h ago, and one scheduled tomorrow.
        (inserted,) = (
            connection.execute(
                """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               VALUES ('inserted', 'ok', '{}') RETURNING id"""
            ).fetchone()
            or ()
        )
        connection.execute(
            "UPDATE procrastinate_events SET at = now() - interval '2 hours'"
            " WHERE job_id = %s AND type = 'deferred'",
            (inserted,),
        )
        connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)
               VALUES ('inserted', 'ok', '{}', now() + interval '1 day'),
                      ('scheduled', 'ok', '{}', now() - interval '3 hours')"""
        )
    worker = running_worker(app, queues=["later"])
    run = asyncio.create_task(worker.run())
    try:
        port = await served_port(worker)

        # The failure is retried in an hour: todo again, not due.
        async def retried_for_later() -> bool:
            rows = await asyncio.to_thread(
                fetch_all,
                dsn,
                "SELECT status::text, attempts FROM procrastinate_jobs WHERE id = %s",
                retried,
            )
            return rows == [("todo", 1)]

        await poll(retried_for_later, "the failed job put back to todo for later")

        later = ("fastworker_queue_jobs_not_due", (("queue", "later"),))
        samples = await scrape_until(
            port, lambda samples: samples.get(later) == 2, "a sample after the retry"
        )
    finally:
        worker.stop()
        await run

    def gauge(name: str, queue: str) -> float:
        return samples[(name, (("queue", queue),))]

    # `later`: todo jobs (the existing series counts them all), none due.
    assert samples[("fastworker_queue_jobs", (("queue", "later"), ("status", "todo")))] == 2
    assert gauge("fastworker_queue_jobs_due", "later") == 0
    assert gauge("fastworker_queue_oldest_due_job_age_seconds", "later") == 0
    # `inserted`: one due for 2 h (its insertion), one not yet due.
    assert gauge("fastworker_queue_jobs_due", "inserted") == 1
    assert gauge("fastworker_queue_jobs_not_due", "inserted") == 1
    assert 2 * 3600 <= gauge("fastworker_queue_oldest_due_job_age_seconds", "inserted") < 3 * 3600
    # `scheduled`: due since its scheduled_at, 3 h ago.
    assert gauge("fastworker_queue_jobs_due", "scheduled") == 1
    assert gauge("fastworker_queue_jobs_not_due", "scheduled") == 0
    assert 3 * 3600 <= gauge("fastworker_queue_oldest_due_job_age_seconds", "scheduled") < 4 * 3600


async def test_unregistered_task_names_share_one_label_and_queue_labels_are_capped(
    app: procrastinate.App, dsn: str
) -> None:
    """Whoever can defer jobs can invent names: 30 unregistered task names are one
    `unknown` label; 150 queue names are at most MAX_LABEL_VALUES labels, the rest `other`
    (nothing lost: the counts add up)."""

    @app.task(name="ok")
    async def ok() -> None:
        await asyncio.sleep(0)

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               SELECT 'default', 'made-up-' || n, '{}' FROM generate_series(1, 30) AS n"""
        )
        connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               SELECT 'queue-' || n, 'ok', '{}' FROM generate_series(1, 150) AS n"""
        )
    worker = running_worker(app, concurrency=20)
    run = asyncio.create_task(worker.run())
    try:
        port = await served_port(worker)

        async def all_written() -> Samples | None:
            samples = await asyncio.to_thread(scrape, port)
            done = sum(
                value
                for (name, _), value in samples.items()
                if name == "fastworker_jobs_completed_total"
            )
            return samples if done == 180 else None

        samples = await poll(all_written, "the 180 jobs written")
    finally:
        worker.stop()
        await run
    completed = {
        dict(labels)["task"]: 0.0
        for (name, labels) in samples
        if name == "fastworker_jobs_completed_total"
    }
    assert set(completed) == {"ok", "unknown"}
    unknown = samples[
        (
            "fastworker_jobs_completed_total",
            (("queue", "default"), ("status", "failed"), ("task", "unknown")),
        )
    ]
    assert unknown == 30
    queues = {
        dict(labels)["queue"]: value
        for (name, labels), value in samples.items()
        if name == "fastworker_jobs_claimed_total" and dict(labels)["task"] == "ok"
    }
    assert len(queues) <= MAX_LABEL_VALUES and "other" in queues
    assert sum(queues.values()) == 150
    statuses = fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")
    assert sorted(statuses) == [("failed", 30), ("succeeded", 150)]


async def test_every_metric_the_docs_alerts_and_dashboard_name_is_served(
    app: procrastinate.App,
) -> None:
    """docs/operations.md's reference, the alert rules and the Grafana dashboard name only
    metrics a real worker serves (after one job of each outcome kind)."""

    @app.task(name="ok")
    async def ok() -> None:
        await asyncio.sleep(0)

    await ok.defer_async()
    await ok.configure(queue="unserved").defer_async()  # queue depth: one todo job
    worker = running_worker(app, queues=["default"])
    run = asyncio.create_task(worker.run())
    try:
        port = await served_port(worker)

        async def complete() -> str | None:
            text = await asyncio.to_thread(scrape_text, port)
            done = "fastworker_job_wait_seconds_count" in text and "unserved" in text
            return text if done else None

        text = await poll(complete, "a full scrape")
    finally:
        worker.stop()
        await run
    served = set()
    for family in text_string_to_metric_families(text):
        # A family without samples yet (no reconnect so far) is still declared.
        served |= (
            {family.name, f"{family.name}_total"} if family.type == "counter" else {family.name}
        )
        served |= {sample.name for sample in family.samples}
    docs = Path(__file__).parent.parent / "docs"
    named: dict[str, set[str]] = {}
    for path in (
        docs / "operations.md",
        docs / "prometheus-alerts.yml",
        docs / "grafana-dashboard.json",
    ):
        named[path.name] = set(
            re.findall(r"\b(?:fastworker|process|python)_[a-z_]+\b", path.read_text())
        )
    # The reference table's names are families: a histogram serves _bucket/_sum/_count,
    # a counter _total.
    suffixes = ("", "_bucket", "_sum", "_count", "_total")
    for source, names in named.items():
        missing = {
            name
            for name in names
            if name not in ("process_", "python_")
            and not any(name + suffix in served for suffix in suffixes)
            # `_idx`: an index's name (operations.md's optional index), not a metric.
            and not name.endswith(("_", "_py", "_idx"))
        }
        assert not missing, f"{source} names metrics no worker serves: {sorted(missing)}"
    assert json.loads((docs / "grafana-dashboard.json").read_text())["panels"]
