"""The ``fastworker`` command: procrastinate's ``worker`` subcommand, run by fastworker.

``procrastinate --app=mypkg.app worker --concurrency=50`` becomes
``fastworker --app=mypkg.app worker --concurrency=50``: the worker flags are procrastinate's
own (its parser builds them, so spelling, meaning and ``PROCRASTINATE_*`` environment
variables are the same), plus a few fastworker flags (``--dsn``, ``--reconnect-timeout``, ...).
procrastinate's other subcommands (``defer``, ``schema``, ``healthchecks``, ``shell``) are
run by procrastinate's own CLI code, for the app loaded as the worker's is.

Exit codes: 0 clean stop, 1 the worker failed, 2 bad arguments or app, 3 database
unreachable or lost, 4 procrastinate schema missing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import procrastinate
import psycopg
from procrastinate import cli as procrastinate_cli
from procrastinate import connector as procrastinate_connector
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs
from psycopg.conninfo import conninfo_to_dict

import fastworker
from fastworker import options, preflight
from fastworker.connection import redact_password
from fastworker.worker import check_platform

PROGRAM_NAME = "fastworker"
# The name it is installed under (`pip install procrastinate-fastworker`); `fastworker` on
# the package index is an unrelated project.
DISTRIBUTION = "procrastinate-fastworker"
ENV_PREFIX = options.ENV_PREFIX

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SCHEMA_MISSING = 4

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  the worker stopped cleanly (SIGINT/SIGTERM, or --one-shot and nothing left to run)
  {EXIT_FAILURE}  the worker failed
  {EXIT_USAGE}  bad arguments, environment variables or app
  {EXIT_UNREACHABLE}  the database is unreachable, or was lost for longer than --reconnect-timeout
  {EXIT_SCHEMA_MISSING}  the procrastinate schema is missing (`fastworker --app=APP schema --apply`)

A first SIGINT/SIGTERM stops claiming jobs and lets running jobs finish (their results are
written); a second one, or --shutdown-graceful-timeout, aborts them.
"""


class CliError(Exception):
    """An error reported as one line on stderr, with its exit code (an empty message: already
    reported, only the exit code is left)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


# procrastinate's subcommands other than `worker`, run by procrastinate's own CLI code.
PROCRASTINATE_COMMANDS = {
    "defer": procrastinate_cli.configure_defer_parser,
    "schema": procrastinate_cli.configure_schema_parser,
    "healthchecks": procrastinate_cli.configure_healthchecks_parser,
    "shell": procrastinate_cli.configure_shell_parser,
}


# --- argument parsing -----------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


class _MergeMapping(argparse.Action):
    """Repeatable ``KEY=VALUE`` flag: later keys override earlier ones."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


class _StoreSwitch(argparse.Action):
    """A switch's flags: ``--name`` turns it on, ``--no-name`` off (a ``type`` is kept for
    the environment default)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def _abort_interval(value: str) -> float:
    """procrastinate's ``worker -a`` is the abort polling interval, not the app."""
    try:
        return options.seconds_from_text(value)
    except argparse.ArgumentTypeError as error:
        if re.fullmatch(r"[A-Za-z_][\w.:]*", value):
            raise argparse.ArgumentTypeError(
                f"{error} (after `worker`, -a is --abort-job-polling-interval, as in "
                f"procrastinate; give the app as `fastworker --app {value} worker` or "
                f"`fastworker worker --app {value}`)"
            ) from None
        raise


def _add_env_argument(
    parser: argparse._ActionsContainer,
    *flags: str,
    envvar: str,
    type: Callable[[str], Any],
    help: str,
    env_help: str = "",
    **kwargs: Any,
) -> argparse.Action:
    """A fastworker-only flag, defaulting to the ``FASTWORKER_<envvar>`` variable."""
    variable = f"{ENV_PREFIX}_{envvar}"
    try:
        default = options.from_environment(variable, type)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    if default is not None:
        kwargs["default"] = default
    suffix = f": {env_help}" if env_help else ""
    return parser.add_argument(
        *flags, type=type, help=f"{help} (env: {variable}{suffix})", **kwargs
    )


