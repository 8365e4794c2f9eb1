"""The Python side of fastworker: runs the jobs the Rust core claims.

`Worker` is procrastinate's `Worker` with the fetching, listening, heartbeat and
completion bookkeeping moved into the Rust core (`fastworker._core`). Running a job is
procrastinate's own code path (`_process_job`: context, middleware, retry decision, logs),
so a job ends exactly as it would under procrastinate's worker; only where its outcome is
written changes: it is handed to the core, which writes it in a batch.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from procrastinate import App, exceptions, job_context, jobs, middleware, retry, tasks, utils
from procrastinate import worker as procrastinate_worker

from fastworker import _core
from fastworker import options as fastworker_options
from fastworker.connection import resolve_conninfo

logger = logging.getLogger("procrastinate.worker")
core_logger = logging.getLogger("fastworker.core")

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# The core's `scheduled_at` for a date no datetime can hold (±infinity, a year outside
# 1-9999): such a job fails alone, with this said.
_UNREPRESENTABLE_SCHEDULED_AT = -(2**63)
_INT32 = range(-(2**31), 2**31)
# An outcome as the runner makes them (the core's Outcome has these two kinds).
_Outcome = _core.Outcome.Finish | _core.Outcome.Retry


def _connector_json_loads(connector: Any) -> Callable[[str], Any]:
    """The JSON decoder the app's connector uses for job arguments (procrastinate's
    connectors take a ``json_loads``), else the standard one."""
    loads = getattr(connector, "_json_loads", None) or getattr(connector, "json_loads", None)
    return loads if callable(loads) else json.loads


def _job_from_row(
    row: _core.Job, loads: Callable[[str], Any] = json.loads, *, decode: bool = True
) -> jobs.Job:
    """procrastinate's Job of a claimed row. ``decode=False``: without its arguments and
    date (a row that could not be decoded, with what is safe to show in logs)."""
    task_kwargs: Any = {}
    scheduled_at = None
    if decode:
        scheduled_at_us = row.scheduled_at_us
        if scheduled_at_us == _UNREPRESENTABLE_SCHEDULED_AT:
            raise ValueError(
                "its scheduled_at is a date Python cannot represent (infinity, or a year "
                "outside 1-9999)"
            )
        task_kwargs = loads(row.args)
        if scheduled_at_us is not None:
            scheduled_at = _EPOCH + datetime.timedelta(microseconds=scheduled_at_us)
    return jobs.Job(
        id=row.id,
        status=row.status,
        priority=row.priority,
        lock=row.lock,
        queueing_lock=row.queueing_lock,
        task_name=row.task_name,
        task_kwargs=task_kwargs,
        scheduled_at=scheduled_at,
        queue=row.queue_name,
        attempts=row.attempts,
        worker_id=row.worker_id,
    )


def _claim(job: jobs.Job) -> tuple[int, int]:
    """One claim of a job: its id and the attempts it had when claimed."""
    assert job.id is not None
    return (job.id, job.attempts)


def _retry_decision_problem(decision: retry.RetryDecision) -> str | None:
    """Why the core could not write this retry decision, or None if it can."""
    if decision.priority is not None and (
        not isinstance(decision.priority, int) or decision.priority not in _INT32
    ):
        return f"priority {decision.priority!r} is not a 32-bit integer"
    for name in ("queue", "lock"):
        value = getattr(decision, name)
        if value is not None and not isinstance(value, str):
            return f"{name} {value!r} is not a string"
    if decision.retry_at is not None and not isinstance(decision.retry_at, datetime.datetime):
        return f"retry_at {decision.retry_at!r} is not a datetime"
    return None


def _ran_for(job_result: job_context.JobResult | None) -> float:
    if job_result is None or job_result.end_timestamp is None:
        return 0.0
    return max(0.0, job_result.end_timestamp - job_result.start_timestamp)


class JobTimeout(Exception):
    """A job ran longer than its ``job_timeout`` / ``task_timeouts`` entry."""


class Worker(procrastinate_worker.Worker):
    """Drop-in replacement for `procrastinate.worker.Worker`.

    Takes the same arguments (procrastinate's ``WorkerOptions``) plus fastworker's own,
    declared (default, check, help, CLI flag, environment variable) in
    `fastworker.options.OPTIONS`, listed in the README. A sync job cannot be interrupted by
    ``job_timeout``: it sees ``context.should_abort()`` and, if it raises ``JobAborted``,
    ends the same way.
    """

    def __init__(
        self,
        app: App,
        *args: Any,
        dsn: str | None = None,
        reconnect_timeout: float = 60.0,
        response_timeout: float = 30.0,
        max_batch_size: int = 500,
        recover_stalled_jobs: bool = False,
        queue_concurrency: Mapping[str, int] | None = None,
        job_timeout: float | None = None,
        task_timeouts: Mapping[str, float] | None = None,
        metrics_port: int | None = None,
        metrics_address: str = "0.0.0.0",
        opentelemetry: bool = False,
        max_jobs: int | None = None,
        **options: Any,
    ):
        # procrastinate's options, positional (in its order) or by keyword.
        super().__init__(app, *args, **options)
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        # fastworker's own, checked as `fastworker.options` declares them.
        own = fastworker_options.checked(
            {
                "dsn": dsn,
                "reconnect_timeout": reconnect_timeout,
                "response_timeout": response_timeout,
                "max_batch_size": max_batch_size,
                "recover_stalled_jobs": recover_stalled_jobs,
                "queue_concurrency": queue_concurrency,
                "max_jobs": max_jobs,
                "job_timeout": job_timeout,
                "task_timeouts": task_timeouts,
                "metrics_port": metrics_port,
                "metrics_address": metrics_address,
                "opentelemetry": opentelemetry,
            }
        )
        self._dsn: str | None = own["dsn"]
        self.reconnect_timeout: float = own["reconnect_timeout"]
        self.response_timeout: float = own["response_timeout"]
        self.max_batch_size: int = own["max_batch_size"]
        self.recover_stalled_jobs: bool = own["recover_stalled_jobs"]
        self.queue_concurrency: dict[str, int] = own["queue_concurrency"]
        self.max_jobs: int | None = own["max_jobs"]
        self.job_timeout: float | None = own["job_timeout"]
        self.task_timeouts: dict[str, float] = own["task_timeouts"]
        self._timed_out: set[int] = set()
        self.metrics_port: int | None = own["metrics_port"]
        self.metrics_address: str = own["metrics_address"]
        self.metrics_server: Any = None
        self.opentelemetry: bool = own["opentelemetry"]
        if opentelemetry:
            from fastworker.otel import job_span_middleware

            self.worker_middleware = [job_span_middleware, *self.worker_middleware]
        if metrics_port is not None:
            # Fail now, not at start, when the extra is missing.
            from fastworker import metrics  # noqa: F401
        if recover_stalled_jobs and self.update_heartbeat_interval >= self.stalled_worker_timeout:
            # Live workers would look stalled between two heartbeats: their running jobs
            # would be put back to run elsewhere, i.e. run twice.
            logger.warning(
                f"recover_stalled_jobs with update_heartbeat_interval "
                f"({self.update_heartbeat_interval} s) >= stalled_worker_timeout "
                f"({self.stalled_worker_timeout} s): live workers will look stalled",
                extra={"action": "stalled_worker_timeout_too_short"},
            )
        self._core: _core.WorkerCore | None = None
        self._async_tasks: dict[str, bool] = {}
        self._json_loads: Callable[[str], Any] = json.loads
        # Outcomes waiting for `_flush_outcomes` (see `_report_outcome`).
        self._outcomes: list[_Outcome] = []
        # Jobs handed over whose outcome is not reported yet (see `_on_job_done`).
        # By claim (job id, attempts): a job recovered elsewhere and claimed here again may
        # run here twice at once, under its old claim and its new one.
        self._awaiting_outcome: dict[tuple[int, int], job_context.JobContext] = {}
        # Jobs whose `_process_job` has begun: only those may be cancelled (see `_abort_job`).
        self._started: set[tuple[int, int]] = set()
        # Claims (job id, attempts) that are no longer this worker's (see _stop_lost_claims).
        self._lost_claims: set[tuple[int, int]] = set()
        self._flush_scheduled = False
        self._hard_stop = asyncio.Event()
        self._fetching_stopped: asyncio.Future[None] | None = None
        self._fatal_error: BaseException | None = None
        self._drained = False
        self._signals_received = 0

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming jobs at once; running jobs finish and their results are written.
        Safe to call from another thread."""
        core = self._core
        if core is not None:
            core.stop_fetching()
        super().stop()

    def _request_hard_stop(self) -> None:
        core = self._core
        if core is not None:
            # Also ends, at once, the core's attempts to reach an unreachable database.
            core.hard_stop()
        if self._loop is not None and self._loop is not _running_loop():
            self._loop.call_soon_threadsafe(self._hard_stop.set)
        else:
            self._hard_stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals_received += 1
        if self._signals_received == 1:
            self.stop()
        else:
            self.logger.info(
                "Second stop signal: aborting running jobs",
                extra=self._log_extra(action="abort_running_jobs", context=None, job_result=None),
            )
            self._request_hard_stop()

    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        # Logged on procrastinate's signals logger, with its actions, as its worker does.
        signals_logger = logging.getLogger("procrastinate.signals")
        if threading.current_thread() is not threading.main_thread():
            signals_logger.warning(
                "Skipping signal handling, because this is not the main thread",
                extra={"action": "skip_signal_handlers"},
            )
            return []
        signals_logger.debug(
            "Installing signal handler", extra={"action": "install_signal_handlers"}
        )
        loop = asyncio.get_running_loop()
        previous: list[tuple[int, Any]] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous.append((signum, signal.getsignal(signum)))
            loop.add_signal_handler(signum, self._on_signal, signum)
        return previous

    def _uninstall_signal_handlers(self, previous: list[tuple[int, Any]]) -> None:
        logging.getLogger("procrastinate.signals").debug(
            "Resetting previous signal handler", extra={"action": "uninstall_signal_handlers"}
        )
        loop = asyncio.get_running_loop()
        for signum, handler in previous:
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)

    # --- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped (or, with ``wait=False``, until the queues are empty)."""
        self._stop_event.clear()
        self._hard_stop.clear()
        self._fatal_error = None
        self._drained = False
        self._signals_received = 0
        self._loop = asyncio.get_running_loop()
        self.run_task = asyncio.current_task()
        # Signal handlers first, so a signal during start-up already stops cleanly.
        previous_handlers = self._install_signal_handlers() if self.install_signal_handlers else []
        try:
            loop_task = asyncio.create_task(self._start_and_run(), name="worker loop")
            try:
                await asyncio.shield(loop_task)
            except asyncio.CancelledError:
                # First cancel: graceful stop. Another cancel while stopping: hard stop.
                self.stop()
                while not loop_task.done():
                    try:
                        await asyncio.shield(loop_task)
                    except asyncio.CancelledError:
                        self._request_hard_stop()
                raise
        finally:
            if previous_handlers:
                self._uninstall_signal_handlers(previous_handlers)
            self._loop = None

    def _core_options(self, conninfo: str) -> dict[str, Any]:
        """The options the core takes (its `WorkerConfig`), by name."""
        core_options: dict[str, Any] = {"conninfo": conninfo}
        for name in fastworker_options.PROCRASTINATE_CORE_OPTIONS:
            core_options[name] = getattr(self, name)
        for option in fastworker_options.OPTIONS:
            if option.core:
                core_options[option.name] = getattr(self, option.name)
        if self.queues is not None:
            core_options["queues"] = list(self.queues)
        return core_options

    async def _start_and_run(self) -> None:
        self._json_loads = _connector_json_loads(self.app.connector)
        conninfo = await resolve_conninfo(self.app, self._dsn)
        core = await _core.WorkerCore.start(self._core_options(conninfo))
        self._core = core
        self.worker_id = core.worker_id
        if core.pruned_workers:
            logger.debug(f"Pruned stalled workers: {', '.join(map(str, core.pruned_workers))}")
        if core.recovered_jobs:
            logger.debug(f"Recovered stalled jobs: {', '.join(map(str, core.recovered_jobs))}")
        logger.debug(f"Registered worker {self.worker_id} in the database")
        if self._stop_event.is_set():
            core.stop_fetching()
        if self.metrics_port is not None:
            self._start_metrics_server()
        try:
            await self._run_loop()
        finally:
            self._core = None
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics_server = None
        if self._fatal_error is not None:
            raise self._fatal_error

    def _start_metrics_server(self) -> None:
        from fastworker.metrics import CoreCollector, MetricsServer

        assert self.metrics_port is not None
        collector = CoreCollector(lambda: self._core, lambda: len(self._running_jobs))
        self.metrics_server = MetricsServer(self.metrics_port, self.metrics_address, collector)
        logger.info(
            f"Serving metrics on {self.metrics_address}:{self.metrics_server.port}/metrics",
            extra={"action": "metrics_server_started", "port": self.metrics_server.port},
        )

    async def _run_loop(self) -> None:
        self.logger.info(
            f"Starting worker on {utils.queues_display(self.queues)}",
            extra=self._log_extra(
                action="start_worker", context=None, queues=self.queues, job_result=None
            ),
        )
        self._running_jobs = {}
        self._fetching_stopped = asyncio.get_running_loop().create_future()
        side_tasks = [asyncio.create_task(self._periodic_deferrer(), name="deferrer")]
        side_tasks_monitor = asyncio.create_task(
            self._monitor_side_tasks(side_tasks), name="side_tasks_monitor"
        )
        events_task = asyncio.create_task(self._consume_events(), name="core events")
        try:
            await utils.wait_any(self._stop_event.wait(), asyncio.shield(events_task))
            if self._drained:
                self.logger.info(
                    "No job found. Stopping worker because wait=False",
                    extra=self._log_extra(
                        context=None, action="stop_worker", queues=self.queues, job_result=None
                    ),
                )
        finally:
            if not side_tasks_monitor.done():
                side_tasks_monitor.cancel()
            await self._shutdown_all(side_tasks, events_task)

    async def _consume_events(self) -> None:
        core = self._core
        assert core is not None
        loop = asyncio.get_running_loop()
        fd = core.events_fd()
        if fd is not None:
            try:
                await self._consume_events_on_wakeups(core, loop, fd)
                return
            except NotImplementedError:
                pass  # an event loop without add_reader (Windows' proactor)
        while True:
            events = await core.next_events()
            if events is None:
                self._mark_fetching_stopped()
                return
            self._handle_events(events)

    async def _consume_events_on_wakeups(
        self, core: _core.WorkerCore, loop: asyncio.AbstractEventLoop, fd: int
    ) -> None:
        """Take the core's events when its descriptor turns readable: the core writes a byte
        from its own thread, and the jobs start in this very loop iteration (no future to
        resolve from another thread, no GIL hand-over in between)."""
        ended: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if ended.done():
                return
            try:
                events = core.take_events()
                if events is None:
                    ended.set_result(None)
                else:
                    self._handle_events(events)
            except BaseException as error:  # surfaces in the awaiting task
                ended.set_exception(error)

        loop.add_reader(fd, on_readable)
        try:
            await ended
        finally:
            loop.remove_reader(fd)
        self._mark_fetching_stopped()

    def _handle_events(self, events: list[_core.Event]) -> None:
        for event in events:
            match event:
                case _core.Event.Jobs(jobs=claimed):
                    for row in claimed:
                        self._start_job(row)
                case _core.Event.Abort(job_ids=job_ids):
                    self._handle_abort_jobs_requested(job_ids)
                case _core.Event.Log(level=level, action=action, message=message, job_id=job_id):
                    core_logger.log(level, message, extra={"action": action, "job_id": job_id})
                case _core.Event.Drained():
                    self._drained = True
                    self._stop_event.set()
                case _core.Event.FetchingStopped():
                    self._mark_fetching_stopped()
                case _core.Event.WorkerId(worker_id=worker_id):
                    self.worker_id = worker_id
                case _core.Event.ClaimsLost(claims=claims):
                    self._stop_lost_claims(claims)
                case _core.Event.Fatal(error=error):
                    self._on_core_failed(error)

    def _on_core_failed(self, error: BaseException) -> None:
        if self._fatal_error is None:
            self._fatal_error = error
        self.logger.error(
            f"Worker core failed: {error}",
            extra=self._log_extra(
                action="core_failed", context=None, job_result=None, exception=str(error)
            ),
        )
        self._stop_event.set()

    def _mark_fetching_stopped(self) -> None:
        if self._fetching_stopped is not None and not self._fetching_stopped.done():
            self._fetching_stopped.set_result(None)

    def _start_job(self, row: _core.Job) -> None:
        """Start one claimed job. Whatever happens, it gets exactly one outcome: a row that
        cannot be decoded (arguments the connector's JSON decoder rejects, a date Python
        cannot hold) fails that job alone, with the reason logged."""
        try:
            job = _job_from_row(row, self._json_loads)
        except Exception as error:  # RecursionError, OverflowError, ValueError, ...
            self._fail_undecodable(_job_from_row(row, decode=False), error)
            return
        job_id = job.id
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context=self.additional_context.copy() if self.additional_context else {},
            job=job,
            abort_reason=lambda: self._abort_reason(job),
            start_timestamp=time.time(),
        )
        if not isinstance(job.task_kwargs, dict):
            self._refuse_job(context)
            return
        assert job_id is not None
        self._awaiting_outcome[(job_id, job.attempts)] = context
        job_task = asyncio.create_task(
            self._process_job(context), name=f"process job {job.task_name}[{job.id}]"
        )
        self._running_jobs[job_task] = context
        job_task.add_done_callback(self._on_job_done)
        timeout = self.task_timeouts.get(job.task_name, self.job_timeout)
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                timeout, self._time_out_job, job_task, context, timeout
            )
            job_task.add_done_callback(lambda _: timer.cancel())
        if self._hard_stop.is_set():
            # Claimed by a request that was in flight when the hard stop came.
            self._abort_job(job_task, context, job_context.AbortReason.SHUTDOWN)

    def _abort_reason(self, job: jobs.Job) -> job_context.AbortReason | None:
        if job.id is None:
            return None
        reason = self._job_ids_to_abort.get(job.id)
        if reason is None and (job.id, job.attempts) in self._lost_claims:
            return job_context.AbortReason.USER_REQUEST
        return reason

    def _stop_lost_claims(self, claims: list[tuple[int, int]]) -> None:
        """These runs' claims are no longer this worker's (the job was recovered by another
        worker after this one was pruned, and may run there): stop them, as an abort would.
        Their ends are still reported, and found no longer current. By claim, not by job:
        the job may run here under a new claim too."""
        lost = set(claims)
        self._lost_claims |= lost
        for job_task, context in list(self._running_jobs.items()):
            job = context.job
            if (job.id, job.attempts) not in lost:
                continue
            self.logger.warning(
                f"Job {job.call_string}: its claim is no longer this worker's; stopping it",
                extra=self._log_extra(action="claim_lost", context=context, job_result=None),
            )
            task = self.app.tasks.get(job.task_name)
            if task is not None and self._task_is_async(task) and _claim(job) in self._started:
                job_task.cancel()
            # Otherwise: a sync job sees context.should_abort(); an async one that has not
            # started is cancelled at its first step (`_process_job`).

    def _fail_undecodable(self, job: jobs.Job, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:300]
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context={},
            job=job,
            abort_reason=lambda: None,
            start_timestamp=time.time(),
        )
        self.logger.error(
            f"Job {job.task_name}[{job.id}] failed: its row cannot be decoded ({reason})",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception=reason
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._report_outcome(job, jobs.Status.FAILED, None, context, result)

    def _refuse_job(self, context: job_context.JobContext) -> None:
        """A job whose args are not a JSON object (``null``, a list, a string ...) cannot be
        called with keyword arguments, and procrastinate's own job logging
        (``Job.call_string``) fails on it, so `_process_job` would end without writing
        anything and the job would stay ``doing``. It fails at once instead, reason logged."""
        job = context.job
        found = json.dumps(job.task_kwargs)[:100]
        context = context.evolve(job=job.evolve(task_kwargs={}))
        self.logger.error(
            f"Job {job.task_name}[{job.id}] failed: its args must be a JSON object, got {found}",
            extra=self._log_extra(
                action="job_error", context=context, job_result=None, exception="invalid args"
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._report_outcome(context.job, jobs.Status.FAILED, None, context, result)

    def _on_job_done(self, task: asyncio.Task[Any]) -> None:
        context = self._running_jobs.pop(task, None)
        if context is None:
            return
        self._started.discard(_claim(context.job))
        if _claim(context.job) not in self._awaiting_outcome:
            return
        # The task ended without reporting an outcome: it was cancelled before its first
        # step (`_abort_job` defers such cancels, but anyone may cancel a task). Its job
        # still gets one, so that it leaves `doing` and frees its slot.
        job = context.job
        self.logger.warning(
            f"Job {job.call_string} was cancelled before it started: ending it aborted",
            extra=self._log_extra(
                action="job_cancelled_before_start", context=context, job_result=None
            ),
        )
        now = time.time()
        result = job_context.JobResult(start_timestamp=now, end_timestamp=now)
        self._report_outcome(job, jobs.Status.ABORTED, None, context, result)

    def _abort_job(
        self,
        process_job_task: asyncio.Task[Any],
        context: job_context.JobContext,
        reason: job_context.AbortReason,
    ) -> None:
        """procrastinate's `_abort_job`, except for a job whose task has not taken its first
        step yet (an abort in the same batch of events as the job, or a hard stop already
        set when a claim lands): cancelling it then would end it before `_process_job`'s
        first line, with no outcome. Its abort reason is set, and `_process_job` raises the
        cancellation itself as it starts."""
        if _claim(context.job) in self._started or process_job_task.done():
            super()._abort_job(process_job_task, context, reason)
            return
        assert context.job.id
        self._job_ids_to_abort[context.job.id] = reason
        self.logger.debug(
            "Received a request to abort a job that has not started yet: it ends at its first step",
            extra=self._log_extra(action="abort_job", context=context, job_result=None),
        )

    def _time_out_job(
        self, job_task: asyncio.Task[Any], context: job_context.JobContext, timeout: float
    ) -> None:
        """Cancel a job over its timeout, through the same path as an abort."""
        job = context.job
        if job_task.done() or job.id is None:
            return
        self._timed_out.add(job.id)
        task = self.app.tasks.get(job.task_name)
        is_async = task is not None and self._task_is_async(task)
        self.logger.warning(
            f"Job {job.call_string} exceeded its timeout of {timeout} s: "
            + ("cancelling it" if is_async else "asking it to abort (sync job)"),
            extra=self._log_extra(
                action="job_timeout", context=context, job_result=None, timeout=timeout
            ),
        )
        if is_async:
            job_task.cancel()
        else:
            # A thread cannot be interrupted: the job sees context.should_abort().
            self._job_ids_to_abort.setdefault(job.id, job_context.AbortReason.USER_REQUEST)

    def _task_is_async(self, task: tasks.Task[Any, Any, Any]) -> bool:
        is_async = self._async_tasks.get(task.name)
        if is_async is None:
            is_async = self._async_tasks[task.name] = inspect.iscoroutinefunction(task.func)
        return is_async

    async def _process_job(self, context: job_context.JobContext) -> None:
        """Run one job and hand its outcome to the core.

        procrastinate's `Worker._process_job`, step for step (same exceptions caught, same
        retry decision, same status, same log records), with two differences that change
        nothing observable: log records' `extra` dicts are only built when the record will
        be emitted, and the outcome is handed to the core synchronously (it never blocks)
        instead of through a shielded task.
        """
        job = context.job
        task = self.app.tasks.get(job.task_name)
        job_retry = None
        exc_info: bool | BaseException = False
        retry_decision = None
        job_result = job_context.JobResult(start_timestamp=context.start_timestamp)
        if job.id is not None:
            self._started.add(_claim(job))
        try:
            if task is not None and job.id in self._job_ids_to_abort and self._task_is_async(task):
                # Aborted before it started (see `_abort_job`): cancelled at its first
                # step, as the cancel would have done.
                raise asyncio.CancelledError()
            if not task:
                raise exceptions.TaskNotFound
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(
                    f"Loaded job info, about to start job {job.call_string}",
                    extra=self._log_extra(
                        context=context, action="loaded_job_info", job_result=job_result
                    ),
                )
            if self.logger.isEnabledFor(logging.INFO):
                self.logger.info(
                    f"Starting job {job.call_string}",
                    extra=self._log_extra(
                        context=context, action="start_job", job_result=job_result
                    ),
                )
            job_args = [context] if task.pass_context else []
            task_is_async = self._task_is_async(task)

            async def run_job() -> Any:
                middlewares = self._resolve_task_middlewares(task, task_is_async)
                if task_is_async:

                    async def run_async_task() -> Any:
                        return await task(*job_args, **job.task_kwargs)

                    task_result = await middleware.compose(
                        middlewares, run_async_task, context, self
                    )()
                else:

                    def run_sync_task() -> Any:
                        return task(*job_args, **job.task_kwargs)

                    task_result = await utils.sync_to_async(
                        middleware.compose(middlewares, run_sync_task, context, self)
                    )
                # A sync function may return an awaitable: run it (procrastinate does).
                if inspect.isawaitable(task_result):
                    task_result = await task_result
                return task_result

            if self.worker_middleware:
                job_result.result = await middleware.compose(
                    self.worker_middleware, run_job, context, self
                )()
            else:
                job_result.result = await run_job()
        except BaseException as raised:
            e = raised
            if job.id in self._timed_out and isinstance(
                e, (asyncio.CancelledError, exceptions.JobAborted)
            ):
                # Over its timeout: a failure (retried if the strategy says so), not an abort.
                e = JobTimeout(f"Job exceeded its timeout ({job.call_string})")
                e.__cause__ = raised
            exc_info = e
            # An aborted job can be retried if the abort comes from a shutdown.
            if not isinstance(e, exceptions.JobAborted) or (
                context.abort_reason() == job_context.AbortReason.SHUTDOWN
            ):
                job_retry = task.get_retry_exception(exception=e, job=job) if task else None
                retry_decision = job_retry.retry_decision if job_retry else None
                if isinstance(e, exceptions.TaskNotFound):
                    self.logger.exception(
                        "Task was not found",
                        extra=self._log_extra(
                            context=context,
                            action="task_not_found",
                            exception=str(e),
                            job_result=job_result,
                        ),
                    )
        finally:
            job_result.end_timestamp = time.time()
            if isinstance(exc_info, (exceptions.JobAborted, asyncio.CancelledError)):
                status = jobs.Status.ABORTED
            elif exc_info:
                status = jobs.Status.FAILED
            else:
                status = jobs.Status.SUCCEEDED
            outcome_level = (
                logging.ERROR if status == jobs.Status.FAILED and not job_retry else logging.INFO
            )
            if procrastinate_worker.logger.isEnabledFor(outcome_level):
                self._log_job_outcome(
                    status=status,
                    context=context,
                    job_result=job_result,
                    job_retry=job_retry,
                    exc_info=exc_info,
                )
            if job.id is not None:
                self._timed_out.discard(job.id)
            self._report_outcome(job, status, retry_decision, context, job_result)

    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        # procrastinate's hook, kept for code that calls or overrides it.
        self._report_outcome(job, status, retry_decision, context, job_result)

    def _report_outcome(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        # Collected and handed to the core once per event-loop iteration (see
        # `_flush_outcomes`), so outcomes of jobs ending together go out in one batch.
        assert job.id is not None
        claim = _claim(job)
        self._lost_claims.discard(claim)
        if self._awaiting_outcome.pop(claim, None) is None and claim in self._started:
            # Reported already (a middleware or an override calling this twice): the
            # first outcome stands, as the database would refuse a second one anyway.
            return
        problem = _retry_decision_problem(retry_decision) if retry_decision else None
        if problem is not None:
            self.logger.error(
                f"Job {job.call_string} cannot be retried as its retry strategy decided "
                f"({problem}): it fails instead",
                extra=self._log_extra(
                    action="job_error", context=context, job_result=job_result, exception=problem
                ),
            )
            retry_decision, status = None, jobs.Status.FAILED
        if retry_decision:
            # As procrastinate's JobManager.retry_job: no retry_at means now.
            retry_at = retry_decision.retry_at or utils.utcnow()
            self._outcomes.append(
                _core.Outcome.Retry(
                    job.id,
                    job.attempts,
                    retry_at=retry_at.isoformat(),
                    priority=retry_decision.priority,
                    queue=retry_decision.queue,
                    lock=retry_decision.lock,
                    duration=_ran_for(job_result),
                )
            )
        else:
            delete_job = {
                jobs.DeleteJobCondition.ALWAYS: True,
                jobs.DeleteJobCondition.NEVER: False,
                jobs.DeleteJobCondition.SUCCESSFUL: status == jobs.Status.SUCCEEDED,
            }[self.delete_jobs]
            self._outcomes.append(
                _core.Outcome.Finish(
                    job.id,
                    job.attempts,
                    status.value,
                    delete=delete_job,
                    duration=_ran_for(job_result),
                )
            )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_outcomes)
        self._job_ids_to_abort.pop(job.id, None)
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(
                f"Acknowledged job completion {job.call_string}",
                extra=self._log_extra(
                    action="finish_task", context=context, status=status, job_result=job_result
                ),
            )

    def _flush_outcomes(self) -> None:
        self._flush_scheduled = False
        if not self._outcomes:
            return
        outcomes, self._outcomes = self._outcomes, []
        core = self._core
        try:
            if core is None:
                raise _core.WorkerShutDown("the worker core is shut down")
            try:
                core.report(outcomes)
            except (TypeError, ValueError, OverflowError):
                # One outcome the core cannot take must not cost the others theirs.
                self._report_one_by_one(core, outcomes)
        except _core.WorkerShutDown:
            # The core is shut down (run() is over): nothing can write these outcomes any
            # more; the jobs stay `doing`, like a killed worker's, for stalled-job recovery.
            job_ids = [outcome.job_id for outcome in outcomes]
            self.logger.error(
                f"Could not record the end of jobs {job_ids}: the worker core has stopped;"
                " they stay in doing",
                extra=self._log_extra(
                    action="finish_task_failed", context=None, job_result=None, job_ids=job_ids
                ),
            )

    def _report_one_by_one(self, core: _core.WorkerCore, outcomes: list[_Outcome]) -> None:
        for outcome in outcomes:
            try:
                core.report([outcome])
            except (TypeError, ValueError, OverflowError) as error:
                job_id = outcome.job_id
                self.logger.error(
                    f"The outcome of job {job_id} could not be handed to the core ({error}):"
                    " it fails instead",
                    extra=self._log_extra(
                        action="finish_task_failed",
                        context=None,
                        job_result=None,
                        job_id=job_id,
                        exception=str(error),
                    ),
                )
                core.report(
                    [_core.Outcome.Finish(job_id, outcome.attempts, jobs.Status.FAILED.value)]
                )

    # --- shutting down --------------------------------------------------------------

    async def _shutdown_all(
        self, side_tasks: list[asyncio.Task[Any]], events_task: asyncio.Task[None]
    ) -> None:
        core = self._core
        assert core is not None and self._fetching_stopped is not None
        core.stop_fetching()
        await utils.cancel_and_capture_errors(side_tasks)
        # A claim in flight when the stop came still hands its jobs over: they run too.
        await asyncio.wait(
            [self._fetching_stopped, events_task], return_when=asyncio.FIRST_COMPLETED
        )

        now = time.time()
        for context in self._running_jobs.values():
            duration = now - context.start_timestamp
            self.logger.info(
                f"Waiting for job to finish: worker: {context.job.call_string} "
                f"(started {duration:.3f} s ago)",
                extra=self._log_extra(context=None, action="ending_job", job_result=None),
            )

        if self._running_jobs and not self._hard_stop.is_set():
            hard_stop = asyncio.create_task(self._hard_stop.wait())
            await self._wait_running_jobs(hard_stop)
            hard_stop.cancel()

        if self._running_jobs:
            self.logger.info(
                f"{len(self._running_jobs)} jobs still running after graceful timeout. "
                "Aborting them",
                extra=self._log_extra(
                    action="stop_worker", queues=self.queues, context=None, job_result=None
                ),
            )
            await self._abort_running_jobs()

        self._flush_outcomes()
        try:
            await core.shutdown()
        finally:
            # The event stream ends once the core is shut down; drain its last logs.
            await events_task
        logger.debug(f"Unregistered finished worker {self.worker_id} from the database")
        self.worker_id = None
        self.logger.info(
            f"Stopped worker on {utils.queues_display(self.queues)}",
            extra=self._log_extra(
                action="stop_worker", queues=self.queues, context=None, job_result=None
            ),
        )

    async def _wait_running_jobs(self, hard_stop: asyncio.Task[Any]) -> None:
        """Wait for the running jobs, until the graceful timeout or a hard stop."""
        deadline = (
            None
            if self.shutdown_graceful_timeout is None
            else time.monotonic() + self.shutdown_graceful_timeout
        )
        while self._running_jobs and not hard_stop.done():
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if timeout == 0.0:
                return
            await asyncio.wait(
                [*self._running_jobs, hard_stop],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def run_async(app: App, **options: Any) -> None:
    """Run a fastworker worker for ``app``: ``await app.run_worker_async(...)``, faster.

    Takes procrastinate's ``WorkerOptions`` (merged over ``app.worker_defaults``, as
    procrastinate does) and fastworker's own (``dsn``, ``reconnect_timeout``,
    ``max_batch_size``, ``recover_stalled_jobs``). The app must be open.
    """
    app.perform_import_paths()
    worker = Worker(app=app, **{**app.worker_defaults, **options})
    await worker.run()


def run(app: App, **options: Any) -> None:
    """Blocking form of `run_async`: opens the app, runs the worker, closes the app."""

    async def main() -> None:
        async with app.open_async():
            await run_async(app, **options)

    asyncio.run(main())
