"""The Prometheus alerting rules shipped in deploy/prometheus/alerts.yml: valid, firing as their promtool unit tests
say (tests/fixtures/prometheus/alerts_test.yml), and naming only metrics a real server serves, so that a renamed
metric cannot leave an alert silently watching nothing. promtool is Debian's `prometheus` package's; scripts/test.sh
unpacks it into .tools/ when it is not installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pyarrow as pa
import yaml

from flight_client import FeatureClient
from tests.conftest import sqlite_catalog, start_writing_server, wait_until
from tests.services import free_ports
from tests.test_metrics import Samples, _drivers, scrape

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "fixtures" / "prometheus" / "alerts_test.yml"


def test_the_rules_are_valid_and_fire_as_their_unit_tests_say(promtool: str) -> None:
    for command in ([promtool, "check", "rules", str(RULES)], [promtool, "test", "rules", RULE_TESTS.name]):
        done = subprocess.run(command, cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == alerts


def test_every_metric_the_rules_name_is_served(tmp_path: Path) -> None:
    rules = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    named = {name for expr in rules for name in re.findall(r"\bflight_[a-z_]+\b", expr)}
    assert len(named) >= 7
    served = {name for name, _ in served_samples(tmp_path)}
    assert named <= served, f"named by deploy/prometheus/alerts.yml but not served: {sorted(named - served)}"


def served_samples(tmp_path: Path) -> Samples:
    """The samples of a writing server with metrics on, after a put (its write process up), an online lookup and a
    maintenance round: what the alerting rules, and the dashboard (tests/test_dashboard.py), may name."""
    port = free_ports(1)[0]
    server = start_writing_server(sqlite_catalog(tmp_path), metrics_port=port)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            table = "tests.alerted"
            client.write(table, _drivers(range(10)), entity_keys=["driver_id"], event_time="event_timestamp")
            wait_until(lambda: server.parts.writes is not None and server.parts.writes.pid is not None, timeout=60)
            client.write(table, _drivers(range(10, 20)))  # through the write process
            lookup = client.get_online_features({"driver_id": pa.array([1], pa.int64())}, [f"{table}:rate"])
            assert lookup.to_pydict()["rate"] == [1.0]
            assert client.run_maintenance(table)["error"] is None
            return scrape(port)
    finally:
        server.shutdown()
