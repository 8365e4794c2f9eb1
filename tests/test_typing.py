"""The native module's stub (`_core.pyi`) says what the module really has, and the
package type-checks against it: what crosses the Rust/Python seam is declared once in
Rust, and a stub that drifts from it fails here. So does a binding that takes what the
core cannot (an end status procrastinate does not have)."""

from __future__ import annotations

import ast
import subprocess
import sys

import procrastinate
import pytest

import fastworker
from fastworker import _core
from fastworker.connection import params_from_dsn
from tests.helpers import wait_for_rows
from tests.reliability.helpers import REPO

STUB = REPO / "python" / "fastworker" / "_core.pyi"


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_stub_of_the_native_module_matches_it() -> None:
    result = run("mypy.stubtest", "fastworker._core")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_type_checks() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def stub_event_kinds() -> tuple[list[str], list[str]]:
    """The classes the stub declares in `Event`, one per kind, and the kinds its `_AnyEvent`
    union names."""
    module = ast.parse(STUB.read_text(encoding="utf-8"))
    (event,) = (
        node for node in module.body if isinstance(node, ast.ClassDef) and node.name == "Event"
    )
    (any_event,) = (
        node.value
        for node in module.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id == "_AnyEvent"
    )
    assert any_event is not None
    members = [node.attr for node in ast.walk(any_event) if isinstance(node, ast.Attribute)]
    return [node.name for node in event.body if isinstance(node, ast.ClassDef)], members


def test_the_event_kinds_agree_across_the_core_the_binding_and_the_stub() -> None:
    core = list(_core.EVENT_KINDS)
    binding = [
        name
        for name, value in vars(_core.Event).items()
        if isinstance(value, type) and issubclass(value, _core.Event)
    ]
    assert core and len(core) == len(set(core)), core
    assert sorted(binding) == sorted(core)
    classes, union = stub_event_kinds()
    assert sorted(classes) == sorted(core)
    # The union `match` statements narrow over, so that they end in assert_never.
    assert sorted(union) == sorted(core)


async def claimed_job(core: _core.WorkerCore) -> _core.Job:
    while True:
        events = await core.next_events()
        assert events is not None, "the core stopped before it handed a job over"
        for event in events:
            if isinstance(event, _core.Event.Jobs) and event.jobs:
                return event.jobs[0]


async def test_an_end_status_procrastinate_does_not_have_is_refused_and_the_report_writes_nothing(
    app: procrastinate.App, dsn: str
) -> None:
    @app.task(name="noop")
    def noop() -> None: ...

    job_id = await noop.defer_async()
    worker = fastworker.Worker(app, wait=True)
    core = await _core.WorkerCore.start(
        worker._core_options(params_from_dsn(dsn), params_from_dsn(dsn))
    )
    try:
        job = await claimed_job(core)
        assert job.id == job_id
        refused = [
            _core.Outcome.Finish(job.id, job.attempts, "succeeded"),
            _core.Outcome.Finish(job.id, job.attempts, "retried"),
        ]
        with pytest.raises(ValueError, match='succeeded, failed or aborted, got "retried"'):
            core.report(refused)
        # Nothing of the refused report was written: the claim is still there to end.
        core.report([_core.Outcome.Finish(job.id, job.attempts, "failed")])
        status = f"SELECT status::text FROM procrastinate_jobs WHERE id = {job_id}"
        await wait_for_rows(dsn, status, [("failed",)])
    finally:
        await core.shutdown()
