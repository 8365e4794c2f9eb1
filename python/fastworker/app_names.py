"""Names in the worker's options checked against the app: the task names of
`task_timeouts` (resolved, or refused at start) and the queues of `queue_concurrency`
(a warning for one that no task uses).

A `task_timeouts` key is a task name as the app registers it (`app.tasks`: the task's
name, with a blueprint's ``namespace:`` prefix, and its aliases), or a bare function name:
the last dotted component of exactly one task's name (``sleepy`` for
``mypkg.tasks.sleepy``). Either way it applies to every name of that task, so jobs
deferred under an alias get it too. A key that names no task, or several, is refused with
the close matches: a timeout that silently never applies is worse than no start.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastworker import _core

logger = logging.getLogger("fastworker.options")


def short_name(name: str) -> str:
    """The last component of a task name: ``sleepy`` for ``ns:mypkg.tasks.sleepy``."""
    return name.rpartition(":")[2].rpartition(".")[2]


def _task_list(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in sorted(names))


def _close_matches(key: str, tasks: Mapping[str, Any]) -> str:
    candidates = {name: name for name in tasks}
    for name in tasks:
        candidates.setdefault(short_name(name), name)
    matches = difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.6)
    found = list(dict.fromkeys(candidates[match] for match in matches))
    if found:
        return f"did you mean {_task_list(found)}?"
    return f"the app's tasks: {_task_list({task.name for task in tasks.values()}) or 'none'}"


def resolve_task_timeouts(
    tasks: Mapping[str, Any], timeouts: Mapping[str, float]
) -> dict[str, float]:
    """`task_timeouts` keyed by every name each of its tasks is registered under.

    Raises `fastworker.ConfigurationError` for a key that names no task or several, and
    for two keys that name the same task."""
    resolved: dict[str, float] = {}
    given_as: dict[int, str] = {}  # id(task) -> the key that named it
    for key, timeout in timeouts.items():
        if key in tasks:
            task = tasks[key]
        else:
            matching = {id(t): t for name, t in tasks.items() if short_name(name) == key}
            if not matching:
                raise _core.ConfigurationError(
                    f"task_timeouts: no task named {key!r} in the app; {_close_matches(key, tasks)}"
                )
            if len(matching) > 1:
                names = [t.name for t in matching.values()]
                raise _core.ConfigurationError(
                    f"task_timeouts: {key!r} is ambiguous, it is the last part of the "
                    f"names of {_task_list(names)}; give the full name"
                )
            (task,) = matching.values()
        if id(task) in given_as:
            raise _core.ConfigurationError(
                f"task_timeouts: {given_as[id(task)]!r} and {key!r} both name the task "
                f"{task.name!r}; give it once"
            )
        given_as[id(task)] = key
        for name, registered in tasks.items():
            if registered is task:
                resolved[name] = timeout
    return resolved


def warn_of_unused_queues(tasks: Mapping[str, Any], queues: Iterable[str]) -> None:
    """A warning for each of `queue_concurrency`'s queues that no task of the app is
    declared on: likely a typo, but jobs may be deferred there with
    ``configure(queue=...)``, so not refused."""
    used = sorted({task.queue for task in tasks.values()})
    for queue in queues:
        if queue not in used:
            logger.warning(
                f"queue_concurrency names the queue {queue!r}, which no task of the app is "
                f"declared on (tasks use {_task_list(used) or 'no queue'}); it only limits "
                "jobs deferred onto it with configure(queue=...)",
                extra={"action": "queue_concurrency_unused_queue", "queue": queue},
            )
