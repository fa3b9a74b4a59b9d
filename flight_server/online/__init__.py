"""Online serving: the in-memory latest-row index per table, kept fresh, and the lookups into it."""
