"""The command line: `--help` explains every option; `serve --demo` serves the demo set and stops cleanly."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flight_client import FeatureClient, FeatureServerError, read_flight
from flight_server.cli import main, serve
from tests.conftest import wait_until
from tests.services import free_ports


def test_help_explains_every_option() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for param in serve.params:
        if param.name != "help":
            assert param.help, f"{param.opts[0]} has no help text"
            assert param.opts[0] in result.output


def test_bad_catalog_property_is_rejected() -> None:
    result = CliRunner().invoke(main, ["serve", "--catalog-property", "novalue"])
    assert result.exit_code == 2
    assert "not of the form key=value" in result.output


def _healthy(location: str) -> bool:
    try:
        with FeatureClient(location, timeout=2) as client:
            return client.health()["status"] == "ok"
    except (FeatureServerError, OSError):
        return False


def test_serve_demo_end_to_end(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    location = f"grpc://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flight_server",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--warehouse",
            str(tmp_path / "wh"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_until(lambda: proc.poll() is not None or _healthy(location), timeout=60, what="the server")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        wait_until(
            lambda: (
                {"demo.driver_stats", "demo.customer_profile", "demo.trips"}
                <= {t["table"] for t in FeatureClient(location).tables()}
            ),
            timeout=60,
            what="the demo tables",
        )
        frame = read_flight(location, "demo.driver_stats", filter="driver_id = 1001")
        assert len(frame) == 49 and frame["driver_id"].eq(1001).all()  # 48 hours in January, and this hour
        with FeatureClient(location) as client:
            latest = client.get_online_features({"driver_id": [1001, 1]}, ["demo.driver_stats:conv_rate"])
        when = latest.column("driver_stats__event_timestamp").to_pylist()
        assert when[1] is None and dt.datetime.now(dt.timezone.utc) - when[0] < dt.timedelta(hours=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (tmp_path / "server.log").read_text()
    assert re.search(rf"serving Flight on grpc://127.0.0.1:{port}", output)
    assert "demo: wrote 49000 rows to demo.driver_stats" in output
    assert "stopped" in output


@pytest.mark.parametrize("secret_key", ["s3.secret-access-key", "credential"])
def test_secrets_never_logged(tmp_path: Path, secret_key: str) -> None:
    from flight_server.base.config import redact

    shown = redact({secret_key: "hunter2", "uri": "postgresql://u:hunter2@db/x", "s3.endpoint": "http://s3"})
    assert "hunter2" not in repr(shown)
    assert shown["s3.endpoint"] == "http://s3"


def test_health_command_for_container_checks(tmp_path: Path) -> None:
    from tests.conftest import sqlite_catalog, start_server

    token = "health-check-token-0123456789"
    server = start_server(
        sqlite_catalog(tmp_path), auth_tokens=[{"name": "probe", "token": token, "permissions": ["read"]}]
    )
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        ok = CliRunner().invoke(main, ["health", "--location", location], env={"FLIGHT_SERVER_HEALTH_TOKEN": token})
        assert ok.exit_code == 0 and '"status": "ok"' in ok.output
        refused = CliRunner().invoke(main, ["health", "--location", location])
        assert refused.exit_code == 1 and "requires a bearer token" in refused.output
    finally:
        server.shutdown()
    down = CliRunner().invoke(main, ["health", "--location", location, "--timeout", "2"])
    assert down.exit_code == 1 and location in down.output


def test_settings_that_do_not_fit_together_are_refused(tmp_path: Path) -> None:
    args = ["serve", "--warehouse", str(tmp_path / "wh"), "--port", "0"]
    no_advertise = CliRunner().invoke(main, [*args, "--peer", "grpc://other:8815"])
    assert no_advertise.exit_code == 2 and "--peer needs --advertise" in no_advertise.output
    bad_tokens = CliRunner().invoke(main, args, env={"FLIGHT_SERVER_AUTH_TOKENS": '[{"name": "x"}]'})
    assert bad_tokens.exit_code == 2 and "'token' must be a string" in bad_tokens.output
