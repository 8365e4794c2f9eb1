"""OpenTelemetry spans per job, recorded by the real SDK."""

from __future__ import annotations

import procrastinate
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import fastworker

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    # The global provider can be set once per process; spans are cleared per test.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


async def test_one_span_per_job_with_messaging_attributes(app: procrastinate.App) -> None:
    EXPORTER.clear()

    @app.task(name="fine", queue="mail")
    async def fine() -> None:
        return None

    @app.task(name="broken")
    def broken() -> None:
        raise RuntimeError("nope")

    fine_id = await fine.defer_async()
    broken_id = await broken.defer_async()
    await fastworker.run_async(
        app, opentelemetry=True, concurrency=2, wait=False, install_signal_handlers=False
    )
    spans = {span.name: span for span in EXPORTER.get_finished_spans()}
    assert set(spans) == {"fine process", "broken process"}
    ok = spans["fine process"]
    assert ok.kind == SpanKind.CONSUMER
    assert ok.attributes is not None
    assert ok.attributes["messaging.system"] == "procrastinate"
    assert ok.attributes["messaging.destination.name"] == "mail"
    assert ok.attributes["messaging.message.id"] == str(fine_id)
    assert ok.status.status_code == StatusCode.UNSET
    failed = spans["broken process"]
    assert failed.attributes is not None
    assert failed.attributes["messaging.message.id"] == str(broken_id)
    assert failed.status.status_code == StatusCode.ERROR
    assert any(event.name == "exception" for event in failed.events)
