"""Storage: the DuckDB writer (duckdb.py), the read queries (queries.py), the schema (schema.py)."""
