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
        child.LatencyChild("fastworker", "dbname=x", 500, 100, True),
        child.FloorChild(
            "dbname=x", 500, "WITH c AS (...)", "WITH f AS (...)", "SET jit TO off", 9
        ),
        child.ServeChild("pgqueuer", "dbname=x", 10, "late", 300, 74.5),
        child.LimitChild("dbname=x", "io_sync", 10, 20000),
        child.ScaleChild("dbname=x", 100),
        child.FleetChild("procrastinate", "dbname=x", 10),
    ],
)
def test_child_config_round_trips_through_json(config: child.ChildConfig) -> None:
    assert child.decode(child.encode(config)) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("drain fastworker", "child config is not JSON"),
        ('["drain"]', "child config is not a JSON object"),
        ('{"kind": "sprint"}', "unknown child kind 'sprint' (of drain, latency, floor, serve,"),
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
        (
            '{"kind": "latency", "system": "fastworker", "dsn": "dbname=x", "expected": 5,'
            ' "busy": 1}',
            "latency child config: busy=1 is not bool",
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
    assert "unknown part 'sprint' (--only takes drain, ceiling, latency, latency_busy," in (
        unknown.stderr
    )
    bad_list = run_e2e("--dsn", "host=192.0.2.1 connect_timeout=1", "--concurrency", "1,x")
    assert bad_list.returncode == 2
    assert "not a comma-separated list of integers: '1,x'" in bad_list.stderr
    bad_variant = run_e2e("--dsn", "host=192.0.2.1 connect_timeout=1", "--io-variants", "io")
    assert bad_variant.returncode == 2
    assert "unknown I/O variant 'io' (of io_sleep_query, io_sleep, io_sync)" in (bad_variant.stderr)


def test_e2e_fleet_counts_what_a_fleet_costs_per_job(dsn: str, tmp_path: Path) -> None:
    completed = run_e2e(
        "--dsn",
        dsn,
        "--only",
        "fleet",
        "--systems",
        "fastworker",
        "--fleet-sizes",
        "2",
        "--fleet-jobs",
        "20",
        "--fleet-rate",
        "100",
        "--out",
        str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| 2 | fastworker |" in completed.stdout
    (figures,) = json.loads((tmp_path / "e2e.json").read_text())["fleet"]["fastworker"]
    assert (figures["size"], figures["jobs"], figures["started"]) == (2, 20, 20)
    # At least: each listener's transaction per notification, one claim and one end.
    assert figures["transactions_per_job"] >= 2
    assert figures["pickup_p50_ms"] > 0


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


def core_statement(*parts: str) -> str:
    return "\n".join(parts)


COMPLETE_AND_CLAIM = core_statement(
    "WITH finished AS (UPDATE procrastinate_jobs AS job SET status = ($8::text[])[1]",
    "  -- a comment",
    " WHERE job.id = ANY($6::bigint[]) AND job.attempts = ($7::int[])[1]",
    "   AND job.worker_id = ANY($11::bigint[]) RETURNING job.id),",
    "deleted AS (DELETE FROM procrastinate_jobs AS job WHERE job.id = ANY($9::bigint[])",
    "   AND job.attempts = ($10::int[])[1] RETURNING job.id),",
    "candidate AS (SELECT id FROM procrastinate_jobs WHERE ($1::varchar[] IS NULL)",
    "   AND NOT (id = ANY(($6::bigint[] || $9::bigint[]))) AND worker_id <> $2::bigint",
    "   AND NOT (id = ANY($5::bigint[])) LIMIT least($3::bigint, $4::bigint)),",
    "claimed AS (UPDATE procrastinate_jobs AS job SET status = 'doing' WHERE true)",
    "SELECT 1 WHERE $12::boolean",
)


def test_the_pgbench_script_ends_the_job_it_counts_and_sets_the_rest_once() -> None:
    from benches.floor import pgbench_script

    script = pgbench_script(COMPLETE_AND_CLAIM, 1)
    statement, counter, end = script.split("\n")
    assert (counter, end) == ("\\set n :n + 1", "")
    assert "job.id = ANY(ARRAY[:n::bigint + 1])" in statement
    assert "(ARRAY[:n::bigint + 1] || :p9::bigint[])" in statement
    assert "(NULL::varchar[] IS NULL)" in statement
    assert ":p11::bigint[]" in statement and ":p10::int[]" in statement
    assert ":p12::boolean" in statement
    assert "$" not in statement and "comment" not in statement
    assert statement.endswith(";")
    batch = pgbench_script(COMPLETE_AND_CLAIM, 100)
    assert "ANY(ARRAY(SELECT generate_series(:n::bigint + 1, :n::bigint + 100)))" in batch
    assert batch.endswith("\n\\set n :n + 100\n")
    with pytest.raises(RuntimeError, match="other parameters than"):
        pgbench_script(COMPLETE_AND_CLAIM.replace("ANY($6::bigint[])", "ANY($6)"), 1)


def test_the_relay_reads_the_statements_and_settings_a_client_sends() -> None:
    import struct

    from benches.statements import SSL_REQUEST, CoreStatements, _client_messages

    def message(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!I", len(body) + 4) + body

    claim = "WITH candidate AS (SELECT 1) UPDATE procrastinate_jobs SET status = 'doing'"
    parameters = b"user\0postgres\0\0"
    stream = (
        struct.pack("!II", 8, SSL_REQUEST)
        + struct.pack("!II", 8 + len(parameters), 196608)  # the startup message
        + parameters
        + message(b"Q", b"SET jit TO off; SET enable_sort TO off\0")
        + message(b"P", b"s1\0" + claim.encode() + b"\0" + struct.pack("!H", 0))
        + message(b"P", b"\0" + COMPLETE_AND_CLAIM.encode() + b"\0" + struct.pack("!H", 0))
    )
    seen = CoreStatements()
    buffer = bytearray()
    started = [False]
    for index in range(0, len(stream), 7):  # in pieces, as a socket may deliver it
        buffer.extend(stream[index : index + 7])
        _client_messages(buffer, started, seen)
    assert not buffer
    assert seen.claim == claim
    assert seen.complete_and_claim == COMPLETE_AND_CLAIM
    assert seen.settings == [("jit", "off"), ("enable_sort", "off")]


@pytest.mark.slow
def test_e2e_floor_and_ceiling_rows_run_the_core_statements(dsn: str, tmp_path: Path) -> None:
    import shutil

    if shutil.which("pgbench") is None:
        pytest.skip("pgbench (PostgreSQL's client programs) is not installed")
    completed = run_e2e(
        "--dsn",
        dsn,
        "--only",
        "ceiling,latency,latency_busy",
        "--systems",
        "fastworker",
        "--jobs",
        "250",
        "--latency-seconds",
        "0.4",
        "--busy-seconds",
        "0.4",
        "--out",
        str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for row in ("| C=1 ceiling |", "| C=100 fastworker |", "| floor |", "| fastworker |"):
        assert row in completed.stdout
    results = json.loads((tmp_path / "e2e.json").read_text())
    assert [entry["concurrency"] for entry in results["ceiling"]] == [1, 100]
    assert results["ceiling"][0]["ceiling"]["commits_per_job"] > 0
    for key in ("latency", "latency_busy"):
        assert set(results[key]) == {"fastworker", "floor"}
        assert results[key]["fastworker"]["to_floor"]["p50_ms"] > 0
        assert results[key]["floor"]["breakdown"]["jobs"] > 0


@pytest.mark.slow
def test_e2e_scratch_server_splits_the_server_time_by_statement(tmp_path: Path) -> None:
    import shutil

    if shutil.which("pgbench") is None or shutil.which("pg_config") is None:
        pytest.skip("PostgreSQL's programs (pg_config, initdb, pgbench) are not installed")
    completed = run_e2e(
        "--scratch-server",
        "--only",
        "ceiling",
        "--systems",
        "fastworker",
        "--jobs",
        "200",
        "--ceiling-concurrency",
        "1",
        "--out",
        str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "e2e.json").read_text())
    assert results["environment"]["scratch_server"] is True
    (entry,) = results["ceiling"]
    for who in ("ceiling", "fastworker"):
        split = entry[who]["server_breakdown"]
        assert split["top_statements"][0]["query"].startswith("WITH finished AS")
        names = {function["name"] for function in split["functions"]}
        assert "procrastinate_trigger_function_status_events_update_v1" in names
