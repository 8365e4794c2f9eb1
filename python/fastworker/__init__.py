"""fastworker: a Rust-accelerated drop-in worker for procrastinate.

Replace ``await app.run_worker_async(concurrency=50)`` with
``await fastworker.run_async(app, concurrency=50)``.
"""

from fastworker._core import (
    ConfigurationError,
    ConnectionLost,
    DatabaseError,
    DatabaseUnreachable,
    FastworkerError,
    SchemaMissing,
    WorkerShutDown,
)
from fastworker.worker import JobTimeout, Worker, run, run_async

__all__ = [
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnreachable",
    "FastworkerError",
    "JobTimeout",
    "SchemaMissing",
    "Worker",
    "WorkerShutDown",
    "run",
    "run_async",
]
