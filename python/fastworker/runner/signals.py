"""Stop signals (`StopSignals`): while a run lasts, a first SIGINT/SIGTERM stops the worker
gracefully (claiming stops, running jobs finish); another one aborts the running jobs. The
signals are counted by the `Lifecycle`; the log records are procrastinate's."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from fastworker.runner.lifecycle import Lifecycle

# procrastinate's signals logger, with its actions, as its worker logs them.
signals_logger = logging.getLogger("procrastinate.signals")


class StopSignals:
    """Owns the handlers of SIGINT and SIGTERM for one run; calls ``stop`` (graceful) or
    ``hard_stop`` as the lifecycle counts the signals."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        stop: Callable[[], None],
        hard_stop: Callable[[], None],
        logger: logging.Logger,
        log_extra: Callable[..., dict[str, Any]],
    ) -> None:
        self._lifecycle = lifecycle
        self._stop = stop
        self._hard_stop = hard_stop
        self._logger = logger
        self._log_extra = log_extra
        self._previous: list[tuple[int, Any]] = []

    def on_signal(self, signum: int) -> None:
        if self._lifecycle.stop_signal():
            self._stop()
        else:
            self._logger.info(
                "Second stop signal: aborting running jobs",
                extra=self._log_extra(action="abort_running_jobs", context=None, job_result=None),
            )
            self._hard_stop()

    def install(self) -> None:
        """On the running loop; skipped, with procrastinate's warning, outside the main
        thread (where signals cannot be handled)."""
        if threading.current_thread() is not threading.main_thread():
            signals_logger.warning(
                "Skipping signal handling, because this is not the main thread",
                extra={"action": "skip_signal_handlers"},
            )
            return
        signals_logger.debug(
            "Installing signal handler", extra={"action": "install_signal_handlers"}
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous.append((signum, signal.getsignal(signum)))
            loop.add_signal_handler(signum, self.on_signal, signum)

    def uninstall(self) -> None:
        """The handlers that were there before `install`, back (nothing if it skipped)."""
        if not self._previous:
            return
        signals_logger.debug(
            "Resetting previous signal handler", extra={"action": "uninstall_signal_handlers"}
        )
        loop = asyncio.get_running_loop()
        for signum, handler in self._previous:
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
        self._previous = []
