"""Type stub of the native module `fastworker._core` (Rust, PyO3)."""

from collections.abc import Awaitable
from typing import Any, Literal

JobRowTuple = tuple[
    int,  # id
    str,  # status
    str,  # task_name
    int,  # priority
    str | None,  # lock
    str | None,  # queueing_lock
    str,  # args, JSON text
    int | None,  # scheduled_at, microseconds since the epoch
    str,  # queue_name
    int,  # attempts
    int | None,  # worker_id
]
LogTuple = tuple[int, str, str, int | None]  # level, action, message, job_id
Event = (
    tuple[Literal["jobs"], list[JobRowTuple]]
    | tuple[Literal["abort"], list[int]]
    | tuple[Literal["drained"], None]
    | tuple[Literal["fetching_stopped"], None]
    | tuple[Literal["worker_id"], int]
    | tuple[Literal["claims_lost"], list[tuple[int, int]]]
    | tuple[Literal["log"], LogTuple]
    | tuple[Literal["fatal"], BaseException]
)

class FastworkerError(Exception): ...
class ConfigurationError(FastworkerError): ...
class DatabaseUnreachable(FastworkerError): ...
class SchemaMissing(FastworkerError): ...
class ConnectionLost(FastworkerError): ...
class DatabaseError(FastworkerError): ...
class WorkerShutDown(FastworkerError): ...

class WorkerCore:
    @staticmethod
    def start(
        conninfo: str,
        *,
        queues: list[str] | None = None,
        concurrency: int = 1,
        wait: bool = True,
        fetch_job_polling_interval: float = 5.0,
        abort_job_polling_interval: float = 5.0,
        listen_notify: bool = True,
        update_heartbeat_interval: float = 10.0,
        stalled_worker_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
        max_batch_size: int = 500,
        recover_stalled_jobs: bool = False,
        queue_concurrency: dict[str, int] | None = None,
        response_timeout: float = 30.0,
    ) -> Awaitable[WorkerCore]: ...
    @property
    def worker_id(self) -> int: ...
    @property
    def pruned_workers(self) -> list[int]: ...
    @property
    def recovered_jobs(self) -> list[int]: ...
    def complete_many(
        self,
        finished: list[tuple[int, int, str, bool]],  # job id, attempts, status, delete
        # job id, attempts, retry_at, priority, queue, lock
        retried: list[tuple[int, int, str | None, int | None, str | None, str | None]],
        durations: list[float] | None = None,
    ) -> None: ...
    def metrics(self) -> dict[str, Any]: ...
    def stop_fetching(self) -> None: ...
    def hard_stop(self) -> None: ...
    def next_events(self, max_events: int = 4096) -> Awaitable[list[Event] | None]: ...
    def events_fd(self) -> int | None: ...
    def take_events(self) -> list[Event] | None: ...
    def shutdown(self) -> Awaitable[None]: ...
