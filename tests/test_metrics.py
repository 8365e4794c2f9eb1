"""The Prometheus endpoint, scraped over HTTP while a real worker drains real jobs."""

from __future__ import annotations

import asyncio
import urllib.request

import procrastinate
from prometheus_client.parser import text_string_to_metric_families

import fastworker


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
