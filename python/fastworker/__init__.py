"""fastworker: a Rust-accelerated drop-in worker for procrastinate.

Replace ``await app.run_worker_async(concurrency=50)`` with
``await fastworker.run_async(app, concurrency=50)``.
"""

from procrastinate import exceptions as _procrastinate_exceptions

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

# Drop-in: code written for procrastinate's worker catches its ConnectorException (a
# ProcrastinateException) around `run_worker_async`; fastworker's database errors are one too.
for _error in (DatabaseUnreachable, SchemaMissing, ConnectionLost, DatabaseError):
    _error.__bases__ = (FastworkerError, _procrastinate_exceptions.ConnectorException)
del _error

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
