"""``./manage.py fastworker``: procrastinate's Django integration, run by fastworker.

A real Django project (written to a temporary directory: settings pointing at the test
database, a manage.py, a task registered on ``procrastinate.contrib.django.app``), and the
management command run in a subprocess (``./manage.py fastworker``, ``django-admin`` with
``--settings`` / ``--pythonpath``, ``call_command``) until the queue is empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import create_database, drop_database, fetch_all

pytest.importorskip("django")


def write_project(root: Path, dsn: str, marker: Path, settings: str = "") -> None:
    """The project; ``settings``: more lines for its settings.py."""
    params = conninfo_to_dict(dsn)
    (root / "djangoproject").mkdir()
    (root / "djangoproject" / "__init__.py").write_text("")
    (root / "djangoproject" / "settings.py").write_text(
        textwrap.dedent(
            f"""
            SECRET_KEY = "test"
            USE_TZ = True
            INSTALLED_APPS = [
                "procrastinate.contrib.django",
                "fastworker.contrib.django",
                "tasksapp",
            ]
            DATABASES = {{
                "default": {{
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": {params["dbname"]!r},
                    "USER": {params.get("user", "postgres")!r},
                    "HOST": {params.get("host", "127.0.0.1")!r},
                    "PORT": {str(params.get("port", "5432"))!r},
                }}
            }}
            """
        )
        + textwrap.dedent(settings)
    )
    (root / "manage.py").write_text(
        textwrap.dedent(
            """
            import os
            import sys

            if __name__ == "__main__":
                os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproject.settings")
                from django.core.management import execute_from_command_line

                execute_from_command_line(sys.argv)
            """
        )
    )
    (root / "tasksapp").mkdir()
    (root / "tasksapp" / "__init__.py").write_text("")
    # A system check that fails when FAILING_CHECK is set: Django runs the checks before
    # the command (unless --skip-checks).
    (root / "tasksapp" / "apps.py").write_text(
        textwrap.dedent(
            """
            import os

            from django.apps import AppConfig
            from django.core import checks


            def failing_check(app_configs, **kwargs):
                if os.environ.get("FAILING_CHECK"):
                    return [checks.Error("the check that fails", id="tasksapp.E001")]
                return []


            class TasksConfig(AppConfig):
                name = "tasksapp"

                def ready(self):
                    checks.register(failing_check)
            """
        )
    )
    (root / "tasksapp" / "tasks.py").write_text(
        textwrap.dedent(
            f"""
            from procrastinate.contrib.django import app

            @app.task(name="record", pass_context=True)
            def record(context, value):
                with open({str(marker)!r}, "a") as marker:
                    marker.write(f"{{value}} {{context.worker_name}}\\n")


            import threading

            from django.db import connection
            from procrastinate.contrib.django.models import ProcrastinateJob

            # Broken (BrokenBarrierError) unless {ORM_AT_ONCE} jobs reach it at once.
            AT_ONCE = threading.Barrier({ORM_AT_ONCE}, timeout=60)


            def backend_pid():
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    return cursor.fetchone()[0]


            @app.task(name="orm_at_once", pass_context=True)
            def orm_at_once(context):
                job = ProcrastinateJob.objects.get(id=context.job.id)
                pid = backend_pid()
                AT_ONCE.wait()
                # Still this thread's own connection, while the others hold theirs.
                assert ProcrastinateJob.objects.filter(id=job.id, status="doing").exists()
                with open({str(marker.with_suffix(".orm"))!r}, "a") as marker:
                    name = threading.current_thread().name
                    marker.write(f"{{job.id}} {{name}} {{pid}} {{backend_pid()}}\\n")
            """
        )
    )


#: Sync jobs of the Django project's `orm_at_once` task that must run at once.
ORM_AT_ONCE = 20


def run_in(
    project: Path, *command: str, timeout: float, **environment: str
) -> subprocess.CompletedProcess[str]:
    """A command run in the project written by `write_project`; fastworker comes from the
    installed package (its native module), the project from its directory."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FASTWORKER_")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *command],
        cwd=project,
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def manage_py(
    project: Path, *arguments: str, timeout: float, **environment: str
) -> subprocess.CompletedProcess[str]:
    """`./manage.py fastworker ARGUMENTS` in the project written by `write_project`."""
    return run_in(project, "manage.py", "fastworker", *arguments, timeout=timeout, **environment)


def defer_records(dsn: str, count: int) -> None:
    values = ",".join(f"('default', 'record', '{{\"value\": {i}}}')" for i in range(count))
    fetch_all(
        dsn,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        f" VALUES {values} RETURNING id",
    )


def recorded(marker: Path) -> list[tuple[str, str]]:
    """(value, worker name) of each job run."""
    return sorted(tuple(line.split()) for line in marker.read_text().splitlines())  # type: ignore[misc]


