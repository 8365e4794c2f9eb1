"""The event pump against a fake of the binding (`tests/fake_core.py`): each kind of event
reaches the role it is for, in order, on both ways of reading the core's events."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fastworker import _core
from fastworker.runner.events import EventHandlers, EventPump
from fastworker.runner.lifecycle import Lifecycle
from tests.fake_core import FakeCore


def recording_handlers(calls: list[tuple[str, Any]]) -> EventHandlers:
    return EventHandlers(
        start_job=lambda row: calls.append(("start_job", row)),
        abort_jobs=lambda job_ids: calls.append(("abort_jobs", job_ids)),
        stop_lost_claims=lambda claims: calls.append(("stop_lost_claims", claims)),
        set_worker_id=lambda worker_id: calls.append(("set_worker_id", worker_id)),
        log_core_failure=lambda error: calls.append(("log_core_failure", error)),
    )


@pytest.mark.parametrize("wakeup_fd", [False, True], ids=["awaited", "on_wakeups"])
async def test_every_event_reaches_its_role_in_order(
    wakeup_fd: bool, caplog: pytest.LogCaptureFixture
) -> None:
    core = FakeCore(wakeup_fd=wakeup_fd)
    stop_event = asyncio.Event()
    lifecycle = Lifecycle(stop_event)
    fetching_stopped = lifecycle.begin_fetching(asyncio.get_running_loop())
    calls: list[tuple[str, Any]] = []
    failure = _core.ConnectionLost("gone")
    core.push(
        [
            _core.Event.Jobs([]),
            _core.Event.Abort([3, 4]),
            _core.Event.Log(logging.WARNING, "core_said", "the core says so", 3),
            _core.Event.WorkerId(9),
            _core.Event.ClaimsLost([(5, 1)]),
        ]
    )
    core.push([_core.Event.Fatal(failure), _core.Event.Drained()])
    core.push([_core.Event.FetchingStopped()])
    core.push(None)
    try:
        with caplog.at_level(logging.WARNING, logger="fastworker.core"):
            await asyncio.wait_for(
                EventPump(core, lifecycle, recording_handlers(calls)).run(), timeout=60
            )
    finally:
        core.close()
    assert calls == [
        ("abort_jobs", [3, 4]),
        ("set_worker_id", 9),
        ("stop_lost_claims", [(5, 1)]),
        ("log_core_failure", failure),
    ]
    [record] = [r for r in caplog.records if r.name == "fastworker.core"]
    assert (record.getMessage(), record.action, record.job_id) == (  # type: ignore[attr-defined]
        "the core says so",
        "core_said",
        3,
    )
    assert lifecycle.fatal_error is failure and lifecycle.drained and stop_event.is_set()
    assert fetching_stopped.done()


async def test_the_end_of_the_stream_is_the_end_of_fetching() -> None:
    core = FakeCore()
    lifecycle = Lifecycle(asyncio.Event())
    fetching_stopped = lifecycle.begin_fetching(asyncio.get_running_loop())
    core.push(None)
    await asyncio.wait_for(EventPump(core, lifecycle, recording_handlers([])).run(), timeout=60)
    assert fetching_stopped.done()


async def test_a_handler_that_raises_ends_the_pump_with_its_error() -> None:
    core = FakeCore(wakeup_fd=True)
    lifecycle = Lifecycle(asyncio.Event())
    lifecycle.begin_fetching(asyncio.get_running_loop())

    def refuse(job_ids: list[int]) -> None:
        raise RuntimeError("broken handler")

    handlers = recording_handlers([])
    handlers = EventHandlers(
        start_job=handlers.start_job,
        abort_jobs=refuse,
        stop_lost_claims=handlers.stop_lost_claims,
        set_worker_id=handlers.set_worker_id,
        log_core_failure=handlers.log_core_failure,
    )
    core.push([_core.Event.Abort([1])])
    try:
        with pytest.raises(RuntimeError, match="broken handler"):
            await asyncio.wait_for(EventPump(core, lifecycle, handlers).run(), timeout=60)
    finally:
        core.close()
