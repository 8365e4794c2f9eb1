"""``./manage.py fastworker [worker flags]``: a fastworker worker for procrastinate's Django app."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from fastworker import cli


class Command(BaseCommand):
    help = (
        "Run a fastworker worker for procrastinate's Django app; takes the flags of "
        "`fastworker worker` (see --help)."
    )

    def run_from_argv(self, argv: list[str]) -> None:
        # fastworker's own parser (procrastinate's worker flags plus fastworker's), not
        # Django's: the flags and their environment variables stay those of the CLI.
        from procrastinate.contrib.django import django_connector, procrastinate_app

        app = procrastinate_app.current_app
        connector = getattr(app, "connector", None)
        if isinstance(connector, django_connector.DjangoConnector):
            # As `manage.py procrastinate worker`: Django's own connections are not made
            # for workers; use a psycopg (or aiopg) connector on the same database.
            with app.replace_connector(connector.get_worker_connector()):  # type: ignore[union-attr]
                sys.exit(cli.main(["worker", *argv[2:]], app=app))  # type: ignore[arg-type]
        sys.exit(cli.main(["worker", *argv[2:]], app=app))  # type: ignore[arg-type]

    def handle(self, *args: Any, **options: Any) -> None:  # pragma: no cover - see run_from_argv
        raise NotImplementedError