def statuses(dsn: str) -> list[tuple[Any, ...]]:
    return fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")


@pytest.fixture
def project(dsn: str, tmp_path: Path) -> Path:
    write_project(tmp_path, dsn, tmp_path / "ran.txt")
    return tmp_path


def test_manage_py_fastworker_runs_the_django_apps_jobs(dsn: str, project: Path) -> None:
    defer_records(dsn, 5)
    completed = manage_py(project, "--one-shot", "--concurrency", "2", timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert recorded(project / "ran.txt") == [(str(i), "worker") for i in range(5)]
    assert statuses(dsn) == [("succeeded", 5)]


def test_manage_py_fastworker_worker_is_accepted_too(dsn: str, project: Path) -> None:
    """As `./manage.py procrastinate worker ...`."""
    defer_records(dsn, 3)
    completed = manage_py(project, "worker", "--one-shot", "-n", "named", timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert recorded(project / "ran.txt") == [(str(i), "named") for i in range(3)]


def test_djangos_settings_and_pythonpath_options(dsn: str, project: Path) -> None:
    """--settings and --pythonpath, with neither DJANGO_SETTINGS_MODULE nor PYTHONPATH set,
    from another directory: Django's own options work."""
    defer_records(dsn, 2)
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "fastworker",
            "--settings=djangoproject.settings",
            f"--pythonpath={project}",
            "--one-shot",
            "--queues=default",
        ],
        cwd=elsewhere,
        env={
            key: value
            for key, value in os.environ.items()
            if key not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert statuses(dsn) == [("succeeded", 2)]


def test_call_command_takes_the_worker_options(dsn: str, project: Path) -> None:
    defer_records(dsn, 4)
    script = textwrap.dedent(
        """
        import django
        from django.core.management import call_command

        django.setup()
        call_command(
            "fastworker", concurrency=5, wait=False, name="called", max_batch_size=2
        )
        """
    )
    completed = run_in(
        project, "-c", script, timeout=120, DJANGO_SETTINGS_MODULE="djangoproject.settings"
    )
    assert completed.returncode == 0, completed.stderr
    assert recorded(project / "ran.txt") == [(str(i), "called") for i in range(4)]
    assert statuses(dsn) == [("succeeded", 4)]


def test_call_command_with_a_bad_option_raises_a_command_error(project: Path) -> None:
    script = textwrap.dedent(
        """
        import django
        from django.core.management import CommandError, call_command

        django.setup()
        try:
            call_command("fastworker", concurrency=0, wait=False)
        except CommandError as error:
            print(f"CommandError {error.returncode}: {error}")
        """
    )
    completed = run_in(
        project, "-c", script, timeout=120, DJANGO_SETTINGS_MODULE="djangoproject.settings"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (
        "CommandError 2: invalid worker settings: concurrency must be at least 1, got 0"
    )


def test_djangos_system_checks_run_first(dsn: str, project: Path) -> None:
    defer_records(dsn, 1)
    failed = manage_py(project, "--one-shot", timeout=120, FAILING_CHECK="1")
    assert failed.returncode != 0
    assert "SystemCheckError" in failed.stderr and "tasksapp.E001" in failed.stderr
    assert statuses(dsn) == [("todo", 1)]
    skipped = manage_py(project, "--one-shot", "--skip-checks", timeout=120, FAILING_CHECK="1")
    assert skipped.returncode == 0, skipped.stderr
    assert statuses(dsn) == [("succeeded", 1)]


def test_a_bad_flag_or_variable_is_a_usage_error(project: Path) -> None:
    flag = manage_py(project, "--concurrency", "zero", timeout=60)
    assert flag.returncode == 2
    assert "--concurrency" in flag.stderr and "invalid int value: 'zero'" in flag.stderr
    variable = manage_py(project, "--one-shot", timeout=60, FASTWORKER_MAX_BATCH_SIZE="many")
    assert variable.returncode == 2
    assert "FASTWORKER_MAX_BATCH_SIZE" in variable.stderr
    assert "Traceback" not in flag.stderr + variable.stderr


def test_manage_py_fastworker_help_lists_the_worker_flags(project: Path) -> None:
    completed = manage_py(project, "--help", timeout=60)
    assert completed.returncode == 0, completed.stderr
    for flag in (
        "--concurrency",
        "--queues",
        "--one-shot",
        "--queue-limit",
        "--job-timeout",
        "--settings",
        "--pythonpath",
        "--skip-checks",
    ):
        assert flag in completed.stdout


def test_a_missing_schema_says_to_migrate(database_name: str, tmp_path: Path) -> None:
    """procrastinate's Django app applies its schema as migrations: the error says
    `./manage.py migrate` (not procrastinate's command, with no app to give it), and after
    that the worker starts."""
    bare = create_database(database_name, with_schema=False)
    try:
        write_project(tmp_path, bare, tmp_path / "ran.txt")
        missing = manage_py(tmp_path, "--one-shot", timeout=120)
        assert missing.returncode == 4, missing.stderr
        assert "apply it with `./manage.py migrate`" in missing.stderr, missing.stderr
        assert "--app" not in missing.stderr, missing.stderr
        migrated = run_in(tmp_path, "manage.py", "migrate", timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        started = manage_py(tmp_path, "--one-shot", timeout=120)
        assert started.returncode == 0, started.stderr
    finally:
        drop_database(database_name)


# settings.LOGGING with a root handler of its own format, as a Django project has it.
LOGGING_SETTINGS = """
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"mine": {"format": "DJANGOLOG %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "mine"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
}
"""


@pytest.fixture
def project_with_logging(dsn: str, tmp_path: Path) -> Path:
    write_project(tmp_path, dsn, tmp_path / "ran.txt", LOGGING_SETTINGS)
    return tmp_path


def log_lines(stderr: str, level: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"DJANGOLOG {level} ")]


def test_djangos_verbosity_sets_the_worker_loggers_level_under_settings_logging(
    dsn: str, project_with_logging: Path
) -> None:
    """settings.LOGGING has a root handler: -v 2 brings the worker's debug lines through
    it, in its format; -v 0 keeps only warnings and errors from the start of the command;
    nothing is logged in another format (the user's configuration is not replaced)."""
    defer_records(dsn, 1)
    verbose = manage_py(project_with_logging, "--one-shot", "-v", "2", timeout=120)
    assert verbose.returncode == 0, verbose.stderr
    assert any(" procrastinate.worker: " in line for line in log_lines(verbose.stderr, "DEBUG"))
    assert not [
        line for line in verbose.stderr.splitlines() if line.startswith(("DEBUG:", "INFO:"))
    ]

    defer_records(dsn, 1)
    quiet = manage_py(project_with_logging, "--one-shot", "-v", "0", timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    # (procrastinate logs its blueprints at INFO while Django sets up, before the command.)
    worker_lines = [
        line
        for line in log_lines(quiet.stderr, "INFO") + log_lines(quiet.stderr, "DEBUG")
        if " procrastinate.blueprints: " not in line
    ]
    assert worker_lines == []
    assert statuses(dsn) == [("succeeded", 2)]

    defer_records(dsn, 1)
    default = manage_py(project_with_logging, "--one-shot", timeout=120)
    assert default.returncode == 0, default.stderr
    assert any("Starting worker" in line for line in log_lines(default.stderr, "INFO"))
    assert log_lines(default.stderr, "DEBUG") == []


@pytest.mark.parametrize("flag", ["--log-level=debug", "--verbose", "--log-format=%(message)s"])
def test_the_cli_logging_flags_are_not_offered_under_django(project: Path, flag: str) -> None:
    """settings.LOGGING configures logging under Django (as `manage.py procrastinate` has
    it): a flag that would do nothing is refused, not ignored."""
    completed = manage_py(project, "--one-shot", flag, timeout=60)
    assert completed.returncode == 2
    assert f"unrecognized arguments: {flag}" in completed.stderr


def test_sync_tasks_use_the_orm_concurrently_each_thread_its_own_connection(
    dsn: str, project: Path
) -> None:
    """20 sync jobs at concurrency=20 use the ORM at once (a barrier of 20), each in its
    own thread with its own connection (Django's connections are per thread); once the
    worker has stopped, procrastinate's Django middleware has closed every one of them."""
    values = ",".join(["('default', 'orm_at_once', '{}')"] * ORM_AT_ONCE)
    fetch_all(
        dsn,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        f" VALUES {values} RETURNING id",
    )
    script = textwrap.dedent(
        """
        import time

        import django
        from django.core.management import call_command
        from django.db import connection

        django.setup()
        call_command("fastworker", concurrency=20, wait=False)
        with open("ran.orm") as marker:
            pids = [int(line.split()[2]) for line in marker]
        deadline = time.monotonic() + 30
        with connection.cursor() as cursor:
            while True:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
                )
                (still_open,) = cursor.fetchone()
                if not still_open or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        print(f"still open: {still_open}")
        """
    )
    completed = run_in(
        project, "-c", script, timeout=180, DJANGO_SETTINGS_MODULE="djangoproject.settings"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "still open: 0"
    assert statuses(dsn) == [("succeeded", ORM_AT_ONCE)]
    runs = [line.split() for line in (project / "ran.orm").read_text().splitlines()]
    assert len(runs) == ORM_AT_ONCE
    assert len({thread for _, thread, _, _ in runs}) == ORM_AT_ONCE
    assert all(thread.startswith("fastworker-sync") for _, thread, _, _ in runs)
    assert len({pid for _, _, pid, _ in runs}) == ORM_AT_ONCE
    assert all(pid == again for _, _, pid, again in runs)
