"""The settings table: the commands' options, ServerConfig's defaults and docs/configuration.md all follow it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from flight_server.base.config import ServerConfig
from flight_server.base.settings import (
    HEALTH_SETTINGS,
    MARKDOWN_END,
    MARKDOWN_START,
    SERVE_SETTINGS,
    SETTINGS,
    Setting,
    markdown,
)
from flight_server.cli import health, main, serve
from flight_server.transport.auth import ENV_TOKENS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def no_server_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options read their variables from the environment: the tests' own must not leak in."""
    for setting in SETTINGS:
        if setting.envvar:
            monkeypatch.delenv(setting.envvar, raising=False)


def parse(command: click.Command, *args: str) -> dict[str, Any]:
    """The values `command` would be called with, without calling it (click's values are untyped)."""
    return dict(command.make_context(command.name, list(args)).params)


def test_the_docs_show_the_table_as_generated() -> None:
    text = DOCS.read_text()
    start, end = text.find(MARKDOWN_START), text.find(MARKDOWN_END)
    assert 0 <= start < end, f"{DOCS.name} has lost the settings table's marker comments"
    assert text.count(MARKDOWN_END) == 1, f"{DOCS.name} has a stray end marker: text up to the last would be replaced"
    assert text[start : end + len(MARKDOWN_END)] == markdown(), (
        f"{DOCS.name}'s settings table is out of date: replace it, marker comments included, with the output "
        "of `flight-server settings --markdown` (python -m flight_server settings --markdown)"
    )


@pytest.mark.parametrize("command, settings", [(serve, SERVE_SETTINGS), (health, HEALTH_SETTINGS)])
def test_every_option_comes_from_the_table(command: click.Command, settings: tuple[Setting, ...]) -> None:
    flags = [param.opts[0] for param in command.params if isinstance(param, click.Option)]
    assert flags == [s.flag.split("/")[0] for s in settings if s.flag]


def test_flags_and_variables_are_unique() -> None:
    for settings in (SERVE_SETTINGS, HEALTH_SETTINGS):
        flags = [s.flag for s in settings if s.flag]
        assert len(flags) == len(set(flags))
    envvars = [s.envvar for s in SETTINGS if s.envvar]
    assert len(envvars) == len(set(envvars)) and all(v.startswith("FLIGHT_SERVER_") for v in envvars)
    assert ENV_TOKENS in envvars, "the tokens variable, which has no flag, is listed too"


def test_a_setting_of_a_field_takes_the_fields_default() -> None:
    fields = {field.name for field in dataclasses.fields(ServerConfig)}
    for setting in SETTINGS:
        assert setting.field is None or setting.field in fields, setting.flag
        assert setting.field is None or setting.default is None, f"{setting.flag}: its default is ServerConfig's"
    values = parse(serve)
    assert ServerConfig(**{k: v for k, v in values.items() if k in fields}) == ServerConfig()


def test_values_reach_the_fields_in_their_units(monkeypatch: pytest.MonkeyPatch) -> None:
    values = parse(serve, "--historical-cache-mb", "3", "--max-request-kb", "2", "--peer", "grpc://a:1 grpc://b:2")
    assert values["historical_cache_bytes"] == 3 << 20 and values["max_request_bytes"] == 2 << 10
    assert values["peers"] == ["grpc://a:1", "grpc://b:2"]
    monkeypatch.setenv("FLIGHT_SERVER_ONLINE_TABLES", "demo.a demo.b")
    monkeypatch.setenv("FLIGHT_SERVER_ONLINE_MAX_MB", "5")
    values = parse(serve)
    assert values["online_tables"] == ["demo.a", "demo.b"] and values["online_max_bytes"] == 5 << 20


def test_out_of_range_values_are_refused_with_their_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHT_SERVER_SCAN_PARTITIONS", "0")
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "--scan-partitions" in result.output


def test_settings_command_lists_every_setting() -> None:
    listed = CliRunner().invoke(main, ["settings"])
    assert listed.exit_code == 0
    for setting in SETTINGS:
        assert (setting.flag or setting.envvar or "") in listed.output
    as_markdown = CliRunner().invoke(main, ["settings", "--markdown"])
    assert as_markdown.exit_code == 0 and as_markdown.output == markdown() + "\n"
