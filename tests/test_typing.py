"""The native module's stub (`_core.pyi`) says what the module really has, and the
package type-checks against it: what crosses the Rust/Python seam is declared once in
Rust, and a stub that drifts from it fails here."""

from __future__ import annotations

import subprocess
import sys

from tests.reliability.helpers import REPO


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
