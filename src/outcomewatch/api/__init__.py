"""The read-only HTTP API: runs, incidents and traces as JSON (see create_app)."""

from outcomewatch.api.app import create_app

__all__ = ["create_app"]
