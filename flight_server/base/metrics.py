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
