"""fastworker's options are declared once (`fastworker.options.OPTIONS`): the `Worker`
signature, the CLI, the core's configuration and the README's table all agree with it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import procrastinate
import pytest

import fastworker
from fastworker import _core, options, synopsis
from fastworker.cli import create_parser
from fastworker.connection import params_from_dsn
from tests.reliability.helpers import REPO

FASTWORKER_ONLY = [option.name for option in options.OPTIONS]


def readme_rows() -> str:
    """The README's table of fastworker's own options, as the option table makes it."""
    rows = ["| option | default | |", "| --- | --- | --- |"]
    for option in options.OPTIONS:
        flag = f"`{option.flag}`"
        rows.append(f"| `{option.name}` ({flag}) | {option.default_text()} | {option.help} |")
    return "\n".join(rows)


def test_the_worker_takes_each_option_with_its_declared_default() -> None:
    parameters = inspect.signature(fastworker.Worker.__init__).parameters
    keywords = [
        name
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert sorted(keywords) == sorted(FASTWORKER_ONLY)
    for option in options.OPTIONS:
        assert parameters[option.name].default == option.default, option.name


def test_the_readme_lists_each_option_as_declared() -> None:
    readme = (REPO / "README.md").read_text()
    expected = readme_rows()
    assert expected in readme, f"the README's table of fastworker's options should be:\n{expected}"


def test_the_cli_has_a_flag_and_a_variable_for_each_option() -> None:
    parser = create_parser()
    worker = parser._subparsers._group_actions[0].choices["worker"]  # type: ignore[union-attr]
    by_dest = {action.dest: action for action in worker._actions}
    for option in options.OPTIONS:
        action = by_dest[option.name]
        assert option.flag in action.option_strings
        assert set(option.old_flags) <= set(action.option_strings)
        assert option.env in (action.help or ""), option.name


def test_an_old_spelling_still_works_on_the_command_line() -> None:
    parsed = vars(
        create_parser().parse_args(
            ["--app", "x.app", "worker", "--queue-limit", "a=2", "--task-timeout", "t=1.5"]
        )
    )
    assert parsed["queue_concurrency"] == {"a": 2}
    assert parsed["task_timeouts"] == {"t": 1.5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-jobs", "0"], "max_jobs must be an integer >= 1"),
        (["--queue-concurrency", "a=0"], "queue_concurrency['a'] must be an integer >= 1"),
        (["--response-timeout", "0"], "response_timeout must be a number of seconds > 0"),
        (["--metrics-port", "70000"], "metrics_port must be a port number"),
        (["--metrics-duration-buckets", "60,1"], "metrics_duration_buckets must be positive"),
        (["--metrics-duration-buckets", "1,x"], "invalid float value: 'x'"),
        (["--sync-executor", "pool"], "sync_executor must be 'threads' or 'default', got 'pool'"),
    ],
)
def test_a_bad_value_on_the_command_line_is_refused_by_the_table_s_check(
    argv: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastworker", "--app", "x.app", "worker", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("max_jobs", 0, "max_jobs must be an integer >= 1"),
        ("task_timeouts", {"t": -1}, "task_timeouts['t'] must be a number of seconds >= 0"),
        ("recover_stalled_jobs", "yes", "recover_stalled_jobs must be True or False"),
        ("metrics_duration_buckets", [1, float("inf")], "in increasing order"),
        ("metrics_duration_buckets", [], "in increasing order"),
    ],
)
def test_a_bad_value_in_python_is_refused_by_the_table_s_check(
    app: procrastinate.App, keyword: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        fastworker.Worker(app, **{keyword: value})


async def test_the_core_takes_every_option_the_worker_hands_it(
    app: procrastinate.App, dsn: str
) -> None:
    worker = fastworker.Worker(
        app, queue_concurrency={"a": 1}, max_jobs=5, update_heartbeat_interval=float("inf")
    )
    core_options = worker._core_options(params_from_dsn(dsn), params_from_dsn(dsn))
    expected = set(options.PROCRASTINATE_CORE_OPTIONS) | {
        option.name for option in options.OPTIONS if option.core
    }
    assert set(core_options) == expected | {
        "connection",
        "listen_connection",
        *options.RUNNER_CORE_VALUES,
    }
    core = await _core.WorkerCore.start(core_options)
    await core.shutdown()


def test_the_core_refuses_an_option_it_does_not_know_by_name() -> None:
    with pytest.raises(_core.ConfigurationError, match="concurency"):
        _core.WorkerCore.start({"connection": {"dbname": "x"}, "concurency": 2})


def test_the_readme_synopsis_is_the_parsers_usage() -> None:
    """The README's synopsis of the command (``python -m fastworker.synopsis`` prints it)
    lists every flag `fastworker --help` and `fastworker worker --help` show, spelled as
    they show them."""
    expected = f"```text\n{synopsis.synopsis()}\n```"
    readme = (REPO / "README.md").read_text()
    assert expected in readme, f"the README's synopsis should be:\n{expected}"
    for flag in ("--pooler", "--listen-dsn", "--metrics-duration-buckets", "[-w]", "[-l]"):
        assert flag in expected


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("max_jobs", "3", 3),
        ("pooler", "off", False),
        ("pooler", "Yes", True),
        ("queue_concurrency", "a=1, b=2", {"a": 1, "b": 2}),
        ("task_timeouts", "pkg.sleepy=1.5", {"pkg.sleepy": 1.5}),
        ("metrics_duration_buckets", "1,60", [1.0, 60.0]),
        ("sync_executor", "default", "default"),
    ],
)
def test_an_options_text_is_read_by_the_table(name: str, text: str, value: object) -> None:
    """The text of a flag or variable, read by the table's converter (the CLI's flags and
    environment variables use it, and nothing else)."""
    assert options.from_text(options.BY_NAME[name])(text) == value


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWORKER_QUEUE_CONCURRENCY", "a=1,b")
    convert = options.from_text(options.BY_NAME["queue_concurrency"])
    with pytest.raises(ValueError) as raised:
        options.from_environment("FASTWORKER_QUEUE_CONCURRENCY", convert)
    assert str(raised.value) == (
        "invalid value in $FASTWORKER_QUEUE_CONCURRENCY: expected QUEUE=N, got 'b'"
    )
    monkeypatch.setenv("FASTWORKER_QUEUE_CONCURRENCY", "")
    assert options.from_environment("FASTWORKER_QUEUE_CONCURRENCY", convert) is None
