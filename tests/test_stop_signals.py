"""Stop signals (`fastworker.runner.signals.StopSignals`) with real signals sent to this
process: the first stops gracefully, the next ones hard; handlers are put back after."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

import pytest

from fastworker.runner.lifecycle import Lifecycle
from fastworker.runner.signals import StopSignals
from tests.test_outcome_sink import LOGGER, log_extra


class Calls(list[str]):
    """The calls the handlers made, with an event at each."""

    def __init__(self) -> None:
        super().__init__()
        self.made = asyncio.Event()

    def record(self, name: str) -> None:
        self.append(name)
        self.made.set()

    async def wait_for(self, count: int) -> None:
        while len(self) < count:
            self.made.clear()
            await asyncio.wait_for(self.made.wait(), timeout=60)


def signals_with(calls: Calls) -> StopSignals:
    return StopSignals(
        Lifecycle(asyncio.Event()),
        stop=lambda: calls.record("stop"),
        hard_stop=lambda: calls.record("hard_stop"),
        logger=LOGGER,
        log_extra=log_extra,
    )


async def test_the_first_signal_stops_gracefully_the_next_ones_hard() -> None:
    calls = Calls()
    signals = signals_with(calls)
    before = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await calls.wait_for(1)
        os.kill(os.getpid(), signal.SIGINT)
        await calls.wait_for(2)
        os.kill(os.getpid(), signal.SIGTERM)
        await calls.wait_for(3)
    finally:
        signals.uninstall()
    assert calls == ["stop", "hard_stop", "hard_stop"]
    assert signal.getsignal(signal.SIGTERM) == before


async def test_outside_the_main_thread_no_handler_is_installed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="procrastinate.signals")
    signals = signals_with(Calls())
    before = signal.getsignal(signal.SIGTERM)

    def in_a_thread() -> None:
        asyncio.run(install_and_uninstall())

    async def install_and_uninstall() -> None:
        signals.install()
        signals.uninstall()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "Skipping signal handling, because this is not the main thread" in caplog.messages
    assert signal.getsignal(signal.SIGTERM) == before
