"""A rank of a two-process `torch.distributed` (gloo) group reading its share of a training set: started by
`torch.multiprocessing.start_processes` in tests/test_torch_dataset.py, and kept apart from it so that the spawned
processes import no more than torch and the client."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed

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
