"""docs/prometheus-alerts.yml: valid rules, and FastworkerQueueStuck fires on a stuck queue
only. Jobs scheduled for later (a `schedule_in`, a retry that waits) are not stuck, however
long no claim comes: the alert rests on how long the oldest *due* job has waited.

Prometheus' own `promtool` checks the file and runs the rules over made-up series
(`promtool test rules`); scripts/test.sh puts it into .venv/bin. Without it, the YAML alone
is checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ALERTS = Path(__file__).parent.parent / "docs" / "prometheus-alerts.yml"

#: The series a worker serves, as scraped by the job the rules assume.
WORKER = 'job="fastworker", instance="worker-1:9100"'


def promtool() -> str | None:
    beside_python = Path(sys.executable).parent / "promtool"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("promtool")


def rule(name: str) -> dict[str, Any]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    (found,) = (r for group in groups for r in group["rules"] if r.get("alert") == name)
    return dict(found)


def test_the_stuck_queue_alert_rests_on_the_wait_of_due_jobs() -> None:
    stuck = rule("FastworkerQueueStuck")
    expression = " ".join(stuck["expr"].split())
    assert "fastworker_queue_oldest_due_job_age_seconds" in expression
    # The count of all todo jobs includes those scheduled for later: not a sign of a stall.
    assert "fastworker_queue_jobs{" not in expression
    assert stuck["labels"]["severity"] == "critical"


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{WORKER}, {labels}}}", "values": values}


def stuck_queue_test() -> dict[str, Any]:
    """Two hours, one sample a minute, three queues:
    - `later`: three todo jobs, all scheduled for later, and no claim: not stuck;
    - `stuck`: a job due since minute 0, and no claim (the worker on it claims nothing);
    - `busy`: its oldest due job always about 30 minutes old (a backlog), but jobs are
      claimed every minute: behind, not stuck (FastworkerLongWaits' business)."""
    input_series = [
        series("fastworker_queue_jobs", 'queue="later", status="todo"', "3x120"),
        series("fastworker_queue_jobs_due", 'queue="later"', "0x120"),
        series("fastworker_queue_jobs_not_due", 'queue="later"', "3x120"),
        series("fastworker_queue_oldest_due_job_age_seconds", 'queue="later"', "0x120"),
        series("fastworker_queue_jobs", 'queue="stuck", status="todo"', "1x120"),
        series("fastworker_queue_jobs_due", 'queue="stuck"', "1x120"),
        series("fastworker_queue_jobs_not_due", 'queue="stuck"', "0x120"),
        series("fastworker_queue_oldest_due_job_age_seconds", 'queue="stuck"', "0+60x120"),
        series("fastworker_jobs_claimed_total", 'queue="stuck", task="t"', "5x120"),
        series("fastworker_queue_jobs", 'queue="busy", status="todo"', "500x120"),
        series("fastworker_queue_jobs_due", 'queue="busy"', "500x120"),
        series("fastworker_queue_jobs_not_due", 'queue="busy"', "0x120"),
        series("fastworker_queue_oldest_due_job_age_seconds", 'queue="busy"', "1800x120"),
        series("fastworker_jobs_claimed_total", 'queue="busy", task="t"', "0+10x120"),
    ]
    return {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            # Due for 10 minutes: not yet.
            {"eval_time": "10m", "alertname": "FastworkerQueueStuck", "exp_alerts": []},
            # Due for an hour, then two, nothing claimed: `stuck` alone.
            {
                "eval_time": "60m",
                "alertname": "FastworkerQueueStuck",
                "exp_alerts": [stuck_alert("stuck", "1h 0m 0s")],
            },
            {
                "eval_time": "119m",
                "alertname": "FastworkerQueueStuck",
                "exp_alerts": [stuck_alert("stuck", "1h 59m 0s")],
            },
        ],
    }


def stuck_alert(queue: str, waited: str) -> dict[str, Any]:
    """The alert promtool must see for `queue`, its oldest due job `waited` long."""
    return {
        "exp_labels": {"severity": "critical", "queue": queue},
        "exp_annotations": {
            "summary": f"Queue {queue} is stuck",
            "description": (
                f"The oldest due job of queue {queue} has waited {waited} and no worker "
                "claimed any job of the queue for 15 minutes (no worker on that queue, all "
                "workers busy with long jobs, or a lock held)."
            ),
        },
    }


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed (scripts/test.sh fetches it)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules() -> None:
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_stuck_queue_alert_fires_on_a_stuck_queue_only(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(ALERTS)],
                "evaluation_interval": "1m",
                "tests": [stuck_queue_test()],
            }
        )
    )
    result = run_promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
