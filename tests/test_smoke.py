"""The shortest path through the product: defer, drain with wait=False, check the rows."""

import procrastinate
import pytest

import fastworker
from tests.conftest import fetch_all, make_app


async def test_deferred_jobs_run_and_succeed(app: procrastinate.App, dsn: str) -> None:
    seen: list[int] = []

    @app.task(name="collect")
    async def collect(value: int) -> None:
        seen.append(value)

    await collect.batch_defer_async(*({"value": i} for i in range(50)))
    await fastworker.run_async(app, concurrency=8, wait=False, install_signal_handlers=False)

    assert sorted(seen) == list(range(50))
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 50)
    ]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


async def test_an_app_not_opened_raises_app_not_open_as_procrastinate_does(dsn: str) -> None:
    """procrastinate's `run_worker_async` raises `AppNotOpen` for an app never opened;
    fastworker used to log it from the periodic deferrer, run nothing and return normally
    (a supervisor never noticed). Both entry points raise it now, before anything runs."""
    app = make_app(dsn)

    @app.task(name="collect")
    async def collect() -> None:
        pass

    async with app.open_async():
        await collect.defer_async()
    with pytest.raises(procrastinate.exceptions.AppNotOpen):
        await fastworker.run_async(app, wait=False, install_signal_handlers=False)
    with pytest.raises(procrastinate.exceptions.AppNotOpen):
        await fastworker.Worker(app, wait=False, install_signal_handlers=False).run()
    # Nothing ran and nothing registered.
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("todo",)]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
