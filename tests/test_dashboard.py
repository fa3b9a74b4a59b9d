"""The Grafana dashboard shipped in deploy/grafana/flight-server.json: the structure Grafana imports, queries that
promtool accepts as PromQL, and only metrics and labels a real server serves, so that a renamed metric or label
cannot leave a panel silently empty."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.test_alerts import RULES, served_samples

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "flight-server.json"
SOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables as Prometheus gets them: every replica (a multi-value variable becomes a regex), and windows.
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Labels Prometheus adds to every sample it scrapes, which the server's endpoint does not serve.
TARGET_LABELS = {"instance", "job"}
INSTANCE_QUERY = re.compile(r"label_values\((\w+), *instance\)")


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those of collapsed rows (which hold their panels) included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """Each target's name (panel id and refId), the target, and its expression as Prometheus would get it."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            yield f"panel_{panel['id']}_{target['refId']}", target, expr


def test_the_dashboard_has_what_grafana_needs() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == SOURCE
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"
    assert INSTANCE_QUERY.fullmatch(instance["definition"]) and instance["query"]["query"] == instance["definition"]
    everything = list(panels(board))
    ids = [panel["id"] for panel in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}  # of the panels laid out now (a collapsed row's lie under it when opened)
    for panel in board["panels"]:
        where = panel.get("gridPos", {})
        for x in range(where.get("x", 0), where.get("x", 0) + where.get("w", 0)):
            for y in range(where.get("y", 0), where.get("y", 0) + where.get("h", 0)):
                assert cells.setdefault((x, y), panel["id"]) == panel["id"], f"{panel['title']} overlaps another panel"
    for panel in everything:
        where = panel.get("gridPos", {})
        assert {"h", "w", "x", "y"} <= where.keys() and where["x"] + where["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == SOURCE, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert len(panel["description"]) > 40, f"{panel['title']} does not say what it shows"
        targets = panel["targets"]
        assert targets and len({target.get("refId") for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target.get("expr") and target.get("refId") and target["datasource"] == SOURCE, panel["title"]
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']} ignores the instance variable"


def test_the_panels_name_every_alert_and_no_other() -> None:
    """A panel's description names the alerts of deploy/prometheus/alerts.yml it shows: each alert has a panel to
    look at, and a renamed alert leaves no description naming the old one."""
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    named = {
        alert
        for panel in panels(dashboard())
        for alert in re.findall(r"\bFlight[A-Z]\w+", panel.get("description", ""))
    }
    assert named == alerts


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each target's expression, its Grafana variables given values, as a recording rule promtool checks."""
    rules = []
    for name, _, expr in queries(dashboard()):
        assert "$" not in expr, f"{name}: a Grafana variable the test gives no value: {expr}"
        rules.append({"record": f"dashboard:{name}", "expr": expr})
    assert len(rules) >= 40
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """The metrics an expression selects, each with the label names its matchers name."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right) *\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range windows
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*) *(\{[^}]*\})?( *\()?", expr):
        name, matchers, call = match.groups()
        if call is None and name not in {"and", "or", "unless", "bool", "offset"}:
            yield name, set(re.findall(r"(\w+) *(?:=~|!~|!=|=)", matchers or ""))


def test_every_metric_and_label_the_dashboard_names_is_served(tmp_path: Path) -> None:
    """Every metric a query selects (and the instance variable's), each label its matchers and groupings name and
    each label its legend shows are among the samples of a real server (write process, online index and
    maintenance round included), or are the labels Prometheus adds."""
    served: dict[str, set[str]] = {}
    for name, labels in served_samples(tmp_path):
        served.setdefault(name, set()).update(label for label, _ in labels)
    board = dashboard()
    instance = {variable["name"]: variable for variable in board["templating"]["list"]}["instance"]
    match = INSTANCE_QUERY.fullmatch(instance["definition"])
    assert match and match[1] in served, f"the instance variable's {match and match[1]} is not served"
    named = set()
    for name, target, expr in queries(board):
        selected = list(selectors(expr))
        assert selected, f"{name} selects no metric: {expr}"
        unknown = {metric for metric, _ in selected} - served.keys()
        assert not unknown, f"{name} names metrics no server serves: {sorted(unknown)}"
        named |= {metric for metric, _ in selected}
        known = TARGET_LABELS.union(*(served[metric] for metric, _ in selected))
        for metric, labels in selected:
            assert labels <= served[metric] | TARGET_LABELS, (
                f"{name}: {metric} has no {labels - served[metric] - TARGET_LABELS}"
            )
        grouped = {
            label.strip() for group in re.findall(r"\b(?:by|without) *\(([^)]*)\)", expr) for label in group.split(",")
        }
        shown = set(re.findall(r"\{\{ *(\w+) *\}\}", target.get("legendFormat", "")))
        assert grouped | shown <= known, (
            f"{name} groups by or shows labels its metrics lack: {sorted((grouped | shown) - known)}"
        )
    assert len(named) >= 40
