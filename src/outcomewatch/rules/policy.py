"""What the incident lifecycle takes from a rule: its Policy (severity, owner, route, flap
control, reopen window). The one place a rule becomes a Policy, online and offline."""

from __future__ import annotations

from datetime import timedelta

from outcomewatch.incidents.lifecycle import DEFAULT_REOPEN_WINDOW, Policy
from outcomewatch.rules.match import Rule


def policy_of(rule: Rule | None, *, reopen_window: timedelta = DEFAULT_REOPEN_WINDOW) -> Policy:
    """``rule``'s policy; ``reopen_window`` is the config's default, which a rule's
    ``reopen_within`` overrides. A rule removed by a reload while its run was open (None) is
    still judged, with the defaults."""
    if rule is None:
        return Policy(reopen_window=reopen_window)
    return Policy(
        severity=rule.severity.value, owner=rule.owner, route=rule.route,
        description=rule.description, open_after=rule.open_after,
        resolve_after=rule.resolve_after, reopen_window=rule.reopen_within or reopen_window,
    )
