"""Markers of the reliability tests.

- ``slow``: takes tens of seconds (real processes, real waits); part of CI all the same.
- ``destructive``: restarts the *shared* PostgreSQL server; runs only with
  ``FASTWORKER_DESTRUCTIVE_TESTS=1``. (The restart test itself uses a private cluster.)
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: tens of seconds, real processes")
    config.addinivalue_line("markers", "destructive: restarts the shared PostgreSQL server")
