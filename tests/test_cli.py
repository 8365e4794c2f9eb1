"""The ``fastworker`` command, run as a real process on a real database.

No timed assertions: waits are bounded polling loops (or subprocess timeouts) whose limits
only decide how long a failing test takes to fail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import procrastinate
import pytest
from procrastinate import cli as procrastinate_cli
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import create_database, drop_database, fetch_all, make_app
from tests.helpers import run_process

#: Upper bound of every wait in this module (never a measured duration).
PATIENCE = 90.0

APP_MODULE = textwrap.dedent(
    """
    import asyncio
    import os
    import time
    from pathlib import Path

    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=os.environ["CLI_TEST_APP_DSN"])
    )


    @app.task(name="quick")
    async def quick(value: int) -> None:
        pass


    @app.task(name="sleepy")
    async def sleepy() -> None:
        await asyncio.sleep(120)


    @app.task(name="gated")
    def gated(gate: str) -> None:
        # A sync job that runs until the test opens the gate (bounded, never hangs).
        deadline = time.monotonic() + 120
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_test_app.py").write_text(APP_MODULE)
    return tmp_path


def cli_env(app_dsn: str, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROCRASTINATE_", "FASTWORKER_"))
    }
    env["CLI_TEST_APP_DSN"] = app_dsn
    env.update(extra)
    return env


def fastworker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastworker", *args]


def run_command(
    command: list[str] | str, *, cwd: Path, env: dict[str, str], timeout: float = PATIENCE
) -> subprocess.CompletedProcess[str]:
    """`command`: its arguments, or a line for the shell (as a user would type it)."""
    return run_process(command, cwd=cwd, env=env, timeout=timeout)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = PATIENCE
) -> subprocess.CompletedProcess[str]:
    return run_command(fastworker_command(*args), cwd=cwd, env=env, timeout=timeout)


