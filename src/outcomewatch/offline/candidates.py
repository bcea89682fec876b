"""Which stored spans could matter to some rule, as a DuckDB predicate over the stored columns.

A span is a *candidate* when, for some selector (a trigger, an ``expect`` or a ``forbid`` item of
some rule), its ``name``, ``service`` and ``status_code`` columns and its duration
(``end_ns - start_ns``) could match. Attributes live in the ``span`` blob and are left to the
engine, which also re-checks every part of every selector: the predicate may let through more
than matches (a ``[...]`` class is widened to any one character), never less.

Globs follow fnmatch (``*``, ``?``, ``[...]``, ``[!...]``; case-sensitive; no escape character)
and become ``LIKE`` patterns with ``\\`` as the escape character, so a ``%`` or ``_`` in a span
name is matched literally. A pattern without glob characters is a plain equality.

While some rule has ``correlate``, the engine also reads the links of *every* span (a span with a
link into a trigger's trace brings its whole trace in), so a span with links is a candidate too.
Links are inside the blob; the stored blob is protobuf re-serialised by the server (fields in
number order), where a link is field 13 (tag ``0x6A``), a length of 1 to 3 bytes, then the
link's 16-byte trace id (field 1: ``0x0A 0x10``). ``LINK_PATTERN`` looks for that sequence at a
byte boundary of ``hex(span)``: it may find one that is not a link, never misses one with a
trace id.
"""

from __future__ import annotations

from datetime import timedelta

from outcomewatch.model import STATUS_CODE, SpanStatus
from outcomewatch.rules import RuleSet, Selector

_GLOB_CHARS = frozenset("*?[")
LINK_PATTERN = "^(?:..)*?6A(?:..){1,3}0A10"
Params = list[object]


def like_pattern(glob: str) -> str:
    """An fnmatch glob as a LIKE pattern (escape ``\\``) matching at least what the glob does."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c == "[":
            # Where fnmatch.translate finds the end of a class; without one, '[' is literal.
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append("[")
            else:
                out.append("_")  # one character, whichever the class admits
                i = j + 1
        elif c in "%_\\":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _text_condition(column: str, pattern: str, params: Params) -> str:
    params.append(pattern if _GLOB_CHARS.isdisjoint(pattern) else like_pattern(pattern))
    return f"{column} = ?" if _GLOB_CHARS.isdisjoint(pattern) else f"{column} LIKE ? ESCAPE '\\'"


def _ns(d: timedelta) -> int:
    return (d // timedelta(microseconds=1)) * 1000


def selector_condition(selector: Selector, params: Params) -> str:
    """The selector's conditions on stored columns, ANDed (parameters appended to ``params``)."""
    parts = [_text_condition("name", selector.span, params)]
    if selector.service is not None:
        parts.append(_text_condition("service", selector.service, params))
    if selector.status is SpanStatus.UNSET:
        # Unknown codes read as unset (SpanStatus.from_code).
        parts.append(f"status_code NOT IN ({STATUS_CODE[SpanStatus.OK]}, "
                     f"{STATUS_CODE[SpanStatus.ERROR]})")
    elif selector.status is not None:
        parts.append(f"status_code = {STATUS_CODE[selector.status]}")
    bounds = selector.duration
    if bounds is not None:
        for op, limit in (("<", bounds.lt), ("<=", bounds.lte), (">", bounds.gt),
                          (">=", bounds.gte)):
            if limit is not None:
                parts.append(f"end_ns - start_ns {op} ?")
                params.append(_ns(limit))
    return "(" + " AND ".join(parts) + ")"


def selectors(rules: RuleSet) -> list[Selector]:
    """Every selector of every rule, without repeats (equal selectors are one condition)."""
    found: list[Selector] = []
    for rule in rules:
        for selector in (rule.trigger, *rule.expect, *rule.forbid):
            if selector not in found:
                found.append(selector)
    return found


def candidate_predicate(rules: RuleSet) -> tuple[str, Params]:
    """A SQL boolean over a ``spans`` row: could the span match some selector of ``rules``?"""
    params: Params = []
    conditions = [selector_condition(s, params) for s in selectors(rules)]
    if any(rule.correlate for rule in rules):
        conditions.append("regexp_matches(hex(span), ?)")
        params.append(LINK_PATTERN)
    return ("(" + " OR ".join(conditions) + ")" if conditions else "FALSE"), params
