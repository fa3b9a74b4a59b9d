"""Changing tables: writes, the shared Parquet file writer, deletes, maintenance, and their commits."""