def _add_procrastinate_argument(
    container: argparse._ActionsContainer,
    *flags: str,
    envvar: str,
    in_subcommand: bool,
    **kwargs: Any,
) -> argparse.Action:
    """A flag of procrastinate's CLI, read from the same ``PROCRASTINATE_*`` variable.

    Its copy after ``worker`` only overrides: no default, and no environment default
    either (that would override a value given before ``worker``)."""
    if not in_subcommand:
        return procrastinate_cli.add_argument(container, *flags, envvar=envvar, **kwargs)
    for key in ("default", "envvar_type"):
        kwargs.pop(key, None)
    envvar_help = kwargs.pop("envvar_help", "")
    variable = f"{procrastinate_cli.ENV_PREFIX}_{envvar}"
    kwargs["help"] = (
        f"{kwargs.get('help', '')} (env: {variable}{f': {envvar_help}' if envvar_help else ''})"
    )
    return container.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)


def _add_logging_arguments(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """procrastinate's logging flags (same names, same PROCRASTINATE_* variables), accepted
    before and after ``worker``."""
    group = parser.add_argument_group("logging")
    verbosity = group.add_mutually_exclusive_group()
    _add_procrastinate_argument(
        verbosity,
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="Use multiple times to increase verbosity (procrastinate deprecates it in "
        "favour of --log-level)",
        envvar="VERBOSE",
        envvar_help="set to desired verbosity level",
        envvar_type=int,
        in_subcommand=in_subcommand,
    )
    _add_procrastinate_argument(
        verbosity,
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        help="Set log level explicitly",
        envvar="LOG_LEVEL",
        envvar_help="set to desired log level",
        in_subcommand=in_subcommand,
    )
    _add_procrastinate_argument(
        group,
        "--log-format",
        default=logging.BASIC_FORMAT,
        help="Format of the log lines (a logging.Formatter format string; default "
        f"{logging.BASIC_FORMAT.replace('%', '%%')!r})",
        envvar="LOG_FORMAT",
        in_subcommand=in_subcommand,
    )
    _add_procrastinate_argument(
        group,
        "--log-format-style",
        default="%",
        choices=["%", "{", "$"],
        help="Style of the --log-format string (default %%)",
        envvar="LOG_FORMAT_STYLE",
        in_subcommand=in_subcommand,
    )


def _with_env_suffix(text: str, old_help: str | None) -> str:
    if old_help and " (env:" in old_help:
        return text + old_help[old_help.index(" (env:") :]
    return text


# procrastinate's worker variables that it reads as booleans (its `env_bool`), by the
# worker option they set.
PROCRASTINATE_BOOLEAN_VARIABLES = {"wait": "WORKER_WAIT", "listen_notify": "WORKER_LISTEN_NOTIFY"}


def _procrastinate_booleans() -> dict[str, bool]:
    """The worker options procrastinate's boolean variables set, read as procrastinate reads
    them: by their first letter (0/n/f or 1/y/t). On any other, procrastinate fails while
    building its parser with a message that names neither the variable nor the value: the
    same rule, checked first, with both named. procrastinate also drops a false value
    (`if env_var_default:`), so PROCRASTINATE_WORKER_WAIT=false would be ignored: these
    values are set as the worker parser's defaults."""
    values = {}
    for dest, name in PROCRASTINATE_BOOLEAN_VARIABLES.items():
        variable = f"{procrastinate_cli.ENV_PREFIX}_{name}"
        value = os.environ.get(variable, "")
        if not value:  # empty is unset, as for procrastinate
            continue
        try:
            values[dest] = procrastinate_cli.env_bool(value)
        except argparse.ArgumentTypeError:
            raise CliError(
                f"invalid value in ${variable}: {value!r} is not a boolean; as procrastinate "
                "reads it, a value starting with 1, y or t is true (1, yes, true) and one "
                "starting with 0, n or f is false (0, no, false)",
                EXIT_USAGE,
            ) from None
    return values


def _adapt_procrastinate_worker_flags(worker: argparse.ArgumentParser) -> None:
    """procrastinate's worker flags, checked as fastworker's (its parser takes any number)
    and explained where its help says little."""
    for action in worker._actions:
        if action.dest == "concurrency":
            action.type = options.at_least_one
        elif action.dest in ("fetch_job_polling_interval", "shutdown_graceful_timeout"):
            action.type = options.seconds_from_text
        elif action.dest == "abort_job_polling_interval":
            action.type = _abort_interval
        elif action.dest == "delete_jobs":
            action.metavar = "{" + ",".join(c.value for c in jobs.DeleteJobCondition) + "}"
        elif action.dest == "wait":
            action.help = _with_env_suffix(
                "--wait (default): keep waiting for new jobs; --one-shot: stop once nothing is "
                "claimable and no job runs",
                action.help,
            )
        elif action.dest == "listen_notify":
            action.help = _with_env_suffix(
                "--listen-notify (default): be woken by PostgreSQL LISTEN/NOTIFY; "
                "--no-listen-notify: only poll",
                action.help,
            )


def _configure_worker_parser(
    subparsers: argparse._SubParsersAction[Any],
) -> argparse.ArgumentParser:
    booleans = _procrastinate_booleans()
    # procrastinate's own `worker` subcommand: same flags, same PROCRASTINATE_WORKER_* vars.
    procrastinate_cli.configure_worker_parser(subparsers)
    worker = subparsers.choices["worker"]
    worker.description = (
        "Run a fastworker worker for the app, listening on the given queues (or all\n"
        "queues). Takes the flags of `procrastinate worker`, with the same meaning and\n"
        "environment variables. Values default to App.worker_defaults, then to\n"
        "procrastinate's worker defaults."
    )
    for choice in subparsers._choices_actions:
        if choice.dest == "worker":
            choice.help = "Run a fastworker worker (takes the flags of `procrastinate worker`)"
    worker.epilog = EXIT_CODES_HELP
    worker.formatter_class = argparse.RawDescriptionHelpFormatter
    worker.set_defaults(func=None, **booleans)
    _adapt_procrastinate_worker_flags(worker)

    _add_procrastinate_argument(
        worker,
        "--app",
        help="Dotted path to the procrastinate app (also accepted before `worker`)",
        envvar="APP",
        in_subcommand=True,
    )
    _add_logging_arguments(worker, in_subcommand=True)

    for name, parse, help in options.PROCRASTINATE_EXTRA_FLAGS:
        _add_env_argument(
            worker,
            "--" + name.replace("_", "-"),
            envvar=name.upper(),
            type=options.checked_from_text(name, parse, options.seconds),
            metavar="SECONDS",
            help=help,
        )
    group = worker.add_argument_group("fastworker options")
    for option in options.OPTIONS:
        _add_option(group, option)
    return worker


def _add_option(group: argparse._ArgumentGroup, option: options.Option) -> None:
    """One flag of fastworker's option table, with its environment variable (and its former
    spellings, still accepted)."""
    flags = (option.flag, *option.old_flags)
    envvar = option.env.removeprefix(f"{ENV_PREFIX}_")
    for old in option.old_env:
        if not os.environ.get(option.env) and os.environ.get(old):
            envvar = old.removeprefix(f"{ENV_PREFIX}_")
    help = f"{option.help} (default: {option.default_text().strip('`')})"
    form: dict[str, Any] = {"metavar": option.metavar}
    if option.form == "switch":
        flags = (*flags, option.off_flag)
        form = {"nargs": 0, "action": _StoreSwitch, "env_help": "use 0/n/f/off or 1/y/t/on"}
    elif option.form == "mapping":
        form["action"] = _MergeMapping
        help += " (repeatable, or comma-separated)"
    _add_env_argument(
        group,
        *flags,
        envvar=envvar,
        type=options.from_text(option),
        dest=option.name,
        help=help,
        **form,
    )


# The logging flags' destinations: the Django command leaves them out (settings.LOGGING
# configures logging there).
LOGGING_DESTS = ("verbose", "log_level", "log_format", "log_format_style")


def add_worker_arguments(parser: argparse.ArgumentParser, *, logging_flags: bool = True) -> None:
    """The flags of ``fastworker worker``, on another parser (the Django command's): the
    same actions, so the same spelling, types, checks and environment variables. Not
    ``--app``, nor the logging flags unless ``logging_flags``, and no flag string the
    parser has already (Django's ``-v``, ``-h``)."""
    holder = argparse.ArgumentParser(add_help=False)
    worker = _configure_worker_parser(holder.add_subparsers())
    taken = set(parser._option_string_actions)
    for action in worker._actions:
        action.option_strings = [flag for flag in action.option_strings if flag not in taken]
    # argparse's own way of copying actions (what `parents=` does), groups and mutually
    # exclusive groups included.
    worker._actions = [
        action
        for action in worker._actions
        if action.option_strings
        and action.dest not in ("help", "app")
        and (logging_flags or action.dest not in LOGGING_DESTS)
    ]
    for group in worker._action_groups + worker._mutually_exclusive_groups:
        group._group_actions = [a for a in group._group_actions if a in worker._actions]
    # An emptied exclusive group (the logging flags left out) breaks argparse's usage.
    worker._mutually_exclusive_groups = [
        g for g in worker._mutually_exclusive_groups if g._group_actions
    ]
    parser._add_container_actions(worker)
    parser.set_defaults(**{key: value for key, value in worker._defaults.items() if key != "func"})


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose errors never show a password:
    they quote arguments, such as a mistyped flag's whole connection string."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact_password(message)}\n")


def create_parser() -> argparse.ArgumentParser:
    """The ``fastworker`` parser. Reads the environment (PROCRASTINATE_*, FASTWORKER_*)."""
    parser = _ArgumentParser(
        prog=PROGRAM_NAME,
        description="Run procrastinate jobs with fastworker, a Rust-accelerated drop-in worker:\n"
        "`procrastinate --app=APP worker ...` becomes `fastworker --app=APP worker ...`.\n"
        "See `fastworker worker --help` for the flags. procrastinate's other commands\n"
        "(defer, schema, healthchecks, shell) are procrastinate's own, run for the same app.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    procrastinate_cli.add_argument(
        parser,
        "-a",
        "--app",
        default="",
        help="Dotted path to the procrastinate app",
        envvar="APP",
    )
    _add_logging_arguments(parser, in_subcommand=False)
    parser.add_argument(
        "-V",
        "--version",
        action="version",
        version=f"%(prog)s {_version()} (procrastinate {procrastinate.__version__})",
        help="Print the version and exit",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _configure_worker_parser(subparsers)
    _configure_procrastinate_parsers(subparsers)
    return parser


def _configure_procrastinate_parsers(subparsers: argparse._SubParsersAction[Any]) -> None:
    """procrastinate's other subcommands, built by procrastinate's own code (same flags,
    same PROCRASTINATE_* variables), marked as procrastinate's in ``--help``."""
    for name, configure in PROCRASTINATE_COMMANDS.items():
        configure(subparsers)
        _add_procrastinate_argument(
            subparsers.choices[name],
            "--app",
            help="Dotted path to the procrastinate app (also accepted before the command)",
            envvar="APP",
            in_subcommand=True,
        )
    for choice in subparsers._choices_actions:
        if choice.dest in PROCRASTINATE_COMMANDS:
            choice.help = f"procrastinate's `{choice.dest}`: {choice.help}"


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    try:
        parser = create_parser()
    except CliError:
        raise
    except (ValueError, argparse.ArgumentTypeError) as error:
        # procrastinate converts its PROCRASTINATE_* variables while building the parser.
        raise CliError(
            f"invalid value in a PROCRASTINATE_* environment variable: {error}", EXIT_USAGE
        ) from None
    return vars(parser.parse_args(list(argv)))


# --- loading and checking ---------------------------------------------------------------


def load_app(path: str) -> procrastinate.App:
    if not path:
        raise CliError(
            "no app given: pass --app=dotted.path.to.app or set PROCRASTINATE_APP",
            EXIT_USAGE,
        )
    # As `python -m fastworker` would: the app's package may sit in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = procrastinate.App.from_path(dotted_path=path)
    except Exception as error:  # the import itself may raise anything
        cause: BaseException = error
        if isinstance(error, procrastinate_exceptions.LoadFromPathError):
            cause = error.__cause__ or error
        raise CliError(
            f"could not load the app from {path!r}: {type(cause).__name__}: {cause}",
            EXIT_USAGE,
        ) from error
    if not isinstance(app, procrastinate.App):
        raise CliError(f"{path!r} is not a procrastinate App", EXIT_USAGE)
    if not isinstance(app.connector, procrastinate_connector.BaseAsyncConnector):
        raise CliError(
            "the app's connector is not async; fastworker needs an async connector "
            "(e.g. procrastinate.PsycopgConnector)",
            EXIT_USAGE,
        )
    return app


def _own_command() -> str:
    """This command as the user can run it again from the same place (the same Python
    environment): ``python -m fastworker`` if it was started so, else ``fastworker``."""
    if os.path.basename(sys.argv[0]) == "__main__.py":
        return f"python -m {PROGRAM_NAME}"
    return PROGRAM_NAME


def apply_schema_command(app_path: str) -> str:
    """The command that applies procrastinate's schema for the app at ``app_path``, run from
    where this one was: fastworker's own ``schema --apply`` loads the app as the worker
    does (the current directory importable), which procrastinate's ``procrastinate``
    script does not."""
    app = shlex.quote(app_path) if app_path else "APP"
    return f"{_own_command()} --app={app} schema --apply"


async def check_database(app: procrastinate.App, dsn: str | None, apply_schema: str) -> None:
    """The start-up check (`fastworker.preflight`), its finding as a `CliError`.
    ``apply_schema``: the command that applies the schema, said when it is missing."""
    found = await preflight.check_database(app, dsn)
    if isinstance(found, preflight.InvalidSettings):
        raise CliError(f"invalid connection settings: {found.reason}", EXIT_USAGE)
    if isinstance(found, preflight.Unreachable):
        raise CliError(
            f"cannot connect to PostgreSQL at {found.where}: {found.reason}", EXIT_UNREACHABLE
        )
    if isinstance(found, preflight.SchemaMissing):
        raise CliError(
            f"the procrastinate schema is missing in database {found.database!r} at "
            f"{found.where}: apply it with `{apply_schema}`",
            EXIT_SCHEMA_MISSING,
        )


# --- running ----------------------------------------------------------------------------


class _StartupSignals:
    """Before the worker runs (loading, checking, opening the app), SIGINT/SIGTERM cancel
    the start-up and the command exits 0; the worker then installs its own handlers."""

    def __init__(self) -> None:
        self.received = False
        self._installed: list[int] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            self.received = True
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal)
            except (NotImplementedError, RuntimeError):  # not the main thread / Windows
                continue
            self._installed.append(signum)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        while self._installed:
            loop.remove_signal_handler(self._installed.pop())


async def run_worker(
    app_path: str,
    options: dict[str, Any],
    app: procrastinate.App | None = None,
    apply_schema: str | None = None,
) -> int:
    signals = _StartupSignals()
    signals.install()
    try:
        if app is None:
            app = load_app(app_path)
        await check_database(
            app, options.get("dsn"), apply_schema or apply_schema_command(app_path)
        )
        async with app.open_async():
            queues = options.get("queues")
            print(
                f"Launching a fastworker worker on {', '.join(queues) if queues else 'all queues'}",
                file=sys.stderr,
            )
            signals.remove()
            await fastworker.run_async(app, **options)
    except asyncio.CancelledError:
        if signals.received:
            return EXIT_OK
        raise
    finally:
        signals.remove()
    return EXIT_OK


def _error_for(error: BaseException) -> CliError:
    if isinstance(error, CliError):
        return error
    if isinstance(error, fastworker.DatabaseUnreachable | fastworker.ConnectionLost):
        return CliError(str(error), EXIT_UNREACHABLE)
    if isinstance(error, fastworker.SchemaMissing):
        return CliError(str(error), EXIT_SCHEMA_MISSING)
    if isinstance(error, ImportError):  # an optional extra is missing
        return CliError(str(error), EXIT_USAGE)
    if isinstance(error, fastworker.ConfigurationError | ValueError | TypeError):
        return CliError(f"invalid worker settings: {error}", EXIT_USAGE)
    if isinstance(error, psycopg.OperationalError):
        return CliError(
            f"database error: {preflight.connect_reason(error, None)}", EXIT_UNREACHABLE
        )
    return CliError(f"the worker failed: {type(error).__name__}: {error}", EXIT_FAILURE)


def _passwords_in_arguments(argv: Sequence[str]) -> list[str]:
    """The flags (``--dsn``, ``--listen-dsn``, any other, abbreviated or mistyped) whose
    value on the command line itself is a connection string that holds a password."""
    flags = []
    for index, argument in enumerate(argv):
        if argument == "--":
            break
        flag, separator, value = argument.partition("=")
        if argument.startswith("--") and separator:
            candidate = value
        elif not argument.startswith("-"):
            after_flag = index > 0 and argv[index - 1].startswith("--")
            flag, candidate = (argv[index - 1] if after_flag else "an argument"), argument
        else:
            continue
        try:
            password = conninfo_to_dict(candidate).get("password")
        except psycopg.ProgrammingError:
            continue  # not a connection string, or a malformed one (reported, redacted)
        if password and flag not in flags:
            flags.append(flag)
    return flags


def dsn_password_warning(argv: Sequence[str]) -> str | None:
    """A warning when a connection string on the command line holds a password: any user
    of the machine sees it in the process list (``ps``). ``argv``: the arguments after the
    program's name (the ``fastworker`` command's, or ``manage.py fastworker``'s)."""
    flags = _passwords_in_arguments(argv)
    if not flags:
        return None
    return (
        f"{' and '.join(flags)} {'holds a password' if len(flags) == 1 else 'hold passwords'}, "
        "which every user of this machine can read in the process list (ps); give the DSN in "
        "$FASTWORKER_DSN (or $FASTWORKER_LISTEN_DSN) instead, or the password in a passfile "
        "(~/.pgpass, $PGPASSFILE) or $PGPASSWORD"
    )


def run_procrastinate_command(parsed: dict[str, Any]) -> None:
    """One of procrastinate's own subcommands (``schema``, ``defer``, ...), run by
    procrastinate's CLI code for the app loaded as the worker's is (``--app`` before or
    after the subcommand, ``PROCRASTINATE_APP``, the current directory importable). It
    prints its own error and exits 1 when the command fails."""
    app_path: str = parsed.pop("app", "")
    # As procrastinate: without an app, a command that needs no database still runs.
    parsed["app"] = load_app(app_path) if app_path else procrastinate_cli.load_app("")
    try:
        asyncio.run(procrastinate_cli.execute_command(parsed))
    except SystemExit as exit:
        if exit.code:
            code = exit.code if isinstance(exit.code, int) else EXIT_FAILURE
            raise CliError("", code) from None


def execute(
    parsed: dict[str, Any],
    app: procrastinate.App | None = None,
    *,
    apply_schema: str | None = None,
) -> None:
    """Run the worker the parsed flags describe, until it stops (or procrastinate's
    subcommand they name); raises `CliError` (with its exit code) when it fails. ``app``:
    run for this app instead of the one ``--app`` names (the Django command).
    ``apply_schema``: the command to suggest when the schema is missing (by default,
    this command's own ``schema --apply``)."""
    parsed = dict(parsed)
    procrastinate_cli.configure_logging(
        verbosity=parsed.pop("verbose", None),
        log_level=parsed.pop("log_level", None),
        format=parsed.pop("log_format", logging.BASIC_FORMAT),
        style=parsed.pop("log_format_style", "%"),
    )
    if parsed.get("command") in PROCRASTINATE_COMMANDS:
        run_procrastinate_command(parsed)
        return
    try:
        check_platform()
    except fastworker.ConfigurationError as error:
        raise CliError(str(error), EXIT_FAILURE) from None
    app_path: str = parsed.pop("app", "")
    for key in ("command", "func"):
        parsed.pop(key, None)
    options = parsed  # only the flags given (or set in the environment)

    try:
        asyncio.run(run_worker(app_path, options, app, apply_schema))
    except KeyboardInterrupt:  # a SIGINT outside the worker's own handling
        raise CliError("interrupted", 130) from None
    except Exception as error:
        logging.getLogger("fastworker.cli").debug("Exception details:", exc_info=error)
        raise _error_for(error) from error


def main(argv: Sequence[str] | None = None, *, app: procrastinate.App | None = None) -> int:
    """Entry point of the ``fastworker`` command; returns the exit code.

    ``app``: run for this app instead of the one ``--app`` names.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = parse_args(arguments)
        warning = dsn_password_warning(arguments)
        if warning is not None:
            print(f"{PROGRAM_NAME}: warning: {warning}", file=sys.stderr)
        execute(parsed, app)
    except CliError as error:
        if error.exit_code == 130 or not str(error):  # interrupted, or already reported
            return error.exit_code
        print(f"{PROGRAM_NAME}: error: {redact_password(str(error))}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
