"""The one duration syntax used everywhere: ``250ms``, ``30s``, ``10m``, ``1h30m``, ``7d``.

Units, largest first: ``d``, ``h``, ``m``, ``s``, ``ms``. Each unit at most once, in that order,
like Prometheus durations. A bare number is refused: "10" is ambiguous.
"""

from __future__ import annotations

import re
from datetime import timedelta

from outcomewatch.errors import DurationError

_MAX_MS = 36_500 * 86_400_000
_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_PATTERN = re.compile(
    r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?$"
)


def bare_number_message(value: int | float | str) -> str:
    """What to say about a number given without a unit (read as seconds, the unit people most
    often mean): the same amount written as a duration, ``600`` -> ``600s or 10m``."""
    text = str(value).strip()
    try:
        ms = float(text) * 1000
    except ValueError:
        ms = 0.0
    if ms <= 0 or not ms.is_integer() or ms > _MAX_MS:
        return "a bare number is not a duration; write it with a unit, like 30s or 10m"
    if ms % 1000:
        return f"a bare number is not a duration; write {int(ms)}ms"
    hint = f"{int(ms) // 1000}s"
    larger = format_duration(timedelta(milliseconds=ms))
    return f"a bare number is not a duration; write {hint}" + (
        f" or {larger}" if larger != hint else "")


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` into a positive timedelta; raise DurationError naming the bad input (a
    bare number is told what to write instead: ``600`` -> ``600s or 10m``)."""
    if isinstance(text, str) and text.strip().isdigit():
        raise DurationError(bare_number_message(text))
    match = _PATTERN.match(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groupdict().values()):
        raise DurationError(
            f"invalid duration {text!r}: use a number with a unit, like 250ms, 30s, 10m, 1h30m, 7d"
        )
    total_ms = sum(int(v) * _UNITS_MS[k] for k, v in match.groupdict().items() if v)
    if total_ms <= 0:
        raise DurationError(f"invalid duration {text!r}: must be greater than zero")
    if total_ms > _MAX_MS:
        # Past this, datetimes overflow (year 9999) when a deadline is computed from it.
        raise DurationError(f"invalid duration {text!r}: at most 36500d (100 years)")
    return timedelta(milliseconds=total_ms)


def format_duration(value: timedelta) -> str:
    """Render ``value`` in the same syntax (the inverse of parse_duration for whole ms)."""
    remaining = int(value / timedelta(milliseconds=1))
    if remaining == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS_MS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
