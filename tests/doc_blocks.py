"""The code blocks of the docs that tests run: each follows an HTML comment that names it
(`<!-- install-from-source: ... -->`), so a test runs what the reader copies; and the
reader's project they run in."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def marked_block(document: str, marker: str) -> str:
    """The fenced code block right after the comment `<!-- marker...` in `document` (a path
    relative to the repository)."""
    text = (REPO / document).read_text()
    found = re.search(
        rf"<!-- {re.escape(marker)}\b.*?-->\s*```[a-z]*\n(.*?)```", text, flags=re.DOTALL
    )
    assert found, f"{document} has no code block marked <!-- {marker} -->"
    return found.group(1)


def command_lines(block: str) -> list[str]:
    """The block's command lines, as written (their trailing comments included): every line
    but the blank ones and those that are only a comment."""
    return [line for line in block.splitlines() if shlex.split(line, comments=True)]


APP_MODULE = """\
import procrastinate

# The connection comes from libpq's PG* variables.
app = procrastinate.App(connector=procrastinate.PsycopgConnector())


@app.task(name="{module}.add")
def add(a: int, b: int) -> int:
    return a + b
"""


def write_app_module(project: Path, module: str) -> None:
    """A user's module `module` (dotted) under `project`: a procrastinate `app`, and a task
    `add` named `<module>.add`."""
    *packages, name = module.split(".")
    directory = project
    for package in packages:
        directory = directory / package
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "__init__.py").touch()
    (directory / f"{name}.py").write_text(APP_MODULE.format(module=module))
