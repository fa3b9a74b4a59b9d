"""Configuration: catalog properties from file, environment and flags; the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest

from flight_server.base.config import ServerConfig, catalog_properties_from_env, parse_property_flags, read_catalog_file


def test_environment_variables_follow_pyiceberg_naming() -> None:
    env = {
        "FLIGHT_SERVER_CATALOG__URI": "http://rest:8181",
        "FLIGHT_SERVER_CATALOG__S3__ACCESS_KEY_ID": "key",
        "FLIGHT_SERVER_PORT": "1",
        "OTHER": "x",
    }
    assert catalog_properties_from_env(env) == {"uri": "http://rest:8181", "s3.access-key-id": "key"}


@pytest.mark.parametrize(
    "name, text",
    [
        ("catalog.yaml", "type: rest\nuri: http://rest:8181\ns3.endpoint: http://s3:8333\n"),
        ("catalog.json", '{"type": "rest", "uri": "http://rest:8181", "s3.endpoint": "http://s3:8333"}'),
    ],
)
def test_catalog_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert read_catalog_file(path) == {"type": "rest", "uri": "http://rest:8181", "s3.endpoint": "http://s3:8333"}


def test_property_flags() -> None:
    assert parse_property_flags(["a=b", "c=d=e"]) == {"a": "b", "c": "d=e"}
    with pytest.raises(ValueError, match="key=value"):
        parse_property_flags(["oops"])


def test_embedded_default_is_sqlite_in_the_warehouse(tmp_path: Path) -> None:
    props = ServerConfig(warehouse=str(tmp_path / "wh")).resolved_catalog_properties()
    assert props == {
        "type": "sql",
        "uri": f"sqlite:///{tmp_path / 'wh' / 'catalog.db'}",
        "warehouse": (tmp_path / "wh").as_uri(),
    }
    assert (tmp_path / "wh").is_dir()


def test_configured_catalog_is_used_as_given(tmp_path: Path) -> None:
    given = {"type": "rest", "uri": "http://rest:8181", "warehouse": "s3://bucket"}
    assert ServerConfig(warehouse=str(tmp_path), catalog_properties=given).resolved_catalog_properties() == given
