"""Run one fastworker worker in its own process, as the CLI will (until it lands).

    python -m tests.reliability.worker_process --dsn DSN [options]

Exit status: 0 after a normal stop, 1 with ``fastworker: error: ...`` on stderr when the
worker fails (unreachable database, lost connection, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys

import fastworker
from tests.reliability.tasks import close_app, make_app, open_app


class ExtraFormatter(logging.Formatter):
    """Prints procrastinate's `action` extra, so tests can look for it in the log."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        action = getattr(record, "action", None)
        return f"{text} [action={action}]" if action else text


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument(
        "--core-dsn", help="the worker core's own connections (default: --dsn, as the app's)"
    )
    parser.add_argument("--response-timeout", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--once", action="store_true", help="wait=False: stop when drained")
    parser.add_argument("--queue", action="append", dest="queues")
    # Neither flag: the option's default.
    parser.add_argument("--recover-stalled-jobs", action="store_const", const=True)
    parser.add_argument(
        "--no-recover-stalled-jobs", action="store_const", const=False, dest="recover_stalled_jobs"
    )
    parser.add_argument("--polling", type=float, default=5.0)
    parser.add_argument("--abort-polling", type=float, default=5.0)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--stalled-timeout", type=float, default=30.0)
    parser.add_argument("--reconnect-timeout", type=float, default=60.0)
    parser.add_argument("--no-listen", action="store_true")
    parser.add_argument("--periodic", action="store_true")
    parser.add_argument(
        "--every-minute", type=int, default=0, help="periodic tasks, each every minute"
    )
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def main(arguments: argparse.Namespace) -> None:
    app = make_app(
        arguments.dsn,
        pool_size=arguments.pool_size,
        periodic=arguments.periodic,
        every_minute=arguments.every_minute,
    )
    await open_app(app)
    recovery = (
        {}
        if arguments.recover_stalled_jobs is None
        else {"recover_stalled_jobs": arguments.recover_stalled_jobs}
    )
    try:
        await fastworker.run_async(
            app,
            **recovery,
            dsn=arguments.core_dsn or arguments.dsn,
            response_timeout=arguments.response_timeout,
            concurrency=arguments.concurrency,
            wait=not arguments.once,
            queues=arguments.queues,
            fetch_job_polling_interval=arguments.polling,
            abort_job_polling_interval=arguments.abort_polling,
            update_heartbeat_interval=arguments.heartbeat,
            stalled_worker_timeout=arguments.stalled_timeout,
            reconnect_timeout=arguments.reconnect_timeout,
            listen_notify=not arguments.no_listen,
        )
    finally:
        await close_app(app)


def run(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash of the process leaves its Python stacks in the log
    arguments = parse(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ExtraFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=arguments.log_level, handlers=[handler])
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        asyncio.run(main(arguments))
    except fastworker.FastworkerError as error:
        print(f"fastworker: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
