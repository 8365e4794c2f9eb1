"""A half-open connection in the middle of a transaction, directly connected: the server
ends the transaction (the core's `idle_in_transaction_session_timeout`, sized from
`response_timeout`, `rust/core/src/connect.rs`), so the rows it locked are free again.

The job connection's lost server process is also ended by the worker itself (the
dispatcher's `retire_old_backend`); the connection of stalled-worker recovery has no
such cleanup, and its transaction locks the stalled worker's row and its jobs. Pooler
mode's cases are in `test_pooler_faults.py`.
"""

from __future__ import annotations

from tests.conftest import fetch_all, server_address
from tests.faults.harness import (
    add_stalled_worker_with_a_job,
    all_slots_work,
    check_runs,
    classify,
    create_tables,
    fault_app,
    running,
    settled,
    wait_until,
)
from tests.faults.proxy import Fault, FaultProxy

CONCURRENCY = 4


def _held_by_an_idle_transaction(dsn: str) -> int:
    """Server processes idle in a transaction that holds locks on job or worker rows."""
    [(count,)] = fetch_all(
        dsn,
        "SELECT count(DISTINCT activity.pid) FROM pg_stat_activity AS activity"
        " JOIN pg_locks AS held ON held.pid = activity.pid"
        " WHERE activity.datname = current_database()"
        " AND activity.state = 'idle in transaction'"
        " AND held.relation IN"
        " ('procrastinate_jobs'::regclass, 'procrastinate_workers'::regclass)",
    )
    return int(count)


async def test_a_half_open_recovery_transaction_gives_the_stalled_job_back(dsn: str) -> None:
    """The recovery's transaction has locked a stalled worker and its job, then its
    connection goes silent (black-holed for far longer than this test waits). The job must
    still be recovered and run."""
    create_tables(dsn)
    app = fault_app(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        async with app.open_async():
            async with running(
                app,
                dsn=proxy.dsn(dsn),
                concurrency=CONCURRENCY,
                fetch_job_polling_interval=1.0,
                abort_job_polling_interval=3600,
                update_heartbeat_interval=0.5,
                # The open transaction lasts about that long: time enough to see it.
                response_timeout=5.0,
                reconnect_timeout=120.0,
                recover_stalled_jobs=True,
                stalled_worker_timeout=2.0,
            ):
                fault = proxy.add_fault(
                    Fault(
                        kind="recover_jobs",
                        point="after_reply_message",
                        reply_type="C",
                        action="blackhole",
                        blackhole_seconds=900.0,
                    )
                )
                add_stalled_worker_with_a_job(dsn)
                await wait_until(lambda: proxy.has_fired(fault), "the recovery's black-hole")
                await wait_until(
                    lambda: _held_by_an_idle_transaction(dsn),
                    "the black-holed recovery's open transaction, holding its rows",
                )
                await wait_until(lambda: settled(dsn), "the stalled job to be recovered and run")
                await all_slots_work(dsn, CONCURRENCY)
    assert not proxy.errors, proxy.errors
    check_runs(dsn)
    assert _held_by_an_idle_transaction(dsn) == 0
