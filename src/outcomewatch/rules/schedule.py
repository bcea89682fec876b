"""When a scheduled rule's trigger is due: cron slots in a time zone, as UTC instants.

The cron expression is read in the rule's time zone with Debian cron's DST behaviour (as
``cronsim`` implements it for 5-field expressions):

- a job at a fixed local time that does not exist on the spring-forward day (03:30 when clocks
  jump from 03:00 to 04:00) runs at the jump, once;
- a job at a fixed local time that happens twice on the fall-back day runs once, at the first
  occurrence; jobs with ``*`` in the minute or hour field run in both occurrences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim


@dataclass(frozen=True)
class Schedule:
    """A 5-field ``cron`` expression read in the IANA time zone ``tz``.

    ``grace`` is how late the trigger may start after a slot before the run counts as missed;
    it is separate from the rule's ``within`` (how long the job may take once started).
    """

    cron: str
    tz: str
    grace: timedelta
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.tz))

    def slots_between(self, start: datetime, end: datetime) -> list[datetime]:
        """The scheduled instants in ``(start, end]``, ascending, as aware UTC datetimes.

        ``start`` and ``end`` must be timezone-aware (any zone). The work grows with the number
        of slots in the window, so call it for short windows (since the last call, say).
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("slots_between needs timezone-aware datetimes")
        slots: list[datetime] = []
        if end <= start:
            return slots
        # cronsim reads a local time as its first occurrence (fold=0), which on a fall-back day
        # may be up to an hour before ``start``: the slots it yields too early are skipped.
        local_start = start.astimezone(self._zone).replace(fold=0)
        for slot in CronSim(self.cron, local_start):
            instant = slot.astimezone(UTC)
            if instant > end:
                break
            if instant > start and (not slots or instant > slots[-1]):
                slots.append(instant)
        return slots
