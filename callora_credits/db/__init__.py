"""The database layer: the library's tables, the SQL of the hot paths, and
the one place that opens a transaction and retries it."""
