"""The drop-in class: procrastinate's `Worker` constructor, ``run()``/``stop()``, patching
``procrastinate.worker.Worker``, connection settings from every async connector, and signal
handlers in place right from the start (a real subprocess, a real SIGINT)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import procrastinate
import pytest
from procrastinate import testing
from procrastinate import worker as procrastinate_worker
from psycopg.conninfo import conninfo_to_dict

import fastworker
from fastworker.connection import resolve_connection
from tests.conftest import create_database, fetch_all, make_app
from tests.differential.harness import GUARD_SECONDS, IMPLEMENTATIONS, Impl, worker_class

REPO = Path(__file__).resolve().parents[2]

ALL_OPTIONS: dict[str, Any] = {
    "queues": ["a", "b"],
    "name": "custom",
    "concurrency": 7,
    "wait": False,
    "fetch_job_polling_interval": 0.3,
    "abort_job_polling_interval": 0.4,
    "shutdown_graceful_timeout": 2.5,
    "listen_notify": False,
    "delete_jobs": "successful",
    "additional_context": {"k": "v"},
    "install_signal_handlers": False,
    "update_heartbeat_interval": 3.0,
    "stalled_worker_timeout": 9.0,
    "task_middleware": [],
    "worker_middleware": [],
}

ATTRIBUTES = (
    "queues",
    "worker_name",
    "concurrency",
    "wait",
    "fetch_job_polling_interval",
    "abort_job_polling_interval",
    "shutdown_graceful_timeout",
    "listen_notify",
    "delete_jobs",
    "additional_context",
    "install_signal_handlers",
    "update_heartbeat_interval",
    "stalled_worker_timeout",
    "task_middleware",
    "worker_middleware",
    "worker_id",
)


def _attributes(worker: procrastinate_worker.Worker) -> dict[str, Any]:
    values = {name: getattr(worker, name) for name in ATTRIBUTES}
    values["logger"] = worker.logger.name
    return values


def test_signature_accepts_every_procrastinate_parameter() -> None:
    ours = inspect.signature(fastworker.Worker.__init__).parameters
    theirs = inspect.signature(procrastinate_worker.Worker.__init__).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    for name in theirs:
        assert name in ours or accepts_kwargs, name
    assert issubclass(fastworker.Worker, procrastinate_worker.Worker)


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["defaults", "all-options"])
def test_constructor_same_attributes(options: dict[str, Any]) -> None:
    app = procrastinate.App(connector=testing.InMemoryConnector())
    expected = _attributes(procrastinate_worker.Worker(app=app, **options))
    assert _attributes(fastworker.Worker(app=app, **options)) == expected


def test_constructor_positional_arguments() -> None:
    """procrastinate's constructor takes its options positionally too."""
    app = procrastinate.App(connector=testing.InMemoryConnector())
    positional = (["q"], "pos", 3, False)
    expected = _attributes(procrastinate_worker.Worker(app, *positional))
    assert _attributes(fastworker.Worker(app, *positional)) == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_constructor_rejects_like_procrastinate(impl: Impl) -> None:
    app = procrastinate.App(connector=testing.InMemoryConnector())

    def sync_middleware(call_next: Any, context: Any, worker: Any) -> Any:
        return call_next()

    with pytest.raises(TypeError):
        worker_class(impl)(app=app, task_middleware=[1])
    with pytest.raises(procrastinate.exceptions.MiddlewareKindMismatch):
        worker_class(impl)(app=app, worker_middleware=[sync_middleware])
    with pytest.raises(TypeError):
        worker_class(impl)(app=app, no_such_option=1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_stop_from_another_thread(impl: Impl, app: procrastinate.App, dsn: str) -> None:
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.task(name="ping")
    async def ping() -> None:
        loop.call_soon(started.set)

    await ping.defer_async()
    worker = worker_class(impl)(
        app=app, install_signal_handlers=False, fetch_job_polling_interval=0.05
    )
    run = asyncio.create_task(worker.run())
    async with asyncio.timeout(GUARD_SECONDS):
        await started.wait()
        thread = threading.Thread(target=worker.stop)
        thread.start()
        await run
    thread.join()
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("succeeded",)]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


async def test_stop_before_run_does_not_stick(app: procrastinate.App, dsn: str) -> None:
    """As procrastinate: a stop() before run() does not stop the next run."""

    @app.task(name="ping")
    async def ping() -> None:
        pass

    worker = fastworker.Worker(app=app, install_signal_handlers=False, wait=False)
    worker.stop()
    await ping.defer_async()
    async with asyncio.timeout(GUARD_SECONDS):
        await worker.run()
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("succeeded",)]


