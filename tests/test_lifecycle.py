"""The run's lifecycle against a fake of the binding (`tests/fake_core.py`): signals,
drains, the core's fatal error, the hard stop from this thread and from another."""

from __future__ import annotations

import asyncio
import threading

from fastworker.runner.lifecycle import Lifecycle
from tests.fake_core import FakeCore


def test_the_first_signal_stops_gracefully_the_next_ones_hard() -> None:
    lifecycle = Lifecycle(asyncio.Event())
    assert [lifecycle.stop_signal() for _ in range(3)] == [True, False, False]
    lifecycle.begin()
    assert lifecycle.stop_signal() is True


def test_a_finished_drain_stops_the_worker() -> None:
    stop_event = asyncio.Event()
    lifecycle = Lifecycle(stop_event)
    lifecycle.drain_finished()
    assert lifecycle.drained and stop_event.is_set()
    lifecycle.begin()
    assert not lifecycle.drained


def test_the_first_fatal_error_of_the_core_is_the_one_raised() -> None:
    stop_event = asyncio.Event()
    lifecycle = Lifecycle(stop_event)
    first, second = RuntimeError("first"), RuntimeError("second")
    lifecycle.core_failed(first)
    lifecycle.core_failed(second)
    assert lifecycle.fatal_error is first and stop_event.is_set()
    lifecycle.begin()
    assert lifecycle.fatal_error is None


async def test_fetching_stopped_resolves_once_and_only_once_fetching_began() -> None:
    lifecycle = Lifecycle(asyncio.Event())
    lifecycle.fetching_stopped()  # before the loop runs jobs: nothing to resolve
    stopped = lifecycle.begin_fetching(asyncio.get_running_loop())
    assert lifecycle.wait_fetching_stopped() is stopped and not stopped.done()
    lifecycle.fetching_stopped()
    lifecycle.fetching_stopped()
    await asyncio.wait_for(stopped, timeout=60)


async def test_a_hard_stop_reaches_the_core_and_the_loop_from_this_thread() -> None:
    core = FakeCore()
    lifecycle = Lifecycle(asyncio.Event())
    lifecycle.request_hard_stop(core, asyncio.get_running_loop())
    assert core.hard_stopped and lifecycle.hard_stop_requested


async def test_a_hard_stop_from_another_thread_wakes_the_loop() -> None:
    core = FakeCore()
    lifecycle = Lifecycle(asyncio.Event())
    loop = asyncio.get_running_loop()
    thread = threading.Thread(target=lifecycle.request_hard_stop, args=(core, loop))
    thread.start()
    await asyncio.wait_for(lifecycle.hard_stop_event.wait(), timeout=60)
    thread.join(timeout=60)
    assert core.hard_stopped


def test_a_hard_stop_before_the_core_started_is_kept() -> None:
    lifecycle = Lifecycle(asyncio.Event())
    lifecycle.request_hard_stop(None, None)
    assert lifecycle.hard_stop_requested
    lifecycle.begin()
    assert not lifecycle.hard_stop_requested
