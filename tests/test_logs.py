"""JSON logs (`--log-format json`) of a real server process: every line is one JSON object, each line of a call
carries its request id (the client's, or one the server made and sent back) and its W3C trace id, and no line
holds a token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, NotFoundError
from flight_server.wire.codec import REQUEST_ID_HEADER
from tests.conftest import healthy, wait_until
from tests.services import _stop_group, free_ports

TOKEN = "log-test-token-0123456789abcdef"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Headers(flight.ClientMiddlewareFactory):
    """Keeps the headers (and trailers) of the responses."""

    def __init__(self) -> None:
        self.received: dict[str, Any] = {}

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware:
        factory = self

        class Received(flight.ClientMiddleware):
            def received_headers(self, headers: dict[str, Any]) -> None:
                factory.received.update(headers)

        return Received()


def test_json_lines_with_request_and_trace_ids(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    location = f"grpc://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    env["FLIGHT_SERVER_AUTH_TOKENS"] = json.dumps([{"name": "tester", "token": TOKEN, "permissions": ["read"]}])
    log = tmp_path / "server.log"
    args = ["--port", str(port), "--warehouse", str(tmp_path / "wh"), "--log-format", "json", "--log-level", "DEBUG"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
    try:
        wait_until(lambda: healthy(location, TOKEN) or proc.poll() is not None, timeout=90, what="the server")
        assert proc.poll() is None, log.read_text()[-3000:]
        with FeatureClient(location, token=TOKEN, request_id="job-42.step-7") as client, pytest.raises(NotFoundError):
            client.read_table("tests.missing")
        headers = _Headers()
        plain = flight.connect(location, middleware=[headers])
        traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        options = flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {TOKEN}".encode()), (b"traceparent", traceparent.encode())]
        )
        list(plain.list_actions(options))
        made = headers.received[REQUEST_ID_HEADER][0]
        plain.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop_group(proc)

    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert TOKEN not in text
    ours = [line for line in lines if line.get("request_id") == "job-42.step-7"]
    assert any("refused" in line["msg"] and "tests.missing" in line["msg"] for line in ours)  # from the handler
    end = [line for line in ours if line.get("code") == "NOT_FOUND"]
    assert len(end) == 1 and end[0]["method"] == "get_flight_info" and end[0]["kind"] == "scan"
    assert end[0]["level"] == "INFO" and end[0]["duration_ms"] >= 0 and end[0]["peer"].startswith("ipv4:127.0.0.1")
    listed = [line for line in lines if line.get("request_id") == made]
    assert len(made) == 16 and [line.get("method") for line in listed] == ["list_actions"]
    assert listed[0]["trace_id"] == TRACE_ID and listed[0]["code"] == "OK" and listed[0]["level"] == "DEBUG"
    assert lines[-1]["msg"] == "stopped"
