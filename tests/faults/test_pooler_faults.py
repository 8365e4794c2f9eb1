"""Pooler mode under faults: the fault proxy between the worker and a real PgBouncer in
transaction mode (`tests/test_pooler.py` starts it), for the main kinds of round trip
of the core: a cut, a black-hole (half-open) and a lost reply, checked against the same
invariants as `test_every_boundary.py` (every job ran once per attempt, none is left
`doing`, every slot still works, the worker never stopped on its own).

Behind a pooler, every statement of the core is `BEGIN; SET LOCAL ...`, the statement and
`COMMIT`, pipelined: a black-hole after the statement (or before the `COMMIT`) leaves a
transaction open on one of PgBouncer's server connections, holding the row locks of what
it claimed or wrote. PgBouncer notices a silent client only through TCP keepalive (about
2 hours by default), and the worker cannot end that server process (it is the pooler's,
shared): the server must end the transaction itself (the core's
`idle_in_transaction_session_timeout`, `rust/core/src/connect.rs`).

LISTEN goes straight to the server (`listen_dsn`), as `pooler=True` requires, so new
jobs wake the worker; rows that a black-holed transaction held come back with no
notification, and are found by the poll (`fetch_job_polling_interval`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import fetch_all
from tests.faults.harness import (
    all_slots_work,
    check_runs,
    classify,
    create_tables,
    defer,
    fault_app,
    running,
    settled,
    wait_until,
)
from tests.faults.proxy import Fault, FaultProxy
from tests.test_pooler import PGBOUNCER, bouncer  # noqa: F401 (bouncer: a fixture)

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; scripts/test.sh does)",
)

CONCURRENCY = 4

#: A black-hole lasts far longer than any wait of these tests: only the worker's own
#: bounds (and the server's) can end what it holds.
BLACKHOLE_SECONDS = 900.0


def _bouncer_address(bouncer_dsn: str) -> tuple[str, int]:
    params = conninfo_to_dict(bouncer_dsn)
    return str(params["host"]), int(str(params["port"]))


def _options(proxy_dsn: str, dsn: str, *, response_timeout: float = 2.0) -> dict[str, Any]:
    return {
        "dsn": proxy_dsn,
        "pooler": True,
        "listen_dsn": dsn,
        "concurrency": CONCURRENCY,
        "fetch_job_polling_interval": 1.0,
        "abort_job_polling_interval": 3600,
        "update_heartbeat_interval": 0.5,
        "response_timeout": response_timeout,
        "reconnect_timeout": 120.0,
    }


def _held_by_an_idle_transaction(dsn: str) -> int:
    """Server processes idle in a transaction that wrote or locked job rows."""
    [(count,)] = fetch_all(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
    )
    return int(count)


async def test_a_half_open_job_connection_in_a_claim_transaction_gives_its_jobs_back(
    bouncer: str,  # noqa: F811 (the fixture)
    dsn: str,
) -> None:
    """Item 4 of issue 20: the claim's transaction is sent through PgBouncer, then the
    connection goes silent before its COMMIT (black-holed after the claim). The claimed
    rows stay locked in an open transaction on a server connection of PgBouncer's. They
    must come back and run, long before PgBouncer's keepalive would notice."""
    create_tables(dsn)
    app = fault_app(dsn)
    defer(dsn, "ok", 6)
    defer(dsn, "flaky", 4)
    with FaultProxy(*_bouncer_address(bouncer), classify=classify) as proxy:
        fault = proxy.add_fault(
            Fault(
                kind="claim",
                point="after_request",
                action="blackhole",
                blackhole_seconds=BLACKHOLE_SECONDS,
            )
        )
        async with app.open_async():
            # A longer response timeout: the open transaction lasts about that long,
            # plenty of time to see it from here.
            options = _options(proxy.dsn(bouncer), dsn, response_timeout=5.0)
            async with running(app, **options):
                await wait_until(lambda: proxy.has_fired(fault), "the claim to be black-holed")
                await wait_until(
                    lambda: _held_by_an_idle_transaction(dsn),
                    "the black-holed claim's open transaction, holding its rows",
                )
                await wait_until(lambda: settled(dsn), "every job to end")
                await all_slots_work(dsn, CONCURRENCY)
    assert not proxy.errors, proxy.errors
    check_runs(dsn)
    assert _held_by_an_idle_transaction(dsn) == 0


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    point: str
    action: str
    reply_type: str | None = None
    # Armed once the worker runs, and the jobs deferred then (a COMMIT or a BEGIN of
    # the start-up would take the fault otherwise).
    after_start: bool = False

    @property
    def id(self) -> str:
        where = f"after_{self.reply_type}" if self.reply_type else self.point
        return f"{self.kind}-{where}-{self.action}"

    def fault(self) -> Fault:
        return Fault(
            kind=self.kind,
            point=self.point,  # type: ignore[arg-type]
            reply_type=self.reply_type,
            action=self.action,  # type: ignore[arg-type]
            blackhole_seconds=BLACKHOLE_SECONDS,
        )


# A "lost reply" is a cut after the whole request was sent: the server ran it (and, for a
# COMMIT, committed), the worker never hears of it.
CASES = [
    # The claim: the first one, at start, with the jobs waiting.
    Case("claim", "before_request", "cut"),
    Case("claim", "after_request", "cut"),
    Case("claim", "after_reply_message", "cut", reply_type="C"),
    Case("claim", "after_request", "blackhole"),
    # Completions and the next claim in one statement.
    Case("complete_and_claim", "after_request", "cut"),
    Case("complete_and_claim", "after_request", "blackhole"),
    # The completions with retries (the retry transaction), or on their own.
    Case("complete", "after_request", "cut"),
    Case("complete", "after_request", "blackhole"),
    # The transaction's ends, whichever connection's comes first.
    Case("begin", "after_request", "blackhole", after_start=True),
    Case("commit", "before_request", "blackhole", after_start=True),
    Case("commit", "after_request", "cut", after_start=True),
    # The heartbeat (its transaction holds the worker's row).
    Case("heartbeat", "after_request", "cut", after_start=True),
    Case("heartbeat", "after_request", "blackhole", after_start=True),
]


def _jobs(dsn: str) -> None:
    defer(dsn, "ok", 6)
    defer(dsn, "flaky", 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
async def test_a_fault_through_pgbouncer_loses_no_job_runs_none_twice_keeps_every_slot(
    bouncer: str,  # noqa: F811 (the fixture)
    dsn: str,
    case: Case,
) -> None:
    create_tables(dsn)
    app = fault_app(dsn)
    if not case.after_start:
        _jobs(dsn)
    with FaultProxy(*_bouncer_address(bouncer), classify=classify) as proxy:
        fault = None if case.after_start else proxy.add_fault(case.fault())
        async with app.open_async():
            async with running(app, **_options(proxy.dsn(bouncer), dsn)):
                if fault is None:
                    fault = proxy.add_fault(case.fault())
                    _jobs(dsn)
                armed = fault
                await wait_until(lambda: proxy.has_fired(armed), f"the fault {case.id} to fire")
                # More work after the fault: the worker must still claim and complete.
                _jobs(dsn)
                await wait_until(lambda: settled(dsn), "every job to end")
                await all_slots_work(dsn, CONCURRENCY)
    assert not proxy.errors, proxy.errors
    check_runs(dsn)
