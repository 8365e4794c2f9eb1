"""fastworker's own worker options, each declared once: its name (the `Worker` keyword, the
core's `WorkerConfig` field when the core takes it), its default, how a value is checked,
its command-line flag and environment variable, and its help.

`Worker` checks its keywords with these entries, the CLI makes its flags from them (the
Django command is the CLI), and the tests hold `Worker`'s signature and the README's
option table to them. A new option is one entry here, plus the code where it takes
effect (and, if the core takes it, a field of `WorkerConfig` in `rust/core/src/config.rs`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastworker.runner import sync_threads

ENV_PREFIX = "FASTWORKER"


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def positive_seconds(name: str, value: Any) -> float:
    if seconds(name, value) == 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def port(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a port number (0-65535), got {value!r}")
    return value


def bucket_bounds(name: str, value: Any) -> list[float]:
    """Histogram bounds: positive, finite numbers of seconds, in increasing order."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of seconds, got {value!r}")
    bounds = list(value)
    numbers = all(
        not isinstance(bound, bool) and isinstance(bound, int | float) and 0 < bound < math.inf
        for bound in bounds
    )
    if not bounds or not numbers or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            f"{name} must be positive numbers of seconds in increasing order, got {value!r}"
        )
    return [float(bound) for bound in bounds]


def one_of(*values: str) -> Callable[[str, Any], str]:
    """One of ``values``."""

    def check_one_of(name: str, value: Any) -> str:
        if value not in values:
            listed = " or ".join(repr(allowed) for allowed in values)
            raise ValueError(f"{name} must be {listed}, got {value!r}")
        return str(value)

    return check_one_of


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def check_optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return check_optional


