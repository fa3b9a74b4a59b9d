"""Counters of events deep in the server that the lower layers count themselves; the transport's metrics
(`transport/metrics.py`) publish them with everything it reads at scrape time.

They count per process (one server a process in production), and are registered with no registry: each
server adds them to its own, so that several servers in one process never clash.
"""

from __future__ import annotations

from prometheus_client import Counter

COMMIT_RETRIES = Counter(
    "flight_commit_retries",
    "Commits that lost a race to a concurrent commit (on any replica) and were tried again on the new table "
    "state, or given up past the commit timeout.",
    registry=None,
)

COMMIT_CLOCK_BEHIND = Counter(
    "flight_commit_clock_behind",
    "Snapshots this process committed at the table's time rather than its own clock's, more than a second later: "
    "the table was last updated (by another replica or engine) after this machine's now, so one of the clocks is "
    "off. Snapshot times never go back; a clock ahead pushes every writer's commit times ahead with it.",
    registry=None,
)

DUCKDB_REOPENED = Counter(
    "flight_duckdb_reopened",
    "DuckDB databases that a fatal error invalidated and that the server replaced by a new one (`reads/duck.py`); "
    "the server's log has the error and the call that met it.",
    registry=None,
)

# Each published as the sum of the serving and the write process.
COUNTERS = (COMMIT_RETRIES, COMMIT_CLOCK_BEHIND, DUCKDB_REOPENED)
