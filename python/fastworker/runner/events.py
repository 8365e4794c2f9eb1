"""The event pump (`EventPump`): takes the core's events as they come and hands each to
the role it is for: claimed jobs, abort requests and lost claims to the job runner, the
end of fetching, a drain's end and a fatal error to the lifecycle, the core's log records
to the `fastworker.core` logger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from typing_extensions import assert_never

from fastworker import _core
from fastworker.runner.core_port import CorePort
from fastworker.runner.lifecycle import Lifecycle

# The core's own log records, relayed by the pump.
core_logger = logging.getLogger("fastworker.core")


@dataclass(frozen=True)
class EventHandlers:
    """Where the pump hands what is not the lifecycle's."""

    start_job: Callable[[_core.Job], None]
    abort_jobs: Callable[[list[int]], None]
    stop_lost_claims: Callable[[list[tuple[int, int]]], None]
    #: The core registered the worker again, under a new id.
    set_worker_id: Callable[[int], None]
    #: The core failed for good (the lifecycle is told after this is called).
    log_core_failure: Callable[[BaseException], None]


class EventPump:
    """Owns only the reading of the core's events, in order; may call the core's event
    methods (`events_fd`, `take_events`, `next_events`), the lifecycle and the handlers."""

    def __init__(self, core: CorePort, lifecycle: Lifecycle, handlers: EventHandlers) -> None:
        self._core = core
        self._lifecycle = lifecycle
        self._handlers = handlers

    async def run(self) -> None:
        """Take the core's events until its stream ends (once the core is shut down)."""
        loop = asyncio.get_running_loop()
        fd = self._core.events_fd()
        if fd is not None:
            try:
                await self._run_on_wakeups(loop, fd)
                return
            except NotImplementedError:
                pass  # an event loop without add_reader (Windows' proactor)
        while True:
            events = await self._core.next_events()
            if events is None:
                self._lifecycle.fetching_stopped()
                return
            self.handle(events)

    async def _run_on_wakeups(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        """Take the core's events when its descriptor turns readable: the core writes a byte
        from its own thread, and the jobs start in this very loop iteration (no future to
        resolve from another thread, no GIL hand-over in between)."""
        ended: asyncio.Future[None] = loop.create_future()
        core = self._core

        def on_readable() -> None:
            if ended.done():
                return
            try:
                events = core.take_events()
                if events is None:
                    ended.set_result(None)
                else:
                    self.handle(events)
            except BaseException as error:  # surfaces in the awaiting task
                ended.set_exception(error)

        loop.add_reader(fd, on_readable)
        try:
            await ended
        finally:
            loop.remove_reader(fd)
        self._lifecycle.fetching_stopped()

    def handle(self, events: list[_core._AnyEvent]) -> None:
        handlers = self._handlers
        for event in events:
            match event:
                case _core.Event.Jobs(jobs=claimed):
                    self._lifecycle.jobs_handed_over(len(claimed))
                    for row in claimed:
                        handlers.start_job(row)
                case _core.Event.Abort(job_ids=job_ids):
                    handlers.abort_jobs(job_ids)
                case _core.Event.Log(level=level, action=action, message=message, job_id=job_id):
                    core_logger.log(level, message, extra={"action": action, "job_id": job_id})
                case _core.Event.Drained():
                    self._lifecycle.drain_finished()
                case _core.Event.FetchingStopped():
                    self._lifecycle.fetching_stopped()
                case _core.Event.WorkerId(worker_id=worker_id):
                    handlers.set_worker_id(worker_id)
                case _core.Event.ClaimsLost(claims=claims):
                    handlers.stop_lost_claims(claims)
                case _core.Event.Fatal(error=error):
                    handlers.log_core_failure(error)
                    self._lifecycle.core_failed(error)
                case _:
                    assert_never(event)
