"""Bad input: each gets a clear outcome, the worker keeps running, other jobs are unaffected.

One worker process per test, fetch polling at an hour: jobs are found through
notifications, so the worker's listener is shown to survive the bad input too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import fetch_all
from tests.reliability.helpers import (
    WorkerProcess,
    create_executions_table,
    defer_jobs,
    fastworker_backends,
    statuses,
    wait_until,
)


def insert_job(dsn: str, task: str, args: str, queue: str = "default") -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "VALUES (%s, %s, %s::jsonb) RETURNING id",
            (queue, task, args),
        ).fetchone()
    assert row is not None
    return int(row[0])


def job_status(dsn: str, job_id: int) -> str:
    return str(
        fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job_id)[0][0]
    )


def terminal(dsn: str) -> bool:
    current = statuses(dsn)
    return not current.get("todo") and not current.get("doing")


@pytest.fixture
def worker(dsn: str, database_name: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    create_executions_table(dsn)
    process = WorkerProcess(
        dsn,
        tmp_path / "worker.log",
        "--concurrency",
        "10",
        "--polling",
        "3600",
        "--heartbeat",
        "0.2",
    )
    # Started means listening: a notification sent before LISTEN would reach nobody.
    wait_until(
        lambda: any(role == "listen" for _, role in fastworker_backends(dsn, database_name)),
        timeout=60,
        what="the worker to listen",
    )
    yield process
    if process.alive():
        process.stop()


def finish(worker: WorkerProcess, dsn: str, good_before: int) -> str:
    """Good jobs after the bad ones still run; the worker stops cleanly. Returns the log."""
    defer_jobs(dsn, 20)
    wait_until(lambda: terminal(dsn), timeout=60, what="every job to end")
    assert worker.alive()
    code = worker.stop()
    log = worker.log()
    assert code == 0, log[-4000:]
    executed = fetch_all(dsn, "SELECT count(*) FROM fw_executions WHERE task = 'record'")[0][0]
    assert executed == good_before + 20
    return log


def test_unknown_task_fails_with_task_not_found(worker: WorkerProcess, dsn: str) -> None:
    job_id = insert_job(dsn, "no.such.task", "{}")
    wait_until(lambda: job_status(dsn, job_id) == "failed", timeout=60, what="the job to fail")
    log = finish(worker, dsn, 0)
    assert "action=task_not_found" in log


@pytest.mark.parametrize(
    ("args", "runs"),
    [
        ('{"a": 1}', 0),  # missing argument: TypeError before the task body
        ('{"a": 1, "b": 2, "c": 3}', 0),  # unexpected argument
        ("[1, 2]", 0),  # not an object: not a mapping of keyword arguments
        ("null", 0),
        ('"text"', 0),
        ('{"a": "x", "b": [1]}', 1),  # fits the signature, fails inside the task
    ],
)
def test_arguments_not_fitting_the_task_fail_the_job(
    worker: WorkerProcess, dsn: str, args: str, runs: int
) -> None:
    job_id = insert_job(dsn, "typed", args)
    wait_until(lambda: job_status(dsn, job_id) == "failed", timeout=60, what="the job to fail")
    log = finish(worker, dsn, 0)
    assert "action=job_error" in log
    assert fetch_all(dsn, "SELECT count(*) FROM fw_executions WHERE job_id = %s", job_id) == [
        (runs,)
    ]


def test_arguments_of_several_megabytes(worker: WorkerProcess, dsn: str) -> None:
    size = 8 * 1024 * 1024
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "SELECT 'default', 'big_args', json_build_object('blob', repeat('x', %s)) "
            "FROM generate_series(1, 3)",
            (size,),
        )
    wait_until(lambda: statuses(dsn) == {"succeeded": 3}, timeout=120, what="big jobs")
    log = finish(worker, dsn, 0)
    assert log.count(f"Result: {size}") == 3


@pytest.mark.parametrize(
    "payload",
    [
        "garbage",
        "",
        "{not json",
        "[1, 2]",
        '{"type": "something_else", "job_id": 1}',
        '{"type": "abort_job_requested"}',
        '{"type": "abort_job_requested", "job_id": "seven"}',
        '{"type": "job_inserted", "job_id": 99999999999999999999999}',
        "x" * 7900,
    ],
)
def test_malformed_notifications_are_logged_and_ignored(
    worker: WorkerProcess, dsn: str, payload: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        for channel in ("procrastinate_any_queue_v1", "procrastinate_queue_v1#default"):
            connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    # The listener is still there: the next jobs are found through their notifications.
    log = finish(worker, dsn, 0)
    assert "action=malformed_notification" in log
    assert "Traceback" not in log


HOSTILE_QUEUES = [
    "it's",
    'a"b',
    "q#1",
    "with space",
    "x'); DROP TABLE fw_executions; --",
    '"; DROP TABLE procrastinate_jobs; --',
    "ünïcødé ✓",
    "l" * 40,  # the longest whose channel name fits in 63 bytes
]
LONG_QUEUE = "L" * 70  # channel name too long for pg_notify: procrastinate cannot defer there


def test_hostile_queue_names(dsn: str, tmp_path: Path) -> None:
    create_executions_table(dsn)
    # procrastinate's insert trigger refuses the long queue (pg_notify: channel name too
    # long); such a job can only exist without the trigger, and is found at start.
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        insert_job(dsn, "record", "{}", queue=LONG_QUEUE)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SET session_replication_role = replica")
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "VALUES (%s, 'record', '{}')",
            (LONG_QUEUE,),
        )
    arguments = ["--concurrency", "10", "--polling", "3600"]
    for queue in [*HOSTILE_QUEUES, LONG_QUEUE]:
        arguments += ["--queue", queue]
    worker = WorkerProcess(dsn, tmp_path / "worker.log", *arguments)
    try:
        wait_until(lambda: terminal(dsn), timeout=60, what="the long-queue job")
        # Each hostile queue gets its job through its own (quoted) channel.
        for queue in HOSTILE_QUEUES:
            insert_job(dsn, "record", "{}", queue=queue)
        wait_until(lambda: terminal(dsn), timeout=60, what="a job in each hostile queue")
        # A queue the worker does not serve is left alone.
        other = insert_job(dsn, "record", "{}", queue="not served")
    finally:
        code = worker.stop()
    log = worker.log()
    assert code == 0, log[-4000:]
    assert job_status(dsn, other) == "todo"
    served = fetch_all(
        dsn,
        "SELECT queue_name, status::text FROM procrastinate_jobs WHERE queue_name <> 'not served'",
    )
    assert sorted(served) == sorted((queue, "succeeded") for queue in [*HOSTILE_QUEUES, LONG_QUEUE])
    assert fetch_all(dsn, "SELECT count(*) FROM fw_executions") == [(len(HOSTILE_QUEUES) + 1,)]


def test_a_task_blocking_the_event_loop(worker: WorkerProcess, dsn: str) -> None:
    """The loop is blocked for 3 s: jobs wait, but the core's heartbeat goes on (it is not
    on the event loop), so the worker is not taken for stalled; everything ends."""
    job_id = insert_job(dsn, "block_loop", '{"seconds": 3}')
    defer_jobs(dsn, 10)
    wait_until(
        lambda: (
            fetch_all(dsn, "SELECT count(*) FROM fw_executions WHERE job_id = %s", job_id) == [(1,)]
        ),
        timeout=60,
        what="the blocking job to start",
    )

    def heartbeat() -> object:
        return fetch_all(dsn, "SELECT last_heartbeat FROM procrastinate_workers")[0][0]

    before = heartbeat()
    # While the job blocks the loop, the heartbeat still moves.
    wait_until(
        lambda: job_status(dsn, job_id) == "doing" and heartbeat() > before,
        timeout=60,
        what="a heartbeat during the block",
    )
    wait_until(lambda: job_status(dsn, job_id) == "succeeded", timeout=60, what="the block")
    finish(worker, dsn, 10)


@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "custom", "GeneratorExit"])
def test_a_task_raising_base_exceptions(worker: WorkerProcess, dsn: str, kind: str) -> None:
    job_id = insert_job(dsn, "raise_base", f'{{"kind": "{kind}"}}')
    wait_until(lambda: job_status(dsn, job_id) == "failed", timeout=60, what="the job to fail")
    log = finish(worker, dsn, 0)
    assert "action=job_error" in log


def test_a_task_returning_a_non_json_value(worker: WorkerProcess, dsn: str) -> None:
    job_id = insert_job(dsn, "non_json", "{}")
    wait_until(lambda: job_status(dsn, job_id) == "succeeded", timeout=60, what="the job")
    log = finish(worker, dsn, 0)
    assert "Result: <Unserializable>" in log
