"""Incident notifications: the outbox worker (``notify``) and its two senders (``senders``).

The store writes an outbox row per transition and target; :class:`Notifier` delivers them to
Alertmanager's v2 API or a webhook, in order within an incident, with exponential backoff.
"""

from outcomewatch.incidents.notify import Notifier, OutboxRow, OutboxStore, backoff_delay
from outcomewatch.incidents.senders import DeliveryError

__all__ = ["DeliveryError", "Notifier", "OutboxRow", "OutboxStore", "backoff_delay"]
