"""The API's routers: ``health`` (unversioned probes), ``metrics``, and ``v1`` (reads) and
``actions`` (writes), both mounted at /api/v1."""
