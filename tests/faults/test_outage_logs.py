"""An outage of the database is logged once when it starts and once when it ends, not once
per failed duty: the abort poll (every 50 ms here) used to log "Error polling jobs to abort:
cannot connect ..." at each tick, 402 lines in a 20 s restart.

Real parts only: the fault proxy makes the database unreachable (every connection cut, new
ones closed at once) while a job runs, so the abort poll runs all along.
"""

from __future__ import annotations

import asyncio
import logging

from procrastinate import JobContext

from tests.conftest import server_address
from tests.faults.harness import (
    check_runs,
    classify,
    create_tables,
    defer,
    fault_app,
    record_run,
    running,
    settled,
    wait_until,
)
from tests.faults.proxy import FaultProxy
from tests.helpers import record_actions

#: How long the database stays unreachable: the time the worker has to log too much.
OUTAGE_SECONDS = 5.0
#: Lines an outage may log at warning level or above (its start, and a margin).
AT_MOST = 3
#: The registry's duties, whose failures used to be logged one by one.
REGISTRY_ACTIONS = frozenset(
    {
        "poll_jobs_to_abort_error",
        "heartbeat_failed",
        "metrics_sample_failed",
        "registry_connection_lost",
    }
)


def assert_few_lines(records: list[logging.LogRecord]) -> None:
    noisy = [
        f"{record.levelname} {getattr(record, 'action', '')}: {record.getMessage()}"
        for record in records
        if record.levelno >= logging.WARNING and getattr(record, "action", "") in REGISTRY_ACTIONS
    ]
    assert len(noisy) <= AT_MOST, f"{len(noisy)} lines for one outage:\n" + "\n".join(noisy[:20])


async def test_an_outage_with_a_running_job_is_logged_once_and_its_end_with_its_length(
    dsn: str,
) -> None:
    create_tables(dsn)
    app = fault_app(dsn)
    release = asyncio.Event()

    @app.task(name="held", pass_context=True)
    async def held(context: JobContext) -> None:
        await record_run(app, context)
        await release.wait()

    (job_id,) = defer(dsn, "held")
    with FaultProxy(*server_address(), classify=classify) as proxy, record_actions() as recorder:
        async with (
            app.open_async(),
            running(
                app,
                dsn=proxy.dsn(dsn),
                abort_job_polling_interval=0.05,
                update_heartbeat_interval=0.5,
                fetch_job_polling_interval=3600,
                reconnect_timeout=120,
            ),
        ):
            try:
                await wait_until(lambda: recorder.with_action("start_job"), "the job to start")
                proxy.unreachable()
                await wait_until(
                    lambda: [r for r in recorder.records if r.levelno >= logging.WARNING],
                    "the worker to notice the outage",
                )
                # Not an assertion: how long the worker has to log each failed duty.
                await asyncio.sleep(OUTAGE_SECONDS)
                proxy.unreachable(False)
                assert_few_lines(recorder.records)
                await wait_until(
                    lambda: recorder.with_action("registry_reconnected"), "the end of the outage"
                )
            finally:
                # The job ends (a graceful stop waits for it), whatever happened.
                proxy.unreachable(False)
                release.set()
            await wait_until(lambda: settled(dsn), "the job")
    assert check_runs(dsn) == {job_id: [0]}
    assert_few_lines(recorder.records)
    ended = recorder.with_action("registry_reconnected")
    assert len(ended) == 1, [record.getMessage() for record in ended]
    assert "after" in ended[0].getMessage()
