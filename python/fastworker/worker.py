"""fastworker's `Worker`: procrastinate's `Worker` with the fetching, listening, heartbeat
and completion bookkeeping moved into the Rust core (`fastworker._core`).

Running a job is procrastinate's own code path (`_process_job`: context, middleware,
retry decision, logs), so a job ends exactly as it would under procrastinate's worker;
only where its outcome is written changes: it is handed to the core, which writes it in a
batch. This file is the facade: options, start and the main loop. The roles it is built
from are plain objects in `fastworker/runner/`, each owning its state:

- `ledger.py`: `ClaimLedger`, each claim from its hand-over to its one outcome;
- `outcome_sink.py`: `OutcomeSink`, outcome batching to the core;
- `lifecycle.py`: `Lifecycle`, graceful and hard stops, drains, the core's fatal error;
- `executor.py`: `JobExecutor`, starting each job handed over (`intake.py` decodes rows);
- `sync_threads.py`: `SyncThreads`, the pool of threads sync jobs run in;
- `timeouts.py`: `JobTimeouts`;
- `events.py`: `EventPump`, the core's events to the roles they are for;
- `periodic.py`: `PeriodicDeferrer`, procrastinate's periodic deferrer, kept running
  through an outage;
- `signals.py`: `StopSignals`, SIGINT/SIGTERM while a run lasts;
- `shutdown.py`: `Shutdown`, the end of a run, up to the final write;
- `core_port.py`: `CorePort`, what the roles ask of the core;
- `roles.py`: `build_roles`, where they are built.

`Worker` derives from procrastinate's `Worker` alone and holds the roles (`_roles`);
procrastinate's methods and the hooks its code, tests and middleware call delegate to them,
but for `_process_job`, a copy of procrastinate 3.10's kept step for step.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from procrastinate import App, exceptions, job_context, jobs, middleware, retry, utils
from procrastinate import worker as procrastinate_worker

from fastworker import _core, app_names, compat
from fastworker import options as fastworker_options
from fastworker.connection import ConnectionParams, params_from_dsn, resolve_connection
from fastworker.runner.core_port import CorePort
from fastworker.runner.events import EventHandlers, EventPump
from fastworker.runner.intake import connector_json_loads
from fastworker.runner.ledger import claim_of
from fastworker.runner.roles import Roles, build_roles
from fastworker.runner.timeouts import JobTimeout

logger = logging.getLogger("procrastinate.worker")

__all__ = ["JobTimeout", "Worker", "check_platform", "run", "run_async"]

#: Seconds that stalled_worker_timeout should leave after update_heartbeat_interval: the
#: core bounds each step of a heartbeat (a connect, a statement) by a quarter of it.
MIN_HEARTBEAT_ROOM = 2.0


def check_platform() -> None:
    """fastworker runs on POSIX systems (Linux, macOS), where it is built and tested: its
    signal handling uses the event loop's `add_signal_handler`, which Windows' loops lack,
    and no Windows wheel is published. Elsewhere, a clear error at start."""
    if sys.platform == "win32" or sys.platform == "cygwin":
        raise _core.ConfigurationError(
            f"fastworker runs on Linux and macOS only, not on Windows ({sys.platform}); "
            "run procrastinate's own worker there (`procrastinate worker`, "
            "`app.run_worker_async()`)"
        )


def require_open_app(app: App) -> None:
    """Raise procrastinate's `AppNotOpen` for an app that was not opened, as its worker
    does at its first statement. The core has connections of its own, but the tasks and
    the periodic deferrer use the app's: without this the worker would run nothing and
    return normally, and a supervisor would never notice. The connectors that have a pool
    (psycopg, aiopg, psycopg2) raise it from their public `pool` property; Django's has
    none and needs no opening."""
    getattr(app.connector, "pool", None)


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
        pooler: bool = False,
        listen_dsn: str | None = None,
        reconnect_timeout: float = 60.0,
        response_timeout: float = 30.0,
        max_batch_size: int = 500,
        recover_stalled_jobs: bool = True,
        queue_concurrency: Mapping[str, int] | None = None,
        job_timeout: float | None = None,
        task_timeouts: Mapping[str, float] | None = None,
        sync_executor: str = "threads",
        metrics_port: int | None = None,
        metrics_address: str = "0.0.0.0",
        metrics_duration_buckets: list[float] | None = None,
        opentelemetry: bool = False,
        max_jobs: int | None = None,
        **options: Any,
    ):
        check_platform()
        # procrastinate's options, positional (in its order) or by keyword.
        super().__init__(app, *args, **options)
        # The private members of procrastinate's Worker the runner uses (fastworker.compat).
        compat.check_worker(self)
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        # fastworker's own, checked as `fastworker.options` declares them.
        own = fastworker_options.checked(
            {
                "dsn": dsn,
                "pooler": pooler,
                "listen_dsn": listen_dsn,
                "reconnect_timeout": reconnect_timeout,
                "response_timeout": response_timeout,
                "max_batch_size": max_batch_size,
                "recover_stalled_jobs": recover_stalled_jobs,
                "queue_concurrency": queue_concurrency,
                "max_jobs": max_jobs,
                "job_timeout": job_timeout,
                "task_timeouts": task_timeouts,
                "sync_executor": sync_executor,
                "metrics_port": metrics_port,
                "metrics_address": metrics_address,
                "metrics_duration_buckets": metrics_duration_buckets,
                "opentelemetry": opentelemetry,
            }
        )
        self._dsn: str | None = own["dsn"]
        self.pooler: bool = own["pooler"]
        self._listen_dsn: str | None = own["listen_dsn"]
        self.reconnect_timeout: float = own["reconnect_timeout"]
        self.response_timeout: float = own["response_timeout"]
        self.max_batch_size: int = own["max_batch_size"]
        self.recover_stalled_jobs: bool = own["recover_stalled_jobs"]
        self.queue_concurrency: dict[str, int] = own["queue_concurrency"]
        self.max_jobs: int | None = own["max_jobs"]
        self.job_timeout: float | None = own["job_timeout"]
        self.task_timeouts: dict[str, float] = own["task_timeouts"]
        self.sync_executor: str = own["sync_executor"]
        self.metrics_port: int | None = own["metrics_port"]
        self.metrics_address: str = own["metrics_address"]
        self.metrics_duration_buckets: list[float] | None = own["metrics_duration_buckets"]
        self.metrics_server: Any = None
        self.opentelemetry: bool = own["opentelemetry"]
        self._check_names_against_the_app()
        if opentelemetry:
            from fastworker.otel import job_span_middleware

            self.worker_middleware = [job_span_middleware, *self.worker_middleware]
        if metrics_port is not None:
            # Fail now, not at start, when the extra is missing.
            from fastworker import metrics  # noqa: F401
        self._warn_if_the_heartbeat_cannot_keep_up()
        self._core: _core.WorkerCore | None = None
        self._roles: Roles = build_roles(
            self,
            job_ids_to_abort=self._job_ids_to_abort,
            stop_event=self._stop_event,
            log_extra=self._log_extra,
            # Looked up at each call: procrastinate's tests and subclasses replace these.
            process_job=lambda context: self._process_job(context),
            abort_job=lambda job_task, context, reason: self._abort_job(job_task, context, reason),
            abort_running_jobs=lambda: self._abort_running_jobs(),
            hard_stop=lambda: self._request_hard_stop(),
        )

    def _check_names_against_the_app(self) -> None:
        """`task_timeouts` keys resolved to the app's tasks (an unknown or ambiguous one
        refused), and a warning for `queue_concurrency` keys no task is declared on (jobs
        may still be deferred there with `configure(queue=...)`)."""
        if not (self.task_timeouts or self.queue_concurrency):
            return
        self.app.perform_import_paths()
        self.task_timeouts = app_names.resolve_task_timeouts(self.app.tasks, self.task_timeouts)
        app_names.warn_of_unused_queues(self.app.tasks, self.queue_concurrency)

    def _warn_if_the_heartbeat_cannot_keep_up(self) -> None:
        """A heartbeat that goes unanswered is sent again on a new connection, each step
        within a quarter of what stalled_worker_timeout leaves after the interval, so that
        other workers never take this live one for stalled (and run its jobs again). With
        too little room left, that cannot hold: procrastinate accepts such settings, so
        does fastworker, but it says so."""
        room = self.stalled_worker_timeout - self.update_heartbeat_interval
        if room >= MIN_HEARTBEAT_ROOM:
            return
        consequence = (
            "live workers will look stalled between two heartbeats"
            if room <= 0
            else f"a heartbeat gets {room / 4:.2f} s per step to be written"
        )
        logger.warning(
            f"update_heartbeat_interval ({self.update_heartbeat_interval} s) leaves less than "
            f"{MIN_HEARTBEAT_ROOM:g} s before stalled_worker_timeout "
            f"({self.stalled_worker_timeout} s): {consequence}; other workers may take this "
            "one for stalled and run its jobs again",
            extra={"action": "stalled_worker_timeout_too_short"},
        )

    async def run(self) -> None:
        """Run until stopped (``wait=False``: until nothing is claimable and no job runs)."""
        self._stop_event.clear()
        self._roles.lifecycle.begin()
        self._loop = asyncio.get_running_loop()
        self.run_task = asyncio.current_task()
        # Signal handlers first, so a signal during start-up already stops cleanly.
        if self.install_signal_handlers:
            self._roles.signals.install()
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
            self._roles.signals.uninstall()
            self._loop = None

    def stop(self) -> None:
        """Stop claiming jobs at once; running jobs finish and their results are written.
        Safe to call from another thread."""
        core = self._core
        if core is not None:
            core.stop_fetching()
        super().stop()

    def _request_hard_stop(self) -> None:
        """Abort the running jobs now (a second signal, a cancel while stopping); safe to
        call from another thread."""
        self._roles.lifecycle.request_hard_stop(self._core, self._loop)

    # procrastinate's hooks, which its code, tests and middleware call: delegations.

    def _unless_claim_lost(self, job: jobs.Job) -> None:
        """Called in a sync job's thread, before its function. The job may have waited for
        a thread (with `sync_executor="default"`, the loop's executor has fewer threads
        than `concurrency`), and its claim may have been lost meanwhile: then the function
        is not called, and the job ends aborted, as a sync job that saw `should_abort()`
        does."""
        if self._roles.ledger.is_lost(claim_of(job)):
            raise exceptions.JobAborted(f"The claim of job {job.id} is no longer this worker's")

    async def _process_job(self, context: job_context.JobContext) -> None:
        """Run one job and hand its outcome to the core.

        procrastinate 3.10.0's `Worker._process_job` (`procrastinate/worker.py`), copied
        step for step (same exceptions caught, same retry decision, same status, same log
        records; re-read it against upstream when procrastinate's changes). What differs:
        - log records' `extra` dicts are only built when the record will be emitted, and
          the outcome is handed to the core synchronously (it never blocks) instead of
          through a shielded task: nothing observable changes;
        - fastworker's own: the claim is marked started (only started jobs are cancelled,
          see `_abort_job`); an abort that came before the first step is raised here, and
          so is a claim lost before it (see `JobExecutor.stop_lost_claims`): its task
          function is never called, sync or async; a sync job whose claim is lost while it waits for
          a thread is not called either (`_unless_claim_lost`); a job cancelled by its
          timeout ends with `JobTimeout` instead of as aborted;
        - a sync function runs as upstream's does (asgiref's `sync_to_async`, not
          thread-sensitive), in the worker's pool of `concurrency` threads unless
          `sync_executor="default"` (`SyncThreads.run`).
        """
        job = context.job
        task = self.app.tasks.get(job.task_name)
        job_retry = None
        exc_info: bool | BaseException = False
        retry_decision = None
        job_result = job_context.JobResult(start_timestamp=context.start_timestamp)
        if job.id is not None:
            self._roles.ledger.start(claim_of(job))
        try:
            if job.id is not None and self._roles.ledger.is_lost(claim_of(job)):
                # No longer this worker's claim (it may run elsewhere already): it never
                # starts, as a cancel at its first step would end it.
                raise asyncio.CancelledError()
            if (
                task is not None
                and self._roles.ledger.abort_requested(job.id)
                and self._roles.task_is_async(task)
            ):
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
            task_is_async = self._roles.task_is_async(task)

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
                        self._unless_claim_lost(job)
                        return task(*job_args, **job.task_kwargs)

                    task_result = await self._roles.sync_threads.run(
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
            if self._roles.ledger.is_timed_out(job.id) and isinstance(
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
                self._roles.ledger.forget_time_out(job.id)
            self._roles.outcome_sink.report(job, status, retry_decision, context, job_result)

    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        self._roles.outcome_sink.report(job, status, retry_decision, context, job_result)

    def _abort_job(
        self,
        process_job_task: asyncio.Task[Any],
        context: job_context.JobContext,
        reason: job_context.AbortReason,
    ) -> None:
        # A job that has not taken its first step is not cancelled (see the executor's).
        if not self._roles.executor.abort_before_first_step(process_job_task, context, reason):
            super()._abort_job(process_job_task, context, reason)

    async def _periodic_deferrer(self) -> None:
        # procrastinate's side task, run by the worker's `PeriodicDeferrer`.
        await self._roles.periodic.run()

    def _core_options(
        self, connection: ConnectionParams, listen_connection: ConnectionParams | None = None
    ) -> dict[str, Any]:
        """The options the core takes (its `WorkerConfig`), by name."""
        core_options: dict[str, Any] = {"connection": connection}
        if listen_connection is not None:
            core_options["listen_connection"] = listen_connection
        for name in fastworker_options.PROCRASTINATE_CORE_OPTIONS:
            core_options[name] = getattr(self, name)
        for option in fastworker_options.OPTIONS:
            if option.core:
                core_options[option.name] = getattr(self, option.name)
        if self.queues is not None:
            core_options["queues"] = list(self.queues)
        # The runner's values (`fastworker.options.RUNNER_CORE_VALUES`).
        core_options["task_names"] = sorted(self.app.tasks)
        core_options["sample_metrics"] = self.metrics_port is not None
        return core_options

    async def _start_and_run(self) -> None:
        require_open_app(self.app)
        self._roles.executor.json_loads = connector_json_loads(self.app.connector)
        connection = await resolve_connection(self.app, self._dsn)
        # Resolved by libpq as `dsn` is.
        listen_connection = params_from_dsn(self._listen_dsn) if self._listen_dsn else None
        if self.metrics_port is not None:
            # Bound first: a port in use is a clear error before anything starts.
            self._start_metrics_server()
        try:
            core = await self._start_core(self._core_options(connection, listen_connection))
        except BaseException:
            self._close_metrics_server()
            raise
        if core is None:
            self._close_metrics_server()
            logger.info(
                "Hard stop while starting: the worker did not start",
                extra={"action": "stop_worker"},
            )
            return
        self._core = self._roles.outcome_sink.core = core
        self.worker_id = core.worker_id
        if core.pruned_workers:
            logger.debug(f"Pruned stalled workers: {', '.join(map(str, core.pruned_workers))}")
        if core.recovered_jobs:
            logger.debug(f"Recovered stalled jobs: {', '.join(map(str, core.recovered_jobs))}")
        logger.debug(f"Registered worker {self.worker_id} in the database")
        if self._stop_event.is_set():
            core.stop_fetching()
        try:
            await self._run_loop()
        finally:
            self._core = self._roles.outcome_sink.core = None
            self._close_metrics_server()
        if self._roles.lifecycle.fatal_error is not None:
            raise self._roles.lifecycle.fatal_error

    async def _start_core(self, core_options: dict[str, Any]) -> _core.WorkerCore | None:
        """The core, started; None if a hard stop came first: the start is dropped, with
        the connect it may be waiting on (a hard stop never waits for a connect)."""
        starting = asyncio.ensure_future(_core.WorkerCore.start(core_options))
        hard_stop = asyncio.ensure_future(self._roles.lifecycle.hard_stop_event.wait())
        try:
            await asyncio.wait([starting, hard_stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hard_stop.cancel()
            if not starting.done():
                starting.cancel()
        if starting.cancelled():
            return None
        return starting.result()

    def _start_metrics_server(self) -> None:
        from fastworker.metrics import CoreCollector, MetricsServer, health
        from fastworker.metrics import logger as metrics_logger

        assert self.metrics_port is not None
        collector = CoreCollector(lambda: self._core, lambda: len(self._running_jobs))
        roles = ("dispatcher", "registry", *(("listener",) if self.listen_notify else ()))
        self.metrics_server = MetricsServer(
            self.metrics_port,
            self.metrics_address,
            collector,
            lambda: health(self._core, roles, self.stalled_worker_timeout),
        )
        # fastworker's own logger: procrastinate's worker serves no metrics.
        metrics_logger.info(
            f"Serving metrics on {self.metrics_address}:{self.metrics_server.port}/metrics "
            "(and /healthz)",
            extra={"action": "metrics_server_started", "port": self.metrics_server.port},
        )

    def _close_metrics_server(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _event_pump(self, core: CorePort) -> EventPump:
        """The pump of the core's events: jobs and lost claims go to the job executor,
        abort requests to procrastinate's own path (which calls `_abort_job`)."""
        return EventPump(
            core,
            self._roles.lifecycle,
            EventHandlers(
                start_job=self._roles.executor.start_job,
                abort_jobs=self._handle_abort_jobs_requested,
                stop_lost_claims=self._roles.executor.stop_lost_claims,
                set_worker_id=self._set_worker_id,
                log_core_failure=self._log_core_failure,
            ),
        )

    def _set_worker_id(self, worker_id: int) -> None:
        self.worker_id = worker_id

    def _log_core_failure(self, error: BaseException) -> None:
        self.logger.error(
            f"Worker core failed: {error}",
            extra=self._log_extra(
                action="core_failed", context=None, job_result=None, exception=str(error)
            ),
        )

    async def _run_loop(self) -> None:
        self.logger.info(
            f"Starting worker on {utils.queues_display(self.queues)}",
            extra=self._log_extra(
                action="start_worker", context=None, queues=self.queues, job_result=None
            ),
        )
        self._running_jobs = self._roles.executor.begin_run()
        self._roles.sync_threads.begin_run()
        self._roles.lifecycle.begin_fetching(asyncio.get_running_loop())
        side_tasks = [asyncio.create_task(self._periodic_deferrer(), name="deferrer")]
        side_tasks_monitor = asyncio.create_task(
            self._monitor_side_tasks(side_tasks), name="side_tasks_monitor"
        )
        core = self._core
        assert core is not None
        events_task = asyncio.create_task(self._event_pump(core).run(), name="core events")
        try:
            await utils.wait_any(self._stop_event.wait(), asyncio.shield(events_task))
            if self._roles.lifecycle.drained:
                max_jobs_reached = (
                    self.max_jobs is not None
                    and self._roles.lifecycle.jobs_claimed >= self.max_jobs
                )
                self.logger.info(
                    f"Claimed max_jobs={self.max_jobs} jobs. Stopping worker once they have run"
                    if max_jobs_reached
                    else "No job found. Stopping worker because wait=False",
                    extra=self._log_extra(
                        context=None, action="stop_worker", queues=self.queues, job_result=None
                    ),
                )
        finally:
            if not side_tasks_monitor.done():
                side_tasks_monitor.cancel()
            try:
                await self._roles.shutdown.run(
                    core, self._running_jobs, side_tasks, events_task, self.worker_id
                )
            finally:
                # Every job has ended (the shutdown waited for them, or aborted them).
                self._roles.sync_threads.end_run()
            # Forgotten before procrastinate's last record, which carries no worker id.
            self.worker_id = None
            self.logger.info(
                f"Stopped worker on {utils.queues_display(self.queues)}",
                extra=self._log_extra(
                    action="stop_worker", queues=self.queues, context=None, job_result=None
                ),
            )


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
