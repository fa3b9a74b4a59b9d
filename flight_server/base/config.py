"""Server configuration: where the catalog is and how the server behaves.

Catalog properties are exactly pyiceberg's (`type`, `uri`, `warehouse`, `s3.endpoint`, ...) and
come from, in increasing precedence: pyiceberg's own configuration of a named catalog
(`.pyiceberg.yaml`, `PYICEBERG_CATALOG__<NAME>__*`), a YAML/JSON file (flat, or pyiceberg's nested
layout), `FLIGHT_SERVER_CATALOG__*` environment variables, and `--catalog-property key=value` flags.
With none of them and no catalog name the server uses the embedded default: a SQLite catalog and a
local warehouse folder. A name nothing configures is an error. docs/configuration.md lists it all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import strictyaml  # pyiceberg's own YAML reader, always installed with it
from pyiceberg.utils.config import Config
from sqlalchemy.exc import OperationalError

ENV_CATALOG_PREFIX = "FLIGHT_SERVER_CATALOG__"

DEFAULT_CATALOG_NAME = "default"

# Shorter values of secret-looking keys are not looked for in error messages: masking every "1" or "on"
# would garble the message and protect nothing.
MIN_SECRET_CHARS = 3

# Where pyiceberg looks for a catalog's properties, for errors that say where a name was looked up.
PYICEBERG_SOURCES = (
    ".pyiceberg.yaml ($PYICEBERG_HOME, ~ or the working directory) nor PYICEBERG_CATALOG__{}__* variables"
)

# Any key naming a credential: access-key ids and secret keys, session tokens, passwords, account keys,
# private keys, authorization headers.
_SECRET_KEY = re.compile(r"secret|passw|token|credential|session|key|authorization|private", re.IGNORECASE)

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z0-9+.\-]+://[^:/@\s]*:)(?P<password>[^@\s]+)@", re.IGNORECASE)


@dataclass
class ServerConfig:
    """Everything the server needs to start; defaults give the embedded laptop setup.

    These defaults are also the command line's: base/settings.py gives the fields their flags and variables.
    """

    host: str = "127.0.0.1"
    port: int = 8815
    warehouse: str = "./warehouse"
    catalog_name: str = DEFAULT_CATALOG_NAME
    catalog_properties: dict[str, str] = field(default_factory=dict)
    default_namespace: str = "default"
    batch_rows: int = 131_072
    write_chunk_bytes: int = 128 << 20
    duckdb_memory_limit: str = "4GB"
    duckdb_threads: int | None = None
    duckdb_temp_dir: str | None = None
    commit_timeout_seconds: float = 120.0
    group_commit: bool = True
    group_commit_linger_seconds: float = 0.1
    # Puts, deletes and compactions in a child process (transport/offload.py), wherever one can run.
    write_process: bool = os.name == "posix"
    historical_partitions: int = 1
    historical_cache_bytes: int = 4 << 30
    online_tables: list[str] = field(default_factory=list)
    online_refresh_seconds: float = 0.5
    online_max_bytes: int = 2 << 30
    scan_partitions: int = 1
    scan_cache_bytes: int = 1 << 30
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
    log_format: str = "text"  # or "json"; JSON logs and metrics both track every call (request ids)
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str | None = None  # None: --host
    # Automatic maintenance (changes/upkeep.py); a table's own properties override the last four.
    auto_maintenance: bool = True
    maintenance_interval_seconds: float = 60.0
    shared_maintenance: bool = True  # with peers: each table maintained by its owner only (changes/upkeep.py)
    expire_snapshot_age_ms: int = 24 * 3600 * 1000
    expire_min_snapshots: int = 100
    expire_max_snapshots: int = 2000  # 0: no cap
    expire_cap_min_age_ms: int = 3600 * 1000
    compact_min_files: int = 10
    memory_budget_bytes: int | None = None  # None: half the machine's memory (base/memory.py default_budget)

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


class CatalogError(ValueError):
    """The catalog cannot be configured or opened. The message is one line, fit to show as is: secrets masked."""


def catalog_failure(name: str, props: Mapping[str, Any], exc: BaseException) -> str:
    """One line saying why catalog `name` did not open: `cannot reach the catalog at URI (connection refused)`
    when the network said no, else the library's own message; secrets masked either way."""
    where = props.get("uri") or props.get("warehouse")
    reason = _network_reason(exc)
    if reason:
        return redact_text(f"cannot reach the catalog at {where or name} ({reason})", props)
    return redact_text(f"cannot open the catalog {name!r}{f' at {where}' if where else ''}: {_line(exc)}", props)


