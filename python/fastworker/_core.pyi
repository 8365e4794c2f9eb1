"""Type stub of the native module `fastworker._core` (Rust, PyO3)."""

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias, final

from typing_extensions import Self, disjoint_base

__all__ = [
    "CONNECTION_KEYWORDS",
    "EVENT_KINDS",
    "UNREPRESENTABLE_SCHEDULED_AT",
    "ConfigurationError",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnreachable",
    "Event",
    "FastworkerError",
    "Histogram",
    "Job",
    "Metrics",
    "Outcome",
    "SchemaMissing",
    "WorkerCore",
    "WorkerShutDown",
    "_quiesce_before_exit",
    "probe_connection",
]

@final
class Job:
    """A claimed job, as the core read it (its fields: the core's one column table)."""

    FIELDS: ClassVar[list[str]]
    @property
    def id(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def task_name(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def lock(self) -> str | None: ...
    @property
    def queueing_lock(self) -> str | None: ...
    @property
    def args(self) -> str:
        """JSON text."""
    @property
    def scheduled_at_us(self) -> int | None:
        """Microseconds since the epoch; `UNREPRESENTABLE_SCHEDULED_AT` for a date Python
        cannot represent."""
    @property
    def queue_name(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def worker_id(self) -> int | None: ...

UNREPRESENTABLE_SCHEDULED_AT: int
"""`Job.scheduled_at_us` of a job whose date Python cannot represent (infinity, a year
outside 1-9999): the runner fails that job alone."""

EVENT_KINDS: list[str]
"""The kinds of `Event`, by their class names, as the core declares them."""

@disjoint_base
class Event:
    """What the core hands to the runner: one subclass per kind, for `match`."""

    @final
    class Jobs(Event):
        __match_args__ = ("jobs",)
        def __new__(cls, jobs: list[Job]) -> Self: ...
        @property
        def jobs(self) -> list[Job]: ...

    @final
    class Abort(Event):
        __match_args__ = ("job_ids",)
        def __new__(cls, job_ids: list[int]) -> Self: ...
        @property
        def job_ids(self) -> list[int]: ...

    @final
    class Drained(Event):
        __match_args__ = ()
        def __new__(cls) -> Self: ...

    @final
    class FetchingStopped(Event):
        __match_args__ = ()
        def __new__(cls) -> Self: ...

    @final
    class WorkerId(Event):
        __match_args__ = ("worker_id",)
        def __new__(cls, worker_id: int) -> Self: ...
        @property
        def worker_id(self) -> int: ...

    @final
    class ClaimsLost(Event):
        __match_args__ = ("claims",)
        def __new__(cls, claims: list[tuple[int, int]]) -> Self: ...
        @property
        def claims(self) -> list[tuple[int, int]]: ...

    @final
    class Log(Event):
        __match_args__ = ("level", "action", "message", "job_id")
        def __new__(cls, level: int, action: str, message: str, job_id: int | None) -> Self: ...
        @property
        def level(self) -> int: ...
        @property
        def action(self) -> str: ...
        @property
        def message(self) -> str: ...
        @property
        def job_id(self) -> int | None: ...

    @final
    class Fatal(Event):
        __match_args__ = ("error",)
        def __new__(cls, error: BaseException) -> Self: ...
        @property
        def error(self) -> BaseException: ...

_AnyEvent: TypeAlias = (
    Event.Jobs
    | Event.Abort
    | Event.Drained
    | Event.FetchingStopped
    | Event.WorkerId
    | Event.ClaimsLost
    | Event.Log
    | Event.Fatal
)
"""Any one event: the kinds of `Event` as a closed union, so that a `match` over them can
end in `assert_never` (typing only: not in the module at runtime)."""

@disjoint_base
class Outcome:
    """How one run of a claimed job ended, as the runner reports it (`duration`: seconds
    it ran, for the metrics)."""

    @final
    class Finish(Outcome):
        __match_args__ = ("job_id", "attempts", "status", "delete", "duration")
        def __new__(
            cls,
            job_id: int,
            attempts: int,
            status: str,
            delete: bool = False,
            duration: float = 0.0,
        ) -> Self: ...
        @property
        def job_id(self) -> int: ...
        @property
        def attempts(self) -> int: ...
        @property
        def duration(self) -> float: ...
        @property
        def status(self) -> str: ...
        @property
        def delete(self) -> bool: ...

    @final
    class Retry(Outcome):
        __match_args__ = (
            "job_id",
            "attempts",
            "retry_at",
            "priority",
            "queue",
            "lock",
            "duration",
        )
        def __new__(
            cls,
            job_id: int,
            attempts: int,
            retry_at: str | None = None,
            priority: int | None = None,
            queue: str | None = None,
            lock: str | None = None,
            duration: float = 0.0,
        ) -> Self: ...
        @property
        def job_id(self) -> int: ...
        @property
        def attempts(self) -> int: ...
        @property
        def duration(self) -> float: ...
        @property
        def retry_at(self) -> str | None: ...
        @property
        def priority(self) -> int | None: ...
        @property
        def queue(self) -> str | None: ...
        @property
        def lock(self) -> str | None: ...

@final
class Histogram:
    """`counts[i]` observations at most `bounds[i]` (not cumulative); the last count is
    over every bound (+Inf)."""

    @property
    def bounds(self) -> list[float]: ...
    @property
    def counts(self) -> list[int]: ...
    @property
    def sum(self) -> float: ...
    @property
    def count(self) -> int: ...

@final
class Metrics:
    """The core's metrics at one moment."""

    @property
    def claimed(self) -> list[tuple[str, str, int]]:
        """(task, queue, jobs claimed)"""
    @property
    def outcomes(self) -> list[tuple[str, str, str, int]]:
        """(task, queue, status, outcomes written)"""
    @property
    def job_duration(self) -> list[tuple[str, str, Histogram]]: ...
    @property
    def claim_batch_size(self) -> Histogram: ...
    @property
    def completion_batch_size(self) -> Histogram: ...
    @property
    def claim_to_start(self) -> Histogram: ...
    @property
    def completer_backlog(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def connected(self) -> dict[str, bool]: ...
    @property
    def reconnects(self) -> dict[str, int]: ...
    @property
    def job_wait(self) -> list[tuple[str, Histogram]]:
        """(queue, how long its jobs waited to be claimed)"""
    @property
    def heartbeat_age(self) -> float | None: ...
    @property
    def heartbeats_late(self) -> int:
        """times the heartbeat was found older than stalled_worker_timeout"""
    @property
    def stalled_workers_pruned(self) -> int: ...
    @property
    def stalled_jobs_recovered(self) -> int: ...
    @property
    def stalled_jobs_failed(self) -> int: ...
    @property
    def queue_depth(self) -> list[tuple[str, str, int]]:
        """(queue, status, jobs) as last sampled"""
    @property
    def queue_depth_age(self) -> float | None: ...
    @property
    def queue_due(self) -> list[tuple[str, int, int, float | None]]:
        """(queue, todo jobs due now, scheduled for later, seconds the oldest due job has
        been due) as last sampled"""

class FastworkerError(Exception): ...
class ConfigurationError(FastworkerError): ...
class DatabaseUnreachable(FastworkerError): ...
class SchemaMissing(FastworkerError): ...
class ConnectionLost(FastworkerError): ...
class DatabaseError(FastworkerError): ...
class WorkerShutDown(FastworkerError): ...

@final
class WorkerCore:
    @staticmethod
    def start(options: Mapping[str, Any]) -> Awaitable[WorkerCore]:
        """Connect, prune stalled workers, register, start claiming. `options`: the core's
        options by name (`connection`: libpq's keywords as libpq resolved them, see
        `fastworker.connection`; procrastinate's claiming options, fastworker's own with
        `core=True` in `fastworker.options`), durations in seconds."""
    @property
    def worker_id(self) -> int: ...
    @property
    def pruned_workers(self) -> list[int]: ...
    @property
    def recovered_jobs(self) -> list[int]: ...
    def report(self, outcomes: Sequence[Outcome]) -> None: ...
    def metrics(self) -> Metrics: ...
    def stop_fetching(self) -> None: ...
    def hard_stop(self) -> None: ...
    def next_events(self, max_events: int = 4096) -> Awaitable[list[_AnyEvent] | None]: ...
    def events_fd(self) -> int | None: ...
    def take_events(self) -> list[_AnyEvent] | None: ...
    def shutdown(self) -> Awaitable[None]: ...

def _quiesce_before_exit() -> None: ...

CONNECTION_KEYWORDS: list[str]
"""The libpq keywords the core takes (`WorkerCore.start`'s `connection`)."""

def probe_connection(connection: Mapping[str, str]) -> Awaitable[dict[str, Any]]:
    """Connect once as the core does; `user`, `database`, `server_port` and `ssl`."""
