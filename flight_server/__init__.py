"""Arrow Flight server that moves ML features in bulk between Iceberg tables and ML programs."""

__version__ = "0.2.0"
