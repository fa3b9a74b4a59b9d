"""Authentication, permissions, TLS and mutual TLS against real servers."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError, PermissionDeniedError, UnauthenticatedError
from flight_server.base.config import ServerConfig
from flight_server.transport.actions import ACTIONS
from flight_server.transport.auth import ADMIN, READ, TokenStore, load_tokens
from tests.certs import Authority
from tests.conftest import sqlite_catalog, start_server

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
READER_TOKEN = "reader-" + uuid.uuid4().hex
WRITER_TOKEN = "writer-" + uuid.uuid4().hex
TEAM_TOKEN = "team-" + uuid.uuid4().hex
READER_PASSWORD = "password-" + uuid.uuid4().hex
TOKENS = [
    {"name": "ops", "token": ADMIN_TOKEN, "permissions": ["read", "write", "admin"]},
    {"name": "notebooks", "token": READER_TOKEN, "permissions": ["read"], "password": READER_PASSWORD},
    {"name": "pipeline", "token": WRITER_TOKEN, "permissions": ["write"]},
    {"name": "team-a", "token": TEAM_TOKEN, "permissions": ["read", "write"], "namespaces": ["team_a"]},
]
SECRETS = [t["token"] for t in TOKENS] + [READER_PASSWORD]
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def rows(n: int = 4) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(range(n), pa.int64()),
            "event_timestamp": pa.array([T0 + dt.timedelta(hours=i) for i in range(n)], pa.timestamp("us", "UTC")),
            "rate": pa.array([i / 10 for i in range(n)], pa.float64()),
        }
    )


def create(client: FeatureClient, table: str) -> None:
    client.write(table, rows(), entity_keys=["driver_id"], event_time="event_timestamp")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("auth-warehouse"))


@pytest.fixture(scope="module")
def secured(catalog: dict[str, str]) -> Iterator[str]:
    """A server that requires tokens, with tables in namespaces `shared` and `team_a`."""
    server = start_server(catalog, auth_tokens=TOKENS)
    location = f"grpc://127.0.0.1:{server.port}"
    with FeatureClient(location, token=ADMIN_TOKEN) as admin:
        create(admin, "shared.drivers")
        create(admin, "team_a.drivers")
    yield location
    server.shutdown()


CALLS = {
    "health": lambda c: c.health(),
    "list_tables": lambda c: c.tables(),
    "describe": lambda c: c.describe("shared.drivers"),
    "scan": lambda c: c.scan("shared.drivers").read_all(),
    "read_table": lambda c: c.read_table("shared.drivers", partitions=2),
    "training set": lambda c: c.get_historical_features(
        {"driver_id": [1], "event_timestamp": ["2025-01-02T00:00:00Z"]}, ["shared.drivers:rate"]
    ),
    "online": lambda c: c.get_online_features({"driver_id": [1]}, ["shared.drivers:rate"]),
    "write": lambda c: c.write("shared.drivers", rows()),
    "list_flights": lambda c: list(c._client.list_flights(options=c._options)),
}
READS = [name for name in CALLS if name != "write"]


@pytest.mark.parametrize("call", list(CALLS))
def test_every_call_needs_a_token(secured: str, call: str) -> None:
    refused = (UnauthenticatedError, flight.FlightUnauthenticatedError)  # list_flights is pyarrow's own
    with FeatureClient(secured) as client, pytest.raises(refused) as e:
        CALLS[call](client)
    assert "requires a bearer token" in str(e.value)


@pytest.mark.parametrize("call", ["health", "scan", "write"])
def test_a_wrong_token_is_refused_without_being_echoed(secured: str, call: str) -> None:
    wrong = ADMIN_TOKEN[:-1] + "x"
    with FeatureClient(secured, token=wrong) as client, pytest.raises(UnauthenticatedError) as e:
        CALLS[call](client)
    assert "not valid" in str(e.value)
    assert wrong not in str(e.value)


def test_a_malformed_authorization_header_is_refused(secured: str) -> None:
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Basic {READER_TOKEN}".encode())])
    with flight.connect(secured) as raw, pytest.raises(flight.FlightUnauthenticatedError, match="Bearer <token>"):
        list(raw.do_action(flight.Action("health", b""), options))


@pytest.mark.parametrize("call", list(CALLS))
def test_admin_may_do_everything(secured: str, call: str) -> None:
    with FeatureClient(secured, token=ADMIN_TOKEN) as client:
        CALLS[call](client)


@pytest.mark.parametrize("call", READS)
def test_read_permission_reads(secured: str, call: str) -> None:
    with FeatureClient(secured, token=READER_TOKEN) as client:
        CALLS[call](client)


def test_read_permission_does_not_write(secured: str) -> None:
    with FeatureClient(secured, token=READER_TOKEN) as client:
        before = client.describe("shared.drivers")["current_snapshot_id"]
        with pytest.raises(PermissionDeniedError) as e:
            client.write("shared.drivers", rows())
        assert "token 'notebooks' lacks the 'write' permission that do_put needs" in str(e.value)
        assert client.describe("shared.drivers")["current_snapshot_id"] == before


@pytest.mark.parametrize("call", ["health", "scan", "training set", "online", "describe"])
def test_write_permission_alone_does_not_read(secured: str, call: str) -> None:
    with FeatureClient(secured, token=WRITER_TOKEN) as client:
        client.write("shared.drivers", rows().slice(0, 1))
        with pytest.raises(PermissionDeniedError, match="lacks the 'read' permission"):
            CALLS[call](client)


def test_basic_authentication_logs_in_for_the_token(secured: str) -> None:
    with FeatureClient(secured, username="notebooks", password=READER_PASSWORD) as client:
        assert client.scan("shared.drivers").read_all().num_rows >= rows().num_rows
        with pytest.raises(PermissionDeniedError, match="token 'notebooks' lacks the 'write' permission"):
            client.write("shared.drivers", rows())
    for name, password in (("notebooks", READER_PASSWORD + "x"), ("ops", READER_PASSWORD), ("pipeline", "")):
        with pytest.raises(UnauthenticatedError, match="wrong user name or password") as e:
            FeatureClient(secured, username=name, password=password)
        assert READER_PASSWORD not in str(e.value)


def test_maintenance_actions_need_admin() -> None:
    assert [ACTIONS[a].permission for a in ("health", "describe", "list_tables")] == [READ] * 3
    maintenance = ("delete", "compact", "expire_snapshots", "pin", "unpin")
    assert [ACTIONS[a].permission for a in maintenance] == [ADMIN] * 5


def test_namespaced_token_uses_its_namespace_only(secured: str) -> None:
    with FeatureClient(secured, token=TEAM_TOKEN) as client:
        assert client.scan("team_a.drivers").read_all().num_rows == rows().num_rows
        client.write("team_a.new_table", rows(), entity_keys=["driver_id"], event_time="event_timestamp")
        assert {t["table"] for t in client.tables()} == {"team_a.drivers", "team_a.new_table"}
        names = [info.descriptor.path[0].decode() for info in client._client.list_flights(options=client._options)]
        assert sorted(names) == ["team_a.drivers", "team_a.new_table"]
        with pytest.raises(PermissionDeniedError, match="may not use namespace 'shared'"):
            client.get_historical_features(
                {"driver_id": [1], "event_timestamp": ["2025-01-02T00:00:00Z"]},
                ["team_a.drivers:rate", "shared.drivers:rate"],
            )
        with pytest.raises(PermissionDeniedError, match="may not use namespace 'shared'"):
            client.write("shared.drivers", rows())


@pytest.mark.parametrize("call", ["scan", "describe", "online"])
def test_forbidden_and_missing_tables_look_the_same(secured: str, call: str) -> None:
    """A namespaced token learns nothing about which tables exist in other namespaces."""
    requests = {
        "scan": lambda c, t: c.scan(t).read_all(),
        "describe": lambda c, t: c.describe(t),
        "online": lambda c, t: c.get_online_features({"driver_id": [1]}, [f"{t}:rate"]),
    }
    answers = []
    with FeatureClient(secured, token=TEAM_TOKEN) as client:
        for table in ("shared.drivers", "shared.no_such_table"):
            with pytest.raises(PermissionDeniedError) as e:
                requests[call](client, table)
            answers.append((type(e.value), e.value.code, str(e.value).replace(table, "<table>")))
    assert answers[0] == answers[1]
    assert "may not use namespace 'shared'" in answers[0][2]


def test_tokens_never_reach_logs_errors_or_replies(catalog: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(catalog, auth_tokens=TOKENS)
    location = f"grpc://127.0.0.1:{server.port}"
    replies = []
    try:
        for token in (*SECRETS, ADMIN_TOKEN + "x", None):
            with FeatureClient(location, token=token) as client:
                with contextlib.suppress(FeatureServerError):
                    FeatureClient(location, username="notebooks", password=token or "").close()
                for call in ("health", "describe", "list_tables", "scan", "write"):
                    try:
                        replies.append(json.dumps(CALLS[call](client), default=str))
                    except FeatureServerError as exc:
                        replies.append(str(exc))
    finally:
        server.shutdown()
    assert "token 'notebooks' lacks" in "\n".join(replies)  # the refusals are in there
    assert "do_put refused: token 'notebooks' lacks the 'write' permission" in caplog.text  # and logged
    assert "do_action refused: the bearer token is not valid" in caplog.text
    text = "\n".join(replies) + caplog.text + repr(server.config)
    assert not [secret for secret in SECRETS if secret in text]


def test_token_lists_are_checked_without_quoting_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- name: ops\n  token: short\n  permissions:\n    - read\n")
    with pytest.raises(ValueError, match="at least 16 characters") as e:
        TokenStore(load_tokens(str(path), {}))
    assert "short" not in str(e.value).replace("16 characters", "")
    path.write_text("- name: ops\n  token: secret-secret-secret\n  permissions:\n    - read\n    - delete\n")
    with pytest.raises(ValueError, match="permissions"):
        TokenStore(load_tokens(str(path), {}))
    with pytest.raises(ValueError, match="neither JSON nor YAML") as e:
        load_tokens(None, {"FLIGHT_SERVER_AUTH_TOKENS": "[{'token': 'secret-secret-secret'"})
    assert "secret-secret-secret" not in str(e.value)
    # One list from the file and one from the environment: both apply.
    path.write_text(json.dumps(TOKENS[:1]))
    store = TokenStore(load_tokens(str(path), {"FLIGHT_SERVER_AUTH_TOKENS": json.dumps(TOKENS[1:2])}))
    assert store.authenticate(ADMIN_TOKEN).name == "ops"  # type: ignore[union-attr]
    assert store.authenticate(READER_TOKEN).name == "notebooks"  # type: ignore[union-attr]
    assert store.authenticate(READER_TOKEN[:-1]) is None


# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A CA with a server and a client certificate, and a rogue CA with a client certificate of its own."""
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "ca"), Authority(directory, "rogue")
    return {
        "ca": ca.cert_path,
        "rogue_ca": rogue.cert_path,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
    }


