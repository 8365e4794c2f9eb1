"""Scale pathologies of procrastinate's schema that fastworker's users meet on large jobs
tables (procrastinate's issue #1454): deleting a worker row, at a worker's start (the prune
of stalled workers) and at its stop (unregistering), must not read the jobs table whole
once the optional index of docs/operations.md is there.

`FASTWORKER_LARGE_TABLE_ROWS` sets the table's size (1,000,000 finished jobs by default;
the closing notes' long form used 10,000,000). No timings are asserted: the table's reads
are counted by PostgreSQL (`pg_stat_user_tables.seq_scan`)."""

from __future__ import annotations

import os

import psycopg
import pytest
from benches.measure import wait_for_clients_to_leave

import fastworker
from tests.conftest import fetch_all, make_app
from tests.doc_blocks import marked_block

ROWS = int(os.environ.get("FASTWORKER_LARGE_TABLE_ROWS", "1000000"))


def load_finished_jobs(dsn: str, rows: int) -> None:
    """`rows` finished jobs with their worker let go of, as fastworker leaves them (and as
    procrastinate's leave them once their worker is gone). Triggers off while loading."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("ALTER TABLE procrastinate_jobs DISABLE TRIGGER USER")
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)"
            " SELECT 'default', 'done', '{}', 'succeeded', 1 FROM generate_series(1, %s)",
            (rows,),
        )
        connection.execute("ALTER TABLE procrastinate_jobs ENABLE TRIGGER USER")
        connection.execute("VACUUM ANALYZE procrastinate_jobs")


def add_stalled_worker(dsn: str) -> int:
    rows = fetch_all(
        dsn,
        "INSERT INTO procrastinate_workers (last_heartbeat)"
        " VALUES (now() - interval '1 hour') RETURNING id",
    )
    return int(rows[0][0])


def sequential_reads_of_the_jobs_table(dsn: str) -> int:
    """Once every other session of the database has ended (a session's statistics reach
    the shared counters at its end at the latest)."""
    wait_for_clients_to_leave(dsn, timeout=10)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'procrastinate_jobs'"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def start_and_stop_a_worker(dsn: str) -> None:
    """A worker on an empty queue: it prunes the stalled workers, finds nothing to run,
    and unregisters."""
    app = make_app(dsn)
    async with app.open_async():
        await fastworker.run_async(app, wait=False, install_signal_handlers=False)


@pytest.mark.slow
async def test_deleting_worker_rows_reads_the_jobs_table_whole_unless_indexed(dsn: str) -> None:
    load_finished_jobs(dsn, ROWS)

    # procrastinate's schema alone: the prune at start and the unregistering at stop each
    # read the whole table.
    stalled = add_stalled_worker(dsn)
    before = sequential_reads_of_the_jobs_table(dsn)
    await start_and_stop_a_worker(dsn)
    assert sequential_reads_of_the_jobs_table(dsn) - before >= 2
    assert not fetch_all(dsn, "SELECT 1 FROM procrastinate_workers WHERE id = %s", stalled)

    # With the index of docs/operations.md: none.
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(marked_block("docs/operations.md", "worker-id-index"))  # type: ignore[arg-type]
    stalled = add_stalled_worker(dsn)
    before = sequential_reads_of_the_jobs_table(dsn)
    await start_and_stop_a_worker(dsn)
    assert sequential_reads_of_the_jobs_table(dsn) == before
    assert not fetch_all(dsn, "SELECT 1 FROM procrastinate_workers")
