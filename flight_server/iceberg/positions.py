"""Position delete files: Iceberg's reserved columns, and the data file a delete file refers to."""

from __future__ import annotations

import pyarrow as pa
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
)

PATH_FIELD_ID = 2147483546  # Iceberg's reserved field ids of a position delete file's columns

POS_FIELD_ID = 2147483545


def referenced_data_file(delete_file: DataFile) -> str | None:
    """The one data file a position delete file applies to, when its path bounds say so (as ours do)."""
    if delete_file.content != DataFileContent.POSITION_DELETES:
        return None
    lower = (delete_file.lower_bounds or {}).get(PATH_FIELD_ID)
    upper = (delete_file.upper_bounds or {}).get(PATH_FIELD_ID)
    return lower.decode() if lower is not None and lower == upper else None


POSITION_DELETE_SCHEMA = pa.schema(
    [
        pa.field(
            "file_path",
            pa.dictionary(pa.int32(), pa.string()),
            nullable=False,
            metadata={b"PARQUET:field_id": str(PATH_FIELD_ID).encode()},
        ),
        pa.field("pos", pa.int64(), nullable=False, metadata={b"PARQUET:field_id": str(POS_FIELD_ID).encode()}),
    ]
)
