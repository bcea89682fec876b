"""The API's routers: ``health`` (unversioned, for probes) and ``v1`` (mounted at /api/v1)."""
