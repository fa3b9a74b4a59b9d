"""Arrow buffers at the addresses Rust's Arrow requires before pyiceberg-core reads them.

Flight keeps the record batches it receives in gRPC's own memory, which sits at any address (apache/arrow#32276),
and the server cannot ask it to align them (pyarrow takes IPC read options on client calls only). arrow-rs panics
on a buffer its values' type does not divide the address of: an int64 column at an odd address fails a put, or not,
by chance. `aligned` copies just those buffers, before any pyiceberg-core transform.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def aligned(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """`column` with each buffer at an address its values' width divides: misaligned buffers are copied, the rest
    shared; `column` itself when all are aligned. Structs are aligned field by field; lists, maps and dictionary
    columns are left as they are (no partition source is in them)."""
    chunks = column.chunks
    fixed = [aligned_array(chunk) for chunk in chunks]
    if all(new is old for new, old in zip(fixed, chunks, strict=True)):
        return column
    return pa.chunked_array(fixed, column.type)


def aligned_array(chunk: pa.Array) -> pa.Array:
    """`aligned` of one array."""
    kind = chunk.type.storage_type if isinstance(chunk.type, pa.BaseExtensionType) else chunk.type
    if pa.types.is_struct(chunk.type):  # a partition source may be one of its fields
        children = chunk.flatten()  # at the struct's offset, its nulls included
        fixed_children = [aligned_array(child) for child in children]
        if all(new is old for new, old in zip(fixed_children, children, strict=True)):
            return chunk
        mask = chunk.is_null() if chunk.null_count else None
        return pa.StructArray.from_arrays(fixed_children, fields=list(kind), mask=mask)
    if kind.num_fields or pa.types.is_dictionary(kind):
        return chunk
    buffers = chunk.buffers()
    fixed = [
        buffer if buffer is None or buffer.address % _alignment(kind, index) == 0 else _copy(buffer)
        for index, buffer in enumerate(buffers)
    ]
    if all(new is old for new, old in zip(fixed, buffers, strict=True)):
        return chunk
    return pa.Array.from_buffers(chunk.type, len(chunk), fixed, chunk.null_count, chunk.offset)


def _alignment(kind: pa.DataType, index: int) -> int:
    """The alignment arrow-rs requires of buffer `index` of a flat array of `kind`: its values' width (16 bytes at
    most: decimals are i128); none for validity bitmaps, booleans and bytes."""
    if index == 0 or pa.types.is_boolean(kind) or pa.types.is_fixed_size_binary(kind):
        return 1
    if pa.types.is_binary_view(kind) or pa.types.is_string_view(kind):
        return 16 if index == 1 else 1  # views, then the data
    if pa.types.is_large_binary(kind) or pa.types.is_large_string(kind):
        return 8 if index == 1 else 1  # offsets, then the data
    if pa.types.is_binary(kind) or pa.types.is_string(kind):
        return 4 if index == 1 else 1
    return min(kind.bit_width // 8, 16)


def _copy(buffer: pa.Buffer) -> pa.Buffer:
    """A copy of `buffer` in Arrow's memory pool, which allocates at 64-byte boundaries."""
    copy = pa.allocate_buffer(buffer.size)
    np.frombuffer(copy, np.uint8)[:] = np.frombuffer(buffer, np.uint8)
    return copy
