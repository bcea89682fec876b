"""Bodies of the probes, the notification outbox listing and the incident actions. Field names
are a pinned public contract, as in schemas.py."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from outcomewatch.store.rows import NotificationRow, Page

_NEXT_CURSOR_HELP = "Pass as `cursor` to get the next page; null on the last page."


class HealthOut(BaseModel):
    status: Literal["ok", "starting"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]


class NotificationStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class NotificationOut(BaseModel):
    id: int
    incident_id: int
    transition: str = Field(description="opened, reopened, acknowledged or resolved.")
    target: str = Field(description="alertmanager or webhook.")
    route: str
    status: str = Field(description="pending, sent, or failed (retried until sent).")
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: NotificationRow) -> NotificationOut:
        return cls(
            id=row.id, incident_id=row.incident_id, transition=row.transition, target=row.target,
            route=row.route, status=row.status, attempts=row.attempts, created_at=row.created_at,
            next_attempt_at=row.next_attempt_at, sent_at=row.sent_at, last_error=row.last_error,
        )


class NotificationsPage(BaseModel):
    notifications: list[NotificationOut]
    next_cursor: str | None = Field(description=_NEXT_CURSOR_HELP)

    @classmethod
    def from_page(cls, page: Page[NotificationRow]) -> NotificationsPage:
        return cls(
            notifications=[NotificationOut.from_row(n) for n in page.items],
            next_cursor=page.next_cursor,
        )


class ActionIn(BaseModel):
    """The optional body of an incident action."""

    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(
        default=None, max_length=4000, description="Why; kept in the timeline and notifications.")
    actor: str | None = Field(
        default=None, min_length=1, max_length=200, description="Who; `api` when omitted.")
