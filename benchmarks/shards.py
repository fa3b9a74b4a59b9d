"""`flight-bench shards`: a training set over a feature table too large for one replica's training-set cache.

Three ways to serve it, on one catalog, measured in the same run: one server whose cache holds the whole table
(the benchmark's own server), replicas (`--advertise`, `--peer`) each capped at 3/4 of the table's index so that
none can hold it whole, which share its keys and each cache only their share, and one server with that same cap
alone, which joins the table with DuckDB. The results must be equal, and each replica must hold its share and no
more: together the shares are the table.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks import report
from benchmarks.datagen import CREATED_TIME, ENTITY_KEY, ENTITY_TIME, EVENT_TIME, entity_rows, feature_table
from benchmarks.harness import Case, Settings, Target, free_port, local_servers, measure, table_name
from flight_client import FeatureClient
from flight_server.base.shards import key_slots, owned

REPLICAS = 2
BUCKETS = 64  # of the first key: shares of 64 slots are even enough that each fits 3/4 of the whole
CAP = 0.75  # each replica's cache, as a share of the whole table's index
ENTITY_SHARE = 10  # entity rows: feature rows / 10
WHOLE, SHARED, SMALL = "one_server_whole_cache", "replicas_sharing_keys", "one_server_small_cache"
LABELS = {
    WHOLE: "one server, its cache holds the whole table",
    SHARED: "replicas sharing the keys, each cache capped below the table",
    SMALL: "one server with that cap: DuckDB joins the table",
}


def _sorted(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None).sort_by([(n, "ascending") for n in table.column_names])


def _cached(location: str, name: str) -> list[dict[str, Any]]:
    with FeatureClient(location) as client:
        return [i for i in client.health()["training_set_indexes"] if i["table"] == name]


def run(target: Target, settings: Settings, replicas: int = REPLICAS) -> dict[str, Any]:
    if target.warehouse is None:
        raise RuntimeError("shards starts replicas on the benchmark's own warehouse: it cannot use --location")
    data = feature_table(settings.rows, settings.entities, settings.seed, settings.features)
    entities = entity_rows(max(settings.rows // ENTITY_SHARE, 1), settings.entities, settings.seed)
    name, trips = table_name("shards"), table_name("shards_entities")
    features = [f"{name}:{c}" for c in data.column_names if c not in (ENTITY_KEY, EVENT_TIME, CREATED_TIME)]
    with FeatureClient(target.location) as client:
        report.progress(f"shards: writing {data.num_rows:,} feature rows and {entities.num_rows:,} entity rows")
        client.write(
            name,
            data,
            entity_keys=[ENTITY_KEY],
            event_time=EVENT_TIME,
            created_time=CREATED_TIME,
            partition_by=[f"month({EVENT_TIME})", f"bucket({BUCKETS}, {ENTITY_KEY})"],
        )
        client.write(trips, entities, entity_keys=[ENTITY_KEY], event_time=ENTITY_TIME)
        expected = _sorted(client.get_historical_features(trips, features, partitions=replicas))
        index_bytes = client.health()["training_set_cache"]["bytes"]
    cap_mb = max(1, math.floor(index_bytes * CAP / report.MB))
    locations = _even_locations(replicas, data)
    with contextlib.ExitStack() as stack:
        report.progress(
            f"shards: starting {replicas} replicas and one server, each with --historical-cache-mb {cap_mb}"
        )
        started: list[tuple[int | None, list[str]]] = []
        for location in locations:
            peers = [arg for other in locations if other != location for arg in ("--peer", other)]
            port = location.rsplit(":", 1)[1]
            started.append((int(port), ["--advertise", location, *peers, "--historical-cache-mb", str(cap_mb)]))
        started.append((None, ["--historical-cache-mb", str(cap_mb)]))  # the capped single server
        *_, small = stack.enter_context(local_servers(started, target.catalog_config, target.warehouse))
        clients = {
            WHOLE: stack.enter_context(FeatureClient(target.location)),
            SHARED: stack.enter_context(FeatureClient(locations[0])),
            SMALL: stack.enter_context(FeatureClient(small.location)),
        }

        def case(client: FeatureClient) -> Case:
            def join() -> None:
                if _sorted(client.get_historical_features(trips, features, partitions=replicas)) != expected:
                    raise RuntimeError(f"{client.location}: the training set differs from the whole-cache server's")

            return Case(join)

        timings = measure({k: case(c) for k, c in clients.items()}, settings.repeat, settings.warmup, "shards")
        shares = [_cached(location, name) for location in locations]
        small_cached = _cached(small.location, name)
    held = [sum(i["rows"] for i in cached) for cached in shares]
    if any(i["share"] is None for cached in shares for i in cached) or sum(held) != data.num_rows:
        raise RuntimeError(f"the replicas' shares {held} are not the table's {data.num_rows:,} rows, once each")
    if small_cached:
        raise RuntimeError("the capped single server cached the table: the cap does not bind")
    whole = timings[WHOLE].median
    return {
        "feature_rows": data.num_rows,
        "entity_rows": entities.num_rows,
        "replicas": replicas,
        "buckets": BUCKETS,
        "index_mb": index_bytes / report.MB,
        "cap_mb": cap_mb,
        "rows_per_replica": held,
        "results": {
            key: {**timing.as_dict(), "vs_whole": whole / timing.median, "label": LABELS[key]}
            for key, timing in timings.items()
        },
    }


def _even_locations(replicas: int, data: pa.Table) -> list[str]:
    """Replica addresses whose shares of the table's rows are the most even of a few draws: rendezvous hashing
    over random ports can give one replica most of the buckets, whose rows its capped cache would not hold."""
    per_slot = np.bincount(key_slots(data.column(ENTITY_KEY), BUCKETS), minlength=BUCKETS)
    best: tuple[int, list[str]] | None = None
    for _ in range(64):
        locations = [f"grpc://127.0.0.1:{port}" for port in {free_port() for _ in range(replicas)}]
        if len(locations) < replicas:
            continue
        largest = max(int(per_slot[slots].sum()) for slots in owned(locations, BUCKETS))
        if best is None or largest < best[0]:
            best = (largest, locations)
    assert best is not None, "free ports were found"
    return best[1]


def render(result: dict[str, Any]) -> str:
    header = (
        f"shards: a training set of {result['entity_rows']:,} entity rows over {result['feature_rows']:,} feature rows "
        f"(index {result['index_mb']:.0f} MB, bucket({result['buckets']}) of the key); {result['replicas']} replicas "
        f"capped at {result['cap_mb']} MB each cached {', '.join(f'{r:,}' for r in result['rows_per_replica'])} rows"
    )
    rows = [
        [r["label"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['max_s']:.3f}", report.ratio(r["vs_whole"])]
        for r in result["results"].values()
    ]
    return "\n".join([header, report.table(["case", "median s", "min s", "max s", "speed vs whole cache"], rows)])
