"""PyTorch: `FlightDataset`, an `IterableDataset` over a table scan or a training set whose endpoints
are dealt out to DataLoader workers and distributed ranks, so that each reads a disjoint share and
no process holds the whole set.

    dataset = FlightDataset.training_set("grpc://server:8815", "ml.trips", ["demo.driver_stats:conv_rate"],
                                         columns=["driver_id", "conv_rate"], batch_size=4096)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_size=None, num_workers=2):
            ...  # batch: {"driver_id": tensor, "conv_rate": tensor}

Needs the `torch` extra (`pip install 'iceberg-feature-flight[torch]'`).
"""

from __future__ import annotations

import datetime as dt
import functools
import multiprocessing
import multiprocessing.context
import os
import random
import threading
import uuid
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
import pyarrow as pa
import torch
import torch.distributed
from torch.utils.data import IterableDataset, get_worker_info

from flight_client.plans import DEFAULT_PARTITIONS, Part, ReadPlan, plan_table, plan_training_set, rebatch

Batch: TypeAlias = "dict[str, torch.Tensor] | pa.RecordBatch"


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world_size, whether they come from an initialised torch.distributed process group)."""
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return rank, world_size, False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), True
    return 0, 1, False


def _tensor_type(field: pa.Field) -> pa.DataType | None:
    """The Arrow type a column is viewed as before it becomes a tensor, or None if it cannot become one."""
    t = field.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return t
    if pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_date64(t) or pa.types.is_time64(t):
        return pa.int64()
    if pa.types.is_date32(t) or pa.types.is_time32(t):
        return pa.int32()
    return None


def _check_tensor_schema(schema: pa.Schema) -> None:
    bad = [f"{f.name} ({f.type})" for f in schema if _tensor_type(f) is None]
    if bad:
        raise TypeError(
            f"columns {bad} cannot become tensors: leave them out with columns=[...], or use format='arrow'"
        )


def to_tensors(batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """A record batch as one 1-D tensor per column, sharing the Arrow buffers where the layout allows
    (numeric columns without nulls). Timestamps, dates, times and durations become their integer
    values (timestamps: in the column's unit since the epoch, UTC). Float nulls become NaN; an integer
    or boolean column holding nulls is an error."""
    tensors = {}
    with warnings.catch_warnings():
        # Arrow's buffers are read-only to numpy; the batch is ours alone, so the tensor may own them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, column in _columns(batch):
            values = _values(column)
            if column.null_count:
                values = np.where(_invalid(column), np.nan, values)
            tensors[name] = torch.from_numpy(values)
    return tensors


def shared_tensors(batch: pa.RecordBatch, blocks: _Blocks | None = None) -> dict[str, torch.Tensor]:
    """`to_tensors`, every column written into one block of shared memory: how a DataLoader worker hands a batch
    to the main process. Left to torch, each tensor would move to a shared segment of its own as it is sent (an
    allocation, a copy and a file descriptor per column and batch: 4 times the time of one block). Each column
    is copied once, straight from its Arrow buffer, its nulls then set to NaN in place. The tensors are views of
    the block, which lives while any of them does; sent to another process, the block goes once (`_OneBlock`),
    and comes back to `blocks` (this process's own by default) for reuse once the receiver has let go of all of
    it (`_Blocks`)."""
    if blocks is None:
        blocks = _BLOCKS
    columns = [(name, column, _values(column)) for name, column in _columns(batch)]
    offsets, size = [], _ALIGN  # the block's first bytes: its busy flag
    for _, _, values in columns:
        offsets.append(size)
        size += -(-values.nbytes // _ALIGN) * _ALIGN
    block = blocks.take(size)
    tensors = _OneBlock(block, blocks.pool, blocks.kept)
    for (name, column, values), at in zip(columns, offsets, strict=True):
        tensor = block[at : at + values.nbytes].view(_TORCH_TYPES[values.dtype])
        out = tensor.numpy()
        np.copyto(out, values)
        if column.null_count:
            np.copyto(out, np.nan, where=_invalid(column))
        tensors[name] = tensor
    return tensors


class _Lock(Protocol):
    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


class _Blocks:
    """This process's shared-memory blocks, each reused once the process it was sent to has let go of every view
    of it: a new block costs a page fault per 4 KiB page at its first write (shared memory gets no huge pages
    here), 11 ms of CPU for a 12.7 MB batch against under 1 ms for private memory. A block's first 8 bytes are its
    flag: the taker's process id from when it is taken until another process that received it clears it
    (`_views`; a copy unpickled in the sending process, whose own views may live on, leaves it busy). At most
    `kept` blocks are kept, busy or free (enough for a batch being built, the DataLoader's prefetched ones and
    the one in use); the oldest goes when a new one is needed beyond that.

    A DataLoader worker's blocks belong to the main process's `_Pool` (`pool`: its id): they start as the blocks
    that the main process received from workers before (`lent`), which every worker it starts may take, so a free
    block is taken under `lock`, shared by them all (a block is never taken twice). A worker that cannot have the
    lock at once (a worker killed while it held it) takes a new block instead of waiting; the main process then
    starts a new pool for the workers it starts next (`_main_pool`)."""

    def __init__(
        self, kept: int, lock: _Lock | None = None, pool: str | None = None, lent: Sequence[torch.Tensor] = ()
    ):
        self.kept, self.pool = kept, pool
        self._blocks: deque[tuple[torch.Tensor, np.ndarray]] = deque((b, _flag(b)) for b in lent)
        self._lock = lock or threading.Lock()  # two takers must not take the same free block
        self._guard = threading.Lock()  # the list of blocks, against this process's other threads

    def take(self, size: int) -> torch.Tensor:
        """A block of at least `size` bytes, marked busy."""
        with self._guard:
            known = list(self._blocks)
        if self._lock.acquire(timeout=_LOCK_WAIT_S):  # held for a look at a few flags, never longer
            try:
                for block, flag in known:
                    if len(block) >= size and not flag[0]:
                        flag[0] = os.getpid()
                        return block
            finally:
                self._lock.release()
        # Allocated in shared memory at once, as torch's own collate does in workers (`share_memory_()` would
        # allocate, fill and copy a private block first: 3 times the time). An eighth more, so that the next
        # batches, a little larger or smaller (a part's rows vary), fit it: pages never written cost nothing.
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size + size // 8))
        flag = _flag(block)
        flag[0] = os.getpid()  # nobody else knows it yet
        with self._guard:
            self._blocks.append((block, flag))
            if len(self._blocks) > self.kept:
                self._blocks.popleft()
        return block


def _flag(block: torch.Tensor) -> np.ndarray:
    return block[:8].numpy().view(np.int64)


_KEPT = 4  # blocks per worker: one being built, the DataLoader's 2 prefetched, one in use
_LOCK_WAIT_S = 0.1  # the lock is held for microseconds: longer, its holder died holding it
_BLOCKS = _Blocks(kept=_KEPT)


class _Pool:
    """In the main process, the shared blocks that DataLoader workers sent it (at most the `kept` of the last worker
    to send one, the most recent ones), kept mapped and handed to the workers started next, of any dataset
    (`FlightDataset.__getstate__`): a worker started for an epoch then writes into pages that exist already (into
    a new block: 3 times the time, its pages allocated and zeroed), and the main process, still holding the block's
    mapping, receives it without mapping it again. One per process (`_main_pool`)."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.lock = multiprocessing.get_context("spawn").Lock()  # shared with workers however they are started
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()  # by address, the most recent last
        self._guard = threading.Lock()

    def keep(self, block: torch.Tensor, kept: int) -> None:
        at = block.untyped_storage().data_ptr()
        with self._guard:
            self._blocks[at] = block
            self._blocks.move_to_end(at)
            while len(self._blocks) > kept:
                self._blocks.popitem(last=False)

    def blocks(self) -> list[torch.Tensor]:
        with self._guard:
            return list(self._blocks.values())


_POOL: _Pool | None = None
_POOL_MADE = threading.Lock()


def _main_pool() -> _Pool:
    """This process's `_Pool`, made when it first starts DataLoader workers, and made anew if a worker died holding
    its lock (workers started before keep the old one: no block is in both)."""
    global _POOL
    with _POOL_MADE:
        if _POOL is None or not _POOL.lock.acquire(timeout=_LOCK_WAIT_S):
            _POOL = _Pool()
        else:
            _POOL.lock.release()
        return _POOL


class _OneBlock(dict[str, torch.Tensor]):
    """Tensors that are 1-D views of one shared `block`, pickled as the block and where each lies in it: torch
    would send each tensor's storage apart, a file descriptor passed over a new connection per tensor and batch
    (for 12 columns, 12 handshakes where one does). Unpickled, a plain dict."""

    def __init__(self, block: torch.Tensor, pool: str | None = None, kept: int = _KEPT):
        super().__init__()
        self.block, self.pool, self.kept = block, pool, kept

    def __copy__(self) -> _OneBlock:  # the DataLoader's `default_convert` copies what a worker yields
        copied = _OneBlock(self.block, self.pool, self.kept)
        copied.update(self)
        return copied

    def __reduce__(self) -> tuple[Any, ...]:
        block = self.block.untyped_storage().data_ptr()
        if not all(_slice_of(t, block) for t in self.values()):
            return (dict, (dict(self),))  # a value was replaced or added: send each as torch would
        layout = [(name, t.storage_offset() * t.element_size(), t.nbytes, t.dtype) for name, t in self.items()]
        return (_views, (self.block, layout, self.pool, self.kept))


def _slice_of(value: Any, block: int) -> bool:
    """Whether `value` is a contiguous 1-D tensor in the shared block whose storage starts at `block`."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 1
        and value.is_contiguous()
        and value.untyped_storage().data_ptr() == block
    )


def _views(
    block: torch.Tensor,
    layout: list[tuple[str, int, int, torch.dtype]],
    pool: str | None = None,
    kept: int = _KEPT,
) -> dict[str, torch.Tensor]:
    """The tensors of an `_OneBlock` again, in the process that received its block: views of one tensor made from
    the block as NumPy, which holds that array while any view lives; when the last goes, the array's finalizer
    clears the block's busy flag and its sender may reuse it (`_Blocks`). A block of this process's pool is kept in
    it (`_Pool`)."""
    whole = block.numpy()
    flag = block[:8].view(torch.int64)
    if int(flag) != os.getpid():
        weakref.finalize(whole, flag.fill_, 0).atexit = False
    if _POOL is not None and pool == _POOL.id:
        _POOL.keep(block, kept)
    base = torch.from_numpy(whole)
    views = {}
    for name, at, nbytes, dtype in layout:  # byte offsets and sizes in the block
        views[name] = base[at : at + nbytes].view(dtype)
    return views


_ALIGN = 64  # bytes: each column of a shared block starts aligned for any element type

_TORCH_TYPES = {
    np.dtype(t): getattr(torch, t)
    for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32")
} | {np.dtype("float64"): torch.float64, np.dtype(bool): torch.bool}


def _columns(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.Array]]:
    """Each column of the batch viewed as the Arrow type its tensor holds (see `to_tensors`)."""
    for field, column in zip(batch.schema, batch.columns, strict=True):
        target = _tensor_type(field)
        if target is None:
            raise TypeError(f"column {field.name!r} ({field.type}) cannot become a tensor")
        if column.null_count and not pa.types.is_floating(target):
            raise ValueError(
                f"column {field.name!r} ({field.type}) holds nulls, which an integer tensor cannot: "
                "fill them on the server side, leave the column out, or use format='arrow'"
            )
        yield field.name, column.view(target) if target != field.type else column


def _values(column: pa.Array) -> np.ndarray:
    """A numeric or boolean column's values as NumPy, read from its buffers (a view, but for booleans), nulls
    included as whatever their slots hold: pyarrow's `to_numpy` imports pandas on its first call, which cost
    each new DataLoader worker a second or more."""
    data = column.buffers()[1]
    start, stop = column.offset, column.offset + len(column)
    if pa.types.is_boolean(column.type):
        return _bits(data, start, stop)
    return np.frombuffer(data, dtype=column.type.to_pandas_dtype(), count=stop)[start:]


def _invalid(column: pa.Array) -> np.ndarray:
    """Where a column holding nulls has them, as booleans."""
    valid = _bits(column.buffers()[0], column.offset, column.offset + len(column))
    return np.logical_not(valid, out=valid)


def _bits(buffer: pa.Buffer, start: int, stop: int) -> np.ndarray:
    """Bits `start` to `stop` of an Arrow bitmap (least significant bit first) as booleans (a new array)."""
    return np.unpackbits(np.frombuffer(buffer, np.uint8), count=stop, bitorder="little")[start:].view(bool)


class FlightDataset(IterableDataset[Batch]):
    """Batches of a planned read (`FlightDataset.table`, `FlightDataset.training_set`).

    The read is planned once, when the dataset is made; pickling it (to DataLoader workers) carries
    only the tickets (and local entity rows, if given). Iterating deals the parts (endpoints, or ranges
    of local entity rows) to the global workers, worker `w` of rank `r` being `r * num_workers + w` of
    `world_size * num_workers`, and streams each worker's parts over a connection it opens itself. Each
    row comes once per epoch, from exactly one worker. Use `DataLoader(dataset, batch_size=None, ...)`:
    the dataset yields whole batches.

    `format` "torch" yields dicts of tensors (see `to_tensors`), "arrow" yields `pyarrow.RecordBatch`.
    `batch_size` re-cuts each worker's stream into batches of that many rows (the last of a worker
    may be shorter); None keeps the server's batches. `shuffle_endpoints` permutes the endpoints with
    `seed + epoch` (call `set_epoch` before each epoch, as with `DistributedSampler`); rows within an
    endpoint keep their order. `rank` and `world_size` are the arguments when given, else those of
    `torch.distributed` when it is initialised, else one rank.
    """

    def __init__(
        self,
        plan: ReadPlan,
        *,
        batch_size: int | None = None,
        format: Literal["torch", "arrow"] = "torch",
        shuffle_endpoints: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if format not in ("torch", "arrow"):
            raise ValueError(f"format must be 'torch' or 'arrow', got {format!r}")
        if format == "torch":
            _check_tensor_schema(plan.schema)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.plan = plan
        self.batch_size = batch_size
        self.format = format
        self.shuffle_endpoints = shuffle_endpoints
        self.seed = seed
        # A tensor, so that DataLoader workers share it (torch passes tensors to them in shared memory):
        # persistent workers see `set_epoch` too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.rank, self.world_size, _ = _distributed(rank, world_size)
        self._lent: tuple[str, _Lock, list[torch.Tensor]] | None = None  # in a worker: the pool it was handed
        self._blocks: _Blocks | None = None  # in a worker: its blocks, from `_lent`

    def __getstate__(self) -> dict[str, Any]:
        """What a DataLoader worker receives: the plan and options, and, when it is being started (its
        arguments pickled to a new process), the main process's pool of shared blocks (`_Pool`) to write its
        batches into. Pickled otherwise (e.g. to Ray, or by `copy`), the dataset carries no blocks."""
        state = {**self.__dict__, "_blocks": None, "_lent": None}
        if multiprocessing.context.get_spawning_popen() is not None:
            pool = _main_pool()
            state["_lent"] = (pool.id, pool.lock, pool.blocks())
        return state

    @classmethod
    def table(
        cls,
        location: str,
        table: str,
        *,
        columns: Sequence[str] | None = None,
        snapshot_id: int | None = None,
        as_of: dt.datetime | str | int | None = None,
        partitions: int | None = None,
        client_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **options: Any,
    ) -> FlightDataset:
        """A whole-table scan, split by data file into up to `partitions` endpoints (default: 8 per
        rank; never more than the snapshot has files). `options`: those of `FlightDataset`."""
        rank, world_size, shared = _distributed(rank, world_size)
        _check_same_snapshots(shared, world_size, snapshot_id is not None or as_of is not None, "snapshot_id or as_of")
        parts = partitions or DEFAULT_PARTITIONS * world_size
        plan = _planned_once(
            shared,
            lambda: plan_table(
                location,
                table,
                columns=columns,
                snapshot_id=snapshot_id,
                as_of=as_of,
                partitions=parts,
                client_options=client_options,
            ),
        )
        return cls(plan, rank=rank, world_size=world_size, **options)

    @classmethod
    def training_set(
        cls,
        location: str,
        entity_rows: Any,
        features: str | Sequence[str],
        *,
        columns: Sequence[str] | None = None,
        partitions: int | None = None,
        entity_filter: str | None = None,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        full_feature_names: bool = False,
        client_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **options: Any,
    ) -> FlightDataset:
        """A training set, split into `partitions` parts (default: 8 per rank) that workers read apart.

        Entity rows in a server table (`entity_rows`: its name) are split by key on the server. Local
        rows (a pandas or polars DataFrame, Arrow data, a dict of lists: what `get_historical_features`
        takes) are held by the dataset and cut into contiguous row ranges, each of which a worker sends
        with `do_exchange`; each DataLoader worker receives a copy of them, so write a large set to a
        table instead. In a process group, rank 0's rows are used (its plan is shared); ranks planning
        for themselves must each give the same rows. `columns` picks output columns, e.g. to leave out
        string keys. `options`: those of `FlightDataset`."""
        rank, world_size, shared = _distributed(rank, world_size)
        _check_same_snapshots(shared, world_size, bool(snapshot_ids), "snapshot_ids (an entity table's too)")
        parts = partitions or DEFAULT_PARTITIONS * world_size
        plan = _planned_once(
            shared,
            lambda: plan_training_set(
                location,
                entity_rows,
                features,
                columns=columns,
                partitions=parts,
                entity_filter=entity_filter,
                snapshot_ids=snapshot_ids,
                as_of=as_of,
                entity_time=entity_time,
                full_feature_names=full_feature_names,
                client_options=client_options,
            ),
        )
        return cls(plan, rank=rank, world_size=world_size, **options)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose endpoint order `shuffle_endpoints` uses; every rank must set the same. Workers
        started already (`persistent_workers=True`) see it from their next epoch on."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def endpoints(self, worker: int = 0, num_workers: int = 1) -> list[Part]:
        """The parts (endpoints or entity row ranges) DataLoader worker `worker` of `num_workers` on this
        rank reads this epoch."""
        order = list(self.plan.endpoints)
        if self.shuffle_endpoints:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order[self.rank * num_workers + worker :: self.world_size * num_workers]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        mine = self.endpoints(info.id, info.num_workers) if info is not None else self.endpoints()
        if not mine:
            return
        tensors: Callable[[pa.RecordBatch], dict[str, torch.Tensor]] = to_tensors
        if info is not None:  # a worker's batches go to the main process
            tensors = functools.partial(shared_tensors, blocks=self._worker_blocks(info.num_workers))
        for batch in rebatch(self.plan.batches(mine), self.batch_size):
            yield tensors(batch) if self.format == "torch" else batch

    def _worker_blocks(self, workers: int) -> _Blocks | None:
        """A worker's blocks: those of the pool it was handed when started, shared with the other workers (each
        keeping up to `_KEPT` for each worker of its loader), else this process's own."""
        if self._blocks is None and self._lent is not None:
            pool, lock, lent = self._lent
            self._blocks = _Blocks(_KEPT * workers, lock, pool, lent)
        return self._blocks


def _check_same_snapshots(shared: bool, world_size: int, pinned: bool, how: str) -> None:
    """Ranks that each plan for themselves (an explicit `rank`/`world_size`, no process group to share rank 0's
    plan) must plan the same snapshots, or a write between their starts gives them different splits: rows
    lost or read twice."""
    if not shared and world_size > 1 and not pinned:
        raise ValueError(
            f"with an explicit world_size of {world_size} and no torch.distributed process group, every rank plans "
            f"for itself: pin the snapshots with {how} so that all ranks split the same rows (or initialise "
            "torch.distributed, and rank 0's plan is shared)"
        )


def _planned_once(shared: bool, plan: Callable[[], ReadPlan]) -> ReadPlan:
    """`plan()` on rank 0, broadcast to every rank of the initialised process group (`shared`), so
    that all ranks split the same endpoints even if the table changes between their starts."""
    if not shared or torch.distributed.get_world_size() == 1:
        return plan()
    box = [plan() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    assert isinstance(box[0], ReadPlan)
    return box[0]


__all__ = ["FlightDataset", "shared_tensors", "to_tensors"]