def run_worker(
    app_dir: Path, dsn: str, *flags: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`fastworker --app cli_test_app.app worker FLAGS` until it exits."""
    return run_cli(
        "--app", "cli_test_app.app", "worker", *flags, cwd=app_dir, env=cli_env(dsn, **env)
    )


def wait_until(
    predicate: Callable[[], bool], what: str, state: Callable[[], object] = lambda: None
) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}; last state: {state()}")
        time.sleep(0.05)


def defer(dsn: str, task: str, kwargs_list: list[dict[str, object]], **options: str) -> None:
    app = make_app(dsn)
    with app.open():
        deferrer = app.configure_task(name=task, allow_unknown=True, **options)  # type: ignore[arg-type]
        deferrer.batch_defer(*kwargs_list)


def status_counts(dsn: str) -> dict[str, int]:
    return dict(  # type: ignore[arg-type]
        fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fastworker: error:")]


@pytest.fixture
def unreachable_dsn() -> str:
    """A DSN nothing listens on (port 1), with a password that must never be printed."""
    return "host=127.0.0.1 port=1 user=someone password=s3cr3t-pw dbname=nowhere connect_timeout=5"


# --- help and arguments -------------------------------------------------------------------


def procrastinate_worker_flags() -> list[str]:
    parser = procrastinate_cli.create_parser()
    procrastinate_cli.add_arguments(parser)
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    worker = subparsers.choices["worker"]
    return [flag for action in worker._actions for flag in action.option_strings]


def test_help_lists_procrastinate_flags(tmp_path: Path) -> None:
    env = cli_env("")
    script = Path(sys.executable).parent / "fastworker"
    command = [str(script)] if script.exists() else fastworker_command()
    worker_help = subprocess.run(
        [*command, "worker", "--help"], env=env, capture_output=True, text=True, timeout=PATIENCE
    )
    assert worker_help.returncode == 0, worker_help.stderr
    flags = procrastinate_worker_flags()
    assert "--concurrency" in flags and "--one-shot" in flags  # the reference is complete
    for flag in [*flags, "--app", "--verbose", "--log-level", "--log-format", "--dsn"]:
        assert flag in worker_help.stdout, f"{flag} missing from `fastworker worker --help`"
    for flag in ["--reconnect-timeout", "--log-format-style", "PROCRASTINATE_WORKER_CONCURRENCY"]:
        assert flag in worker_help.stdout

    main_help = subprocess.run(
        [*command, "--help"], env=env, capture_output=True, text=True, timeout=PATIENCE
    )
    assert main_help.returncode == 0
    for flag in ["--app", "--verbose", "--log-level", "--log-format", "--version", "worker"]:
        assert flag in main_help.stdout
    assert "exit codes" in main_help.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker", "--concurrency", "0"], "must be at least 1"),
        (["worker", "--no-such-flag"], "unrecognized arguments"),
        (["worker", "-a", "cli_test_app.app"], "-a is --abort-job-polling-interval"),
        (["worker"], "no app given"),
        (["--app", "no_such_module.app", "worker"], "could not load the app"),
        (["--app", "cli_test_app.app", "worker", "--delete-jobs", "sometimes"], "invalid"),
    ],
)
def test_bad_arguments_exit_2(app_dir: Path, dsn: str, args: list[str], expected: str) -> None:
    result = run_cli(*args, cwd=app_dir, env=cli_env(dsn))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_variable_exit_2(app_dir: Path, dsn: str) -> None:
    env = cli_env(dsn, PROCRASTINATE_WORKER_CONCURRENCY="lots")
    result = run_cli("--app", "cli_test_app.app", "worker", cwd=app_dir, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(error_lines(result.stderr)) == 1


@pytest.mark.parametrize(
    "variable", ["PROCRASTINATE_WORKER_LISTEN_NOTIFY", "PROCRASTINATE_WORKER_WAIT"]
)
def test_a_bad_boolean_variable_is_named_with_the_accepted_values(
    app_dir: Path, dsn: str, variable: str
) -> None:
    result = run_worker(app_dir, dsn, **{variable: "off"})
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        f"fastworker: error: invalid value in ${variable}: 'off' is not a boolean; as "
        "procrastinate reads it, a value starting with 1, y or t is true (1, yes, true) and "
        "one starting with 0, n or f is false (0, no, false)"
    ]


def test_a_boolean_variable_is_read_as_procrastinate_reads_it(app_dir: Path, dsn: str) -> None:
    """Any word starting with 0/n/f is false: `no` turns LISTEN/NOTIFY off, `never` turns
    waiting off (the worker stops once the queue is empty)."""
    defer(dsn, "quick", [{"value": 1}])
    result = run_worker(
        app_dir, dsn, PROCRASTINATE_WORKER_LISTEN_NOTIFY="no", PROCRASTINATE_WORKER_WAIT="never"
    )
    assert result.returncode == 0, result.stderr
    assert status_counts(dsn) == {"succeeded": 1}


# --- running ------------------------------------------------------------------------------


def test_one_shot_drains_jobs_and_exits_0(app_dir: Path, dsn: str) -> None:
    defer(dsn, "quick", [{"value": i} for i in range(300)])
    result = run_cli(
        "--app",
        "cli_test_app.app",
        "worker",
        "--one-shot",
        "--concurrency",
        "20",
        "--log-level",
        "warning",
        cwd=app_dir,
        env=cli_env(dsn),
    )
    assert result.returncode == 0, result.stderr
    assert status_counts(dsn) == {"succeeded": 300}
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]


def test_procrastinate_environment_variables(app_dir: Path, dsn: str) -> None:
    """PROCRASTINATE_APP, PROCRASTINATE_WORKER_WAIT and _QUEUES mean what they mean to
    procrastinate; flags after `worker` override them."""
    defer(dsn, "quick", [{"value": i} for i in range(20)], queue="mine")
    defer(dsn, "quick", [{"value": i} for i in range(10)], queue="other")
    env = cli_env(
        dsn,
        PROCRASTINATE_APP="cli_test_app.app",
        PROCRASTINATE_WORKER_WAIT="false",
        PROCRASTINATE_WORKER_QUEUES="mine",
        PROCRASTINATE_LOG_LEVEL="warning",
    )
    result = run_cli("worker", "--name", "env-worker", cwd=app_dir, env=env)
    assert result.returncode == 0, result.stderr
    rows = fetch_all(
        dsn, "SELECT queue_name, status::text, count(*) FROM procrastinate_jobs GROUP BY 1, 2"
    )
    assert sorted(rows) == [("mine", "succeeded", 20), ("other", "todo", 10)]

    result = run_cli("worker", "--queues", "other", cwd=app_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert status_counts(dsn) == {"succeeded": 30}


def test_fastworker_flags_reach_the_worker(app_dir: Path, dsn: str) -> None:
    """--job-timeout ends an overlong job failed; --queue-limit and --max-batch-size are
    accepted and the queue still drains."""
    defer(dsn, "sleepy", [{}])
    defer(dsn, "quick", [{"value": i} for i in range(30)], queue="limited")
    result = run_cli(
        "--app",
        "cli_test_app.app",
        "worker",
        "--one-shot",
        "--job-timeout",
        "0.5",
        "--queue-limit",
        "limited=2",
        "--max-batch-size",
        "7",
        "--log-level",
        "warning",
        cwd=app_dir,
        env=cli_env(dsn),
    )
    assert result.returncode == 0, result.stderr
    rows = fetch_all(
        dsn, "SELECT task_name, status::text, count(*) FROM procrastinate_jobs GROUP BY 1, 2"
    )
    assert sorted(rows) == [("quick", "succeeded", 30), ("sleepy", "failed", 1)]


def test_an_unknown_task_in_task_timeouts_is_a_usage_error(app_dir: Path, dsn: str) -> None:
    defer(dsn, "quick", [{"value": 1}])
    result = run_worker(app_dir, dsn, "--one-shot", "--task-timeouts", "sleepx=1")
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        "fastworker: error: invalid worker settings: task_timeouts: no task named 'sleepx' "
        "in the app; did you mean 'sleepy'?"
    ]
    assert status_counts(dsn) == {"todo": 1}


def test_a_queue_limit_no_task_uses_is_warned_about(app_dir: Path, dsn: str) -> None:
    defer(dsn, "quick", [{"value": 1}])
    result = run_worker(app_dir, dsn, "--one-shot", "--queue-concurrency", "emials=1")
    assert result.returncode == 0, result.stderr
    assert (
        "queue_concurrency names the queue 'emials', which no task of the app is declared on "
        "(tasks use 'builtin', 'default')" in result.stderr
    )
    assert status_counts(dsn) == {"succeeded": 1}


@pytest.fixture
def worker_process(app_dir: Path, dsn: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            fastworker_command("--app", "cli_test_app.app", "worker", *args),
            cwd=app_dir,
            env=cli_env(dsn),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PATIENCE)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_worker_cleanly(
    worker_process: Callable[..., subprocess.Popen[str]],
    dsn: str,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """A real signal while a job runs: the job finishes and is recorded, the worker
    unregisters, the process exits 0."""
    process = worker_process("--concurrency", "10", "--log-level", "info")
    wait_until(
        lambda: (
            fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(1,)]
            or process.poll() is not None
        ),
        "the worker to register",
    )
    assert process.poll() is None, process.communicate()

    gate = tmp_path / "gate"
    defer(dsn, "quick", [{"value": i} for i in range(200)])
    defer(dsn, "gated", [{"gate": str(gate)}])
    wait_until(
        lambda: status_counts(dsn) == {"succeeded": 200, "doing": 1} or process.poll() is not None,
        "the quick jobs to finish while the gated one runs",
        lambda: status_counts(dsn),
    )
    assert process.poll() is None, process.communicate()

    process.send_signal(signum)
    gate.touch()  # the gated job was running when the signal arrived; now it may end
    _, stderr = process.communicate(timeout=PATIENCE)

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert status_counts(dsn) == {"succeeded": 201}
    assert fetch_all(dsn, "SELECT count(*) FROM procrastinate_workers") == [(0,)]
    assert "Stopped worker" in stderr


def test_a_second_signal_says_it_aborts_the_running_job(
    worker_process: Callable[..., subprocess.Popen[str]], dsn: str
) -> None:
    """Without --shutdown-graceful-timeout, the abort is the second signal's doing, and the
    log says so (not "after graceful timeout")."""
    process = worker_process("--log-level", "info")
    defer(dsn, "sleepy", [{}])
    wait_until(
        lambda: status_counts(dsn) == {"doing": 1} or process.poll() is not None,
        "the sleepy job to run",
        lambda: status_counts(dsn),
    )
    # Two signals sent at once may arrive as one: the second goes once the first is seen.
    assert process.stderr is not None
    lines: list[str] = []
    stream = process.stderr

    def read_lines() -> None:
        for line in stream:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    process.send_signal(signal.SIGTERM)
    wait_until(
        lambda: (
            any("Waiting for job to finish" in line for line in lines) or process.poll() is not None
        ),
        "the first signal to be handled",
        lambda: lines,
    )
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=PATIENCE)
    reader.join(timeout=PATIENCE)
    stderr = "".join(lines)

    assert process.returncode == 0, stderr
    assert "1 jobs still running after a second stop signal or cancel. Aborting them" in stderr
    assert "graceful timeout" not in stderr


def test_max_jobs_says_why_the_worker_stops(app_dir: Path, dsn: str) -> None:
    defer(dsn, "quick", [{"value": i} for i in range(5)])
    result = run_worker(app_dir, dsn, "--max-jobs", "2", "--log-level", "info")
    assert result.returncode == 0, result.stderr
    assert "Claimed max_jobs=2 jobs. Stopping worker once they have run" in result.stderr
    assert "No job found" not in result.stderr
    assert status_counts(dsn) == {"succeeded": 2, "todo": 3}


# --- database errors ----------------------------------------------------------------------


def test_unreachable_database_is_a_clear_error(app_dir: Path, unreachable_dsn: str) -> None:
    result = run_cli(
        "--app", "cli_test_app.app", "worker", cwd=app_dir, env=cli_env(unreachable_dsn)
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "127.0.0.1:1" in line
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_unreachable_dsn_for_the_worker_is_a_clear_error(
    app_dir: Path, dsn: str, unreachable_dsn: str
) -> None:
    result = run_cli(
        "--app",
        "cli_test_app.app",
        "worker",
        "--dsn",
        unreachable_dsn,
        cwd=app_dir,
        env=cli_env(dsn),
    )
    assert result.returncode == 3, result.stderr
    [line] = error_lines(result.stderr)
    assert "127.0.0.1:1" in line
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_a_password_in_dsn_on_the_command_line_is_warned_about(app_dir: Path, dsn: str) -> None:
    """`ps` shows a command line to every user: a password there gets a warning (never the
    password itself); the same DSN from FASTWORKER_DSN gets none."""
    with_password = conninfo_to_dict(dsn)
    with_password["password"] = "pw-in-argv"
    secret_dsn = make_conninfo("", **with_password)
    for args, env in (
        (["--dsn", secret_dsn], cli_env(dsn)),
        ([f"--dsn={secret_dsn}"], cli_env(dsn)),
        ([], cli_env(dsn, FASTWORKER_DSN=secret_dsn)),
        (["--dsn", dsn], cli_env(dsn)),
    ):
        result = run_cli(
            "--app", "cli_test_app.app", "worker", "--one-shot", *args, cwd=app_dir, env=env
        )
        assert result.returncode == 0, result.stderr
        warned = [line for line in result.stderr.splitlines() if "warning: --dsn" in line]
        assert len(warned) == (1 if args and "pw-in-argv" in args[-1] else 0), result.stderr
        assert "pw-in-argv" not in result.stderr + result.stdout
        if warned:
            assert "FASTWORKER_DSN" in warned[0] and "PGPASSWORD" in warned[0]


def test_missing_schema_is_a_clear_error(app_dir: Path, database_name: str) -> None:
    bare = create_database(database_name, with_schema=False)
    try:
        with_password = make_conninfo(bare, password="s3cr3t-pw")
        result = run_cli(
            "--app", "cli_test_app.app", "worker", cwd=app_dir, env=cli_env(with_password)
        )
    finally:
        drop_database(database_name)
    assert result.returncode == 4, result.stderr
    [line] = error_lines(result.stderr)
    assert "schema" in line and database_name in line
    params = conninfo_to_dict(bare)
    assert f"{params.get('host', '')}:{params.get('port', 5432)}" in line
    assert "s3cr3t-pw" not in result.stderr


def test_version(tmp_path: Path) -> None:
    result = subprocess.run(
        fastworker_command("--version"), capture_output=True, text=True, timeout=PATIENCE
    )
    assert result.returncode == 0
    assert "fastworker" in result.stdout and procrastinate.__version__ in result.stdout
    # The version of the distribution as installed (`procrastinate-fastworker`), not "unknown".
    installed = importlib.metadata.version("procrastinate-fastworker")
    assert result.stdout.startswith(f"fastworker {installed} ")


# --- procrastinate's own commands, and the schema hint ------------------------------------


def test_a_missing_schemas_hint_is_a_command_that_works_from_there(
    tmp_path: Path, database_name: str
) -> None:
    """A project as a newcomer has it: a package in the current directory, a database
    without procrastinate's schema, the installed `fastworker` script. The command the error
    suggests, run from there, applies the schema, and the worker then starts."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "tasks.py").write_text(APP_MODULE)
    scripts = Path(sys.executable).parent
    env = cli_env(
        create_database(database_name, with_schema=False),
        PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    try:

        def run(command: str) -> subprocess.CompletedProcess[str]:
            return run_command(command, cwd=tmp_path, env=env)

        worker = "fastworker --app=mypkg.tasks.app worker --one-shot"
        missing = run(worker)
        assert missing.returncode == 4, missing.stderr
        [line] = error_lines(missing.stderr)
        suggested = line.split("`")[-2]
        assert suggested == "fastworker --app=mypkg.tasks.app schema --apply", line
        applied = run(suggested)
        assert applied.returncode == 0, applied.stderr
        started = run(worker)
        assert started.returncode == 0, started.stderr
        assert "Launching a fastworker worker" in started.stderr
    finally:
        drop_database(database_name)


def test_procrastinates_commands_run_for_the_same_app(app_dir: Path, database_name: str) -> None:
    """`schema --apply`, `defer`, `healthchecks` and `shell` are procrastinate's own, run
    for the app `--app` names (before or after the command) or PROCRASTINATE_APP, loaded
    from the current directory as the worker's."""
    bare = create_database(database_name, with_schema=False)
    try:
        env = cli_env(bare)
        unhealthy = run_cli("--app", "cli_test_app.app", "healthchecks", cwd=app_dir, env=env)
        assert unhealthy.returncode == 1, unhealthy.stderr
        assert "procrastinate_jobs table was not found" in unhealthy.stderr
        assert "DB connection: OK" in unhealthy.stdout

        applied = run_cli("--app=cli_test_app.app", "schema", "--apply", cwd=app_dir, env=env)
        assert applied.returncode == 0, applied.stderr
        assert fetch_all(bare, "SELECT to_regclass('procrastinate_jobs') IS NOT NULL") == [(True,)]

        deferred = run_cli(
            "defer", "--app", "cli_test_app.app", "quick", '{"value": 7}', cwd=app_dir, env=env
        )
        assert deferred.returncode == 0, deferred.stderr
        assert fetch_all(bare, "SELECT task_name, args FROM procrastinate_jobs") == [
            ("quick", {"value": 7})
        ]

        from_env = {**env, "PROCRASTINATE_APP": "cli_test_app.app"}
        healthy = run_cli("healthchecks", cwd=app_dir, env=from_env)
        assert healthy.returncode == 0, healthy.stderr
        assert "Found procrastinate_jobs table: OK" in healthy.stdout

        listed = run_cli("shell", "list_jobs", cwd=app_dir, env=from_env)
        assert listed.returncode == 0, listed.stderr
        assert "quick" in listed.stdout and "todo" in listed.stdout

        drained = run_cli("worker", "--one-shot", cwd=app_dir, env=from_env)
        assert drained.returncode == 0, drained.stderr
        assert status_counts(bare) == {"succeeded": 1}
    finally:
        drop_database(database_name)


def test_help_lists_procrastinates_commands_as_procrastinates(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path, env=cli_env("", COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    for command in ("defer", "schema", "healthchecks", "shell"):
        assert f"procrastinate's `{command}`" in result.stdout, result.stdout
