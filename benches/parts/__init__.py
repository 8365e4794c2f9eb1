"""The parts of the side-by-side benchmark (`benches/e2e.py --only NAME,...`), one module
each, registered here in the order they run and report.

A part declares its options, runs against the benchmark's database and returns what goes
under its key of the results (None: nothing to run with these options), and turns those
results into the lines of its table; the idle-gap parts also draw a panel.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("procrastinate", "fastworker", "pgqueuer")  # pgqueuer: when installed


@dataclass
class Bench:
    """What every part runs with."""

    dsn: str
    args: argparse.Namespace
    systems: list[str]


def no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


@dataclass(frozen=True)
class Part:
    name: str  # for --only
    key: str  # its key in the results (and in their `runs` stamps)
    run: Callable[[Bench], Any]  # what goes under `key`, or None to skip
    # The lines of its table, from what went under `key`.
    report: Callable[[Any, Bench], list[str]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    # Results per system, each stamped: a run of some systems keeps the others' results.
    per_system: bool = False
    # A panel of the idle-gaps figure (matplotlib axis, the part's results).
    panel: Callable[[Any, Any], None] | None = None
    # Keys this part adds to the results before any part runs (the drain's header).
    header: Callable[[Bench], dict[str, Any]] = field(default=lambda bench: {})


def registry() -> tuple[Part, ...]:
    """Every part, in the order they run and report."""
    from benches.parts import (
        ceiling,
        drain,
        fleet,
        io_bound,
        latency,
        lateness,
        lock_chain,
        memory,
        scale_out,
    )

    return (
        drain.PART,
        ceiling.PART,
        latency.PART,
        latency.BUSY,
        memory.PART,
        lock_chain.PART,
        lateness.PART,
        lateness.PACED,
        io_bound.PART,
        scale_out.PART,
        fleet.PART,
    )


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers ('' for none), as an argparse type."""
    try:
        return [int(value) for value in text.split(",") if value]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def ms(value: float | None) -> str:
    """A figure of milliseconds in a table."""
    return "n/a" if value is None else f"{value:.1f}"
