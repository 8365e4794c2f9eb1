"""Each scenario runs under procrastinate's Worker and under fastworker's, each on a fresh
database; the two outcomes (job rows, events, side effects, log actions) must be equal."""

from __future__ import annotations

import logging

import pytest

from tests.differential import scenarios  # noqa: F401  (registers the scenarios)
from tests.differential.harness import SCENARIOS, ScenarioSpec, run_scenario


@pytest.mark.parametrize("spec", SCENARIOS, ids=[spec.name for spec in SCENARIOS])
# A scenario exercises procrastinate's deprecated retry API on purpose.
@pytest.mark.filterwarnings("ignore:`get_schedule_in` is deprecated:DeprecationWarning")
async def test_same_outcome(spec: ScenarioSpec, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="procrastinate")
    expected = await run_scenario(spec, "procrastinate", caplog)
    actual = await run_scenario(spec, "fastworker", caplog)
    assert actual.jobs == expected.jobs
    assert actual.events == expected.events
    assert actual.scheduled_order == expected.scheduled_order
    assert actual.workers_left == expected.workers_left
    assert actual.effects == expected.effects
    assert actual.job_logs == expected.job_logs
    assert actual.worker_logs == expected.worker_logs
    assert actual.signal_logs == expected.signal_logs


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 40
    assert len({spec.name for spec in SCENARIOS}) == len(SCENARIOS)
