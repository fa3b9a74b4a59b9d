"""A table's new metadata file, parsed reusing what the previous file of the same table was parsed to.

Every commit writes a new metadata file that repeats the table's whole history (every snapshot, the snapshot log,
the metadata log), and pyiceberg validates all of it into models: 15-110 ms for 1,501 snapshots, holding the GIL,
in every process that reads the table, each time the table changes. A commit adds entries and drops some but
leaves nearly all as they were (pyiceberg's expiry does rewrite the snapshot whose parent it expires, without its
parent), so `parse_object` validates only the entries that the previous file did not have exactly as this one has them,
and places the models already made for the others in the input, where pydantic takes them as they are
(pyiceberg's models do not ask it to validate instances again). The table metadata's own validators never look
into these lists (they check the current schema, spec and sort order, and add the main branch), so the result is
what a full parse of the file gives: `tests/test_reparse.py` compares the two after random sequences of commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyiceberg.io import FileIO
from pyiceberg.serializers import Compressor
from pyiceberg.table.metadata import TableMetadata, TableMetadataUtil
from pyiceberg.table.snapshots import Snapshot

# The metadata's lists of log entries, by key and field. Their models hold only ints and strings, converted from the
# raw JSON values alike whenever Python finds two raw entries equal (1 == 1.0 == True become the same int), so
# equal raw entries give equal models.
LOGS = {"snapshot-log": "snapshot_log", "metadata-log": "metadata_log"}


@dataclass(frozen=True)
class Parsed:
    """What a table's metadata file was parsed to, kept for its next file: each entry's model with the raw JSON it
    was validated from, so that an entry is reused only when the next file has exactly that JSON."""

    table_uuid: str
    format_version: int
    snapshots: dict[int, tuple[dict[str, Any], Snapshot]]  # by snapshot id: its raw JSON object, its model
    logs: dict[str, tuple[list[Any], list[Any]]]  # by key (`LOGS`): the raw entries, their models


def metadata_text(io: FileIO, location: str) -> str:
    """The metadata file's JSON text, read and decoded as pyiceberg reads it (gzip for `.gz.metadata.json`)."""
    with (
        io.new_input(location).open() as stream,
        Compressor.get_compressor(location).stream_decompressor(stream) as plain,
    ):
        return plain.read().decode("utf-8")


def parse_object(data: dict[str, Any], previous: Parsed | None) -> tuple[TableMetadata, Parsed | None]:
    """The table metadata in `data` (a metadata file's JSON decoded as pydantic decodes it for a full parse, or a REST
    catalog's loadTable answer's `metadata`), with the models of `previous` (the last file of the same table parsed
    here) for the entries it has unchanged, and what to keep for the next file (None: metadata without a table uuid,
    nothing to check the next one against). Nothing is reused from another table (uuid) or format version. It takes
    `data` over: its lists are replaced by models. Raises what validation raises (the caller falls back to
    pyiceberg's own load and its errors)."""
    uuid, version = data.get("table-uuid"), data.get("format-version")
    if previous is not None and (previous.table_uuid != uuid or previous.format_version != version):
        previous = None
    snapshots: dict[int, tuple[dict[str, Any], Snapshot]] = {}
    if isinstance(data.get("snapshots"), list):
        entries = []
        reusable: dict[Any, tuple[dict[str, Any], Snapshot]] = previous.snapshots if previous else {}
        for raw in data["snapshots"]:
            kept = reusable.get(raw.get("snapshot-id")) if isinstance(raw, dict) else None
            if kept is not None and kept[0] == raw:
                snapshots[kept[1].snapshot_id] = kept
                raw = kept[1]
            entries.append(raw)
        data["snapshots"] = entries
    raw_logs = {key: data[key] for key in LOGS if isinstance(data.get(key), list)}
    for key, raws in raw_logs.items():
        data[key] = _log(raws, previous.logs.get(key) if previous else None)
    metadata = TableMetadataUtil.parse_obj(data)
    if not isinstance(uuid, str) or not isinstance(version, int):
        return metadata, None
    for entry, model in zip(data.get("snapshots", ()), metadata.snapshots, strict=True):
        if entry is not model and _reusable(entry):  # validated now
            snapshots[model.snapshot_id] = (entry, model)
    logs = {key: (raws, list(getattr(metadata, LOGS[key]))) for key, raws in raw_logs.items()}
    return metadata, Parsed(uuid, version, snapshots, logs)


def _reusable(raw: Any) -> bool:
    """Whether a snapshot's model may stand for any raw snapshot equal to `raw`: its summary keeps its values as
    given (the other fields convert 1, 1.0 and True alike), so only strings there, as the spec has them; and its
    timestamp is given, not the parse's clock."""
    if not isinstance(raw, dict) or "timestamp-ms" not in raw:
        return False
    summary = raw.get("summary")
    return summary is None or (isinstance(summary, dict) and all(type(value) is str for value in summary.values()))


def _log(raws: list[Any], previous: tuple[list[Any], list[Any]] | None) -> list[Any]:
    """The raw log entries, the run of them that continues the previous log (entries appended at its end, the
    oldest dropped from its start) replaced by the previous models."""
    if previous is None or not raws:
        return raws
    old_raws, old_models = previous
    try:
        start = old_raws.index(raws[0])
    except ValueError:
        return raws
    shared = len(old_raws) - start
    if raws[:shared] != old_raws[start:]:
        return raws
    return [*old_models[start:], *raws[shared:]]
