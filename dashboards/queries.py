"""Every PromQL query of the shipped dashboards, ready to run against a Prometheus.

Tests use it to check that the panels parse, read only series the daemon exports, and return
data on a real Prometheus after a scenario::

    sys.path.append(str(REPO_ROOT))  # dashboards/ is a package at the repo root
    from dashboards.queries import all_panel_queries

    for query in all_panel_queries():
        expr = query.rendered({"job": "toy"})  # $job -> toy, other variables match all
        ...  # run `expr` as a range query; `query.requires` says what it needs to have data

Grafana runs these as range queries over the dashboard's time range; a panel may legitimately
be empty at one instant (e.g. *Active findings* once every finding resolved).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dashboards import specs

MATCH_ALL = ".*"  # what "All" means for a multi-value variable (the dashboards' allValue)
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")


def render(expr: str, variables: Mapping[str, str] | None = None, rate_interval: str = "1m") -> str:
    """`expr` with Grafana's variables replaced: `$__rate_interval`, then `$name` (default: match all)."""
    values = dict(variables or {})
    expr = expr.replace("$__rate_interval", rate_interval)
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), MATCH_ALL), expr)


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: where it is shown, its PromQL, and what it needs to have data."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    requires: frozenset[str]

    def rendered(self, variables: Mapping[str, str] | None = None, rate_interval: str = "1m") -> str:
        """The query as Grafana would send it with these variable values."""
        return render(self.expr, variables, rate_interval)


def all_panel_queries() -> list[PanelQuery]:
    """Every target of every panel of every shipped dashboard, in dashboard order."""
    return [
        PanelQuery(dashboard.uid, panel.title, chr(ord("A") + index), query.expr, panel.requires)
        for dashboard in specs.DASHBOARDS
        for row in dashboard.rows
        for panel in row.panels
        for index, query in enumerate(panel.queries)
    ]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(dashboard uid, variable name, series selector) of every `label_values(selector, label)` variable."""
    found = []
    for dashboard in specs.DASHBOARDS:
        for variable in dashboard.variables:
            match = _LABEL_VALUES.match(variable.query)
            if match is None:
                raise ValueError(
                    f"{dashboard.uid}: variable {variable.name} is not label_values(selector, label)"
                )
            found.append((dashboard.uid, variable.name, match.group("selector")))
    return found
