"""How many statements an idle worker sends, fastworker's against procrastinate's.

    python benches/idle_statements.py [--seconds 60]

Each worker runs alone on a fresh database with no jobs, with its default intervals, for
`--seconds`; every connection it opens (the app's pool and, for fastworker, the core's
own) goes through the wire proxy of the fault suite, which counts requests by kind. Prints
one line per worker: the total and the kinds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import procrastinate  # noqa: E402
from tests.conftest import create_database, drop_database, server_address  # noqa: E402
from tests.faults.harness import classify  # noqa: E402
from tests.faults.proxy import FaultProxy  # noqa: E402

import fastworker  # noqa: E402


async def idle(system: str, seconds: float) -> dict[str, int]:
    name = f"fw_idle_{uuid.uuid4().hex[:10]}"
    dsn = create_database(name)
    try:
        with FaultProxy(*server_address(), classify=classify) as proxy:
            proxied = proxy.dsn(dsn)
            app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=proxied))
            async with app.open_async():
                options: dict[str, Any] = {"install_signal_handlers": False}
                if system == "fastworker":
                    run = fastworker.run_async(app, dsn=proxied, **options)
                else:
                    run = app.run_worker_async(**options)
                task = asyncio.create_task(run)
                await asyncio.sleep(5)  # started, registered
                before = proxy.counts
                await asyncio.sleep(seconds)
                after = proxy.counts
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return {
            kind: after[kind] - before.get(kind, 0)
            for kind in after
            if after[kind] > before.get(kind, 0)
        }
    finally:
        drop_database(name)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    arguments = parser.parse_args()
    for system in ("procrastinate", "fastworker"):
        counts = await idle(system, arguments.seconds)
        total = sum(counts.values())
        kinds = dict(sorted(counts.items()))
        print(f"{system}: {total} statements in {arguments.seconds:.0f} s idle: {kinds}")


if __name__ == "__main__":
    asyncio.run(main())
