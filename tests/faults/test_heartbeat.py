"""The heartbeat and the connects it waits on, under a half-open connection and a
black-holed start-up (issue 20, items 2 and 3), through the real fault proxy.

- A live worker whose database is reachable never looks stalled: one heartbeat that goes
  unanswered is sent again on a new connection in time, and the row's age, read from the
  database by another session, stays below `stalled_worker_timeout`.
- `connect_timeout` bounds a connection's whole establishment (start-up, authentication,
  the session settings), as libpq's does, not only the TCP connect.
- A hard stop never waits for a connect.

Each test fails on the code before the fix it covers. The timings are the defaults scaled
down by 5 (heartbeat 2 s, stalled 6 s, response 6 s for 10 / 30 / 30), and nothing is
timed: the waits are bounded only to decide how long a failing test takes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import procrastinate
import pytest
from psycopg.conninfo import conninfo_to_dict

import fastworker
from fastworker import _core
from tests.conftest import fetch_all, server_address
from tests.faults.harness import (
    FOREVER,
    PATIENCE,
    black_hole_every_start_up,
    black_hole_of,
    check_runs,
    classify,
    create_tables,
    defer,
    fault_app,
    running,
    wait_until,
)
from tests.faults.proxy import Fault, FaultProxy

#: The defaults (10 s / 30 s / 30 s) divided by 5.
SCALED: dict[str, Any] = {
    "update_heartbeat_interval": 2.0,
    "stalled_worker_timeout": 6.0,
    "response_timeout": 6.0,
    "fetch_job_polling_interval": 3600,
    "abort_job_polling_interval": 3600,
}

#: Far longer than any wait of the tests: a connect that waits for a black-holed start-up
#: to end would make them fail.


def heartbeat_age(dsn: str, worker_id: int) -> float | None:
    """Seconds since the worker's row was last written, in the database's clock; None if
    the row is gone."""
    rows = fetch_all(
        dsn,
        "SELECT extract(epoch FROM now() - last_heartbeat)::float8 "
        "FROM procrastinate_workers WHERE id = %s",
        worker_id,
    )
    return float(rows[0][0]) if rows else None


async def oldest_heartbeat_until(dsn: str, worker: fastworker.Worker, done: Any) -> float:
    """Sample the worker's heartbeat age from another session until `done()`; the oldest
    seen. The row must never be gone (pruned or registered again)."""
    worker_id = worker.worker_id
    assert worker_id is not None
    oldest = 0.0
    deadline = time.monotonic() + PATIENCE
    while not done():
        assert time.monotonic() < deadline, "the heartbeats never resumed"
        age = await asyncio.to_thread(heartbeat_age, dsn, worker_id)
        assert age is not None, f"worker {worker_id}'s row is gone"
        assert worker.worker_id == worker_id, "the worker registered again"
        oldest = max(oldest, age)
        await asyncio.sleep(0.05)
    return oldest


# --- item 2: one unanswered heartbeat ------------------------------------------------------


@pytest.mark.slow
async def test_one_unanswered_heartbeat_never_lets_the_row_look_stalled(dsn: str) -> None:
    """The proxy swallows one heartbeat (its connection turns half-open). The heartbeat
    used to wait `response_timeout` for it, then reconnect: at the defaults the row aged to
    about 40 s, past `stalled_worker_timeout` (30 s), and any other worker could take this
    live one for stalled and run its jobs again. Here (scaled by 5) it aged to about 8 s
    for a timeout of 6 s."""
    create_tables(dsn)
    app = fault_app(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        async with app.open_async(), running(app, dsn=proxy.dsn(dsn), **SCALED) as worker:
            assert await asyncio.to_thread(proxy.wait_seen, "heartbeat", 1, PATIENCE)
            fault = proxy.add_fault(
                # Swallowed before the server sees it: the row is not written.
                black_hole_of("heartbeat")
            )
            seen = proxy.counts.get("heartbeat", 0)

            def resumed() -> bool:
                # The swallowed one, the one sent again, and one more after it.
                return proxy.has_fired(fault) and proxy.counts.get("heartbeat", 0) >= seen + 3

            oldest = await oldest_heartbeat_until(dsn, worker, resumed)
    assert oldest < SCALED["stalled_worker_timeout"], (
        f"the heartbeat aged to {oldest:.1f} s "
        f"(stalled_worker_timeout {SCALED['stalled_worker_timeout']} s)"
    )


@pytest.mark.slow
async def test_a_black_holed_reconnect_of_the_heartbeat_never_lets_the_row_look_stalled(
    dsn: str,
) -> None:
    """The heartbeat's connection is cut, and the start-up of its new connection is
    swallowed: the connect used to wait for it without a bound (the proxy's black hole
    here outlasts the test), the row aging all that time."""
    create_tables(dsn)
    app = fault_app(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        core_dsn = proxy.dsn(dsn) + f" connect_timeout={int(FOREVER)}"
        async with app.open_async(), running(app, dsn=core_dsn, **SCALED) as worker:
            assert await asyncio.to_thread(proxy.wait_seen, "heartbeat", 1, PATIENCE)
            cut = proxy.add_fault(Fault(kind="heartbeat", point="before_request", action="cut"))
            black_hole = proxy.add_fault(black_hole_of("startup"))
            seen = proxy.counts.get("heartbeat", 0)

            def resumed() -> bool:
                return (
                    proxy.has_fired(cut)
                    and proxy.has_fired(black_hole)
                    and proxy.counts.get("heartbeat", 0) >= seen + 3
                )

            oldest = await oldest_heartbeat_until(dsn, worker, resumed)
    assert oldest < SCALED["stalled_worker_timeout"], f"the heartbeat aged to {oldest:.1f} s"


# --- item 3: connect_timeout bounds the whole establishment --------------------------------


@pytest.mark.parametrize("swallowed", ["startup", "set"])
async def test_a_black_holed_reconnect_of_the_job_connection_fails_in_time_and_is_retried(
    dsn: str, swallowed: str
) -> None:
    """The job connection is cut; its new connection's start-up packet (or its session
    settings) goes unanswered. Only the TCP connect had a bound: the dispatcher waited for
    ever (here: longer than the test), and the job deferred meanwhile never ran. Now
    `connect_timeout` (2 s) ends the attempt and the next one claims the job."""
    create_tables(dsn)
    app = fault_app(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        core_dsn = proxy.dsn(dsn) + " connect_timeout=2"
        async with app.open_async(), running(app, dsn=core_dsn, **SCALED):
            cut = proxy.add_fault(Fault(kind="claim", point="before_request", action="cut"))
            black_hole = proxy.add_fault(black_hole_of(swallowed))
            job = defer(dsn, "ok")
            await wait_until(
                lambda: fetch_all(
                    dsn,
                    "SELECT 1 FROM procrastinate_jobs WHERE id = %s AND status = 'succeeded'",
                    job[0],
                ),
                "the job, claimed on a new connection",
            )
            assert proxy.has_fired(cut) and proxy.has_fired(black_hole)
    check_runs(dsn)


async def test_a_black_holed_start_up_fails_the_connect_within_connect_timeout(
    dsn: str,
) -> None:
    """The core's connect (here through its Python binding's probe) used to wait for a
    swallowed start-up packet for ever; now it fails with DatabaseUnreachable once
    connect_timeout has passed, naming it."""
    with FaultProxy(*server_address()) as proxy:
        fault = proxy.add_fault(black_hole_of("startup"))
        connection = {
            key: str(value)
            for key, value in conninfo_to_dict(proxy.dsn(dsn) + " connect_timeout=2").items()
        }
        with pytest.raises(fastworker.DatabaseUnreachable, match="connect_timeout"):
            await asyncio.wait_for(_core.probe_connection(connection), PATIENCE)
        assert proxy.has_fired(fault)
        # The next connect goes through.
        landed = await asyncio.wait_for(_core.probe_connection(connection), PATIENCE)
        assert landed["database"] == conninfo_to_dict(dsn)["dbname"]


# --- a hard stop never waits for a connect --------------------------------------------------


@pytest.mark.slow
async def test_a_worker_cancelled_twice_during_black_holed_connects_ends(dsn: str) -> None:
    """Every connection of the core is cut and every new one's start-up swallowed (with a
    connect_timeout longer than the test). A worker cancelled twice (a hard stop) used to
    wait for those connects (its heartbeat's, its listener's, its dispatcher's): it must
    end without them, leaving the job it ran `doing` for the stalled-job recovery."""
    create_tables(dsn)
    app = fault_app(dsn)
    job = defer(dsn, "sleepy", seconds=2.0)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        core_dsn = proxy.dsn(dsn) + f" connect_timeout={int(FOREVER)}"
        async with app.open_async():
            worker = fastworker.Worker(
                app,
                dsn=core_dsn,
                install_signal_handlers=False,
                concurrency=1,
                reconnect_timeout=FOREVER,
                **{**SCALED, "update_heartbeat_interval": 0.5},
            )
            task = asyncio.create_task(worker.run())
            await wait_until(lambda: fetch_all(dsn, "SELECT 1 FROM fw_runs"), "the job to start")
            black_holes = black_hole_every_start_up(proxy)
            proxy.cut_all()
            # The job ends; its outcome cannot be written; every role is reconnecting.
            await wait_until(
                lambda: sum(proxy.has_fired(fault) for fault in black_holes) >= 2,
                "reconnects waiting on swallowed start-ups",
            )
            task.cancel()
            await asyncio.sleep(0.5)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, PATIENCE)
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", job[0]) == [
        ("doing",)
    ]


async def test_a_worker_cancelled_twice_while_its_first_connect_is_black_holed_ends(
    dsn: str,
) -> None:
    """The start-up packet of the worker's very first connection is swallowed (with a
    connect_timeout longer than the test). A hard stop used to wait for the start to end;
    now it drops the start."""
    app = fault_app(dsn)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        fault = proxy.add_fault(black_hole_of("startup"))
        core_dsn = proxy.dsn(dsn) + f" connect_timeout={int(FOREVER)}"
        async with app.open_async():
            worker = fastworker.Worker(app, dsn=core_dsn, install_signal_handlers=False)
            task = asyncio.create_task(worker.run())
            assert await asyncio.to_thread(proxy.wait_fired, fault, PATIENCE)
            task.cancel()
            await asyncio.sleep(0.5)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, PATIENCE)
    assert worker.worker_id is None
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


@pytest.mark.parametrize(
    ("interval", "stalled", "warned"),
    [(10.0, 30.0, False), (2.0, 6.0, False), (30.0, 30.0, True), (5.0, 6.5, True)],
)
def test_settings_that_leave_the_heartbeat_no_room_are_warned_about(
    app: procrastinate.App,
    caplog: pytest.LogCaptureFixture,
    interval: float,
    stalled: float,
    warned: bool,
) -> None:
    """Accepted, as procrastinate accepts them, but said: with less than 2 s between the
    interval and the timeout, one unanswered heartbeat may let the row look stalled."""
    caplog.set_level(logging.WARNING)
    fastworker.Worker(app, update_heartbeat_interval=interval, stalled_worker_timeout=stalled)
    actions = [getattr(record, "action", None) for record in caplog.records]
    assert ("stalled_worker_timeout_too_short" in actions) == warned, actions
