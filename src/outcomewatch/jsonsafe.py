"""Strict JSON for values that come from spans.

Span attributes may hold NaN or infinite doubles; ``json.dumps`` writes them as the bare tokens
``NaN`` / ``Infinity``, which are not JSON: DuckDB's JSON type refuses them and so do most
webhook receivers. Here they become the strings "NaN", "Infinity", "-Infinity".
"""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """``json.dumps`` that always yields strict JSON (objects it cannot encode become str)."""
    try:
        # Almost every value is finite: encoded in C as it is. Only a refusal (a NaN or an
        # infinity somewhere) pays for the copy that _finite makes in Python.
        return json.dumps(value, ensure_ascii=False, default=str, allow_nan=False,
                          sort_keys=sort_keys)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=False, default=str, allow_nan=False,
                          sort_keys=sort_keys)
