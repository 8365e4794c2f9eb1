"""The end of a run (`fastworker.runner.shutdown.Shutdown`) against a fake of the binding
(`tests/fake_core.py`): running jobs finish, or are aborted at the graceful timeout or a
hard stop; the last outcomes reach the core before it shuts down. A real worker's shutdown
is in `tests/test_shutdown.py`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from procrastinate import job_context, jobs

from fastworker.runner.ledger import ClaimLedger
from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.outcome_sink import OutcomeSink
from fastworker.runner.shutdown import Shutdown
from tests.fake_core import FakeCore
from tests.test_outcome_sink import LOGGER, context_of, job, log_extra

RunningJobs = dict[asyncio.Task[Any], job_context.JobContext]


class Run:
    """One run's parts as the worker wires them, with jobs that run until released."""

    def __init__(self, graceful_timeout: float | None) -> None:
        self.core = FakeCore()
        self.lifecycle = Lifecycle(asyncio.Event())
        self.lifecycle.begin_fetching(asyncio.get_running_loop())
        self.lifecycle.fetching_stopped()
        ledger: ClaimLedger[job_context.JobContext] = ClaimLedger({})
        self.sink = OutcomeSink(
            ledger, delete_jobs=jobs.DeleteJobCondition.NEVER, logger=LOGGER, log_extra=log_extra
        )
        self.sink.core = self.core  # type: ignore[assignment]
        self.running: RunningJobs = {}
        self.release = asyncio.Event()
        self.aborted = False
        self.shutdown = Shutdown(
            lifecycle=self.lifecycle,
            sink=self.sink,
            abort_running_jobs=self.abort_running_jobs,
            graceful_timeout=graceful_timeout,
            queues=None,
            logger=LOGGER,
            log_extra=log_extra,
        )

    def start_job(self, job_id: int) -> None:
        ran = job(job_id)

        async def run_job() -> None:
            await self.release.wait()
            self.sink.report(ran, jobs.Status.SUCCEEDED, None, context_of(ran), None)

        task = asyncio.create_task(run_job())
        self.running[task] = context_of(ran)
        task.add_done_callback(lambda done: self.running.pop(done, None))

    async def abort_running_jobs(self) -> None:
        self.aborted = True
        for task in self.running:
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)

    async def end(self) -> None:
        async def pump() -> None:
            while await self.core.next_events() is not None:
                pass

        await self.shutdown.run(
            self.core, self.running, [], asyncio.create_task(pump()), worker_id=1
        )


def reported_ids(core: FakeCore) -> list[int]:
    return [outcome.job_id for batch in core.batches for outcome in batch]


async def test_running_jobs_finish_and_their_outcomes_are_written_before_the_core_ends() -> None:
    run = Run(graceful_timeout=None)
    run.start_job(1)
    ending = asyncio.create_task(run.end())
    await asyncio.sleep(0)
    assert run.core.fetching_stopped and not run.core.shut_down
    run.release.set()
    await asyncio.wait_for(ending, timeout=60)
    assert reported_ids(run.core) == [1] and run.core.shut_down and not run.aborted


async def test_the_graceful_timeout_aborts_the_jobs_still_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="procrastinate.worker")
    run = Run(graceful_timeout=0.0)
    run.start_job(1)
    await asyncio.wait_for(run.end(), timeout=60)
    assert run.aborted and run.core.shut_down
    assert "1 jobs still running after graceful timeout. Aborting them" in caplog.messages


async def test_a_hard_stop_aborts_the_jobs_before_the_graceful_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="procrastinate.worker")
    run = Run(graceful_timeout=None)
    run.start_job(1)
    ending = asyncio.create_task(run.end())
    await asyncio.sleep(0)
    run.lifecycle.request_hard_stop(run.core, asyncio.get_running_loop())
    await asyncio.wait_for(ending, timeout=60)
    assert run.aborted and run.core.shut_down
    assert (
        "1 jobs still running after a second stop signal or cancel. Aborting them"
        in caplog.messages
    )
