"""The catalog as pyiceberg configures it (`.pyiceberg.yaml`, `PYICEBERG_CATALOG__*`, its nested file layout),
secrets masked wherever the server shows properties, and one-line errors when the server cannot start."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from flight_client import FeatureClient
from flight_server.base.config import (
    CatalogError,
    catalog_settings,
    read_catalog_entry,
    redact,
    redact_text,
)
from flight_server.cli import main
from flight_server.iceberg.catalog import FeatureCatalog
from tests.conftest import healthy, sqlite_catalog, start_server, wait_until
from tests.services import _stop_group, free_ports

TABLE = "feat.drivers"

# Secret values placed at every depth a configuration can hold them; none may ever be shown.
SECRETS = {
    "s3.secret-access-key": "SECRET-ACCESS-KEY-0001",
    "s3.session-token": "SESSION-TOKEN-0002",
    "token": "BEARER-TOKEN-0003",
    "password": "PASSWORD-0004",
}


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A SQLite catalog named `prod` holding one feature table (written through a server, as users do)."""
    props = sqlite_catalog(tmp_path_factory.mktemp("prod"))
    server = start_server(props, catalog_name="prod")
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            rows = pa.table({"driver_id": [1, 2], "ts": pa.array([0, 0], pa.timestamp("us", "UTC")), "x": [1.0, 2.0]})
            client.write(TABLE, rows, entity_keys=["driver_id"], event_time="ts")
    finally:
        server.shutdown()
    return props


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server process: no FLIGHT_SERVER_* or PYICEBERG_* of the caller, `home` as both
    HOME and PYICEBERG_HOME (where pyiceberg looks for `.pyiceberg.yaml`)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("FLIGHT_SERVER_", "PYICEBERG_"))}
    return {**keep, "HOME": str(home), "PYICEBERG_HOME": str(home), **extra}


@contextlib.contextmanager
def serving(home: Path, *args: str, **env: str) -> Iterator[tuple[str, Path]]:
    """A `flight-server serve` process started in `home`; yields its location and log once it answers `health`."""
    port = free_ports(1)[0]
    location = f"grpc://127.0.0.1:{port}"
    log = home / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve", "--port", str(port), *args],
            cwd=home,
            env=_env(home, FLIGHT_SERVER_WAREHOUSE=str(home / "unused"), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: proc.poll() is not None or healthy(location), timeout=90, what="the server")
        assert proc.poll() is None, log.read_text()
        yield location, log
    finally:
        _stop_group(proc)


def refused(home: Path, *args: str, **env: str) -> str:
    """What `flight-server serve` prints when it refuses to start: one line, exit 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "flight_server", "serve", "--port", "0", *args],
        cwd=home,
        env=_env(home, FLIGHT_SERVER_WAREHOUSE=str(home / "unused"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    return output.strip()


def _yaml(catalogs: dict[str, dict[str, str]]) -> str:
    """pyiceberg's nested layout, `catalog: {NAME: {key: value}}`."""
    lines = ["catalog:"]
    for name, props in catalogs.items():
        lines += [f"  {name}:", *(f"    {key}: {value}" for key, value in props.items())]
    return "\n".join(lines) + "\n"


def _serves_prod(location: str, log: Path) -> None:
    """The server reads the `prod` catalog's table, and shows no secret in its log or its `health` reply."""
    with FeatureClient(location) as client:
        assert TABLE in {t["table"] for t in client.tables()}
        assert client.read_table(TABLE).num_rows == 2
        health = client.health()
    assert health["catalog"] == "prod"
    shown = log.read_text() + json.dumps(health)
    assert "catalog 'prod'" in shown
    for secret in SECRETS.values():
        assert secret not in shown


def test_catalog_name_loads_pyiceberg_yaml(tmp_path: Path, prod: dict[str, str]) -> None:
    (tmp_path / ".pyiceberg.yaml").write_text(_yaml({"prod": {**prod, **SECRETS}, "other": {"uri": "sqlite://"}}))
    with serving(tmp_path, "--catalog-name", "prod") as (location, log):
        _serves_prod(location, log)