def mapping_of(check: Callable[[str, Any], Any]) -> Callable[[str, Any], dict[str, Any]]:
    """A mapping of names to values that each pass `check` (None: empty)."""

    def check_mapping(name: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return {str(key): check(f"{name}[{key!r}]", item) for key, item in value.items()}

    return check_mapping


@dataclass(frozen=True)
class Option:
    """One option of fastworker's `Worker` (and of the core, if `core`)."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    help: str
    # The CLI's value syntax: "value" (one value, `parse`d from text), "switch" (a flag
    # that turns it on, and `--no-...` that turns it off), "mapping" (repeatable
    # KEY=VALUE, each value `parse`d).
    form: str = "value"
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    core: bool = False
    # Former spellings, still accepted: flags and environment variables.
    old_flags: tuple[str, ...] = ()
    old_env: tuple[str, ...] = ()
    # The README's words for the default, where `repr` would not say it well.
    shown_default: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def off_flag(self) -> str:
        """A switch's flag that turns it off."""
        return "--no-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}_{self.name.upper()}"

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return f"`{self.default}`"
        return str(self.default)


# --- values from text: the CLI's flags and environment variables ---------------------------
# Each raises argparse.ArgumentTypeError with words fit for argparse's "argument --flag: ..."
# and for "invalid value in $VARIABLE: ...".


def _number(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {value!r}") from None
        if isinstance(number, float) and math.isnan(number):
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {value!r}")
        return number

    return parse


def _bounds(value: str) -> list[float]:
    """``1,60,3600``: the bounds, parsed (checked by `bucket_bounds`)."""
    parse = _number(float)
    return [parse(part.strip()) for part in value.split(",") if part.strip()]


def at_least_one(value: str) -> int:
    """procrastinate's ``--concurrency``, which its own parser takes as any int."""
    number = _number(int)(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def seconds_from_text(value: str) -> float:
    """procrastinate's polling intervals and graceful timeout, which its own parser takes as
    any float (negative, nan)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if not number >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {value}")
    return number


def switch_from_text(value: str) -> bool:
    """A switch's environment variable: procrastinate's spellings, and on/off."""
    word = value.strip().lower()
    if word in ("1", "y", "yes", "t", "true", "on"):
        return True
    if word in ("0", "n", "no", "f", "false", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/y/t/on or 0/n/f/off, got {value!r}")


def checked_from_text(
    name: str, parse: Callable[[str], Any], check: Callable[[str, Any], Any]
) -> Callable[[str], Any]:
    """Text to a value: ``parse``d, then ``check``ed (the option table's check)."""

    def convert(value: str) -> Any:
        try:
            return check(name, parse(value))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def mapping_from_text(option: Option) -> Callable[[str], dict[str, Any]]:
    """``KEY=VALUE[,KEY=VALUE...]`` into a dict, each value ``option.parse``d, the whole
    checked as ``option.check`` says."""
    form = option.metavar or "KEY=VALUE"

    def parse(text: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, separator, raw = item.rpartition("=")
            if not separator or not key.strip():
                raise argparse.ArgumentTypeError(f"expected {form}, got {item!r}")
            try:
                result[key.strip()] = option.parse(raw.strip())
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(f"{item!r}: {error}") from None
        try:
            return option.check(option.name, result)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def from_text(option: Option) -> Callable[[str], Any]:
    """The text of ``option``'s flag or environment variable to its checked value."""
    if option.form == "switch":
        return switch_from_text
    if option.form == "mapping":
        return mapping_from_text(option)
    return checked_from_text(option.name, option.parse, option.check)


def from_environment(variable: str, convert: Callable[[str], Any]) -> Any:
    """``variable``'s value, ``convert``ed (None when unset or empty); a ValueError that
    names the variable when the value is bad."""
    value = os.environ.get(variable, "")
    if not value:
        return None
    try:
        return convert(value)
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise ValueError(f"invalid value in ${variable}: {error}") from None


OPTIONS: tuple[Option, ...] = (
    Option(
        "dsn",
        None,
        optional(text),
        "libpq connection string or URL for the worker's own connections",
        metavar="DSN",
        shown_default="the app's connector",
    ),
    Option(
        "pooler",
        False,
        boolean,
        "the worker's connections go through a transaction-mode pooler (PgBouncer): no "
        "named prepared statements, settings per transaction, LISTEN needs `listen_dsn` "
        "(see docs/pooler.md)",
        form="switch",
        core=True,
    ),
    Option(
        "listen_dsn",
        None,
        optional(text),
        "libpq connection string or URL for the LISTEN connection only, straight to "
        "PostgreSQL when `dsn` goes through a pooler",
        metavar="DSN",
        shown_default="as the other connections",
    ),
    Option(
        "reconnect_timeout",
        60.0,
        seconds,
        "seconds the database may be unreachable, or refuse every statement (a lock, a "
        "cancel), also at start, before the worker stops with `fastworker.ConnectionLost` "
        "(CLI: exit code 3), or `fastworker.DatabaseError` if it kept refusing (exit code 1)",
        parse=_number(float),
        metavar="SECONDS",
        core=True,
    ),
    Option(
        "response_timeout",
        30.0,
        positive_seconds,
        "seconds a statement may go unanswered before its connection is taken for dead "
        "(half-open) and replaced (the heartbeat's statements get less, see "
        "`stalled_worker_timeout`); the server ends a transaction of the worker left idle "
        "that long (`idle_in_transaction_session_timeout`, at least 1 s)",
        parse=_number(float),
        metavar="SECONDS",
        core=True,
    ),
    Option(
        "max_batch_size",
        500,
        positive_int,
        "most jobs claimed by one statement (a claim also takes at most half the slots)",
        parse=_number(int),
        metavar="N",
        core=True,
    ),
    Option(
        "recover_stalled_jobs",
        True,
        boolean,
        "put the `doing` jobs of stalled workers (pruned, or left without a worker) back "
        "to run, with procrastinate's retry semantics: a job killed mid-run (SIGKILL, OOM) "
        "runs again, at least once; `False` / `--no-recover-stalled-jobs` leaves them "
        "`doing`, as procrastinate does (see docs/operations.md)",
        form="switch",
        core=True,
    ),
    Option(
        "queue_concurrency",
        None,
        mapping_of(positive_int),
        'per-queue limit within concurrency, enforced when claiming: `{"emails": 5}`, '
        "`--queue-concurrency emails=5`; a queue that no task of the app is declared on is "
        "warned about at start",
        form="mapping",
        parse=_number(int),
        metavar="QUEUE=N",
        core=True,
        old_flags=("--queue-limit",),
        old_env=("FASTWORKER_QUEUE_LIMITS",),
    ),
    Option(
        "max_jobs",
        None,
        optional(positive_int),
        "claim this many jobs in all, then stop once they have run (process recycling)",
        parse=_number(int),
        metavar="N",
        core=True,
    ),
    Option(
        "job_timeout",
        None,
        optional(positive_seconds),
        "seconds after which a job is cancelled like an abort and ends `failed` (or is "
        "retried, if its retry strategy says so)",
        parse=_number(float),
        metavar="SECONDS",
    ),
    Option(
        "task_timeouts",
        None,
        mapping_of(positive_seconds),
        'per-task timeouts over job_timeout: `{"task name": seconds}`, '
        "`--task-timeouts name=SECONDS`; a name is the task's registered name (or alias), or "
        "the last dotted part of exactly one task's name (`sleepy` for `mypkg.tasks.sleepy`); "
        "an unknown or ambiguous name is refused at start",
        form="mapping",
        parse=_number(float),
        metavar="TASK=SECONDS",
        old_flags=("--task-timeout",),
    ),
    Option(
        "sync_executor",
        sync_threads.THREADS,
        one_of(*sync_threads.MODES),
        "where sync tasks run: `threads`, a pool of `concurrency` threads the worker owns "
        "(each running sync job has a thread), or `default`, the event loop's default "
        "executor (procrastinate's behaviour: at most `min(32, cores + 4)` sync jobs at "
        "once; see docs/migration.md)",
        metavar="{threads,default}",
        shown_default="`threads`",
    ),
    Option(
        "metrics_port",
        None,
        optional(port),
        "serve Prometheus metrics on this port at /metrics (0: any free port; extra "
        "`procrastinate-fastworker[metrics]`)",
        parse=_number(int),
        metavar="PORT",
    ),
    Option(
        "metrics_address",
        "0.0.0.0",
        text,
        "address the metrics server listens on (`127.0.0.1`: this machine only)",
        metavar="ADDRESS",
    ),
    Option(
        "metrics_duration_buckets",
        None,
        optional(bucket_bounds),
        "upper bounds, in seconds, of the job duration and wait histograms: "
        "`[1, 60, 3600, 86400]`, `--metrics-duration-buckets 1,60,3600,86400`",
        parse=_bounds,
        metavar="SECONDS,...",
        core=True,
        shown_default="5 ms to 4 h (20 buckets)",
    ),
    Option(
        "opentelemetry",
        False,
        boolean,
        "one OpenTelemetry span per job (extra `procrastinate-fastworker[otel]`)",
        form="switch",
    ),
)

# Values the runner hands the core besides the options: the app's registered task names
# (metric labels) and whether metrics are served (the core then samples the queue depth
# and the jobs' waits).
RUNNER_CORE_VALUES = ("task_names", "sample_metrics")

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}

# procrastinate's worker options that the core takes too (procrastinate's `Worker` checks
# and keeps them; the core gets their values by the same names).
PROCRASTINATE_CORE_OPTIONS = (
    "queues",
    "concurrency",
    "wait",
    "fetch_job_polling_interval",
    "abort_job_polling_interval",
    "listen_notify",
    "update_heartbeat_interval",
    "stalled_worker_timeout",
)

# procrastinate's worker options that its CLI has no flag for and fastworker's has:
# (name, parse, help).
PROCRASTINATE_EXTRA_FLAGS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    (
        "update_heartbeat_interval",
        _number(float),
        "procrastinate's update_heartbeat_interval: seconds between heartbeats (default 10)",
    ),
    (
        "stalled_worker_timeout",
        _number(float),
        "procrastinate's stalled_worker_timeout: a worker without heartbeat for that long "
        "is pruned at start (default 30)",
    ),
)


def checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """fastworker's options by name, each checked (ValueError names the bad one)."""
    return {name: BY_NAME[name].check(name, value) for name, value in values.items()}
