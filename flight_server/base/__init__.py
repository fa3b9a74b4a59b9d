"""Shared primitives of every wing: settings, Arrow schemas, row filters, per-key locks, client streams."""
