"""Token rotation without a restart: a real `flight-server serve` process re-reads its tokens file when the
file changes, and at once on SIGHUP; a file that does not parse leaves the tokens in force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flight_client import FeatureClient, FeatureServerError, UnauthenticatedError
from tests.conftest import wait_until
from tests.services import free_ports


def token() -> str:
    return "rotate-" + uuid.uuid4().hex


def write_tokens(path: Path, *tokens: str) -> None:
    """Replace the file the way operators and secret mounts do: write aside, then rename over it."""
    aside = path.with_suffix(".new")
    aside.write_text(json.dumps([{"name": f"t{i}", "token": t, "permissions": ["read"]} for i, t in enumerate(tokens)]))
    aside.replace(path)


def accepted(location: str, secret: str) -> bool | None:
    """True when the server accepts the token, False when it refuses it, None while it does not answer."""
    try:
        with FeatureClient(location, timeout=5, token=secret) as client:
            return client.health()["status"] == "ok"
    except UnauthenticatedError:
        return False
    except (FeatureServerError, OSError):
        return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes], Path]]:
    """A server process on a tokens file; yields its location, the file, the process and its log."""
    port = free_ports(1)[0]
    tokens, log = tmp_path / "tokens.json", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    command = [sys.executable, "-m", "flight_server", "serve", "--port", str(port), "--warehouse", str(tmp_path / "wh")]
    first = token()
    write_tokens(tokens, first)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--auth-tokens-file", str(tokens)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    location = f"grpc://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or accepted(location, first) is not None, timeout=60, what="server")
        assert accepted(location, first), log.read_text()
        yield location, tokens, proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first not in log.read_text()


def current(tokens: Path) -> str:
    return json.loads(tokens.read_text())[0]["token"]


def test_a_changed_tokens_file_applies_within_seconds(server: tuple[str, Path, subprocess.Popen[bytes], Path]) -> None:
    location, tokens, _, log = server
    old, new = current(tokens), token()
    write_tokens(tokens, old, new)  # rotation: add the new token, move clients over...
    wait_until(lambda: accepted(location, new), timeout=10, what="the new token")
    assert accepted(location, old)
    write_tokens(tokens, new)  # ...then remove the old one
    wait_until(lambda: accepted(location, old) is False, timeout=10, what="the old token to be refused")
    assert accepted(location, new)

    tokens.write_text(f'[{{"name": "broken", "token": "{token()}"')  # a half-written file: not JSON or YAML
    # The file is checked on calls (at most once a second): each poll makes one, with the token in force.
    refused = "not reloaded, the previous tokens stay in force"
    wait_until(lambda: accepted(location, new) and refused in log.read_text(), timeout=10, what="the refusal")
    text = log.read_text()
    assert new not in text and old not in text and "reloaded: 2 token(s)" in text


def test_sighup_reloads_at_once(server: tuple[str, Path, subprocess.Popen[bytes], Path]) -> None:
    """A change the file's modification time, size and inode do not show (rewritten in place, mtime put back)
    is only seen on SIGHUP."""
    location, tokens, proc, log = server
    old, new = current(tokens), token()
    stat = tokens.stat()
    tokens.write_text(tokens.read_text().replace(old, new[: len(old)].ljust(len(old), "x")))
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement = current(tokens)
    assert tokens.stat().st_size == stat.st_size and tokens.stat().st_ino == stat.st_ino
    assert accepted(location, old) and not accepted(location, replacement)  # unchanged to the server
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: accepted(location, replacement), timeout=10, what="SIGHUP to reload the tokens")
    assert accepted(location, old) is False
    assert "SIGHUP: reloading the tokens file" in log.read_text()
