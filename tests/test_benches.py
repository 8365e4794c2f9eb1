"""benches/ as a package: the registry of parts matches what the README documents, the
child configs survive their trip as JSON and bad ones are refused by name, and a small
real run of benches/e2e.py (its child processes included) writes results of the
documented shape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benches import child
from benches.parts import registry

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "benches" / "e2e.py"


def test_registry_holds_the_parts_the_readme_documents_in_order() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"`--only` runs some parts alone \(([^)]*)\)", readme)
    assert match is not None
    documented = re.findall(r"`(\w+)`", match.group(1))
    parts = registry()
    assert [part.name for part in parts] == documented
    assert len({part.key for part in parts}) == len(parts)


@pytest.mark.parametrize(
    "config",
    [
        child.DrainChild("fastworker", "dbname=x", 10, "successful", "io_sleep"),
        child.LatencyChild("procrastinate", "dbname=x", 500),
        child.ServeChild("pgqueuer", "dbname=x", 10, "late", 300, 74.5),
        child.LimitChild("dbname=x", "io_sync", 10, 20000),
        child.ScaleChild("dbname=x", 100),
    ],
)
def test_child_config_round_trips_through_json(config: child.ChildConfig) -> None:
    assert child.decode(child.encode(config)) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("drain fastworker", "child config is not JSON"),
        ('["drain"]', "child config is not a JSON object"),
        ('{"kind": "sprint"}', "unknown child kind 'sprint' (of drain, latency, serve,"),
        (
            '{"kind": "scale", "dsn": "dbname=x", "concurrency": 1, "processes": 4}',
            "scale child config: unknown fields ['processes'], missing []",
        ),
        ('{"kind": "scale", "dsn": "dbname=x"}', "missing ['concurrency']"),
        (
            '{"kind": "scale", "dsn": "dbname=x", "concurrency": "100"}',
            "scale child config: concurrency='100' is not int",
        ),
        (
            '{"kind": "scale", "dsn": "dbname=x", "concurrency": true}',
            "concurrency=True is not int",
        ),
    ],
)
def test_bad_child_config_is_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        child.decode(text)


def test_child_process_refuses_a_bad_config_before_running_anything() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benches.child", '{"kind": "drain"}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1
    assert "error: drain child config: unknown fields [], missing ['concurrency', 'dsn'," in (
        completed.stderr
    )


def run_e2e(*args: str) -> subprocess.CompletedProcess[str]:
    # As documented: `python benches/e2e.py`, from anywhere.
    return subprocess.run(
        [sys.executable, str(E2E), *args],
        cwd=ROOT / "benches",
        capture_output=True,
        text=True,
        check=False,
    )


def test_e2e_refuses_an_unknown_part_or_list_before_touching_a_database() -> None:
    unknown = run_e2e("--dsn", "host=192.0.2.1 connect_timeout=1", "--only", "drain,sprint")
    assert unknown.returncode == 2
    assert "unknown part 'sprint' (--only takes drain, latency, memory, lock_chain," in (
        unknown.stderr
    )
    bad_list = run_e2e("--dsn", "host=192.0.2.1 connect_timeout=1", "--concurrency", "1,x")
    assert bad_list.returncode == 2
    assert "not a comma-separated list of integers: '1,x'" in bad_list.stderr
    bad_variant = run_e2e("--dsn", "host=192.0.2.1 connect_timeout=1", "--io-variants", "io")
    assert bad_variant.returncode == 2
    assert "unknown I/O variant 'io' (of io_sleep_query, io_sleep, io_sync)" in (bad_variant.stderr)


@pytest.mark.slow
def test_e2e_drain_runs_each_system_in_a_child_and_writes_the_documented_shape(
    dsn: str, tmp_path: Path
) -> None:
    completed = run_e2e(
        "--dsn",
        dsn,
        "--only",
        "drain",
        "--systems",
        "procrastinate,fastworker",
        "--jobs",
        "200",
        "--concurrency",
        "10",
        "--sync",
        "",
        "--history",
        "",
        "--delete-successful",
        "",
        "--out",
        str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| C=10 async | fastworker |" in completed.stdout
    results = json.loads((tmp_path / "e2e.json").read_text())
    assert list(results) == ["environment", "runs", "jobs", "systems", "drain"]
    assert list(results["runs"]) == ["drain"]
    assert results["jobs"] == 200
    assert results["systems"] == ["procrastinate", "fastworker"]
    (entry,) = results["drain"]
    assert entry["label"] == "C=10 async"
    assert {"jobs_per_s", "worker_cpu_us_per_job", "commits_per_job", "wall_s"} <= set(
        entry["procrastinate"]
    )
    assert entry["fastworker"]["ratio"] > 0
