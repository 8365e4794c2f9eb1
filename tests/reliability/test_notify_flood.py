"""A flood of malformed notifications on procrastinate's channel. Any role can NOTIFY on
it, as fast as it likes: the worker logs the first and then a count per period (not a
line per notification: the audit saw 100,000 WARNING lines, and the worker's memory double),
and keeps running jobs."""

from __future__ import annotations

import asyncio
import re

import procrastinate
import psycopg

import fastworker
from tests.helpers import record_actions, wait_for, wait_until_listening

#: Malformed notifications sent: three kinds (not JSON, an unknown type, an abort request
#: without a job id), each payload distinct (PostgreSQL folds identical ones of a
#: transaction into one).
FLOOD = 20_000
#: Log records the flood may cause at most: the first in full, then a count every 10 s
#: (and one at the stop), however long the flood takes.
MOST_RECORDS = 10

FLOOD_SQL = """
SELECT pg_notify(
    'procrastinate_any_queue_v1',
    CASE n %% 3
        WHEN 0 THEN 'junk ' || n
        WHEN 1 THEN json_build_object('type', 'no_such_type', 'n', n)::text
        ELSE json_build_object('type', 'abort_job_requested', 'n', n)::text
    END)
FROM generate_series(1, %s) AS n
"""

COUNTED = re.compile(r"\.\.\. and (\d+) more malformed notifications")


def flood(dsn: str, count: int) -> None:
    """`count` notifications in one transaction: delivered at once, at its commit."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(FLOOD_SQL, (count,))


async def test_a_flood_of_malformed_notifications_is_logged_in_bounded_lines(
    app: procrastinate.App, dsn: str
) -> None:
    ran: list[int] = []

    @app.task(name="after_the_flood")
    async def after_the_flood(n: int) -> None:
        ran.append(n)

    # Fetch polling at an hour: the job after the flood is found through its notification,
    # which comes after the flood's on the same connection, so the listener went through
    # the whole flood first (and survived it).
    worker = fastworker.Worker(
        app, fetch_job_polling_interval=3600, install_signal_handlers=False, concurrency=4
    )
    with record_actions() as recorder:
        run = asyncio.create_task(worker.run())
        try:
            await wait_until_listening(dsn)
            await asyncio.to_thread(flood, dsn, FLOOD)
            await after_the_flood.defer_async(n=1)
            await wait_for(lambda: ran == [1], "the job deferred after the flood")
        finally:
            worker.stop()
            await run
    logged = recorder.with_action("malformed_notification")
    counted = recorder.with_action("malformed_notifications_counted")
    # Before: one WARNING record per notification (20,000).
    assert 1 <= len(logged) + len(counted) <= MOST_RECORDS, (len(logged), len(counted))
    # None is lost: each is logged or counted, the counts logged by the stop at the latest.
    numbers = [COUNTED.search(record.getMessage()) for record in counted]
    assert all(numbers), [record.getMessage() for record in counted]
    assert len(logged) + sum(int(number[1]) for number in numbers if number) == FLOOD
    assert all(record.levelname == "WARNING" for record in [*logged, *counted])