def tls_server(catalog: dict[str, str], pki: dict[str, object], mutual: bool) -> tuple[object, str]:
    server_pem = pki["server"]
    server = start_server(
        catalog,
        tls_cert=str(server_pem.cert),  # type: ignore[attr-defined]
        tls_key=str(server_pem.key),  # type: ignore[attr-defined]
        tls_client_ca=str(pki["ca"]) if mutual else None,
        auth_tokens=TOKENS,
    )
    return server, f"grpc+tls://127.0.0.1:{server.port}"


def healthy(location: str, **options: object) -> bool:
    with FeatureClient(location, timeout=10, token=READER_TOKEN, **options) as client:  # type: ignore[arg-type]
        return client.health()["status"] == "ok"


def test_tls_handshakes(catalog: dict[str, str], pki: dict[str, object]) -> None:
    server, location = tls_server(catalog, pki, mutual=False)
    try:
        assert healthy(location, tls_root_certs=pki["ca"])
        assert healthy(location, tls_root_certs=Path(pki["ca"]).read_text())  # type: ignore[arg-type]
        with pytest.raises(FeatureServerError):  # the server's CA is not among the system's
            healthy(location)
        with pytest.raises(FeatureServerError):  # signed by another CA
            healthy(location, tls_root_certs=pki["rogue_ca"])
        with pytest.raises(FeatureServerError):  # plain gRPC to a TLS port
            healthy(location.replace("grpc+tls", "grpc"))
        with FeatureClient(location, token=ADMIN_TOKEN, tls_root_certs=pki["ca"]) as client:
            create(client, "tls.drivers")
            assert client.read_table("tls.drivers").num_rows == rows().num_rows
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_mutual_tls_handshakes(catalog: dict[str, str], pki: dict[str, object]) -> None:
    server, location = tls_server(catalog, pki, mutual=True)
    client_pem, rogue_pem = pki["client"], pki["rogue_client"]
    try:
        assert healthy(location, tls_root_certs=pki["ca"], cert_chain=client_pem.cert, private_key=client_pem.key)  # type: ignore[attr-defined]
        with pytest.raises(FeatureServerError):  # no client certificate
            healthy(location, tls_root_certs=pki["ca"])
        with pytest.raises(FeatureServerError):  # a client certificate the server's CA did not sign
            healthy(location, tls_root_certs=pki["ca"], cert_chain=rogue_pem.cert, private_key=rogue_pem.key)  # type: ignore[attr-defined]
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_tls_settings_must_be_complete(catalog: dict[str, str], pki: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="needs both a certificate"):
        start_server(catalog, tls_cert=str(pki["server"].cert))  # type: ignore[attr-defined]
    assert ServerConfig(tls_cert="x", tls_key="y").scheme == "grpc+tls"


@pytest.mark.parametrize("rpc", ["get_schema", "get_flight_info"])
def test_namespace_refusals_carry_no_traceback(secured: str, rpc: str) -> None:
    """get_schema can send only INVALID_ARGUMENT and NOT_FOUND (docs/protocol.md, "Errors"): its refusal arrives as
    UNKNOWN, but like every other one its message is the explanation, without a traceback or a server path."""
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TEAM_TOKEN}".encode())])
    descriptor = flight.FlightDescriptor.for_path("shared.drivers")
    with flight.connect(secured) as raw, pytest.raises(pa.ArrowException) as e:
        getattr(raw, rpc)(descriptor, options)
    if rpc == "get_flight_info":
        assert type(e.value) is flight.FlightUnauthorizedError  # PERMISSION_DENIED
    assert "may not use namespace 'shared'" in str(e.value)
    assert not [leak for leak in ("Traceback", "/work", '.py"', 'File "', "/tmp/") if leak in str(e.value)], e.value
