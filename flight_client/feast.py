"""Feast feature views as feature tables: the definitions a migration from Feast needs.

Feast is not needed (nor imported): `tables_from_feature_views` reads anything shaped like Feast's
objects (`FeatureView`, `Entity`, `Field`, a batch source with `timestamp_field`) or plain dicts of
the same fields, such as a YAML description loaded with `yaml.safe_load`. docs/feast.md shows the
migration end to end.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from flight_client import inputs

if TYPE_CHECKING:
    from flight_client.client import FeatureClient, WriteResult

UTC_MICROS = pa.timestamp("us", tz="UTC")

# Feast's type names (`feast.types`, and the older `ValueType` names) as Arrow types.
FEAST_TYPES: dict[str, pa.DataType] = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float": pa.float32(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "bytes": pa.binary(),
    "unixtimestamp": UTC_MICROS,
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(d|h|m|s)?\s*$")
_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1, None: 1}


@dataclass(frozen=True)
class FeatureTable:
    """A feature view as a feature table: what `FeatureClient.write` needs to create it."""

    name: str
    entity_keys: list[str]
    event_time: str
    created_time: str | None
    ttl_seconds: int | None
    schema: pa.Schema  # keys, event time, created time, then the features
    source_path: str | None  # the view's batch source file or folder, when it names one

    def write_options(self) -> dict[str, Any]:
        """Keyword arguments of `FeatureClient.write` that create this table on its first write."""
        return {
            "entity_keys": self.entity_keys,
            "event_time": self.event_time,
            "created_time": self.created_time,
            "ttl": self.ttl_seconds,
        }

    def write(self, client: FeatureClient, data: Any, **options: Any) -> WriteResult:
        """Write `data` (the view's rows, from Feast's offline store) to the table, creating it; columns
        the schema names are cast to its types, so a view's declared types win over the file's."""
        table = _typed(data, self.schema)
        return client.write(self.name, table, **self.write_options(), **options)


def tables_from_feature_views(
    views: Iterable[Any], entities: Iterable[Any] = (), namespace: str | None = None
) -> list[FeatureTable]:
    """One `FeatureTable` per Feast feature view (an object or a dict with Feast's field names).

    The table is named after the view (`<namespace>.<view>` when `namespace` is given), so Feast's
    feature references `view:feature` name it as they are. Join keys come from the view's
    `entity_columns` or `join_keys`, else from its `entities`: Entity objects (or names looked up in
    `entities`) with `join_keys` / `join_key`, a bare name being its own join key, as in Feast. A
    `ttl` of zero or none means no TTL, as in Feast.
    """
    known = {_get(e, "name"): e for e in entities}
    return [_table(view, known, namespace) for view in views]


def _typed(data: Any, schema: pa.Schema) -> pa.Table:
    """`data` as a table, its columns that `schema` names cast to the schema's types."""
    table = inputs.to_table(data)
    for i, name in enumerate(table.column_names):
        if name in schema.names and table.schema.field(i).type != schema.field(name).type:
            table = table.set_column(i, name, table.column(i).cast(schema.field(name).type))
    return table


def _table(view: Any, known: Mapping[str, Any], namespace: str | None) -> FeatureTable:
    name = str(_get(view, "name"))
    source = _get(view, "batch_source") or _get(view, "source") or {}
    event_time = _get(view, "timestamp_field") or _get(source, "timestamp_field")
    if not event_time:
        raise ValueError(f"feature view {name!r} names no timestamp field (batch_source.timestamp_field)")
    created = _get(view, "created_timestamp_column") or _get(source, "created_timestamp_column") or None
    fields = [*(_get(view, "entity_columns") or []), *(_get(view, "schema") or _get(view, "features") or [])]
    types = {str(_get(f, "name")): _arrow_type(_get(f, "dtype"), name, f) for f in fields if _get(f, "dtype")}
    keys = _join_keys(view, known)
    if not keys:
        raise ValueError(f"feature view {name!r} has no entities, so its table would have no key")
    missing = [k for k in keys if k not in types]
    if missing:
        raise ValueError(f"feature view {name!r}: give the type of join key(s) {missing} in its schema")
    columns = [(k, types[k]) for k in keys] + [(event_time, UTC_MICROS)]
    columns += [(created, UTC_MICROS)] if created else []
    columns += [(n, t) for n, t in types.items() if n not in {k for k, _ in columns}]
    return FeatureTable(
        name=f"{namespace}.{name}" if namespace else name,
        entity_keys=keys,
        event_time=str(event_time),
        created_time=str(created) if created else None,
        ttl_seconds=_seconds(_get(view, "ttl"), name),
        schema=pa.schema(columns),
        source_path=_get(source, "path") or None,
    )


def _join_keys(view: Any, known: Mapping[str, Any]) -> list[str]:
    columns = _get(view, "entity_columns")
    if columns:
        return [str(_get(c, "name")) for c in columns]
    if _get(view, "join_keys"):
        return [str(k) for k in _get(view, "join_keys")]
    keys: list[str] = []
    for entity in _get(view, "entities") or []:
        entity = known.get(entity, entity) if isinstance(entity, str) else entity
        if isinstance(entity, str):
            keys.append(entity)
        else:
            given = _get(entity, "join_keys") or [_get(entity, "join_key") or _get(entity, "name")]
            keys += [str(k) for k in given]
    return keys


def _arrow_type(dtype: Any, view: str, field: Any) -> pa.DataType:
    """A Feast type (`Int64`, `Float32`, `Array(String)`, `ValueType.INT64`, or its name) as Arrow."""
    if isinstance(dtype, pa.DataType):
        return dtype
    text = getattr(dtype, "name", None) if not isinstance(dtype, str) and hasattr(dtype, "value") else None
    text = (text or str(dtype)).lower().replace("_", "").removeprefix("valuetype.")
    inner = re.fullmatch(r"array\((.+)\)|(.+)list", text)
    if inner:
        return pa.list_(_arrow_type(inner.group(1) or inner.group(2), view, field))
    if text not in FEAST_TYPES:
        raise ValueError(f"feature view {view!r}: field {_get(field, 'name')!r} has type {dtype}, unknown here")
    return FEAST_TYPES[text]


def _seconds(ttl: Any, view: str) -> int | None:
    """Feast's TTL (a timedelta, seconds, or text such as '2h' / '86400s') in seconds; zero means none."""
    if ttl is None:
        return None
    if isinstance(ttl, dt.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)):
        seconds = float(ttl)
    else:
        match = _DURATION.match(str(ttl))
        if match is None:
            raise ValueError(f"feature view {view!r}: ttl {ttl!r} is not a duration such as 86400, '2h' or '1d'")
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    return int(seconds) or None


def _get(obj: Any, name: str) -> Any:
    """A field of a Feast object or of a dict describing one."""
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