async def test_patching_procrastinate_worker_class(
    app: procrastinate.App, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code that patches procrastinate.worker.Worker gets fastworker from the app API."""
    seen: list[type] = []

    async def record_worker(call_next: Any, context: Any, worker: Any) -> Any:
        seen.append(type(worker))
        return await call_next()

    @app.task(name="ping")
    async def ping() -> None:
        pass

    monkeypatch.setattr(procrastinate_worker, "Worker", fastworker.Worker)
    await ping.defer_async()
    async with asyncio.timeout(GUARD_SECONDS):
        await app.run_worker_async(
            wait=False, install_signal_handlers=False, worker_middleware=[record_worker]
        )
    assert seen == [fastworker.Worker]
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("succeeded",)]


# --- connection settings ----------------------------------------------------------------


async def _drain_with(
    app: procrastinate.App, database: str, **options: Any
) -> list[tuple[Any, ...]]:
    """Defer two jobs through a psycopg app, drain them with a fastworker Worker on ``app``."""
    seen: list[int] = []

    def record(n: int) -> None:
        seen.append(n)

    app.task(name="record")(record)
    feeder = make_app(database)
    feeder.task(name="record")(record)
    async with feeder.open_async():
        await feeder.tasks["record"].batch_defer_async({"n": 1}, {"n": 2})
    worker = fastworker.Worker(app=app, wait=False, install_signal_handlers=False, **options)
    async with asyncio.timeout(GUARD_SECONDS):
        await worker.run()
    assert sorted(seen) == [1, 2]
    return fetch_all(database, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")


async def test_connection_from_psycopg_connector_kwargs(dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(kwargs=params))
    async with app.open_async():
        assert await _drain_with(app, dsn) == [("succeeded", 2)]


async def test_connection_from_aiopg_connector(dsn: str) -> None:
    pytest.importorskip("aiopg")
    from procrastinate.contrib.aiopg import AiopgConnector

    params = conninfo_to_dict(dsn)
    connector = AiopgConnector(
        host=params["host"], port=params["port"], user=params["user"], dbname=params["dbname"]
    )
    app = procrastinate.App(connector=connector)
    async with app.open_async():
        resolved = await resolve_connection(app)
        assert resolved["dbname"] == params["dbname"]
        assert await _drain_with(app, dsn) == [("succeeded", 2)]


async def test_connection_from_aiopg_connector_dsn_before_open(dsn: str) -> None:
    """Not opened: the aiopg connector's own arguments are used."""
    pytest.importorskip("aiopg")
    from procrastinate.contrib.aiopg import AiopgConnector

    app = procrastinate.App(connector=AiopgConnector(dsn=dsn))
    resolved = await resolve_connection(app)
    assert resolved["dbname"] == conninfo_to_dict(dsn)["dbname"]


async def test_connection_from_pg_environment(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector without settings to read: the libpq PG* variables are used."""
    params = conninfo_to_dict(dsn)
    for variable, key in [("PGHOST", "host"), ("PGPORT", "port"), ("PGUSER", "user")]:
        monkeypatch.setenv(variable, str(params[key]))
    monkeypatch.setenv("PGDATABASE", str(params["dbname"]))
    app = procrastinate.App(connector=testing.InMemoryConnector())
    assert await _drain_with(app, dsn) == [("succeeded", 2)]


async def test_explicit_dsn_wins(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDATABASE", "no_such_database_here")
    app = procrastinate.App(connector=testing.InMemoryConnector())
    assert await _drain_with(app, dsn, dsn=dsn) == [("succeeded", 2)]


def test_connection_from_django_connector(dsn: str) -> None:
    """procrastinate's Django integration connector (in a subprocess: Django's settings are
    process-wide)."""
    pytest.importorskip("django")
    script = textwrap.dedent(
        """
        import asyncio, sys
        import django
        from django.conf import settings
        from psycopg.conninfo import conninfo_to_dict

        dsn = sys.argv[1]
        params = conninfo_to_dict(dsn)
        settings.configure(
            INSTALLED_APPS=[],
            DATABASES={"default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": params["dbname"], "USER": params["user"],
                "HOST": params["host"], "PORT": params["port"],
            }},
        )
        django.setup()

        import procrastinate
        from procrastinate.contrib.django.django_connector import DjangoConnector
        import fastworker

        seen = []
        app = procrastinate.App(connector=DjangoConnector())

        @app.task(name="record")
        def record(n):
            seen.append(n)

        async def main():
            feeder = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
            feeder.task(name="record")(lambda n: None)
            async with feeder.open_async():
                await feeder.tasks["record"].batch_defer_async({"n": 1}, {"n": 2})
            async with app.open_async():
                await fastworker.Worker(app=app, wait=False).run()

        asyncio.run(main())
        print(sorted(seen))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [sys.executable, "-c", script, dsn],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 2]"
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 2)
    ]