def _network_reason(exc: BaseException) -> str | None:
    """Why a connection failed, from the socket error somewhere in the chain (requests and urllib3 wrap it
    three deep, SQLAlchemy keeps the driver's error in `orig`), or None when no connection failed."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror.lower()
        if isinstance(error, OperationalError):  # SQLAlchemy's: the driver's first line ends with the reason
            first = (str(error.orig).strip().splitlines() or [""])[0]
            return first.rsplit(": ", 1)[-1].rstrip(".").lower() or _line(error)
        for link in (error.__cause__, error.__context__, getattr(error, "reason", None)):
            if isinstance(link, BaseException):
                pending.append(link)
    return None


def read_catalog_file(path: str | Path) -> dict[str, str]:
    """The catalog properties a YAML or JSON file gives (`read_catalog_entry` says which)."""
    return read_catalog_entry(path)[1]


def read_catalog_entry(path: str | Path, name: str | None = None) -> tuple[str | None, dict[str, str]]:
    """The catalog name and properties a YAML or JSON file gives: a flat mapping of properties (no name), or
    pyiceberg's layout `catalog: {NAME: {properties}}`, of which `name`'s entry or else the file's
    `default-catalog`, its only entry or its `default` one (names and keys lowercased, as pyiceberg does)."""
    text = Path(path).read_text()
    is_json = str(path).endswith(".json")
    data: Any
    try:
        data = (json.loads(text) if text.strip() else None) if is_json else strictyaml.load(text).data
    except (ValueError, strictyaml.YAMLError) as exc:
        raise CatalogError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {_line(exc)}") from None
    if not data or not any(line.split("#", 1)[0].strip() for line in text.splitlines()):  # YAML of comments only
        raise CatalogError(f"{path}: no catalog properties in the file")
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping of catalog properties")
    if not isinstance(data.get("catalog"), dict):
        return None, _flat(data, str(path))
    catalogs = {str(k).lower(): v for k, v in data["catalog"].items()}
    chosen = _choose(catalogs, name.lower() if name else data.get("default-catalog"), str(path))
    entry = catalogs[chosen]
    if not isinstance(entry, dict) or not entry:
        raise CatalogError(f"{path}: catalog {chosen!r} has no properties")
    return chosen, _flat({str(k).lower(): v for k, v in entry.items()}, f"{path}: catalog {chosen!r}")


def _choose(catalogs: dict[str, Any], name: Any, where: str) -> str:
    """The entry of pyiceberg's `catalog:` mapping to use: the one named, else the only one, else `default`."""
    known = ", ".join(sorted(catalogs)) or "none"
    if name:
        if str(name).lower() not in catalogs:
            raise CatalogError(f"{where}: no catalog named {str(name)!r} (it names: {known})")
        return str(name).lower()
    if len(catalogs) == 1:
        return next(iter(catalogs))
    if DEFAULT_CATALOG_NAME in catalogs:
        return DEFAULT_CATALOG_NAME
    raise CatalogError(f"{where}: several catalogs ({known}) and none is 'default': choose one with --catalog-name")


def _flat(data: Mapping[Any, Any], where: str) -> dict[str, str]:
    """Properties as strings; a mapping where a value belongs is a layout mistake, not a property."""
    for key, value in data.items():
        if isinstance(value, dict | list):
            raise CatalogError(
                f"{where}: property {str(key)!r} holds a {type(value).__name__}, not a value "
                "(pyiceberg's nested layout is `catalog: {NAME: {properties}}`)"
            )
    return {str(k): str(v) for k, v in data.items()}


def pyiceberg_catalog(name: str) -> dict[str, str]:
    """The properties pyiceberg's own configuration gives catalog `name` (what `load_catalog(name)` starts from),
    read now: its `.pyiceberg.yaml` and its `PYICEBERG_CATALOG__<NAME>__<KEY>` variables."""
    try:
        entry = Config().get_catalog_config(name)
    except (ValueError, strictyaml.YAMLError) as exc:  # a malformed .pyiceberg.yaml or variable
        raise CatalogError(f"pyiceberg's configuration: {_line(exc)}") from None
    return _flat(entry, f"pyiceberg's configuration of catalog {name!r}") if entry else {}


def catalog_settings(
    name: str | None, file: str | Path | None, flags: Mapping[str, str], environ: Mapping[str, str] = os.environ
) -> tuple[str, dict[str, str]]:
    """The catalog's name and properties from every source, lowest precedence first: pyiceberg's configuration
    of the catalog (when one is named, by `name` or the file's pick), the file, the environment, the flags.

    No properties at all means the embedded default (`resolved_catalog_properties`), but only for the unnamed
    catalog: a name that nothing configures is an error, never an empty catalog of that name.
    """
    from_file: dict[str, str] = {}
    if file is not None:
        picked, from_file = read_catalog_entry(file, name)
        name = name or picked
    own = pyiceberg_catalog(name) if name else {}
    props = {**own, **from_file, **catalog_properties_from_env(environ), **flags}
    if name and not props:
        raise CatalogError(
            f"no catalog named {name!r}: neither {PYICEBERG_SOURCES.format(name.upper())} configure it, "
            "and no --catalog-config, --catalog-property or FLIGHT_SERVER_CATALOG__* variable gives properties"
        )
    return name or DEFAULT_CATALOG_NAME, props


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


def redact_text(text: str, props: Mapping[str, Any]) -> str:
    """`text` (an error message from a catalog library) with every secret of `props` and every URI password
    masked: such messages may quote a connection string or a request."""
    for secret in sorted(_secrets(props), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _URI_PASSWORD.sub(r"\g<scheme>***@", text)


def _secrets(value: Any, secret: bool = False) -> set[str]:
    """The values under secret-looking keys, at any depth, and the passwords inside URIs."""
    if isinstance(value, Mapping):
        return {s for key, item in value.items() for s in _secrets(item, secret or bool(_SECRET_KEY.search(str(key))))}
    if isinstance(value, list | tuple):
        return {s for item in value for s in _secrets(item, secret)}
    text = str(value)
    found = {match.group("password") for match in _URI_PASSWORD.finditer(text)}
    return found | ({text} if secret and len(text) >= MIN_SECRET_CHARS else set())


def _line(exc: BaseException) -> str:
    """An exception's message as one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
