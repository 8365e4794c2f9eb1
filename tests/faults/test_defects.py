"""The fault paths an audit found losing or doubling jobs, each reproduced for real and
checked in the database and in the tasks' own records.

Each test fails on the code before the fix it covers (the commit says which).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
import pytest
from procrastinate import JobContext, retry

import fastworker
from tests.conftest import fetch_all, server_address
from tests.faults.harness import (
    PATIENCE,
    add_stalled_worker_with_a_job,
    all_slots_work,
    block_until_claimed,
    check_runs,
    classify,
    create_tables,
    defer,
    fault_app,
    pass_gate,
    record_run,
    running,
    settled,
    statuses,
    wait_until,
)
from tests.faults.proxy import FaultProxy
from tests.reliability.helpers import WorkerProcess

QUICK: dict[str, Any] = {
    # These faults are met by the drain; the recovery (on by default) would take some of
    # them first at start (its own COMMIT). tests/faults/test_recovery.py covers it.
    "recover_stalled_jobs": False,
    "fetch_job_polling_interval": 3600,
    "abort_job_polling_interval": 0.1,
    "update_heartbeat_interval": 0.5,
}


def status_of(dsn: str, job_id: int) -> str:
    return str(
        fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job_id)[0][0]
    )


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(record, "action", "")) for record in caplog.records]


# --- 1. an abort that arrives together with the job's hand-off ---------------------------


async def test_an_abort_handed_over_with_its_job_ends_it_aborted_and_frees_its_slot(
    dsn: str,
) -> None:
    """The loop is blocked while the core claims a job and learns of its abort: the job
    and the abort reach Python in the same batch of events. The job used to be cancelled
    before its first step, with no outcome: `doing` forever, its slot lost."""
    create_tables(dsn)
    app = fault_app(dsn)
    victims: list[int] = []

    @app.task(name="block_loop", pass_context=True)
    async def block_loop(context: JobContext) -> None:
        await record_run(app, context)
        # Blocking, on purpose: the core claims and learns of the abort meanwhile.
        victims.extend(defer(dsn, "sleepy", seconds=30))
        block_until_claimed(dsn, victims[0])
        fetch_all(dsn, "SELECT procrastinate_cancel_job_v1(%s, true, false)", victims[0])
        # The notification and the abort poll (every 0.1 s) queue the abort meanwhile.
        time.sleep(1.0)  # noqa: ASYNC251

    defer(dsn, "block_loop")
    async with app.open_async(), running(app, concurrency=2, **QUICK):
        await wait_until(lambda: victims and status_of(dsn, victims[0]) == "aborted", "the abort")
        await all_slots_work(dsn, 2)
    assert statuses(dsn).get("doing") is None


async def test_a_job_claimed_as_the_hard_stop_lands_ends_aborted(dsn: str) -> None:
    """A hard stop already set when a claim lands: the job used to be cancelled before its
    first step and stay `doing`."""
    create_tables(dsn)
    app = fault_app(dsn)
    victims: list[int] = []
    workers: list[fastworker.Worker] = []

    @app.task(name="block_loop", pass_context=True)
    async def block_loop(context: JobContext) -> None:
        await record_run(app, context)
        victims.extend(defer(dsn, "sleepy", seconds=30))
        block_until_claimed(dsn, victims[0])
        workers[0]._request_hard_stop()  # as a second signal would, in this loop

    async with app.open_async(), running(app, concurrency=2, **QUICK) as worker:
        workers.append(worker)
        defer(dsn, "block_loop")
        await wait_until(lambda: victims and status_of(dsn, victims[0]) == "aborted", "the abort")
    assert statuses(dsn) == {"succeeded": 1, "aborted": 1}


# --- 2. statement errors that are not a lost connection ----------------------------------


async def test_a_cancelled_claim_is_retried_and_running_jobs_still_end(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A DBA's pg_cancel_backend on a claim (57014), then the lock timeout (55P03) while
    another session keeps this worker's row locked: both used to stop the core, and the
    outcomes of the running jobs were lost."""
    caplog.set_level(logging.WARNING, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    running_job = defer(dsn, "sleepy", seconds=1.5)
    async with app.open_async(), running(app, concurrency=3, **QUICK) as worker:
        await wait_until(lambda: status_of(dsn, running_job[0]) == "doing", "the first job")
        release = threading.Event()
        locked = threading.Event()

        def hold_worker_row() -> None:
            # The claim sets worker_id: its foreign key check needs a lock on this row.
            with psycopg.connect(dsn) as connection:
                connection.execute(
                    "SELECT 1 FROM procrastinate_workers WHERE id = %s FOR UPDATE",
                    (worker.worker_id,),
                )
                locked.set()
                release.wait(PATIENCE)

        holder = threading.Thread(target=hold_worker_row, daemon=True)
        holder.start()
        await asyncio.to_thread(locked.wait, PATIENCE)
        later = defer(dsn, "ok", 2)

        def claim_waiting() -> int | None:
            rows = fetch_all(
                dsn,
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'fastworker' "
                "AND wait_event_type = 'Lock' AND query LIKE '%%candidate AS%%'",
            )
            return int(rows[0][0]) if rows else None

        pid = await wait_until(claim_waiting, "a claim waiting for the lock")
        fetch_all(dsn, "SELECT pg_cancel_backend(%s)", pid)
        await wait_until(
            lambda: "dispatcher_statement_failed" in actions(caplog), "the failure logged"
        )
        # The running job ends meanwhile; its outcome must be written.
        await wait_until(lambda: status_of(dsn, running_job[0]) == "succeeded", "its outcome")
        release.set()
        await asyncio.to_thread(holder.join, PATIENCE)
        await wait_until(lambda: settled(dsn), "the later jobs")
    check_runs(dsn)
    assert all(status_of(dsn, job_id) == "succeeded" for job_id in later)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "57014" in messages or "55P03" in messages


async def test_a_pruned_worker_registers_again_and_ends_its_jobs(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """This worker's row deleted (pruned by another worker after a network split): its
    next claim used to fail on the foreign key (23503) and stop the core."""
    caplog.set_level(logging.WARNING, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    first = defer(dsn, "sleepy", seconds=1.0)
    async with app.open_async(), running(app, concurrency=2, **QUICK) as worker:
        old_id = worker.worker_id
        await wait_until(lambda: status_of(dsn, first[0]) == "doing", "the first job")
        fetch_all(dsn, "DELETE FROM procrastinate_workers WHERE id = %s RETURNING id", old_id)
        defer(dsn, "ok", 3)
        await wait_until(lambda: settled(dsn), "every job")
        await wait_until(lambda: worker.worker_id != old_id, "the new worker id")
        registered = [int(row[0]) for row in fetch_all(dsn, "SELECT id FROM procrastinate_workers")]
        assert registered == [worker.worker_id]
    check_runs(dsn)
    assert "worker_registered_again" in actions(caplog)


async def test_a_worker_whose_row_was_deleted_takes_its_running_jobs_back(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting this worker's row set its running job's worker_id to NULL, and it stayed
    so after the worker registered again: had the process died then, no recovery would
    ever have put the job back to run (found by the chaos soak: two jobs left `doing`)."""
    caplog.set_level(logging.WARNING, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    (held,) = defer(dsn, "gate", gate="reattach", size=2)
    async with app.open_async(), running(app, concurrency=2, **QUICK) as worker:
        old_id = worker.worker_id
        await wait_until(lambda: status_of(dsn, held) == "doing", "the held job")
        fetch_all(dsn, "DELETE FROM procrastinate_workers WHERE id = %s RETURNING id", old_id)
        await wait_until(lambda: worker.worker_id != old_id, "the new worker id")
        await wait_until(
            lambda: (
                fetch_all(dsn, "SELECT worker_id FROM procrastinate_jobs WHERE id = %s", held)[0][0]
                == worker.worker_id
            ),
            "the running job given back to the new worker id",
        )
        defer(dsn, "gate", gate="reattach", size=2)
        await wait_until(lambda: settled(dsn), "every job")
    check_runs(dsn)
    assert "claims_reattached" in actions(caplog)


# --- 3. recovery must never delay the heartbeat -------------------------------------------


@pytest.mark.slow
async def test_a_recovery_waiting_for_row_locks_never_gets_a_live_worker_pruned(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled worker's job is row-locked by another session while this worker's
    recovery wants it. The recovery used to wait for that lock inside a transaction that
    had updated this worker's own heartbeat: the heartbeat froze, and a prune by any other
    worker (here, procrastinate's own function, as its worker runs at start) deleted this
    live worker, whose running jobs another recovery would then run again."""
    caplog.set_level(logging.WARNING, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    options = {
        **QUICK,
        "concurrency": 1,
        "recover_stalled_jobs": True,
        "stalled_worker_timeout": 4.0,
        "update_heartbeat_interval": 0.5,
    }
    long_job = defer(dsn, "sleepy", seconds=8)
    async with app.open_async(), running(app, **options) as worker:
        await wait_until(lambda: status_of(dsn, long_job[0]) == "doing", "the long job")
        orphan = add_stalled_worker_with_a_job(dsn)
        release = threading.Event()
        locked = threading.Event()

        def hold_the_orphan() -> None:  # a DBA's session
            with psycopg.connect(dsn) as connection:
                connection.execute(
                    "SELECT 1 FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (orphan,)
                )
                locked.set()
                release.wait(PATIENCE)

        holder = threading.Thread(target=hold_the_orphan, daemon=True)
        holder.start()
        await asyncio.to_thread(locked.wait, PATIENCE)
        await wait_until(
            lambda: fetch_all(
                dsn,
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'fastworker' "
                "AND wait_event_type = 'Lock'",
            ),
            "the recovery waiting for the lock",
        )
        # Longer than stalled_worker_timeout, the lock still held; then another worker
        # prunes the stalled ones (it waits for the lock too, until it is released).
        await asyncio.sleep(5)
        pruned: list[int] = []
        pruner = threading.Thread(
            target=lambda: pruned.extend(
                int(row[0])
                for row in fetch_all(
                    dsn, "SELECT worker_id FROM procrastinate_prune_stalled_workers_v1(4)"
                )
            ),
            daemon=True,
        )
        pruner.start()
        await asyncio.sleep(0.5)
        release.set()
        await asyncio.to_thread(pruner.join, PATIENCE)
        await asyncio.to_thread(holder.join, PATIENCE)
        assert worker.worker_id not in pruned, f"the live worker was pruned: {pruned}"
        await wait_until(lambda: status_of(dsn, long_job[0]) == "succeeded", "the long job")
    # The stalled worker's job ran once more if this worker's recovery got it, else it is
    # left `doing` (procrastinate's function, which pruned its worker, leaves it so).
    left = frozenset({orphan}) if status_of(dsn, orphan) == "doing" else frozenset()
    runs = check_runs(dsn, stuck=left)
    assert runs[long_job[0]] == [0], runs
    assert "worker_registered_again" not in actions(caplog)


# --- 4. a retry re-sent after its COMMIT's reply was lost ---------------------------------


async def test_a_retry_resent_after_a_lost_commit_reply_applies_once(dsn: str) -> None:
    """The retry transaction (retry, claim, COMMIT) committed, and the reply was lost: the
    job had been retried and claimed again. Re-sending the retry used to hit that new claim:
    attempts jumped by 2, a run was skipped."""
    from tests.faults.proxy import Fault

    create_tables(dsn)
    app = fault_app(dsn)
    jobs = defer(dsn, "flaky")
    with FaultProxy(*server_address(), classify=classify) as proxy:
        fault = proxy.add_fault(
            Fault(kind="commit", point="after_reply_message", reply_type="C", action="cut")
        )
        async with app.open_async(), running(app, dsn=proxy.dsn(dsn), concurrency=1, **QUICK):
            await wait_until(lambda: proxy.has_fired(fault), "the lost COMMIT reply")
            await wait_until(lambda: settled(dsn), "the job")
    runs = check_runs(dsn)
    assert runs[jobs[0]] == [0, 1]


# --- a connection lost while the worker starts -------------------------------------------


@pytest.mark.parametrize(
    ("kind", "recover"),
    [("recover_lock", True), ("prune", False), ("register", False)],
    ids=["prune and recover", "prune", "register"],
)
async def test_a_connection_lost_while_starting_is_one_more_reconnect(
    dsn: str, kind: str, recover: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up steps (prune stalled workers, with or without recovery, then register)
    lost their connection: the worker used to fail to start ("pruning stalled workers and
    recovering their jobs: connection closed", found by the chaos soak: a worker started
    during a cut). It connects again, runs the steps again, and starts."""
    from tests.faults.proxy import Fault

    caplog.set_level(logging.WARNING, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    defer(dsn, "ok", 3)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        # The first request of each of these kinds is a start-up step.
        fault = proxy.add_fault(Fault(kind=kind, point="before_request", action="cut"))
        options = {**QUICK, "recover_stalled_jobs": recover}
        async with app.open_async(), running(app, dsn=proxy.dsn(dsn), **options):
            assert proxy.has_fired(fault)
            await wait_until(lambda: settled(dsn), "every job")
    check_runs(dsn)
    assert "start_connection_lost" in actions(caplog)


async def test_a_lost_connection_does_not_stop_the_periodic_deferrer(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """procrastinate's periodic deferrer raises when its connection is lost, and the
    worker's side-task monitor then stopped the whole worker (found by the chaos soak
    during a PostgreSQL restart). The deferrer starts again; the worker goes on."""
    from tests.faults.proxy import Fault

    caplog.set_level(logging.WARNING)
    create_tables(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        # The app's own connections (where the deferrer defers) go through the proxy.
        app = fault_app(proxy.dsn(dsn))

        @app.periodic(cron="* * * * * *", periodic_id="every-second")
        @app.task(name="tick", queueing_lock="tick")
        async def tick(timestamp: int) -> None:
            pass

        fault = proxy.add_fault(Fault(kind="defer_periodic", point="after_request", action="cut"))
        async with app.open_async(), running(app, dsn=dsn, **QUICK):
            await wait_until(lambda: proxy.has_fired(fault), "the cut periodic defer")
            # Deferred and run after the cut: the deferrer is running again.
            await wait_until(
                lambda: (
                    fetch_all(
                        dsn,
                        "SELECT count(*) FROM procrastinate_jobs"
                        " WHERE task_name = 'tick' AND status = 'succeeded'",
                    )[0][0]
                    >= 2
                ),
                "two periodic jobs run after the cut",
            )
    assert "periodic_deferrer_restarted" in actions(caplog)
    assert "side_task_failed" not in actions(caplog)


# --- 5. orphaned claims found at any time, not only after a reconnect ---------------------


async def test_a_claim_that_commits_late_is_found_and_run(dsn: str) -> None:
    """A statement of a lost connection that commits after the reconnect leaves a job
    `doing` for this live worker, unknown to it. It used to stay there forever, eating a
    slot. (Made here by another session, as the late commit would.)"""
    create_tables(dsn)
    app = fault_app(dsn)
    async with app.open_async(), running(app, concurrency=2, **QUICK) as worker:
        # Not claimable yet (scheduled far ahead), so the worker cannot claim it itself;
        # then `doing` for this worker, as a lost claim of its own that committed late.
        late = [
            int(row[0])
            for row in fetch_all(
                dsn,
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at) "
                "VALUES ('default', 'ok', '{}', now() + interval '1 day') RETURNING id",
            )
        ]
        fetch_all(
            dsn,
            "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s WHERE id = %s "
            "RETURNING id",
            worker.worker_id,
            late[0],
        )
        await wait_until(lambda: status_of(dsn, late[0]) == "succeeded", "the orphan to run")
        await all_slots_work(dsn, 2)
    check_runs(dsn)


async def test_a_job_recovered_elsewhere_and_claimed_here_again_runs_once_more(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the soak. This worker was pruned (its heartbeat late) while a job ran here;
    another worker put the job back to run, and this one claimed it again. Its old run
    must stop, its new claim run once: the orphan search once took the new claim for an
    unknown one (two claims of one job id), and handed it over every second, 20 times."""
    caplog.set_level(logging.INFO, logger="fastworker.core")
    create_tables(dsn)
    app = fault_app(dsn)
    # A sync job that ignores aborts: its old run goes on while its new claim runs.
    job = defer(dsn, "sleepy_sync", seconds=3.0)
    options = {**QUICK, "fetch_job_polling_interval": 0.2}
    async with app.open_async(), running(app, concurrency=2, **options) as worker:
        await wait_until(lambda: status_of(dsn, job[0]) == "doing", "the first run")
        # What a recovery by another worker does, after pruning this one.
        fetch_all(
            dsn, "DELETE FROM procrastinate_workers WHERE id = %s RETURNING id", worker.worker_id
        )
        fetch_all(dsn, "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", job[0])
        await wait_until(lambda: status_of(dsn, job[0]) == "succeeded", "the second run")
        await all_slots_work(dsn, 2)
    runs = check_runs(dsn)
    assert runs[job[0]] == [0, 1], runs
    assert "claims_lost" in actions(caplog)


# --- 6. rows that cannot be decoded fail alone ----------------------------------------------


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def app_recording_ok_runs(dsn: str, loads: Any) -> procrastinate.App:
    """An app whose connector decodes args with `loads`, with a task `ok` that records its
    runs."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, json_loads=loads)
    )

    @app.task(name="ok", pass_context=True)
    async def ok(context: JobContext, **_: Any) -> None:
        await record_run(app, context)

    return app


async def test_rows_that_cannot_be_decoded_fail_alone_and_the_others_run(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A `scheduled_at` of -infinity (or before year 1) used to fail the claim statement
    itself: every claim of every worker failed, again and again. Arguments the connector's
    decoder rejects, or nested 3,000 deep, stopped the worker."""
    caplog.set_level(logging.ERROR)
    create_tables(dsn)

    def loads(text: str) -> Any:
        value = json.loads(text)
        if isinstance(value, dict) and value.get("poison"):
            raise ValueError("rejected by the connector's json_loads")
        return value

    app = app_recording_ok_runs(dsn, loads)

    with psycopg.connect(dsn, autocommit=True) as connection:
        poisoned = [
            int(row[0])
            for row in connection.execute(
                """INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)
                   VALUES ('default', 'ok', '{}', '-infinity'),
                          ('default', 'ok', '{}', '0044-03-15 BC'),
                          ('default', 'ok', '{"poison": true}', NULL),
                          ('default', 'ok', %s::jsonb, NULL),
                          ('default', 'not_a_task', '{}', NULL)
                   RETURNING id""",
                ('{"x": ' + deep(3000) + "}",),
            ).fetchall()
        ]
    good = defer(dsn, "ok", 5)
    async with app.open_async(), running(app, concurrency=3, **QUICK):
        await wait_until(lambda: settled(dsn), "every job to end")
        later = defer(dsn, "ok", 2)  # the worker goes on
        await wait_until(lambda: settled(dsn), "the later jobs")
    for job_id in poisoned:
        assert status_of(dsn, job_id) == "failed", job_id
    for job_id in good + later:
        assert status_of(dsn, job_id) == "succeeded", job_id
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "cannot be decoded" in logged
    assert "Python cannot represent" in logged


async def test_args_that_decode_but_nest_too_deep_fail_alone_with_logging_on(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Args nested 900 deep decode (below Python's recursion limit), but procrastinate's
    job log (`Starting job ...`, the repr of the args) then raised RecursionError inside
    the job's own handling: no outcome was written and the job stayed `doing`, its slot
    lost. It fails alone now, with the depth said, and the other jobs of its batch run."""
    caplog.set_level(logging.INFO)
    create_tables(dsn)
    app = fault_app(dsn)
    with psycopg.connect(dsn, autocommit=True) as connection:
        before = defer(dsn, "ok", 3)
        [(deep_job,)] = connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               VALUES ('default', 'ok', %s::jsonb) RETURNING id""",
            ('{"x": ' + deep(900) + "}",),
        ).fetchall()
        after = defer(dsn, "ok", 3)
    # One claim takes all seven: the deep one is in the same batch as the others.
    async with app.open_async(), running(app, concurrency=7, **QUICK):
        await wait_until(lambda: settled(dsn), "every job to end")
        later = defer(dsn, "ok", 2)  # the worker goes on, all its slots free
        await wait_until(lambda: settled(dsn), "the later jobs")
        await all_slots_work(dsn, 7)
    assert status_of(dsn, deep_job) == "failed"
    for job_id in before + after + later:
        assert status_of(dsn, job_id) == "succeeded", job_id
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "nest 901 levels deep" in logged


class Unprintable:
    """An argument the app's own decoder makes, whose repr fails."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_a_job_whose_logging_fails_still_gets_an_outcome(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connector's decoder returns an object whose repr raises: procrastinate's job
    logs (in the job's handling, outside the task) raise, before and after the task runs,
    and no outcome was reported; the job stayed `doing`. Every job handed over ends now:
    this one failed, with the reason logged; the others run."""
    caplog.set_level(logging.INFO)
    create_tables(dsn)

    def loads(text: str) -> Any:
        value = json.loads(text)
        if isinstance(value, dict) and value.get("unprintable"):
            value["unprintable"] = Unprintable()
        return value

    app = app_recording_ok_runs(dsn, loads)

    @app.task(name="gate", pass_context=True)
    async def gate(context: JobContext, gate: str, size: int) -> None:
        await record_run(app, context)
        await pass_gate(app, context, gate, size)

    with psycopg.connect(dsn, autocommit=True) as connection:
        [(bad,)] = connection.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args)
               VALUES ('default', 'ok', '{"unprintable": true}') RETURNING id"""
        ).fetchall()
    good = defer(dsn, "ok", 4)
    async with app.open_async(), running(app, concurrency=5, **QUICK):
        await wait_until(lambda: settled(dsn), "every job to end")
        await all_slots_work(dsn, 5)
    assert status_of(dsn, bad) == "failed"
    assert all(status_of(dsn, job_id) == "succeeded" for job_id in good)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "ended without an outcome (RuntimeError: no repr)" in logged


# --- 7. the smaller ones ----------------------------------------------------------------------


class BadPriority(retry.BaseRetryStrategy):
    """A retry strategy deciding a priority the database cannot hold."""

    def get_retry_decision(self, *, exception: BaseException, job: Any) -> retry.RetryDecision:
        return retry.RetryDecision(retry_in={"seconds": 0}, priority=2**31)


async def test_a_retry_decision_the_database_cannot_hold_fails_only_its_job(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A priority >= 2**31 raised OverflowError while handing the outcomes to the core: the
    outcomes of every job that ended in that loop iteration were dropped."""
    caplog.set_level(logging.ERROR)
    create_tables(dsn)
    app = fault_app(dsn)

    @app.task(name="bad_retry", pass_context=True, retry=BadPriority())
    async def bad_retry(context: JobContext, gate: str, size: int) -> None:
        await record_run(app, context)
        await pass_gate(app, context, gate, size)
        raise RuntimeError("to retry")

    # Four jobs end together (a gate of four): one with the bad decision.
    bad = defer(dsn, "bad_retry", gate="g", size=4)
    others = defer(dsn, "gate", 3, gate="g", size=4)
    async with app.open_async(), running(app, concurrency=4, **QUICK):
        await wait_until(lambda: settled(dsn), "every job to end")
    assert status_of(dsn, bad[0]) == "failed"
    assert all(status_of(dsn, job_id) == "succeeded" for job_id in others)
    assert "not a 32-bit integer" in " ".join(r.getMessage() for r in caplog.records)


async def test_the_outcome_of_a_job_that_ends_after_the_core_gave_up_is_still_written(
    dsn: str,
) -> None:
    """The database unreachable for longer than reconnect_timeout: the core gives up
    claiming (run() raises ConnectionLost), but the job still running then ends later,
    and its outcome used to be dropped (`doing` forever). It is written once the database
    answers again, before run() returns."""
    create_tables(dsn)
    app = fault_app(dsn)
    job = defer(dsn, "sleepy", seconds=4.0)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        async with app.open_async():
            worker = fastworker.Worker(
                app,
                dsn=proxy.dsn(dsn),
                install_signal_handlers=False,
                concurrency=2,
                reconnect_timeout=1.0,
                # The job connection is in use during the outage (it polls, nothing else
                # listens), so its own reconnect budget is the one that runs out.
                **{**QUICK, "fetch_job_polling_interval": 0.2, "listen_notify": False},
            )
            task = asyncio.create_task(worker.run())
            await wait_until(lambda: status_of(dsn, job[0]) == "doing", "the job to start")
            proxy.unreachable()
            await wait_until(
                lambda: worker._roles.lifecycle.fatal_error is not None, "the core to give up"
            )
            proxy.unreachable(False)
            with pytest.raises(fastworker.ConnectionLost):
                await asyncio.wait_for(task, PATIENCE)
    assert status_of(dsn, job[0]) == "succeeded"
    check_runs(dsn)


@pytest.mark.slow
def test_a_second_signal_while_the_database_is_away_stops_at_once(dsn: str, tmp_path: Path) -> None:
    """A first SIGTERM waits for the running job; its outcome cannot be written (the
    database is away) and the core tries to reconnect for up to reconnect_timeout (here 300
    s). A second SIGTERM used to wait all that time too; it must end the worker now."""
    from tests.reliability.helpers import create_executions_table

    create_executions_table(dsn)
    with FaultProxy(*server_address()) as proxy:
        proxy_dsn = proxy.dsn(dsn)
        worker = WorkerProcess(
            proxy_dsn,
            tmp_path / "worker.log",
            "--concurrency",
            "1",
            "--reconnect-timeout",
            "300",
            "--heartbeat",
            "0.5",
        )
        try:
            defer(dsn, "record", sleep=3.0)
            deadline = time.monotonic() + PATIENCE
            # It recorded its run (through the proxy too): now it only sleeps.
            while not fetch_all(dsn, "SELECT 1 FROM fw_executions"):
                assert time.monotonic() < deadline, worker.log()
                time.sleep(0.05)
            proxy.unreachable()
            worker.process.send_signal(signal.SIGTERM)
            while "ended with status" not in worker.log():
                assert time.monotonic() < deadline, worker.log()
                time.sleep(0.05)
            time.sleep(0.5)  # the core now tries to reach the database for the outcome
            assert worker.alive(), worker.log()
            worker.process.send_signal(signal.SIGTERM)
            # Bounded far below the 300 s the reconnect would take.
            worker.wait(timeout=30)
        finally:
            worker.kill()
    log = worker.log()
    assert "finish_task_failed" in log, log
