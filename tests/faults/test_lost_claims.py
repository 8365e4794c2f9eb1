"""A claim lost before its job started (issue 20, item 6): the job is handed over to this
worker, then recovered by another one (this worker pruned meanwhile) before its task
function is called. That run must never call the function (it may run elsewhere already):
it used to run in full. The recovered job then runs once more, under its new claim.

Each test stands one part of the worker still while the core claims the job and learns
that the claim is lost: the event loop (an async task that blocks it), or the only thread
of the loop's executor (a sync task that holds it, with `sync_executor="default"`)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from procrastinate import JobContext

import fastworker
from tests.conftest import fetch_all, server_address
from tests.faults.harness import (
    PATIENCE,
    block_until_claimed,
    classify,
    create_tables,
    defer,
    fault_app,
    record_run,
    running,
    wait_until,
)
from tests.faults.proxy import FaultProxy

QUICK: dict[str, Any] = {
    # The recovered job is claimed here again by a poll: the round trip that writes the
    # lost run's end (not written: no longer current) leaves that job out of its claim.
    "fetch_job_polling_interval": 0.5,
    "abort_job_polling_interval": 0.1,
    "update_heartbeat_interval": 0.5,
}

# The victims, by task: `ok` is async, `sleepy_sync` runs in a thread.
VICTIM_ARGS: dict[str, dict[str, Any]] = {"ok": {}, "sleepy_sync": {"seconds": 0.0}}


def recover_elsewhere(dsn: str, job_id: int) -> None:
    """What another worker's recovery does to a job of a pruned worker: back to `todo`,
    one attempt more (procrastinate's own retry). This worker's claim of it is lost."""
    fetch_all(dsn, "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", job_id)


def runs_of(dsn: str, job_id: int) -> list[int]:
    """The attempts of the job whose task function ran (the tasks' own record)."""
    return [
        int(attempts)
        for (attempts,) in fetch_all(
            dsn, "SELECT attempts FROM fw_runs WHERE job_id = %s ORDER BY id", job_id
        )
    ]


def status_of(dsn: str, job_id: int) -> str:
    return str(
        fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job_id)[0][0]
    )


def block_until_lost_claims_checked(proxy: FaultProxy, seen_before: int) -> None:
    """Blocking until the core has looked for lost claims after the `seen_before`-th request
    the proxy saw, and taken in the answer (a later round trip on that connection, which
    begins the next check, comes only after)."""
    deadline = time.monotonic() + PATIENCE
    while True:
        history = proxy.history[seen_before:]
        checks = [index for index, (_, kind, _) in enumerate(history) if kind == "lost_claims"]
        if checks:
            connection = history[checks[0]][0]
            if any(
                number == connection and kind == "orphans"
                for number, kind, _ in history[checks[0] + 1 :]
            ):
                return
        assert time.monotonic() < deadline, "the core never looked for lost claims"
        time.sleep(0.02)


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(record, "action", "")) for record in caplog.records]


@pytest.mark.parametrize("victim_task", sorted(VICTIM_ARGS))
async def test_a_claim_lost_before_its_first_step_never_calls_the_task(
    dsn: str, victim_task: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The job and the news that its claim is lost reach the runner together (its loop was
    busy meanwhile): its asyncio task had not taken its first step, so it was not cancelled,
    and its function then ran in full, under a claim that was no longer this worker's."""
    caplog.set_level(logging.INFO)
    create_tables(dsn)
    app = fault_app(dsn)
    victims: list[int] = []
    with FaultProxy(*server_address(), classify=classify) as proxy:

        @app.task(name="block_loop", pass_context=True)
        async def block_loop(context: JobContext) -> None:
            await record_run(app, context)
            # Blocking, on purpose: the core claims the victim and hands it over, then
            # learns that its claim is lost, all before this loop takes either event.
            victims.extend(defer(dsn, victim_task, **VICTIM_ARGS[victim_task]))
            block_until_claimed(dsn, victims[0])
            seen_before = len(proxy.history)
            recover_elsewhere(dsn, victims[0])
            block_until_lost_claims_checked(proxy, seen_before)

        async with app.open_async(), running(app, dsn=proxy.dsn(dsn), concurrency=2, **QUICK):
            defer(dsn, "block_loop")
            await wait_until(
                lambda: victims and status_of(dsn, victims[0]) == "succeeded",
                "the victim's run under its new claim",
            )
    assert "claims_lost" in actions(caplog)  # the core told the runner
    assert "claim_lost" in actions(caplog)  # while the victim's run was the runner's
    # Attempt 0 (the lost claim) never called the function; attempt 1 (the new claim,
    # here again) did, once.
    assert runs_of(dsn, victims[0]) == [1]


async def test_a_sync_job_waiting_for_a_thread_when_its_claim_is_lost_is_not_called(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync job waits for a thread of the loop's executor (`sync_executor="default"`:
    fewer threads than `concurrency`). Its claim lost meanwhile, it was still called when
    a thread came, with only `should_abort()` to tell it (a function that never looks ran
    in full)."""
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)  # this test's loop only
    loop.set_default_executor(executor)
    create_tables(dsn)
    app = fault_app(dsn)
    victims: list[int] = []
    workers: list[fastworker.Worker] = []

    def is_true(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while not predicate():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.02)

    @app.task(name="hold_the_thread", pass_context=True)
    def hold_the_thread(context: JobContext) -> None:
        # In the executor's only thread: the victim, started, waits for it.
        worker = workers[0]
        victims.extend(defer(dsn, "sleepy_sync", seconds=0.0))
        block_until_claimed(dsn, victims[0])
        claim = (victims[0], 0)
        is_true(lambda: worker._roles.ledger.is_started(claim), "the victim's first step")
        recover_elsewhere(dsn, victims[0])
        is_true(
            lambda: worker._roles.ledger.is_lost(claim), "the runner to learn the claim is lost"
        )

    async with (
        app.open_async(),
        running(app, concurrency=2, sync_executor="default", **QUICK) as worker,
    ):
        workers.append(worker)
        defer(dsn, "hold_the_thread")
        await wait_until(
            lambda: victims and status_of(dsn, victims[0]) == "succeeded",
            "the victim's run under its new claim",
        )
    assert "claim_lost" in actions(caplog)
    assert runs_of(dsn, victims[0]) == [1]
