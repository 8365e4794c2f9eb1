"""procrastinate's private members that fastworker uses: declared in `fastworker.compat`,
present in the installed procrastinate, and named when a release changes one.

scripts/compat.sh runs this file (and the rest of the suite) against each procrastinate
release the pin allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import procrastinate
import pytest
from packaging.requirements import Requirement
from procrastinate import worker as procrastinate_worker
from procrastinate.contrib.aiopg import AiopgConnector

import fastworker
from fastworker import compat
from tests.conftest import make_app

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "python" / "fastworker"

# Private members of the standard library's argparse (its classes in type hints, and what
# the CLI uses to copy procrastinate's worker flags onto its parsers, argparse's own
# `parents=` mechanism): not procrastinate's.
ARGPARSE_PRIVATE = {
    "_actions",
    "_action_groups",
    "_add_container_actions",
    "_choices_actions",
    "_defaults",
    "_group_actions",
    "_mutually_exclusive_groups",
    "_option_string_actions",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def upstream_private_members(app: procrastinate.App) -> set[str]:
    """Every private member of procrastinate's Worker: class attributes and methods, and
    what its __init__ sets."""
    worker = procrastinate_worker.Worker(app)
    names = set(dir(procrastinate_worker.Worker)) | set(vars(worker))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def self_members_used() -> dict[str, set[str]]:
    """`self._name` and `super()._name` in fastworker's sources, with the files using them."""
    used: dict[str, set[str]] = {}
    for path in SOURCES.rglob("*.py"):
        for match in re.finditer(r"\b(?:self|super\(\))\.(_[a-z]\w*)", path.read_text()):
            used.setdefault(match.group(1), set()).add(path.name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                used.setdefault(node.name, set()).add(f"{path.name} (overrides)")
    return used


def test_the_private_members_fastworker_uses_are_in_the_installed_procrastinate(dsn: str) -> None:
    worker = procrastinate_worker.Worker(make_app(dsn))
    assert compat.missing_members(worker) == []


def test_the_methods_fastworker_reproduces_are_the_reviewed_ones() -> None:
    assert compat.changed_sources() == []


def test_every_private_member_of_procrastinates_worker_the_runner_uses_is_declared(
    dsn: str,
) -> None:
    upstream = upstream_private_members(make_app(dsn))
    declared = {member.name for member in compat.WORKER_MEMBERS}
    undeclared = {
        name: sorted(files)
        for name, files in self_members_used().items()
        if name in upstream and name not in declared
    }
    assert undeclared == {}, "declare these in fastworker.compat.WORKER_MEMBERS"


def test_no_other_private_attribute_is_read_outside_the_compat_module() -> None:
    """Connectors' (or any other object's) private attributes are read in compat.py only."""
    found = []
    for path in SOURCES.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
            ):
                found.append(
                    f"{path.name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})"
                )
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            owner = node.value
            # `_core`: our own binding, whose stub declares typing-only names (`_AnyEvent`).
            if isinstance(owner, ast.Name) and owner.id in (
                "self",
                "fastworker",
                "argparse",
                "_core",
            ):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            if node.attr in ARGPARSE_PRIVATE:
                continue
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_a_member_gone_upstream_is_named_and_the_worker_refuses_to_start(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(dsn)
    monkeypatch.delattr(procrastinate_worker.Worker, "_log_extra")
    assert compat.missing_members() == [
        "procrastinate.worker.Worker._log_extra is gone (builds every log record's extra)"
    ]
    with pytest.raises(RuntimeError, match=r"does not support procrastinate .*Worker\._log_extra"):
        fastworker.Worker(app)


def test_an_instance_attribute_gone_upstream_is_named(dsn: str) -> None:
    worker = procrastinate_worker.Worker(make_app(dsn))
    del worker._running_jobs
    assert [line for line in compat.missing_members(worker) if "_running_jobs" in line] == [
        "procrastinate.worker.Worker._running_jobs is gone "
        "(the running jobs' tasks and contexts (the job executor's, shutdown))"
    ]


def test_a_changed_signature_upstream_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def _abort_job(self: Any, task: Any, context: Any) -> None: ...

    monkeypatch.setattr(procrastinate_worker.Worker, "_abort_job", _abort_job)
    (problem,) = [line for line in compat.missing_members() if "_abort_job" in line]
    assert problem.startswith(
        "procrastinate.worker.Worker._abort_job takes (task, context), "
        "fastworker expects (process_job_task, context, reason)"
    )


def test_a_rewritten_method_upstream_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    async def _update_heartbeat(self: Any) -> None:
        """A release that heartbeats differently."""

    monkeypatch.setattr(procrastinate_worker.Worker, "_update_heartbeat", _update_heartbeat)
    (problem,) = [line for line in compat.changed_sources() if "_update_heartbeat" in line]
    assert problem.startswith(
        f"procrastinate.worker.Worker._update_heartbeat changed in procrastinate "
        f"{procrastinate.__version__} (source fingerprint "
    )
    assert "replaced by the core's heartbeat" in problem


def test_a_rewritten_query_or_method_outside_the_worker_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from procrastinate import periodic, sql

    monkeypatch.setitem(sql.queries, "defer_periodic_job", "SELECT 1 AS id;")

    async def defer_jobs(self: Any, jobs_to_defer: Any) -> None:
        """A release that defers differently."""

    monkeypatch.setattr(periodic.PeriodicDeferrer, "defer_jobs", defer_jobs)
    problems = [line for line in compat.changed_sources() if "procrastinate's" in line]
    assert [problem.split(" changed in ")[0] for problem in problems] == [
        "procrastinate's periodic.PeriodicDeferrer.defer_jobs",
        "procrastinate's sql.queries.defer_periodic_job",
    ]
    assert "DEFER_PERIODIC_JOB_UNLESS_PASSED" in problems[1]


async def test_the_connector_accessors_find_their_members_on_real_connectors(dsn: str) -> None:
    def loads(text: str) -> Any:
        return text

    connector = procrastinate.PsycopgConnector(conninfo=dsn, json_loads=loads)
    arguments = compat.connector_pool_args(connector)
    assert arguments is not None, "PsycopgConnector._pool_args is gone"
    assert arguments.get("conninfo") == dsn
    assert compat.connector_json_loads(connector) is loads, "PsycopgConnector._json_loads"
    assert compat.psycopg_async_pool(connector) is None
    app = procrastinate.App(connector=connector)
    async with app.open_async():
        assert compat.psycopg_async_pool(connector) is not None, "PsycopgConnector._async_pool"

    aiopg = AiopgConnector(dsn=dsn)
    assert compat.connector_pool_args(aiopg) is not None, "AiopgConnector._pool_args is gone"
    assert compat.aiopg_pool(aiopg) is None
    async with procrastinate.App(connector=aiopg).open_async():
        assert compat.aiopg_pool(aiopg) is not None, "AiopgConnector._pool"


def test_the_pin_is_the_tested_range() -> None:
    """pyproject.toml allows exactly the procrastinate series compat.TESTED_SERIES names
    (scripts/compat.sh runs the suite against the newest release of each)."""
    # (tomllib is Python >= 3.11; the dependency is one line of pyproject.toml)
    pins = re.findall(r'^\s*"(procrastinate[^"\[]*)",', (ROOT / "pyproject.toml").read_text(), re.M)
    (pin,) = [Requirement(text) for text in pins]
    for series in compat.TESTED_SERIES:
        assert pin.specifier.contains(f"{series}.0"), f"{pin} excludes the tested {series}"
        assert pin.specifier.contains(f"{series}.99"), f"{pin} excludes the tested {series}"
    major, minor = map(int, compat.TESTED_SERIES[0].split("."))
    below = f"{major}.{minor - 1}.99"
    major, minor = map(int, compat.TESTED_SERIES[-1].split("."))
    above = f"{major}.{minor + 1}.0"
    assert not pin.specifier.contains(below), f"{pin} allows the untested {below}"
    assert not pin.specifier.contains(above), f"{pin} allows the untested {above}"
    series = {".".join(release.split(".")[:2]) for release in _compat_releases()}
    assert series == set(compat.TESTED_SERIES), "scripts/compat.sh tests another range"


def _compat_releases() -> list[str]:
    """The releases scripts/compat.sh runs the suite against."""
    text = (ROOT / "scripts" / "compat.sh").read_text()
    match = re.search(r"^RELEASES=\(([^)]*)\)", text, re.MULTILINE)
    assert match, "scripts/compat.sh has no RELEASES=(...) line"
    return match.group(1).split()
