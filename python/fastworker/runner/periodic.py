"""Periodic tasks: procrastinate's periodic deferrer, with two changes.

- It never defers a second that the fleet has already passed. procrastinate's
  `procrastinate_defer_periodic_job_v2` deletes the marks (`procrastinate_periodic_defers`)
  of the seconds before the one it defers, so a deferrer that lagged (a stalled process, a
  slow clock) found no mark for the seconds another worker had deferred meanwhile and
  deferred them again. Here the defer is guarded in the same statement: a second at or
  below the newest mark of its task and periodic id (any worker's) is skipped. The jobs,
  marks and events are procrastinate's own: its SQL function makes them.
- It is kept running through a database outage. procrastinate's worker stops when its
  deferrer raises, and a lost connection (a PostgreSQL restart, a failover) makes it
  raise; here the deferrer starts again, with backoff, for as long as `reconnect_timeout`
  allows. Any other failure (arguments that cannot be stored) still stops the worker, as
  in procrastinate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import psycopg
from procrastinate import App, exceptions, jobs, manager, periodic

# procrastinate's worker logger, as its `_periodic_deferrer` is the worker's.
logger = logging.getLogger("procrastinate.worker")

# The backoff of the deferrer's restarts after a lost connection, in seconds.
FIRST_RESTART_DELAY = 0.1
LAST_RESTART_DELAY = 2.0

# procrastinate's `defer_periodic_job` query (procrastinate/sql/queries.sql), called only if
# no mark of this task and periodic id is at or after the second: one statement, so no
# deferrer can stall between the look and the defer. The newest mark is never deleted (the
# function deletes only marks older than the one it inserts), so it always tells how far
# the fleet has gone. Two deferrers of one second are told apart by the marks' unique
# constraint, as in procrastinate. A mark more than a minute ahead of the database's clock
# (a worker whose clock runs ahead) does not count: it would silence the task for as long
# as that clock is ahead, after that worker is gone.
DEFER_PERIODIC_JOB_UNLESS_PASSED = """SELECT CASE
    WHEN EXISTS (
        SELECT 1 FROM procrastinate_periodic_defers
         WHERE task_name = %(task_name)s AND periodic_id = %(periodic_id)s
           AND defer_timestamp >= %(defer_timestamp)s
           AND defer_timestamp <= extract(epoch FROM now())::bigint + 60)
    THEN NULL
    ELSE procrastinate_defer_periodic_job_v2(%(queue)s, %(lock)s, %(queueing_lock)s,
        %(task_name)s, %(priority)s, %(periodic_id)s, %(defer_timestamp)s, %(args)s)
    END AS id"""


async def defer_periodic_job_unless_passed(
    job_manager: manager.JobManager, job: jobs.Job, periodic_id: str, defer_timestamp: int
) -> int | None:
    """procrastinate's `JobManager.defer_periodic_job`, with the query above: the new job's
    id, or None if the second was deferred already (by any worker) or passed."""
    if job.task_kwargs.get("timestamp") != defer_timestamp:
        raise exceptions.InvalidTimestamp
    try:
        result = await job_manager.connector.execute_query_one_async(
            query=DEFER_PERIODIC_JOB_UNLESS_PASSED,
            task_name=job.task_name,
            defer_timestamp=defer_timestamp,
            periodic_id=periodic_id,
            queue=job.queue,
            priority=job.priority,
            lock=job.lock,
            queueing_lock=job.queueing_lock,
            args=job.task_kwargs,
        )
    except exceptions.UniqueViolation as error:
        if error.constraint_name == manager.QUEUEING_LOCK_CONSTRAINT:
            raise exceptions.AlreadyEnqueued(
                "Job cannot be enqueued: there is already a job in the queue "
                f"with the queueing lock {job.queueing_lock}"
            ) from error
        raise
    return result["id"]


class FleetPeriodicDeferrer(periodic.PeriodicDeferrer):
    """procrastinate's `PeriodicDeferrer`, deferring through
    `defer_periodic_job_unless_passed`."""

    async def defer_jobs(self, jobs_to_defer: Iterable[periodic.TaskAtTime]) -> None:
        """procrastinate 3.10's `PeriodicDeferrer.defer_jobs`, step for step (same
        arguments, same log records), but for the defer's query."""
        for periodic_task, timestamp in jobs_to_defer:
            task = periodic_task.task
            periodic_id = periodic_task.periodic_id
            configure_kwargs = periodic_task.configure_kwargs
            task_kwargs = configure_kwargs.get("task_kwargs")
            if task_kwargs is None:
                task_kwargs = {}
                configure_kwargs["task_kwargs"] = task_kwargs
            task_kwargs["timestamp"] = timestamp

            description = {
                "task_name": task.name,
                "periodic_id": periodic_id,
                "defer_timestamp": timestamp,
                "kwargs": configure_kwargs,
            }
            job_deferrer = task.configure(**configure_kwargs)
            job = job_deferrer.job
            try:
                job_id = await defer_periodic_job_unless_passed(
                    job_deferrer.job_manager, job, periodic_id, timestamp
                )
            except exceptions.AlreadyEnqueued:
                periodic.logger.debug(
                    f"Periodic job {job.call_string} cannot be enqueued: there is already "
                    f"a job in the queue with the queueing lock {task.queueing_lock}",
                    extra={
                        "action": "skip_periodic_task_queueing_lock",
                        "queueing_lock": task.queueing_lock,
                        "job": job.log_context(),
                        **description,
                    },
                )
                continue
            else:
                job = job.evolve(id=job_id)

            if job.id:
                periodic.logger.info(
                    f"Periodic job {job.call_string} deferred for timestamp "
                    f"{timestamp} with id {job.id}",
                    extra={
                        "action": "periodic_task_deferred",
                        "job": job.log_context(),
                        **description,
                    },
                )
            else:
                periodic.logger.debug(
                    f"Periodic job {job.call_string} skipped for timestamp "
                    f"{timestamp}: already deferred",
                    extra={
                        "action": "periodic_task_already_deferred",
                        "job": job.log_context(),
                        **description,
                    },
                )


class PeriodicDeferrer:
    """The worker's periodic deferrer: procrastinate's `Worker._periodic_deferrer` with
    `FleetPeriodicDeferrer`, started again after a lost connection (with backoff, for as
    long as ``reconnect_timeout`` allows). Any other failure is raised, and stops the
    worker as in procrastinate."""

    def __init__(
        self,
        app: App,
        *,
        reconnect_timeout: float,
        make_deferrer: Callable[[], periodic.PeriodicDeferrer] | None = None,
    ) -> None:
        self._reconnect_timeout = reconnect_timeout
        self._make_deferrer = make_deferrer or (
            lambda: FleetPeriodicDeferrer(registry=app.periodic_registry, **app.periodic_defaults)
        )

    async def run(self) -> None:
        lost_since: float | None = None
        delay = FIRST_RESTART_DELAY
        while True:
            started = time.monotonic()
            try:
                await self._make_deferrer().worker()
                return
            except exceptions.ConnectorException as error:
                if not isinstance(error.__cause__, psycopg.OperationalError):
                    raise
                now = time.monotonic()
                if lost_since is None or now - started > 2 * delay:
                    # A new outage (the deferrer had been working since the last one).
                    lost_since, delay = now, FIRST_RESTART_DELAY
                if now - lost_since > self._reconnect_timeout:
                    raise
                logger.warning(
                    f"The periodic deferrer lost the database ({error.__cause__}); "
                    f"starting it again in {delay:.1f} s",
                    extra={"action": "periodic_deferrer_restarted"},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LAST_RESTART_DELAY)
