"""Issue 15, the smaller ones: each test fails on the code before its fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flight_server.base.config import redact
from flight_server.iceberg.catalog import FeatureCatalog
from tests.conftest import sqlite_catalog

SECRET_KEYS = [
    "s3.access-key-id",
    "s3.secret-access-key",
    "s3.session-token",
    "token",
    "password",
    "credential",
    "adls.account-key",
    "client.access-key-id",
    "S3_ACCESS_KEY_ID",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_looking_keys_are_redacted_at_any_depth(key: str) -> None:
    shown = redact(
        {
            key: "AKIAHUNTER2",
            "uri": "postgresql://u:hunter2@db/x",
            "s3.endpoint": "http://s3",
            "nested": {"deeper": {key: "AKIAHUNTER2"}, "list": [{key: "AKIAHUNTER2"}, "http://u:hunter2@h/"]},
        }
    )
    assert "AKIAHUNTER2" not in repr(shown) and "hunter2" not in repr(shown)
    assert shown[key] == "***" and shown["nested"]["deeper"][key] == "***"
    assert shown["s3.endpoint"] == "http://s3"
    assert shown["uri"] == "postgresql://u:***@db/x"


def test_access_key_id_not_logged_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    properties = {**sqlite_catalog(tmp_path), "s3.access-key-id": "AKIAEXAMPLEKEYID", "s3.region": "eu-west-1"}
    with caplog.at_level(logging.INFO, logger="flight_server.iceberg.catalog"):
        FeatureCatalog("hardening", properties)
    assert "s3.region" in caplog.text and "AKIAEXAMPLEKEYID" not in caplog.text
