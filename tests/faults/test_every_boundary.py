"""Cut every kind of round trip of the core at every message boundary, and check the
invariants after the drain.

For each kind of round trip (claim; complete-and-claim; the retry transaction; the
one-by-one fallback of a refused batch; heartbeat; abort poll; orphan search; stalled-worker
recovery; LISTEN) and each point of it (before the request, in the middle of it, after it,
after the first reply message, just before ReadyForQuery), the fault proxy cuts the
connection (or black-holes it, or delays it) once, while a worker in this process drains a
mix of jobs. Then, from the database and the tasks' own records:

- every job ran attempts 0..k in order, with no gap and no duplicate;
- no job is left `doing` (or `todo`);
- the worker still runs `concurrency` jobs at once (no slot lost);
- the worker never stopped on its own.

Every case checks that its fault really fired: a boundary that never happens is a failure,
not a pass. Nothing is timed: the waits are bounded, the faults happen when they happen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.conftest import server_address
from tests.faults.harness import (
    PATIENCE,
    add_stalled_worker_with_a_job,
    all_slots_work,
    check_runs,
    classify,
    create_tables,
    defer,
    fault_app,
    release_row_locks,
    running,
    settled,
    wait_until,
)
from tests.faults.proxy import Fault, FaultProxy

CONCURRENCY = 4


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    point: str
    action: str = "cut"
    workload: str = "mixed"
    occurrence: int = 1
    # For after_reply_message: the reply message to act after (index 0, or a type).
    index: int = 0
    reply_type: str | None = None

    @property
    def id(self) -> str:
        where = self.point
        if self.point == "after_reply_message":
            where = f"after_{self.reply_type or self.index}"
        suffix = "" if self.occurrence == 1 else f"#{self.occurrence}"
        return f"{self.workload}-{self.kind}{suffix}-{where}-{self.action}"

    def fault(self) -> Fault:
        return Fault(
            kind=self.kind,
            occurrence=self.occurrence,
            point=self.point,  # type: ignore[arg-type]
            index=self.index,
            reply_type=self.reply_type,
            action=self.action,  # type: ignore[arg-type]
            delay_seconds=1.0,
            blackhole_seconds=30.0,
        )


def extended(
    kind: str, workload: str = "mixed", occurrence: int = 1, last: str = "C"
) -> list[Case]:
    """The boundaries of a prepared statement's round trip (Bind/Execute/Sync; replies
    BindComplete, rows, CommandComplete (or ErrorResponse: `last`), ReadyForQuery)."""
    return [
        Case(kind, "before_request", workload=workload, occurrence=occurrence),
        Case(kind, "mid_request", workload=workload, occurrence=occurrence),
        Case(kind, "after_request", workload=workload, occurrence=occurrence),
        Case(kind, "after_reply_message", workload=workload, occurrence=occurrence, index=0),
        Case(
            kind, "after_reply_message", workload=workload, occurrence=occurrence, reply_type=last
        ),
    ]


def simple(kind: str, workload: str = "mixed") -> list[Case]:
    """The boundaries of a simple query (Query; replies CommandComplete, ReadyForQuery)."""
    return [
        Case(kind, "before_request", workload=workload),
        Case(kind, "after_request", workload=workload),
        Case(kind, "after_reply_message", workload=workload, reply_type="C"),
    ]


CASES = [
    # Claims alone: the first one at start, then one in the middle of the drain.
    *extended("claim", occurrence=2),
    Case("claim", "before_request"),
    Case("claim", "after_request", action="blackhole", occurrence=2),
    # One statement that ends a batch and claims.
    *extended("complete_and_claim"),
    Case("complete_and_claim", "after_request", action="blackhole"),
    Case("complete_and_claim", "after_request", action="delay"),
    # The retry transaction: BEGIN, the batch with retries, the claim, COMMIT.
    *simple("begin"),
    *extended("complete"),
    *simple("commit"),
    Case("commit", "after_request", action="blackhole"),
    # A batch held up by a row that another session keeps locked: one by one (the locked
    # row's own write fails on its lock timeout: an ErrorResponse). The lock is held for
    # 6 s, far longer than the lock timeout, so that even a slow machine writes the end
    # while it is held.
    *extended("finish_one", workload="locked_ok", last="E"),
    *extended("retry_one", workload="locked_flaky", last="E"),
    # The registry's duties.
    *extended("heartbeat"),
    Case("heartbeat", "after_request", action="blackhole"),
    *[dataclasses.replace(case, workload="aborts") for case in simple("abort_poll")],
    # The periodic search for claims this worker never heard of.
    Case("orphans", "before_request"),
    Case("orphans", "after_request"),
    Case("orphans", "after_reply_message", reply_type="C"),
    # The notifications connection.
    *simple("listen"),
    Case("listen", "after_request", action="blackhole"),
    # Stalled-worker recovery (its own connection and transaction).
    Case("recover_lock", "before_request", workload="recovery"),
    Case("recover_lock", "after_reply_message", workload="recovery", reply_type="C"),
    Case("recover_retry", "before_request", workload="recovery"),
    Case("recover_retry", "after_request", workload="recovery"),
    Case("recover_retry", "after_reply_message", workload="recovery", reply_type="C"),
    *[dataclasses.replace(case, workload="recovery") for case in simple("commit")],
]


def worker_options(case: Case, proxy_dsn: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "dsn": proxy_dsn,
        "concurrency": CONCURRENCY,
        # No polling to catch up: a missed wake-up shows as jobs left `todo`.
        "fetch_job_polling_interval": 3600,
        "abort_job_polling_interval": 0.2 if case.workload == "aborts" else 3600,
        "update_heartbeat_interval": 0.5,
        "response_timeout": 2.0,
        "reconnect_timeout": 120.0,
    }
    # Recovery is on by default; off but for its own cases, so that a fault armed before
    # the start is met by the drain, not by the start-up recovery's statements.
    options["recover_stalled_jobs"] = case.workload == "recovery"
    if case.workload == "recovery":
        options.update(stalled_worker_timeout=2.0)
    return options


def first_half(dsn: str, case: Case) -> None:
    # The row stays locked until the fault has fired (the write waits for it, fails,
    # falls back to one-by-one writes, which fail too), however slow the machine. The
    # locked job runs alone: another job's one-by-one write, coming first, would take the
    # fault's occurrence without the error reply it waits for.
    if case.workload == "locked_ok":
        defer(dsn, "locked_ok", hold=-1)
        return
    if case.workload == "locked_flaky":
        defer(dsn, "locked_flaky", hold=-1)
        return
    elif case.workload == "aborts":
        defer(dsn, "sleepy", 6, seconds=0.6)
        return
    defer(dsn, "ok", 6)
    if case.workload != "recovery":
        defer(dsn, "flaky", 4)


def second_half(dsn: str, case: Case) -> None:
    defer(dsn, "ok", 6)
    if case.workload in ("mixed", "locked_ok", "locked_flaky"):
        defer(dsn, "flaky", 4)
    if case.workload == "aborts":
        defer(dsn, "sleepy", 4, seconds=0.6)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
async def test_a_fault_at_this_boundary_loses_no_job_runs_none_twice_keeps_every_slot(
    dsn: str, case: Case
) -> None:
    create_tables(dsn)
    app = fault_app(dsn)
    first_half(dsn, case)
    with FaultProxy(*server_address(), classify=classify) as proxy:
        # Armed before the start, so that the first drain meets it; the recovery's are
        # armed after it, so that a recovery round meets them, not the start-up prune.
        fault = proxy.add_fault(case.fault()) if case.workload != "recovery" else None
        async with app.open_async():
            async with running(app, **worker_options(case, proxy.dsn(dsn))):
                if fault is None:
                    add_stalled_worker_with_a_job(dsn)
                    fault = proxy.add_fault(case.fault())
                armed = fault
                fired = await wait_until(
                    lambda: proxy.has_fired(armed), f"the fault {case.id} to fire"
                )
                assert fired
                release_row_locks()
                second_half(dsn, case)
                await wait_until(lambda: settled(dsn), "every job to end", patience=PATIENCE)
                await all_slots_work(dsn, CONCURRENCY)
    assert not proxy.errors, proxy.errors
    check_runs(dsn)
