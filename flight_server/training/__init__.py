"""Training sets: point-in-time joins planned, run through sorted per-snapshot indexes or DuckDB, and streamed."""
