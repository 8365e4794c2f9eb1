"""The run's lifecycle (`Lifecycle`): the graceful stop, the hard stop, the end of fetching
and of a drain (``wait=False``), the first fatal error of the core, the stop signals
counted. One object owns these flags; the event pump, the signal handlers and the shutdown
read and set them through it."""

from __future__ import annotations

import asyncio

from fastworker.runner.core_port import CorePort


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Lifecycle:
    """Owns the stop state of one run; may call the core's `hard_stop`.

    ``stop_event``: procrastinate's `Worker._stop_event`, shared by reference, as
    procrastinate's own `stop()` and main loop use it."""

    def __init__(self, stop_event: asyncio.Event) -> None:
        self.stop_event = stop_event
        self.hard_stop_event = asyncio.Event()
        self.fatal_error: BaseException | None = None
        self.drained = False
        # Jobs the core handed over in this run (a drain at max_jobs is not "no job found").
        self.jobs_claimed = 0
        self.signals_received = 0
        self._fetching_stopped: asyncio.Future[None] | None = None

    def begin(self) -> None:
        """A new run: no stop, no error, no signal yet (a stop request made before the
        run is cleared by the worker, as procrastinate's `run` does)."""
        self.hard_stop_event.clear()
        self.fatal_error = None
        self.drained = False
        self.jobs_claimed = 0
        self.signals_received = 0

    def begin_fetching(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        self._fetching_stopped = loop.create_future()
        return self._fetching_stopped

    def fetching_stopped(self) -> None:
        """The core claims no more (its event stream said so, or ended)."""
        if self._fetching_stopped is not None and not self._fetching_stopped.done():
            self._fetching_stopped.set_result(None)

    def wait_fetching_stopped(self) -> asyncio.Future[None]:
        assert self._fetching_stopped is not None
        return self._fetching_stopped

    def jobs_handed_over(self, count: int) -> None:
        self.jobs_claimed += count

    def drain_finished(self) -> None:
        """Nothing claimable and no job running (``wait=False``): the worker stops."""
        self.drained = True
        self.stop_event.set()

    def core_failed(self, error: BaseException) -> None:
        """The core failed: the first error is what the run raises; the worker stops."""
        if self.fatal_error is None:
            self.fatal_error = error
        self.stop_event.set()

    def stop_signal(self) -> bool:
        """A SIGINT/SIGTERM came: True if it is the first (a graceful stop), False for
        another (a hard stop)."""
        self.signals_received += 1
        return self.signals_received == 1

    def request_hard_stop(
        self, core: CorePort | None, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Abort the running jobs now; safe to call from another thread than ``loop``'s."""
        if core is not None:
            # Also ends, at once, the core's attempts to reach an unreachable database.
            core.hard_stop()
        if loop is not None and loop is not running_loop():
            loop.call_soon_threadsafe(self.hard_stop_event.set)
        else:
            self.hard_stop_event.set()

    @property
    def hard_stop_requested(self) -> bool:
        return self.hard_stop_event.is_set()
