"""``./manage.py fastworker [worker] [worker flags]``: a fastworker worker for procrastinate's
Django app.

A normal Django command: Django's own options (``--settings``, ``--pythonpath``,
``--traceback``, ``--skip-checks``, ...) and system checks apply, and
``call_command("fastworker", concurrency=5)`` works. Its worker flags are those of
``fastworker worker`` (procrastinate's worker flags and fastworker's option table, with
their environment variables), made by the same code. ``./manage.py fastworker worker ...``
is accepted too, as ``./manage.py procrastinate worker ...`` is.

Logging is Django's: ``settings.LOGGING`` configures it, so the command has none of
``fastworker worker``'s logging flags (``--log-level``, ``--verbose``, ``--log-format``,
``--log-format-style``), as ``./manage.py procrastinate`` has none. Django's own
``-v/--verbosity`` sets the level of the ``procrastinate`` and ``fastworker`` loggers: 0
warnings and errors only, 2 or 3 debug; 1 (the default) leaves them as configured. Without
a root handler in ``settings.LOGGING``, the worker's lines go to stderr as with
``fastworker``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fastworker import cli

#: The loggers Django's --verbosity sets the level of: the worker's and the jobs' lines.
WORKER_LOGGERS = ("procrastinate", "fastworker")


def apply_verbosity(verbosity: int) -> None:
    """Django's --verbosity on the worker's loggers, their handlers and formats untouched:
    0 warnings and errors only, 2 and 3 debug, 1 (the default) as settings.LOGGING has it."""
    if verbosity == 1:
        return
    level = logging.WARNING if verbosity == 0 else logging.DEBUG
    for name in WORKER_LOGGERS:
        logging.getLogger(name).setLevel(level)


class Command(BaseCommand):
    help = (
        "Run a fastworker worker for procrastinate's Django app; takes the flags of "
        "`fastworker worker`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        # Django's own options, to leave out of the worker's.
        self._django_options = {action.dest for action in parser._actions}
        parser.add_argument(
            "subcommand",
            nargs="?",
            choices=["worker"],
            help="optional, as in `./manage.py procrastinate worker`",
        )
        try:
            cli.add_worker_arguments(parser, logging_flags=False)
        except cli.CliError as error:  # an invalid FASTWORKER_* / PROCRASTINATE_* variable
            parser.error(str(error))

    def run_from_argv(self, argv: list[str]) -> None:
        # A command line is visible in `ps`: warn about a password in it, as `fastworker`
        # does (argv: manage.py, the command's name, its arguments).
        warning = cli.dsn_password_warning(argv[2:])
        if warning is not None:
            print(f"{cli.PROGRAM_NAME}: warning: {warning}", file=sys.stderr)
        super().run_from_argv(argv)

    def handle(self, *args: Any, **options: Any) -> None:
        from procrastinate.contrib.django import django_connector, procrastinate_app

        worker_options = {
            name: value
            for name, value in options.items()
            if name not in self._django_options and name != "subcommand"
        }
        apply_verbosity(options.get("verbosity", 1))
        app = procrastinate_app.current_app
        # procrastinate's Django app applies its schema as migrations.
        apply_schema = "./manage.py migrate"
        try:
            connector = app.connector
            if isinstance(connector, django_connector.DjangoConnector):
                # As `manage.py procrastinate worker`: Django's own connections are not
                # made for workers; a psycopg (or aiopg) connector on the same database.
                with app.replace_connector(connector.get_worker_connector()):
                    cli.execute(worker_options, app, apply_schema=apply_schema)
            else:
                cli.execute(worker_options, app, apply_schema=apply_schema)
        except cli.CliError as error:
            raise CommandError(str(error), returncode=error.exit_code) from error
