"""The client install: `iceberg-feature-flight` without the `server` extra is pyarrow alone, and the
client works with nothing else importable; the server's commands then say which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

from flight_server.launch import SERVER_MODULES

from .conftest import sqlite_catalog, start_server

ROOT = Path(__file__).resolve().parent.parent

# Runs first in the child: every server dependency (and pandas) fails to import, as in a client-only venv.
BLOCK = textwrap.dedent(
    f"""
    import sys
    BLOCKED = {sorted(SERVER_MODULES | {"pandas"})!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_the_core_install_is_pyarrow_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["pyarrow"]
    server = {d.split("[")[0].split("=")[0].split(">")[0] for d in project["optional-dependencies"]["server"]}
    assert {"pyiceberg", "duckdb", "pandas", "click"} <= server


def test_the_client_works_without_the_server_dependencies(tmp_path: Path) -> None:
    server = start_server(sqlite_catalog(tmp_path))
    try:
        location = f"grpc://127.0.0.1:{server.port}"
        done = run_blocked(
            f"""
            import datetime as dt
            import pyarrow as pa
            from flight_client import FeatureClient

            ts = [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * 2

            with FeatureClient({location!r}) as client:
                data = pa.table({{"id": [1, 2], "ts": ts, "x": [0.5, 1.5]}})
                client.write("light.t", data, entity_keys=["id"], event_time="ts")
                table = client.read_table("light.t")
                assert sorted(table.column("x").to_pylist()) == [0.5, 1.5], table
                online = client.get_online_features({{"id": [2]}}, ["light.t:x"])
                assert online.column("x").to_pylist() == [1.5], online
            loaded = {{m.split(".")[0] for m in sys.modules}} & set(BLOCKED)
            assert not loaded, loaded
            print("ok")
            """
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
    finally:
        server.shutdown()


def test_the_server_commands_name_the_extra_when_it_is_missing() -> None:
    for command in ("serve", "bench"):
        done = run_blocked(f"from flight_server.launch import {command}; {command}()")
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "pip install 'iceberg-feature-flight[server]'" in lines[0]
