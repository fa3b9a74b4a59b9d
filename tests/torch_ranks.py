"""A rank of a two-process `torch.distributed` (gloo) group reading its share of a training set: started by
`torch.multiprocessing.start_processes` in tests/test_torch_dataset.py, and kept apart from it so that the spawned
processes import no more than torch and the client."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import torch.distributed
from torch.utils.data import DataLoader

from flight_client.torch import FlightDataset


def read_share(rank: int, init_method: str, location: str, trips: str, features: list[str], out: Path) -> None:
    """Join the group, read this rank's share of the training set in process, write what it saw to `out`."""
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        dataset = FlightDataset.training_set(location, trips, features, columns=["trip_id"])
        ids = [i for batch in dataset for i in batch["trip_id"].tolist()]
        seen = {"rank": dataset.rank, "world_size": dataset.world_size, "ids": ids}
        seen["tickets"] = [e.ticket.decode() for e in dataset.plan.endpoints]
        (out / f"rank-{rank}.json").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


def read_with_workers(rank: int, init_method: str, location: str, source: dict[str, Any], out: Path) -> None:
    """Join the group and read this rank's share of a table scan (`source["table"]`) or of a training set of local
    entity rows (`source["rows"]`, `source["features"]`) through a DataLoader with two worker processes; write the
    ids it got (column `source["id"]`) and the parts each worker was dealt to `out`."""
    multiprocessing.set_forkserver_preload(["torch", "flight_client.torch"])  # workers start in a fraction of the time
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        options: dict[str, Any] = {"columns": [source["id"]], "shuffle_endpoints": True, "batch_size": 256}
        if "table" in source:
            dataset = FlightDataset.table(location, source["table"], **options)
        else:
            dataset = FlightDataset.training_set(location, source["rows"], source["features"], **options)
        dataset.set_epoch(1)
        loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="forkserver")
        ids = [i for batch in loader for i in batch[source["id"]].tolist()]
        seen = {"rank": dataset.rank, "world_size": dataset.world_size, "ids": ids}
        seen["parts"] = [[repr(part) for part in dataset.endpoints(w, 2)] for w in range(2)]
        (out / f"rank-{rank}.json").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


def received(tensors: dict[str, torch.Tensor]) -> tuple[str, int, dict[str, Any], dict[str, str]]:
    """What another process received of a batch of tensors: its type, the number of storages, values, types."""
    storages = len({t.untyped_storage().data_ptr() for t in tensors.values()})
    values = {k: t.tolist() for k, t in tensors.items()}
    return type(tensors).__name__, storages, values, {k: str(t.dtype) for k, t in tensors.items()}


_held: list[dict[str, torch.Tensor]] = []


def hold(tensors: dict[str, torch.Tensor]) -> list[float]:
    """Keep a received batch (one of its tensors only, a slice of it) until `let_go`: its block stays busy."""
    _held.append({"kept": next(iter(tensors.values()))[1:]})
    return _held[-1]["kept"].tolist()


def let_go() -> None:
    _held.clear()
