"""OpenTelemetry spans per job (extra ``procrastinate-fastworker[otel]``), following procrastinate
issue #1431: one CONSUMER span per job run, named ``<task name> process``, with the
messaging attributes of OpenTelemetry's semantic conventions.

Enabled with ``Worker(..., opentelemetry=True)`` / ``--opentelemetry``; the spans go to
whatever tracer provider the application configured.
"""

from __future__ import annotations

from typing import Any

from procrastinate import job_context

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "opentelemetry=True needs the opentelemetry-api package: "
        "pip install 'procrastinate-fastworker[otel]'"
    ) from error

_tracer = trace.get_tracer("fastworker")


async def job_span_middleware(call_next: Any, context: job_context.JobContext, worker: Any) -> Any:
    """A procrastinate worker middleware: wraps each job (sync or async) in a span."""
    job = context.job
    attributes: dict[str, Any] = {
        "messaging.system": "procrastinate",
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": str(job.id),
        "procrastinate.task.name": job.task_name,
        "procrastinate.job.attempts": job.attempts,
    }
    if job.lock:
        attributes["procrastinate.job.lock"] = job.lock
    with _tracer.start_as_current_span(
        f"{job.task_name} process",
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            return await call_next()
        except BaseException as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            raise
