"""The threads sync jobs run in (`SyncThreads`).

procrastinate runs a sync task's function (with its sync middleware) through asgiref's
``sync_to_async(thread_sensitive=False)``: in the loop's default executor, whose size is
``min(32, cores + 4)`` whatever the worker's ``concurrency``, so that at ``concurrency=50``
on a 2-core machine at most 6 sync jobs run at once and the others wait for a thread.

With ``sync_executor="threads"`` (the default), the worker owns a pool of ``concurrency``
threads instead, made when a run starts and shut down when it ends: every running sync job
has a thread. ``sync_executor="default"`` keeps procrastinate's behaviour. Either way the
call is asgiref's, so contextvars, thread-local state (Django's connections are per thread)
and exceptions behave as under procrastinate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from asgiref import sync

#: The names of the pool's threads start with this.
THREAD_NAME_PREFIX = "fastworker-sync"

#: The values of the worker's ``sync_executor`` option.
THREADS = "threads"
DEFAULT = "default"
MODES = (THREADS, DEFAULT)

logger = logging.getLogger("fastworker.worker")


class _Pool(ThreadPoolExecutor):
    """A thread pool that counts the calls submitted and not finished yet."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=THREAD_NAME_PREFIX)
        self._lock = threading.Lock()
        self.unfinished = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        with self._lock:
            self.unfinished += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future[Any]) -> None:
        with self._lock:
            self.unfinished -= 1


class SyncThreads:
    """Owns the pool sync jobs run in during a run (none with ``mode="default"``: the
    loop's default executor, procrastinate's)."""

    def __init__(self, *, concurrency: int, mode: str) -> None:
        self._concurrency = concurrency
        self._mode = mode
        self._pool: _Pool | None = None

    @property
    def executor(self) -> ThreadPoolExecutor | None:
        """The pool of this run; None (the loop's default executor) with
        ``mode="default"`` or outside a run."""
        return self._pool

    def begin_run(self) -> None:
        if self._mode == THREADS:
            self._pool = _Pool(self._concurrency)

    def end_run(self) -> None:
        """Shut the pool down once the run's jobs have ended. Its threads are joined; but a
        thread still running a sync function (its job's task was cancelled, which does not
        stop a thread) is not waited for: it ends when the function returns."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        busy = pool.unfinished
        if busy:
            logger.warning(
                f"{busy} sync job function(s) still running after the run ended: their "
                "threads end when they return",
                extra={"action": "sync_threads_still_running", "count": busy},
            )
        pool.shutdown(wait=not busy, cancel_futures=True)

    async def run(self, func: Callable[[], Any]) -> Any:
        """``func()`` in a thread of the pool (or of the loop's default executor), as
        procrastinate's ``utils.sync_to_async`` calls it: asgiref's ``sync_to_async``,
        not thread-sensitive."""
        return await sync.sync_to_async(func, thread_sensitive=False, executor=self._pool)()
