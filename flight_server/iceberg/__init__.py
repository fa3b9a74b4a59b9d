"""Iceberg access: the catalog of feature tables, snapshots, position deletes, and pyiceberg's private API."""
