"""``./manage.py fastworker``: procrastinate's Django integration, run by fastworker.

A real Django project (written to a temporary directory) whose settings point at the test
database, a task registered on ``procrastinate.contrib.django.app``, and the management
command run in a subprocess until the queue is empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import fetch_all

pytest.importorskip("django")


def write_project(root: Path, dsn: str, marker: Path) -> None:
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
    )
    (root / "tasksapp").mkdir()
    (root / "tasksapp" / "__init__.py").write_text("")
    (root / "tasksapp" / "tasks.py").write_text(
        textwrap.dedent(
            f"""
            from procrastinate.contrib.django import app

            @app.task(name="record")
            def record(value):
                with open({str(marker)!r}, "a") as marker:
                    marker.write(f"{{value}}\\n")
            """
        )
    )


def manage_py(project: Path, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`django-admin fastworker ARGUMENTS` in the project written by `write_project`."""
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "djangoproject.settings",
        # Only the project: fastworker comes from the installed package (its native module).
        "PYTHONPATH": str(project),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", "fastworker", *arguments],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_manage_py_fastworker_runs_the_django_apps_jobs(dsn: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    write_project(tmp_path, dsn, marker)
    with_values = ",".join(f"('default', 'record', '{{\"value\": {i}}}')" for i in range(5))
    fetch_all(
        dsn,
        f"INSERT INTO procrastinate_jobs (queue_name, task_name, args) VALUES {with_values}"
        " RETURNING id",
    )
    completed = manage_py(tmp_path, "--one-shot", "--concurrency", "2", timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert sorted(marker.read_text().split()) == ["0", "1", "2", "3", "4"]
    assert fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1") == [
        ("succeeded", 5)
    ]


def test_manage_py_fastworker_help_lists_the_worker_flags(dsn: str, tmp_path: Path) -> None:
    write_project(tmp_path, dsn, tmp_path / "unused.txt")
    completed = manage_py(tmp_path, "--help", timeout=60)
    assert completed.returncode == 0, completed.stderr
    for flag in ("--concurrency", "--queues", "--one-shot", "--queue-limit", "--job-timeout"):
        assert flag in completed.stdout