def test_catalog_name_loads_pyiceberg_variables(tmp_path: Path, prod: dict[str, str]) -> None:
    variables = {
        "PYICEBERG_CATALOG__PROD__URI": prod["uri"],
        "PYICEBERG_CATALOG__PROD__WAREHOUSE": prod["warehouse"],
        "PYICEBERG_CATALOG__PROD__S3__SECRET_ACCESS_KEY": SECRETS["s3.secret-access-key"],
        "PYICEBERG_CATALOG__PROD__PASSWORD": SECRETS["password"],
    }
    with serving(tmp_path, FLIGHT_SERVER_CATALOG_NAME="prod", **variables) as (location, log):  # named by variable
        _serves_prod(location, log)


def test_nested_catalog_config_file(tmp_path: Path, prod: dict[str, str]) -> None:
    """pyiceberg's layout given to --catalog-config: its only catalog is the one served, under its name."""
    config = tmp_path / "catalogs.yaml"
    config.write_text(_yaml({"prod": {**prod, **SECRETS}}))
    with serving(tmp_path, "--catalog-config", str(config)) as (location, log):
        _serves_prod(location, log)


def test_unknown_catalog_name_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".pyiceberg.yaml").write_text(_yaml({"dev": {"uri": "sqlite://"}}))
    line = refused(tmp_path, "--catalog-name", "prod")
    assert "no catalog named 'prod'" in line and "PYICEBERG_CATALOG__PROD__" in line
    assert not (tmp_path / "unused").exists()  # no embedded catalog was made in its place


def test_remove_orphan_files_opens_the_catalog_as_serve_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYICEBERG_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["remove-orphan-files", TABLE, "--catalog-name", "nowhere"])
    assert result.exit_code == 2 and result.output.startswith("Error: no catalog named 'nowhere'"), result.output


def test_embedded_default_needs_no_configuration(tmp_path: Path) -> None:
    """No catalog options at all: the embedded SQLite catalog, even with a `.pyiceberg.yaml` around."""
    (tmp_path / ".pyiceberg.yaml").write_text(_yaml({"default": {"uri": "postgresql://nowhere:1/x"}}))
    with serving(tmp_path) as (location, _), FeatureClient(location) as client:
        assert client.tables() == []
    assert (tmp_path / "unused" / "catalog.db").is_file()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.yaml", "", "no catalog properties in the file"),
        ("empty.json", "", "no catalog properties in the file"),
        ("comment.yaml", "# nothing yet\n", "no catalog properties in the file"),
        ("list.json", "[1, 2]", "expected a mapping of catalog properties"),
        ("forgot-catalog.yaml", "prod:\n  uri: sqlite://\n", "property 'prod' holds a dict"),
        ("no-props.yaml", "catalog:\n  prod: ''\n", "catalog 'prod' has no properties"),
        ("several.yaml", _yaml({"a": {"uri": "x"}, "b": {"uri": "y"}}), "several catalogs (a, b)"),
    ],
)
def test_unusable_catalog_files_are_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    config = tmp_path / name
    config.write_text(text)
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--catalog-config", str(config)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1


def test_nested_file_picks_as_pyiceberg_does(tmp_path: Path) -> None:
    config = tmp_path / "catalogs.yaml"
    config.write_text(_yaml({"Default": {"uri": "d"}, "prod": {"URI": "p"}}))
    assert read_catalog_entry(config) == ("default", {"uri": "d"})  # names and keys lowercased, as pyiceberg's
    assert read_catalog_entry(config, "PROD") == ("prod", {"uri": "p"})
    config.write_text("default-catalog: prod\n" + _yaml({"default": {"uri": "d"}, "prod": {"uri": "p"}}))
    assert read_catalog_entry(config) == ("prod", {"uri": "p"})
    with pytest.raises(CatalogError, match=r"no catalog named 'qa' \(it names: default, prod\)"):
        read_catalog_entry(config, "qa")


