"""The runner's roles, built in one place (`build_roles`) from a worker's options.

The roles are plain objects, each owning its state and calling only what it is handed:
`ClaimLedger`, `OutcomeSink`, `Lifecycle`, `JobTimeouts`, `JobExecutor` (and, per run,
`EventPump`), `SyncThreads`, `PeriodicDeferrer`, `StopSignals`, `Shutdown`, the core seen
through `CorePort`. fastworker's `Worker` (`fastworker/worker.py`) derives from procrastinate's
and holds them: procrastinate's methods and hooks, which its code, tests and middleware
call, delegate to them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from procrastinate import job_context, tasks

from fastworker.runner.executor import JobExecutor
from fastworker.runner.ledger import ClaimLedger
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink
from fastworker.runner.periodic import PeriodicDeferrer
from fastworker.runner.shutdown import Shutdown
from fastworker.runner.signals import StopSignals
from fastworker.runner.sync_threads import SyncThreads
from fastworker.runner.timeouts import JobTimeouts

if TYPE_CHECKING:
    from fastworker.worker import Worker


class AsyncTasks:
    """Whether a task runs as a coroutine (else in a thread), looked up once per task."""

    def __init__(self) -> None:
        self._by_name: dict[str, bool] = {}

    def __call__(self, task: tasks.Task[Any, Any, Any]) -> bool:
        is_async = self._by_name.get(task.name)
        if is_async is None:
            is_async = self._by_name[task.name] = inspect.iscoroutinefunction(task.func)
        return is_async


@dataclass(frozen=True)
class Roles:
    """The roles one worker holds (one set for all its runs)."""

    #: Every claim handed over, from its hand-over to its outcome (`ledger.py`).
    ledger: ClaimLedger[job_context.JobContext]
    #: Outcomes on their way to the core (`outcome_sink.py`).
    outcome_sink: OutcomeSink
    #: Stops, drains and the core's fatal error (`lifecycle.py`).
    lifecycle: Lifecycle
    #: Starting each job handed over and ending it with one outcome (`executor.py`).
    executor: JobExecutor
    #: The threads sync jobs run in (`sync_threads.py`).
    sync_threads: SyncThreads
    #: The periodic deferrer, a side task of each run (`periodic.py`).
    periodic: PeriodicDeferrer
    #: SIGINT/SIGTERM while a run lasts (`signals.py`).
    signals: StopSignals
    #: The end of each run (`shutdown.py`).
    shutdown: Shutdown
    task_is_async: AsyncTasks


def build_roles(
    worker: Worker,
    *,
    job_ids_to_abort: dict[int, job_context.AbortReason],
    stop_event: asyncio.Event,
    log_extra: Callable[..., dict[str, Any]],
    process_job: Callable[[job_context.JobContext], Coroutine[Any, Any, None]],
    abort_job: Callable[[asyncio.Task[Any], job_context.JobContext, job_context.AbortReason], None],
    abort_running_jobs: Callable[[], Awaitable[None]],
    hard_stop: Callable[[], None],
) -> Roles:
    """The roles of ``worker``, its public options read once; procrastinate's private
    members and hooks are handed in by the worker (``job_ids_to_abort``: the abort reasons
    procrastinate's `_handle_abort_jobs_requested` writes)."""
    task_is_async = AsyncTasks()
    ledger: ClaimLedger[job_context.JobContext] = ClaimLedger(job_ids_to_abort)
    sink = OutcomeSink(
        ledger, delete_jobs=worker.delete_jobs, logger=worker.logger, log_extra=log_extra
    )
    lifecycle = Lifecycle(stop_event)
    executor = JobExecutor(
        process_job=process_job,
        abort_job=abort_job,
        ledger=ledger,
        sink=sink,
        timeouts=JobTimeouts(
            ledger=ledger,
            job_timeout=worker.job_timeout,
            task_timeouts=worker.task_timeouts,
            app=worker.app,
            task_is_async=task_is_async,
            logger=worker.logger,
            log_extra=log_extra,
        ),
        lifecycle=lifecycle,
        task_is_async=task_is_async,
        app=worker.app,
        worker_name=worker.worker_name,
        queues=worker.queues,
        additional_context=worker.additional_context,
        logger=worker.logger,
        log_extra=log_extra,
    )
    return Roles(
        ledger=ledger,
        outcome_sink=sink,
        lifecycle=lifecycle,
        executor=executor,
        sync_threads=SyncThreads(concurrency=worker.concurrency, mode=worker.sync_executor),
        periodic=PeriodicDeferrer(worker.app, reconnect_timeout=worker.reconnect_timeout),
        signals=StopSignals(
            lifecycle,
            stop=lambda: worker.stop(),
            hard_stop=hard_stop,
            logger=worker.logger,
            log_extra=log_extra,
        ),
        shutdown=Shutdown(
            lifecycle=lifecycle,
            sink=sink,
            abort_running_jobs=abort_running_jobs,
            graceful_timeout=worker.shutdown_graceful_timeout,
            queues=worker.queues,
            logger=worker.logger,
            log_extra=log_extra,
        ),
        task_is_async=task_is_async,
    )
