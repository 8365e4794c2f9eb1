"""The shortest path through the product: defer, drain with wait=False, check the rows."""

import procrastinate

import fastworker
from tests.conftest import fetch_all


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
