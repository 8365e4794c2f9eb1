"""Every private member of procrastinate that fastworker relies on, declared in one place.

fastworker's runner is procrastinate's `Worker`, extended (`fastworker/runner/`): it reads
and calls some of that class's private members, overrides others, and reproduces the
behaviour of the methods it replaces. Outside the runner, fastworker reads a few private
attributes of procrastinate's connectors, only through the accessors below.

A procrastinate release may rename, remove or rewrite any of these. `missing_members()` and
`changed_sources()` say which, by name: tests/test_compat.py runs them (and checks that the
runner uses no private member of procrastinate's `Worker` that is not declared here), and
scripts/compat.sh runs the suite against each procrastinate release that pyproject.toml's
pin allows. `Worker` refuses to start, naming the member, when one is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import procrastinate
from procrastinate import sql as procrastinate_sql
from procrastinate import worker as procrastinate_worker

# The releases this module was checked against: the pin in pyproject.toml
# (`procrastinate>=3.10,<3.11`) allows exactly these series; scripts/compat.sh runs the test
# suite against the newest release of each. procrastinate 3.9.0 is not among them: its
# worker logs a missing task as "Task was not found: <error>" (fastworker's copy of
# `_process_job` is 3.10's), its `cli.configure_logging` has no `log_level`, and its worker
# ends an aborted sync job differently from 3.10's (the differential suite's
# `user_aborts_every_kind_of_job_running`).
TESTED_SERIES = ("3.10",)


@dataclass(frozen=True)
class Member:
    """A private member of `procrastinate.worker.Worker` that the runner uses.

    ``parameters``: for a method, the parameters fastworker passes or expects (by name, in
    procrastinate's order, without ``self``); None for a data attribute.
    ``use``: where and how fastworker uses it.
    """

    name: str
    use: str
    parameters: tuple[str, ...] | None = None


# Read, written or called by the runner.
WORKER_MEMBERS: tuple[Member, ...] = (
    Member("_log_extra", "builds every log record's extra", ("action", "context", "job_result")),
    Member("_running_jobs", "the running jobs' tasks and contexts (the job executor's, shutdown)"),
    Member("_stop_event", "set to stop the worker (the lifecycle, the facade)"),
    Member("_job_ids_to_abort", "abort reasons by job id (held by the claim ledger)"),
    Member("_loop", "the worker's loop, for a hard stop from another thread (the facade)"),
    Member(
        "_abort_job",
        "cancels a running job; overridden by the facade (the job executor decides)",
        ("process_job_task", "context", "reason"),
    ),
    Member(
        "_abort_running_jobs", "aborts every running job at a hard stop (the shutdown role)", ()
    ),
    Member(
        "_handle_abort_jobs_requested",
        "abort requests from the core (the event pump)",
        ("job_ids",),
    ),
    Member(
        "_log_job_outcome",
        "logs a job's end (the facade's _process_job)",
        ("status", "context", "job_result", "job_retry", "exc_info"),
    ),
    Member(
        "_resolve_task_middlewares",
        "a task's middleware (the facade's _process_job)",
        ("task", "task_is_async"),
    ),
    Member("_monitor_side_tasks", "stops the worker when a side task fails", ("side_tasks",)),
    Member("_periodic_deferrer", "procrastinate's periodic deferrer (the facade)", ()),
    Member("_process_job", "runs one job; overridden by the facade (a copy)", ("context",)),
    Member(
        "_persist_job_status",
        "writes a job's end; overridden by the facade (the outcome sink)",
        ("job", "status", "retry_decision", "context", "job_result"),
    ),
    Member("_run_loop", "the worker's main loop; replaced by the facade", ()),
)

# procrastinate's `Worker` methods whose behaviour fastworker reproduces (copies step by step,
# or replaces with the core's), with the fingerprints of their source in the releases that
# were read against fastworker's code. A new fingerprint means upstream changed the method:
# re-read fastworker's counterpart against it, then add the fingerprint here.
REVIEWED_SOURCES: Mapping[str, tuple[str, frozenset[str]]] = {
    "__init__": (
        "its options are passed on by fastworker's Worker, and taken by the core by name "
        "(fastworker/options.py, PROCRASTINATE_CORE_OPTIONS)",
        frozenset({"a6a9cadd80b5f6da"}),
    ),
    "run": (
        "replaced by fastworker/worker.py's Worker.run",
        frozenset({"48cf282970e1957f"}),
    ),
    "_run_loop": (
        "replaced by fastworker/worker.py's Worker._run_loop",
        frozenset({"cf412345fcc270c4"}),
    ),
    "_process_job": (
        "copied step by step in fastworker/worker.py's Worker._process_job",
        frozenset({"35d5da56aea6cff5"}),
    ),
    "_persist_job_status": (
        "replaced by fastworker/runner/outcome_sink.py (outcomes go to the core)",
        frozenset({"8d53fd9c1738b7c5"}),
    ),
    "_fetch_and_process_jobs": (
        "replaced by the core's claims and fastworker/runner/executor.py",
        frozenset({"61ce06fd0fe2120a"}),
    ),
    "_poll_jobs_to_abort": (
        "replaced by the core's abort polling",
        frozenset({"e771dda5f939533c"}),
    ),
    "_update_heartbeat": (
        "replaced by the core's heartbeat",
        frozenset({"a86faef3ab683a19"}),
    ),
    "_handle_notification": (
        "replaced by the core's listener",
        frozenset({"1cdd4f2f9e26a205"}),
    ),
    "_start_side_tasks": (
        "replaced by fastworker/worker.py's Worker._run_loop",
        frozenset({"19274ee46774617c"}),
    ),
    "_shutdown": (
        "replaced by fastworker/runner/shutdown.py's Shutdown.run",
        frozenset({"6fde710b5f1c3dda"}),
    ),
    "_periodic_deferrer": (
        "replaced by fastworker/runner/periodic.py's PeriodicDeferrer.run",
        frozenset({"4fc1c39d101a92d5"}),
    ),
}

# The same, for the parts of procrastinate outside its `Worker` that fastworker reproduces:
# a function or method by its path in the package, or a query of procrastinate's
# `sql/queries.sql` as `sql.queries.<name>`.
REVIEWED_UPSTREAM: Mapping[str, tuple[str, frozenset[str]]] = {
    "periodic.PeriodicDeferrer.defer_jobs": (
        "copied step by step in fastworker/runner/periodic.py's FleetPeriodicDeferrer",
        frozenset({"109dd5d13e8955ac"}),
    ),
    "manager.JobManager.defer_periodic_job": (
        "reproduced by fastworker/runner/periodic.py's defer_periodic_job_unless_passed",
        frozenset({"434495eacc5e2c96"}),
    ),
    "sql.queries.defer_periodic_job": (
        "guarded in fastworker/runner/periodic.py's DEFER_PERIODIC_JOB_UNLESS_PASSED",
        frozenset({"ea6b04988ac3313a"}),
    ),
}


def fingerprint(function: Callable[..., Any]) -> str:
    """A short hash of a function's source (dedented), to notice upstream changes."""
    return text_fingerprint(textwrap.dedent(inspect.getsource(function)))


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def upstream_fingerprint(path: str) -> str | None:
    """The fingerprint of a `REVIEWED_UPSTREAM` entry in the installed procrastinate, or
    None if it is gone."""
    if path.startswith("sql.queries."):
        query = procrastinate_sql.queries.get(path.removeprefix("sql.queries."))
        return None if query is None else text_fingerprint(query)
    module, *attributes = path.split(".")
    found: Any = importlib.import_module(f"procrastinate.{module}")
    for attribute in attributes:
        found = getattr(found, attribute, None)
        if found is None:
            return None
    return fingerprint(found)


def _missing_attribute(worker: object, member: Member) -> str | None:
    if not hasattr(worker, member.name):
        return f"procrastinate.worker.Worker.{member.name} is gone ({member.use})"
    if member.parameters is None:
        return None
    method = getattr(worker, member.name)
    if not callable(method):
        return f"procrastinate.worker.Worker.{member.name} is no longer a method ({member.use})"
    found = tuple(inspect.signature(method).parameters)
    if isinstance(worker, type):
        found = found[1:]  # the class's function: without `self`
    named = tuple(name for name in found if not name.startswith("*"))
    if named[: len(member.parameters)] != member.parameters:
        return (
            f"procrastinate.worker.Worker.{member.name} takes ({', '.join(found)}), "
            f"fastworker expects ({', '.join(member.parameters)}) ({member.use})"
        )
    return None


def missing_members(worker: object | None = None) -> list[str]:
    """The members of `WORKER_MEMBERS` the installed procrastinate lacks, or whose
    parameters changed: one line each, naming it. ``worker``: a constructed procrastinate
    `Worker` (its instance attributes are checked too); else the class only."""
    subject: object = worker if worker is not None else procrastinate_worker.Worker
    found = []
    for member in WORKER_MEMBERS:
        if worker is None and member.parameters is None:
            continue  # an instance attribute: set by __init__
        problem = _missing_attribute(subject, member)
        if problem:
            found.append(problem)
    return found


def changed_sources() -> list[str]:
    """The methods of `REVIEWED_SOURCES` and the parts of `REVIEWED_UPSTREAM` whose
    source, in the installed procrastinate, is none of the reviewed ones: one line each,
    naming it."""
    found = []
    for name, (counterpart, reviewed) in REVIEWED_SOURCES.items():
        function = getattr(procrastinate_worker.Worker, name, None)
        if function is None:
            found.append(f"procrastinate.worker.Worker.{name} is gone ({counterpart})")
            continue
        seen = fingerprint(function)
        if seen not in reviewed:
            found.append(
                f"procrastinate.worker.Worker.{name} changed in procrastinate "
                f"{procrastinate.__version__} (source fingerprint {seen}; {counterpart}): "
                "re-read it against fastworker's code, then add the fingerprint to "
                "fastworker.compat.REVIEWED_SOURCES"
            )
    for path, (counterpart, reviewed) in REVIEWED_UPSTREAM.items():
        upstream = upstream_fingerprint(path)
        if upstream is None:
            found.append(f"procrastinate's {path} is gone ({counterpart})")
        elif upstream not in reviewed:
            found.append(
                f"procrastinate's {path} changed in procrastinate {procrastinate.__version__} "
                f"(source fingerprint {upstream}; {counterpart}): re-read it against fastworker's "
                "code, then add the fingerprint to fastworker.compat.REVIEWED_UPSTREAM"
            )
    return found


def check_worker(worker: object) -> None:
    """Refuse to run on a procrastinate whose `Worker` lacks a member fastworker uses (a
    release outside the pin, installed anyway): a clear error naming it, not an
    AttributeError in the middle of a job."""
    missing = missing_members(worker)
    if missing:
        raise RuntimeError(
            f"fastworker does not support procrastinate {procrastinate.__version__} "
            f"(tested: {', '.join(series + '.x' for series in TESTED_SERIES)}): "
            + "; ".join(missing)
        )


# --- procrastinate's connectors -----------------------------------------------------------
# Private attributes of the connectors, read only here. Each returns None when the
# connector has no such attribute (another connector class, or a procrastinate that
# renamed it: tests/test_compat.py checks they exist on real connectors).


def connector_pool_args(connector: Any) -> Mapping[str, Any] | None:
    """The arguments the connector was built with (PsycopgConnector, AiopgConnector:
    ``_pool_args``)."""
    arguments = getattr(connector, "_pool_args", None)
    return arguments if isinstance(arguments, Mapping) else None


def psycopg_async_pool(connector: Any) -> Any:
    """PsycopgConnector's open pool (``_async_pool``; None until the app is open)."""
    return getattr(connector, "_async_pool", None)


def aiopg_pool(connector: Any) -> Any:
    """AiopgConnector's open pool (``_pool``; None until the app is open)."""
    return getattr(connector, "_pool", None)


def connector_json_loads(connector: Any) -> Callable[[str], Any] | None:
    """The JSON decoder the connector uses for job arguments (``_json_loads``, or a public
    ``json_loads``), if it has one."""
    loads = getattr(connector, "_json_loads", None) or getattr(connector, "json_loads", None)
    return loads if callable(loads) else None
