"""Server configuration: where the catalog is and how the server behaves.

Catalog properties are exactly pyiceberg's (`type`, `uri`, `warehouse`, `s3.endpoint`, ...) and
come from, in increasing precedence: a YAML/JSON file, `FLIGHT_SERVER_CATALOG__*` environment
variables, and `--catalog-property key=value` flags. With none of them the server uses the
embedded default: a SQLite catalog and a local warehouse folder. docs/configuration.md lists it all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_CATALOG_PREFIX = "FLIGHT_SERVER_CATALOG__"

# Any key naming a credential: access-key ids and secret keys, session tokens, passwords, account keys.
_SECRET_KEY = re.compile(r"secret|passw|token|credential|session|key", re.IGNORECASE)

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z0-9+.\-]+://[^:/@\s]+:)[^@\s]+@", re.IGNORECASE)


@dataclass
class ServerConfig:
    """Everything the server needs to start; defaults give the embedded laptop setup.

    These defaults are also the command line's: base/settings.py gives the fields their flags and variables.
    """

    host: str = "127.0.0.1"
    port: int = 8815
    warehouse: str = "./warehouse"
    catalog_name: str = "default"
    catalog_properties: dict[str, str] = field(default_factory=dict)
    default_namespace: str = "default"
    batch_rows: int = 131_072
    write_chunk_bytes: int = 128 << 20
    duckdb_memory_limit: str = "4GB"
    duckdb_threads: int | None = None
    duckdb_temp_dir: str | None = None
    commit_timeout_seconds: float = 120.0
    historical_partitions: int = 1
    historical_cache_bytes: int = 4 << 30
    online_tables: list[str] = field(default_factory=list)
    online_refresh_seconds: float = 0.5
    online_max_bytes: int = 2 << 30
    scan_partitions: int = 1
    # Deployment: where replicas are reached, who may call, how much at once.
    advertise: str | None = None
    peers: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: list[dict[str, Any]] = field(default_factory=list, repr=False)
    auth_tokens_file: str | None = None  # re-read when it changes (token rotation without a restart)
    max_concurrent_requests: int = 0
    max_request_bytes: int = 1 << 20
    max_exchange_bytes: int = 0
    max_concurrent_per_caller: int = 0
    max_batch_bytes: int = 0
    idle_timeout_seconds: float = 0.0
    # Automatic maintenance (changes/upkeep.py); a table's own properties override the last three.
    auto_maintenance: bool = True
    maintenance_interval_seconds: float = 60.0
    expire_snapshot_age_ms: int = 24 * 3600 * 1000
    expire_min_snapshots: int = 100
    compact_min_files: int = 10

    @property
    def scheme(self) -> str:
        return "grpc+tls" if self.tls_cert else "grpc"

    def endpoint_locations(self) -> list[str]:
        """The replicas `get_flight_info` spreads endpoints over: this one (as advertised) and its peers."""
        if self.peers and not self.advertise:
            raise ValueError("--peer needs --advertise: the address under which clients reach this server")
        locations = [self.advertise, *self.peers] if self.advertise else []
        return list(dict.fromkeys(locations))

    def resolved_catalog_properties(self) -> dict[str, str]:
        """The catalog properties to load, filling in the embedded default where unset."""
        props = dict(self.catalog_properties)
        if "type" not in props and "uri" not in props:
            root = Path(self.warehouse).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            props.update(type="sql", uri=f"sqlite:///{root / 'catalog.db'}")
            props.setdefault("warehouse", root.as_uri())
        elif "warehouse" not in props and props.get("type", "sql") == "sql":
            root = Path(self.warehouse).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            props["warehouse"] = root.as_uri()
        return props


def read_catalog_file(path: str | Path) -> dict[str, str]:
    """Catalog properties from a YAML or JSON file (a flat mapping of strings)."""
    text = Path(path).read_text()
    data: Any
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import strictyaml  # pyiceberg's own YAML reader, always installed with it

        data = strictyaml.load(text).data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of catalog properties")
    return {str(k): str(v) for k, v in data.items()}


def catalog_properties_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`FLIGHT_SERVER_CATALOG__S3__ENDPOINT=...` becomes `s3.endpoint` (pyiceberg's convention)."""
    props = {}
    for name, value in environ.items():
        if name.startswith(ENV_CATALOG_PREFIX):
            key = name[len(ENV_CATALOG_PREFIX) :].lower().replace("__", ".").replace("_", "-")
            props[key] = value
    return props


def parse_property_flags(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`key=value` strings from the command line."""
    props = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"catalog property {pair!r} is not of the form key=value")
        props[key.strip()] = value
    return props


def redact(props: Mapping[str, Any]) -> dict[str, Any]:
    """Properties safe to log or return from `describe`: values of secret-looking keys masked at any depth
    (a nested mapping or a list of them), URI passwords masked everywhere else. An access-key id is masked
    too: it names the account a leaked secret would open."""
    return {key: "***" if _SECRET_KEY.search(str(key)) else _redact_value(value) for key, value in props.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return _URI_PASSWORD.sub(r"\g<scheme>***@", str(value))
