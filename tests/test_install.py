"""README.md's install section, followed as a new user follows it: its marked block run as
written in a project of the test's own (a procrastinate App with a task, in a database of
its own), from a fresh virtualenv, with fastworker installed from this checkout; then the
block's last command, the worker, drains the jobs the project deferred.

pip builds a local path in place, so maturin reuses this checkout's `target/`: the test
costs a relink of the extension, not a cold build (a cold one is allowed for all the same).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import create_database, drop_database, fetch_all
from tests.doc_blocks import REPO, command_lines, marked_block, write_app_module
from tests.helpers import run_process

PLACEHOLDER = "<path or URL of this repository>"
JOBS = 40
#: A cold release build (fat LTO) on a busy 2-core machine; only bounds a failing run.
BUILD_PATIENCE = 1800.0
PATIENCE = 120.0

DEFER = f"""\
from mypkg.tasks import add, app

with app.open():
    for number in range({JOBS}):
        add.defer(a=number, b=1)
"""


def cargo_path() -> str | None:
    """Where cargo is, as scripts/venv.sh finds it (PATH, else rustup's ~/.cargo/bin)."""
    found = shutil.which("cargo")
    if found:
        return str(Path(found).parent)
    rustup_bin = Path.home() / ".cargo" / "bin"
    return str(rustup_bin) if (rustup_bin / "cargo").exists() else None


@pytest.fixture
def project_database() -> Iterator[str]:
    """An empty database for the project (no schema: the README's block applies it)."""
    name = f"fw_install_{uuid.uuid4().hex[:12]}"
    dsn = create_database(name, with_schema=False)
    yield dsn
    drop_database(name)


def project_environment(tmp_path: Path, dsn: str, cargo_bin: str) -> dict[str, str]:
    """The environment of a shell on a clean machine: no virtualenv active, `python3` the
    interpreter of this suite (CPython >= 3.10), cargo on PATH, the database in PG*."""
    interpreter_bin = tmp_path / "bin"
    interpreter_bin.mkdir()
    (interpreter_bin / "python3").symlink_to(sys.executable)
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"} and not key.startswith("PG")
    }
    environment["PATH"] = os.pathsep.join(
        [str(interpreter_bin), cargo_bin, environment.get("PATH", "/usr/bin:/bin")]
    )
    parameters = conninfo_to_dict(dsn)
    for key, variable in [
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("user", "PGUSER"),
        ("password", "PGPASSWORD"),
        ("dbname", "PGDATABASE"),
    ]:
        if parameters.get(key) is not None:
            environment[variable] = str(parameters[key])
    return environment


def job_statuses(dsn: str) -> dict[str, int]:
    rows = fetch_all(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")
    return {status: count for status, count in rows}


@pytest.mark.slow
def test_the_readme_install_from_source_runs_a_worker(
    tmp_path: Path, project_database: str
) -> None:
    cargo_bin = cargo_path()
    if cargo_bin is None:
        pytest.skip("no Rust toolchain (cargo): the README's install from source needs one")
    lines = command_lines(marked_block("README.md", "install-from-source"))
    setup, worker_line = lines[:-1], lines[-1]
    assert sum(line.count(PLACEHOLDER) for line in setup) == 1, setup
    worker_command = shlex.split(worker_line, comments=True)
    assert worker_command[0] == ".venv/bin/fastworker" and "worker" in worker_command

    project = tmp_path / "myproject"
    write_app_module(project, "mypkg.tasks")
    environment = project_environment(tmp_path, project_database, cargo_bin)

    # The block's commands up to the worker: the virtualenv, fastworker built from this
    # checkout, the schema. A path without quotes or `$` stays one word in "..." quotes.
    assert not set('"$`\\') & set(str(REPO))
    script = "\n".join(line.replace(PLACEHOLDER, str(REPO)) for line in setup)

    def run(*command: str, timeout: float = PATIENCE) -> str:
        """`command` in the project, as the user runs it; its output, or the test fails."""
        done = run_process(command, cwd=project, env=environment, timeout=timeout)
        assert done.returncode == 0, f"{command}:\n{done.stdout}{done.stderr}"
        return done.stdout

    run("bash", "-euo", "pipefail", "-c", script, timeout=BUILD_PATIENCE)

    # fastworker runs from the new virtualenv, not from the checkout or the suite's own.
    native_module = run(
        ".venv/bin/python", "-c", "import fastworker._core as core; print(core.__file__)"
    ).strip()
    assert Path(native_module).is_relative_to(project / ".venv"), native_module

    run(".venv/bin/python", "-c", DEFER)
    assert job_statuses(project_database) == {"todo": JOBS}

    worker = subprocess.Popen(
        worker_command,
        cwd=project,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + PATIENCE
        while job_statuses(project_database) != {"succeeded": JOBS}:
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                output, _ = worker.communicate()
                pytest.fail(
                    f"the worker left {job_statuses(project_database)} "
                    f"(exit code {worker.returncode}):\n{output}"
                )
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=PATIENCE)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, output
