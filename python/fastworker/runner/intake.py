"""Job intake: a claimed row as the core hands it over becomes procrastinate's `Job`
(`job_from_row`), its arguments decoded with the app's connector's JSON decoder, checked
for what fastworker can run. The jobs are started by the job executor (`executor.py`), as
the event pump (`events.py`) hands them over."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from procrastinate import jobs

from fastworker import _core, compat

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# Arguments nested deeper than this fail their job alone. Python's recursive operations
# (repr in procrastinate's job logs, copies, JSON log formatters) stop at the recursion
# limit (1000 frames, with the caller's frames counted): args that decode but nest close to
# it broke the job's logging and left it `doing`.
MAX_ARGS_DEPTH = 500


def _depth(value: Any) -> int:
    """How deep lists and dicts nest in ``value``, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_args_depth(text: str, value: Any) -> None:
    """Refuse arguments nested deeper than `MAX_ARGS_DEPTH`. The brackets of the JSON text
    bound the depth, so only texts with that many are walked."""
    if text.count("[") + text.count("{") <= MAX_ARGS_DEPTH:
        return
    depth = _depth(value)
    if depth > MAX_ARGS_DEPTH:
        raise ValueError(
            f"its args nest {depth} levels deep, more than fastworker handles ({MAX_ARGS_DEPTH})"
        )


def connector_json_loads(connector: Any) -> Callable[[str], Any]:
    """The JSON decoder the app's connector uses for job arguments (procrastinate's
    connectors take a ``json_loads``), else the standard one."""
    return compat.connector_json_loads(connector) or json.loads


def job_from_row(
    row: _core.Job, loads: Callable[[str], Any] = json.loads, *, decode: bool = True
) -> jobs.Job:
    """procrastinate's Job of a claimed row. ``decode=False``: without its arguments and
    date (a row that could not be decoded, with what is safe to show in logs)."""
    task_kwargs: Any = {}
    scheduled_at = None
    if decode:
        scheduled_at_us = row.scheduled_at_us
        # A date no datetime can hold (±infinity, a year outside 1-9999): this job fails alone.
        if scheduled_at_us == _core.UNREPRESENTABLE_SCHEDULED_AT:
            raise ValueError(
                "its scheduled_at is a date Python cannot represent (infinity, or a year "
                "outside 1-9999)"
            )
        task_kwargs = loads(row.args)
        check_args_depth(row.args, task_kwargs)
        if scheduled_at_us is not None:
            scheduled_at = _EPOCH + datetime.timedelta(microseconds=scheduled_at_us)
    return jobs.Job(
        id=row.id,
        status=row.status,
        priority=row.priority,
        lock=row.lock,
        queueing_lock=row.queueing_lock,
        task_name=row.task_name,
        task_kwargs=task_kwargs,
        scheduled_at=scheduled_at,
        queue=row.queue_name,
        attempts=row.attempts,
        worker_id=row.worker_id,
    )
