"""docs/grafana-dashboard.json as Grafana reads it: every input and template variable it
declares is used, and every variable it uses is declared (an unused input makes the import
dialog ask for a data source that nothing then uses)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"

#: Grafana's variable syntaxes: `$name`, `${name}`, `${name:format}`, `[[name]]`.
VARIABLE_REFERENCE = re.compile(
    r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)|\[\[(?P<bracketed>\w+)(?::\w+)?\]\]"
)


def referenced_variables(text: str) -> set[str]:
    """The variables `text` refers to, without Grafana's own (`$__rate_interval`, ...)."""
    names = {
        match.group("braced") or match.group("plain") or match.group("bracketed")
        for match in VARIABLE_REFERENCE.finditer(text)
    }
    return {name for name in names if not name.startswith("__")}


def datasources(node: Any) -> list[Any]:
    """Every `datasource` field of the dashboard, at any depth."""
    found: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append(value)
            found.extend(datasources(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(datasources(item))
    return found


def test_the_dashboard_uses_every_input_and_variable_it_declares_and_no_other() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    inputs = {entry["name"] for entry in dashboard.get("__inputs", [])}
    variables = {entry["name"] for entry in dashboard["templating"]["list"]}
    used = referenced_variables(text)
    assert inputs <= used, f"inputs declared and never used: {sorted(inputs - used)}"
    assert variables <= used, f"variables declared and never used: {sorted(variables - used)}"
    assert used <= inputs | variables, f"used, never declared: {sorted(used - inputs - variables)}"


def test_every_panel_and_query_takes_the_data_source_the_dashboard_lets_one_pick() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    picked = {"type": "prometheus", "uid": "${datasource}"}
    found = datasources(dashboard["panels"])
    assert found and all(source == picked for source in found), found
    # The variable that holds the choice is a Prometheus data source picker.
    (datasource,) = (v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"


def test_variable_references_are_found_in_every_syntax() -> None:
    """The checker itself: each of Grafana's syntaxes counts, its built-ins do not."""
    text = "a $job b ${instance} c ${datasource:raw} d [[queue]] e $__rate_interval ${__from}"
    assert referenced_variables(text) == {"job", "instance", "datasource", "queue"}
