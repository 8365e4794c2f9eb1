"""The Prometheus endpoint, scraped over HTTP while a real worker drains real jobs."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import procrastinate
import psycopg
from prometheus_client.parser import text_string_to_metric_families

import fastworker
from tests.conftest import fetch_all

# The core's cap on task and queue label values (rust/core/src/metrics.rs).
MAX_LABEL_VALUES = 100


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
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


# --- label values ---------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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
