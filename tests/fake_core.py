"""A fake of fastworker's own binding (`fastworker.runner.core_port.CorePort`), for the
roles' unit tests: it records what the roles ask of the core. Never a fake database: the
integration suites run the real core on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

from fastworker import _core
from fastworker.runner.outcome_sink import Outcome


class FakeCore:
    """Takes outcomes as the binding does: a batch at once, or an error for the whole
    batch (``refuse``: the outcomes it cannot take, as the binding refuses values it
    cannot convert; ``shut_down``: it raises WorkerShutDown, as the binding does once shut
    down)."""

    def __init__(self, worker_id: int = 1, *, wakeup_fd: bool = False) -> None:
        self.worker_id = worker_id
        self.batches: list[list[Outcome]] = []
        self.reported = asyncio.Event()  # set at each batch taken
        self.refuse: Callable[[Outcome], bool] = lambda outcome: False
        self.shut_down = False
        self.fetching_stopped = False
        self.hard_stopped = False
        self.events: asyncio.Queue[list[_core.Event] | None] = asyncio.Queue()
        # As the binding's: a descriptor that turns readable when events wait.
        self._wakeups = os.pipe() if wakeup_fd else None

    def push(self, events: list[_core.Event] | None) -> None:
        """Events for the runner (None: the stream ends, as after a shutdown)."""
        self.events.put_nowait(events)
        if self._wakeups is not None:
            os.write(self._wakeups[1], b"x")

    def close(self) -> None:
        if self._wakeups is not None:
            for fd in self._wakeups:
                os.close(fd)
            self._wakeups = None

    def report(self, outcomes: Sequence[Outcome]) -> None:  # type: ignore[override]
        if self.shut_down:
            raise _core.WorkerShutDown("the worker core is shut down")
        for outcome in outcomes:
            if self.refuse(outcome):
                raise ValueError(f"cannot take the outcome of job {outcome.job_id}")
        self.batches.append(list(outcomes))
        self.reported.set()

    def stop_fetching(self) -> None:
        self.fetching_stopped = True

    def hard_stop(self) -> None:
        self.hard_stopped = True

    async def next_events(self, max_events: int = 4096) -> list[_core.Event] | None:
        return await self.events.get()

    def events_fd(self) -> int | None:
        return None if self._wakeups is None else self._wakeups[0]

    def take_events(self) -> list[_core.Event] | None:
        if self._wakeups is not None:
            os.read(self._wakeups[0], 1)
        return self.events.get_nowait()

    async def shutdown(self) -> None:
        self.shut_down = True
        self.push(None)
