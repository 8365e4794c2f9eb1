"""The worker's `PeriodicDeferrer` on its own: which failures start procrastinate's deferrer
again and which stop the worker. The deferrer it runs is a stand-in that fails as
procrastinate's does when its connection is lost (a real outage is in
`tests/faults/test_defects.py`)."""

from __future__ import annotations

import logging

import psycopg
import pytest
from procrastinate import exceptions, periodic

from fastworker.runner.periodic import PeriodicDeferrer


def connection_lost() -> exceptions.ConnectorException:
    """procrastinate's connector error for a lost connection, its cause psycopg's."""
    error = exceptions.ConnectorException("connection lost")
    error.__cause__ = psycopg.OperationalError("server closed the connection unexpectedly")
    return error


class FailingDeferrer:
    """Raises the next of ``failures`` from ``worker()``, then ends as a stopped one does."""

    def __init__(self, failures: list[BaseException], runs: list[int]) -> None:
        self._failures = failures
        self._runs = runs

    async def worker(self) -> None:
        self._runs.append(1)
        if self._failures:
            raise self._failures.pop(0)


def deferrer_of(
    failures: list[BaseException], reconnect_timeout: float
) -> tuple[PeriodicDeferrer, list[int]]:
    runs: list[int] = []

    def make() -> periodic.PeriodicDeferrer:
        return FailingDeferrer(failures, runs)  # type: ignore[return-value]

    return PeriodicDeferrer(None, reconnect_timeout=reconnect_timeout, make_deferrer=make), runs  # type: ignore[arg-type]


async def test_a_lost_connection_starts_the_deferrer_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="procrastinate.worker")
    deferrer, runs = deferrer_of([connection_lost(), connection_lost()], reconnect_timeout=60)
    await deferrer.run()
    assert len(runs) == 3
    restarts = [r for r in caplog.records if r.action == "periodic_deferrer_restarted"]  # type: ignore[attr-defined]
    assert len(restarts) == 2


async def test_any_other_failure_is_raised_at_once() -> None:
    unstorable = exceptions.ConnectorException("cannot adapt type")
    unstorable.__cause__ = psycopg.ProgrammingError("cannot adapt type 'object'")
    deferrer, runs = deferrer_of([unstorable], reconnect_timeout=60)
    with pytest.raises(exceptions.ConnectorException) as raised:
        await deferrer.run()
    assert raised.value is unstorable and len(runs) == 1


async def test_an_outage_longer_than_reconnect_timeout_is_raised() -> None:
    failures = [connection_lost() for _ in range(5)]
    deferrer, runs = deferrer_of(list(failures), reconnect_timeout=0)
    with pytest.raises(exceptions.ConnectorException) as raised:
        await deferrer.run()
    # Started once again (the outage had just begun), then given up on.
    assert raised.value is failures[1] and len(runs) == 2
