"""Generate trainwarden's Grafana dashboards (dashboards/*.json) from dashboards/specs.py.

Built with Grafana's grafana-foundation-sdk (the classic dashboard model), so the JSON is never
hand-edited; the generated files are committed, and tests/test_dashboards.py fails when they
differ from what this script produces. Every panel and query uses the `${datasource}` variable,
never a data-source uid, so the files import into any Grafana as they are.

    .venv/bin/python dashboards/generate.py           # rewrite dashboards/*.json
    .venv/bin/python dashboards/generate.py --check   # exit 1 if a committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

if __package__ in {None, ""}:  # run as a script: make `dashboards` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboards import specs

HERE = Path(__file__).resolve().parent
# Grafana 12's classic dashboard schema; the SDK's models default to an older one.
SCHEMA_VERSION = 41
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
PanelBuilder = timeseries.Panel | stat.Panel


def _target(query: specs.Query, ref_id: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(query.expr)
        .legend_format(query.legend)
        .range()
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )


def _panel(spec: specs.Panel, panel_id: int) -> PanelBuilder:
    panel: PanelBuilder
    if spec.kind == "stat":
        panel = (
            stat.Panel()
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(values=False))
            .color_mode(common.BigValueColorMode.VALUE)
        )
    else:
        panel = (
            timeseries.Panel()
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(show_legend=True)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
        )
    panel = (
        panel.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .span(spec.width)
        .height(spec.height)
    )
    for index, query in enumerate(spec.queries):
        panel = panel.with_target(_target(query, chr(ord("A") + index)))
    return panel


def _variable(spec: specs.Variable) -> builders.QueryVariable:
    return (
        builders.QueryVariable(spec.name)
        .label(spec.label)
        .datasource(DATASOURCE)
        .query(spec.query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(multi=True)
        .include_all(include_all=True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text="All", value="$__all"))
    )


def build(spec: specs.Dashboard) -> model.Dashboard:
    """The Grafana dashboard model for one spec."""
    dashboard = (
        builders.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        # An empty list: Grafana adds its built-in "Annotations & Alerts" query on import.
        .annotations([])
        .with_variable(builders.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in spec.variables:
        dashboard = dashboard.with_variable(_variable(variable))
    panel_id = 1
    for row in spec.rows:
        dashboard = dashboard.with_row(builders.Row(row.title).id(panel_id))
        panel_id += 1
        for panel in row.panels:
            dashboard = dashboard.with_panel(_panel(panel, panel_id))
            panel_id += 1
    built = dashboard.build()
    built.schema_version = SCHEMA_VERSION
    return built


def render(spec: specs.Dashboard) -> str:
    """The JSON text committed for one spec (stable key order, trailing newline)."""
    return json.dumps(build(spec), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def path_of(spec: specs.Dashboard) -> Path:
    """Where a dashboard's JSON lives: dashboards/<uid without the trainwarden- prefix>.json."""
    return HERE / f"{spec.uid.removeprefix('trainwarden-')}.json"


def main(argv: list[str] | None = None) -> int:
    """Write every dashboard, or with --check report the stale ones and return 1."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args(argv)
    stale = []
    for spec in specs.DASHBOARDS:
        path, text = path_of(spec), render(spec)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        sys.stderr.write(f"stale, run dashboards/generate.py: {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