# --- signals: a real subprocess, a real SIGINT ------------------------------------------

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, os, sys
    import procrastinate
    import fastworker

    dsn, when = sys.argv[1], sys.argv[2]
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="slow")
    async def slow():
        print("job started", flush=True)
        await asyncio.sleep(0.3)
        print("job finished", flush=True)

    class Ready(logging.Handler):
        def emit(self, record):
            if getattr(record, "action", None) == "start_worker" and when == "started":
                print("ready", flush=True)

    logging.getLogger("procrastinate").addHandler(Ready())
    logging.getLogger("procrastinate").setLevel(logging.INFO)

    async def main():
        async with app.open_async():
            if when == "job":
                await slow.defer_async()
            worker = fastworker.Worker(app=app, fetch_job_polling_interval=0.05)
            if when == "immediately":
                asyncio.get_running_loop().call_soon(lambda: print("ready", flush=True))
            await worker.run()
        print("clean exit", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("when", ["immediately", "started", "job"])
def test_sigint_stops_cleanly(dsn: str, when: str) -> None:
    """SIGINT as soon as run() has started (before the worker has even connected), once it
    has started, or while a job runs: the worker stops cleanly and unregisters."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_SCRIPT, dsn, when],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    trigger = "job started" if when == "job" else "ready"
    for line in process.stdout:
        if line.strip() == trigger:
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "KeyboardInterrupt" not in err
    assert "clean exit" in out
    if when == "job":
        assert "job finished" in out
        assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("succeeded",)]
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_worker_in_another_thread_skips_signal_handlers(
    impl: Impl, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Run from a thread other than the main one: handlers are skipped with procrastinate's
    warning (procrastinate.signals, action skip_signal_handlers), and jobs still run."""
    caplog.set_level(logging.DEBUG, logger="procrastinate")
    errors: list[BaseException] = []

    def in_thread() -> None:
        async def main() -> None:
            app = make_app(dsn)

            @app.task(name="ping")
            async def ping() -> None:
                pass

            async with app.open_async():
                await ping.defer_async()
                await worker_class(impl)(app=app, wait=False).run()

        try:
            asyncio.run(main())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(GUARD_SECONDS)
    assert not thread.is_alive() and not errors
    signal_records = [
        (record.levelname, getattr(record, "action", None))
        for record in caplog.records
        if record.name == "procrastinate.signals"
    ]
    assert signal_records == [("WARNING", "skip_signal_handlers")]
    assert fetch_all(dsn, "SELECT status::text FROM procrastinate_jobs") == [("succeeded",)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_database_errors_are_procrastinate_connector_exceptions(
    impl: Impl, database_name: str
) -> None:
    """A database without procrastinate's schema: both workers raise a ConnectorException,
    so code that catches procrastinate's exceptions around the worker keeps working."""
    dsn = create_database(database_name, with_schema=False)
    app = make_app(dsn)
    async with app.open_async():
        worker = worker_class(impl)(app=app, wait=False, install_signal_handlers=False)
        with pytest.raises(procrastinate.exceptions.ConnectorException):
            async with asyncio.timeout(GUARD_SECONDS):
                await worker.run()


@pytest.mark.parametrize("entry", ["app.run_worker", "fastworker.run"])
def test_blocking_entry_points(entry: str, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """procrastinate's blocking ``App.run_worker`` with the patched class, and
    ``fastworker.run``: both open the app, drain the queue and close it."""
    seen: list[type] = []

    async def record_worker(call_next: Any, context: Any, worker: Any) -> Any:
        seen.append(type(worker))
        return await call_next()

    app = make_app(dsn)

    @app.task(name="ping")
    def ping() -> None:
        pass

    with app.open():
        ping.defer()
        ping.defer()
    options: dict[str, Any] = {"wait": False, "worker_middleware": [record_worker]}
    if entry == "app.run_worker":
        monkeypatch.setattr(procrastinate_worker, "Worker", fastworker.Worker)
        app.run_worker(**options)
    else:
        fastworker.run(app, **options)
    assert seen == [fastworker.Worker, fastworker.Worker]
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 2)
    ]