def test_sources_in_order_of_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyiceberg's configuration of the named catalog < the file < FLIGHT_SERVER_CATALOG__* < flags."""
    monkeypatch.setenv("PYICEBERG_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".pyiceberg.yaml").write_text(_yaml({"prod": {"uri": "yaml", "a": "yaml", "b": "yaml", "c": "yaml"}}))
    monkeypatch.setenv("PYICEBERG_CATALOG__PROD__D", "pyiceberg-variable")
    config = tmp_path / "file.json"
    config.write_text(json.dumps({"a": "file", "b": "file", "c": "file"}))
    environ = {"FLIGHT_SERVER_CATALOG__B": "variable", "FLIGHT_SERVER_CATALOG__C": "variable"}
    name, props = catalog_settings("prod", config, {"c": "flag"}, environ)
    assert name == "prod"
    assert props == {"uri": "yaml", "a": "file", "b": "variable", "c": "flag", "d": "pyiceberg-variable"}
    assert catalog_settings(None, None, {}, {}) == ("default", {})  # the embedded default, unnamed
    with pytest.raises(CatalogError, match="no catalog named 'qa'"):
        catalog_settings("qa", None, {}, {})


def test_redaction_at_any_depth() -> None:
    config = {
        "catalog": {"prod": {"uri": "postgresql+psycopg2://iceberg:PASSWORD-0005@db/x", **SECRETS}},
        "auth": {"type": "oauth2", "oauth2": {"client-secret": "CLIENT-SECRET-0006"}},
        "header.Authorization": "Bearer HEADER-0007",
        "headers": [{"credential": "LIST-0008"}],
        "s3.endpoint": "http://s3:8333",
    }
    shown = repr(redact(config))
    for secret in [*SECRETS.values(), "PASSWORD-0005", "CLIENT-SECRET-0006", "HEADER-0007", "LIST-0008"]:
        assert secret not in shown
    assert "postgresql+psycopg2://iceberg:***@db/x" in shown and "http://s3:8333" in shown and "oauth2" in shown
    message = "refused: token BEARER-TOKEN-0003 for postgresql://u:PASSWORD-0005@db"
    assert redact_text(message, config) == "refused: token *** for postgresql://u:***@db"


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(tmp_path, "--port", str(port))
    assert line == f"Error: cannot listen on grpc://127.0.0.1:{port}: address already in use"


def test_unreachable_rest_catalog_is_one_line(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    config = tmp_path / "rest.yaml"
    config.write_text(_yaml({"prod": {"type": "rest", "uri": uri, **SECRETS}}))
    line = refused(tmp_path, "--catalog-config", str(config))
    assert line == f"Error: cannot reach the catalog at {uri} (connection refused)"


def test_unreachable_postgres_catalog_hides_its_password(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    uri = f"postgresql+psycopg2://iceberg:PASSWORD-0009@127.0.0.1:{port}/iceberg"
    line = refused(tmp_path, "--catalog-property", f"uri={uri}")
    assert line == (
        f"Error: cannot reach the catalog at postgresql+psycopg2://iceberg:***@127.0.0.1:{port}/iceberg "
        "(connection refused)"
    )


def test_catalog_library_errors_are_one_line_without_secrets() -> None:
    props = {"type": "nonsense", "token": "BEARER-TOKEN-0003"}
    with pytest.raises(CatalogError) as error:
        FeatureCatalog("x", props)
    assert str(error.value) == "cannot open the catalog 'x': 'nonsense' is not a valid CatalogType"


def test_health_against_nothing_is_one_line() -> None:
    location = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    result = CliRunner().invoke(main, ["health", "--location", location, "--timeout", "2"])
    assert result.exit_code == 1  # 1, not 2: container health checks reserve 2
    assert result.output == (
        f"Error: {location}: cannot reach the feature server (connection refused): is it running, and is the location "
        "right?\n"
    )
