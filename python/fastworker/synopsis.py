"""The ``fastworker`` command's synopsis, rendered from its parser: the usage lines of
``fastworker --help`` and ``fastworker worker --help``, joined and wrapped for the README
("The command line"), whose block a test holds equal to it. Print it with
``python -m fastworker.synopsis``.
"""

from __future__ import annotations

import argparse

from fastworker import cli

#: Width of the README's block.
WIDTH = 92


def _usage_items(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's usage, as argparse writes it, cut into its top-level items
    (``[-v | --log-level {...}]`` is one), without ``-h`` and the program's name."""
    formatter = argparse.HelpFormatter(parser.prog, width=1_000_000)
    formatter.add_usage(None, parser._actions, parser._mutually_exclusive_groups, prefix="")
    usage = formatter.format_help().strip().removeprefix(parser.prog).strip()
    items: list[str] = []
    depth = 0
    current = ""
    for character in usage:
        if character == " " and depth == 0:
            if current:
                items.append(current)
            current = ""
            continue
        if character in "[(":
            depth += 1
        elif character in "])":
            depth -= 1
        current += character
    if current:
        items.append(current)
    return [item for item in items if item not in ("[-h]", "COMMAND", "...")]


def _wrapped(head: str, items: list[str], indent: int) -> list[str]:
    """``head`` and its items, filling lines up to `WIDTH`; an item is never split."""
    lines = [" " * indent + head]
    continuation = " " * (indent + len(head) + 1)
    for item in items:
        if len(lines[-1]) + 1 + len(item) > WIDTH and lines[-1].strip() != head:
            lines.append(continuation + item)
        else:
            lines[-1] += " " + item
    return lines


def synopsis() -> str:
    """``fastworker [options] worker [worker options]``, wrapped to `WIDTH` columns."""
    parser = cli.create_parser()
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    worker = subparsers.choices["worker"]
    lines = _wrapped(cli.PROGRAM_NAME, _usage_items(parser), 0)
    lines += _wrapped("worker", _usage_items(worker), len(cli.PROGRAM_NAME) + 1)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(synopsis())
