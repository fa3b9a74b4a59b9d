"""Read engines: scan planning, the DuckDB engine and the three read paths a scan can take."""
