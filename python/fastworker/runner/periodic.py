"""Periodic tasks: procrastinate's own periodic deferrer, kept running through a database
outage. procrastinate's worker stops when its deferrer raises, and a lost connection
(a PostgreSQL restart, a failover) makes it raise; here the deferrer starts again, with
backoff, for as long as `reconnect_timeout` allows. Any other failure (arguments that
cannot be stored) still stops the worker, as in procrastinate."""

from __future__ import annotations

import asyncio
import time

import psycopg
from procrastinate import exceptions

from fastworker.runner.shutdown import Shutdown
from fastworker.runner.state import logger


class Periodic(Shutdown):
    """procrastinate's periodic deferrer, started again after a lost connection."""

    reconnect_timeout: float

    async def _periodic_deferrer(self) -> None:
        lost_since: float | None = None
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                await super()._periodic_deferrer()
                return
            except exceptions.ConnectorException as error:
                if not isinstance(error.__cause__, psycopg.OperationalError):
                    raise
                now = time.monotonic()
                if lost_since is None or now - started > 2 * delay:
                    # A new outage (the deferrer had been working since the last one).
                    lost_since, delay = now, 0.1
                if now - lost_since > self.reconnect_timeout:
                    raise
                logger.warning(
                    f"The periodic deferrer lost the database ({error.__cause__}); "
                    f"starting it again in {delay:.1f} s",
                    extra={"action": "periodic_deferrer_restarted"},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
