"""The reliability tasks as an app for the `fastworker` CLI:
``--app tests.reliability.cli_app.app``,
on the database named by ``FW_RELIABILITY_DSN``."""

from __future__ import annotations

import os

from tests.reliability.tasks import make_app

app = make_app(os.environ.get("FW_RELIABILITY_DSN", ""))
