"""The project's habits are wired up: CI runs `.ci/run` (the README's test command) on
pushes and pull requests, that command runs the lint checks, and the pre-commit hooks run
the very same checks (scripts/lint.sh)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def lint_checks() -> list[str]:
    """The check names scripts/lint.sh declares (its CHECKS array)."""
    match = re.search(r"^CHECKS=\(([^)]*)\)$", (ROOT / "scripts/lint.sh").read_text(), re.M)
    assert match is not None, "scripts/lint.sh declares no CHECKS=(...)"
    return match.group(1).split()


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def test_ci_workflow_runs_ci_run_on_pushes_and_pull_requests() -> None:
    workflow = load(".github/workflows/ci.yml")
    # PyYAML reads the bare key `on` as the boolean True (YAML 1.1).
    triggers = workflow.get("on", workflow.get(True))
    assert "push" in triggers and "pull_request" in triggers
    runs = [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step
    ]
    assert any(re.search(r"(^|\s)bash \.ci/run\s*$", run) for run in runs), runs


def test_ci_run_is_the_readme_test_command_which_runs_the_lint_checks() -> None:
    ci_run = (ROOT / ".ci/run").read_text()
    assert re.search(r"^exec bash scripts/test\.sh$", ci_run, re.M)
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
    test_sh = (ROOT / "scripts/test.sh").read_text()
    assert re.search(r"^bash scripts/lint\.sh \|\|", test_sh, re.M)
    assert lint_checks() == ["ruff-check", "ruff-format", "cargo-fmt", "cargo-clippy"]


def test_pre_commit_hooks_run_each_lint_check_of_ci() -> None:
    config = load(".pre-commit-config.yaml")
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert all(repo["repo"] == "local" for repo in config["repos"])
    entries = [hook["entry"] for hook in hooks]
    assert entries == [f"bash scripts/lint.sh {check}" for check in lint_checks()]
    assert all(hook["pass_filenames"] is False for hook in hooks)


def test_lint_script_rejects_an_unknown_check_by_name() -> None:
    completed = subprocess.run(
        ["bash", "scripts/lint.sh", "spelling"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0
    assert "unknown check 'spelling' (of ruff-check ruff-format cargo-fmt cargo-clippy)" in (
        completed.stderr
    )
