"""Which copy of a usage event is the first: the two-tier identity both consumers decide from.

Tier 1, forever (every retained month): an event is known by `(tenant_id, occurred_at,
gateway_request_id)`; an identical re-send meets the stored row. Tier 2, within the window
(`DEDUP_WINDOW_HOURS`): the id alone is known with the fields that tell a duplicate from a
conflict, whatever its tenant or time. A copy is judged against the window's row when there is
one, else against the row stored under its own Tier 1 key (an event older than the window).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum


class Identity(StrEnum):
    """What one copy of an event is, once both tiers have been looked up."""

    FIRST_COPY = "first_copy"  # unknown to both tiers: remember the id, store (or count) it
    FIRST_SEEN_ELSEWHERE = "first_seen_elsewhere"  # the window has it, equal, not yet stored here
    DUPLICATE = "duplicate"  # equal to what is already stored: nothing changes
    CONFLICT = "conflict"  # a known id with different fields: never stored, dead-lettered


def identity_of(*, window_equal: bool | None, stored_equal: bool | None) -> Identity:
    """Judge a copy from the window's row (`None`: absent; else whether it is equal) and the row
    stored under the copy's Tier 1 key (same three-way answer)."""
    if stored_equal:  # identical to a stored event: a duplicate forever, whatever the window
        return Identity.DUPLICATE
    if window_equal is False or stored_equal is False:
        return Identity.CONFLICT
    if window_equal:
        return Identity.FIRST_SEEN_ELSEWHERE
    return Identity.FIRST_COPY


def is_expired(occurred_at: datetime, retention_floor: date | None) -> bool:
    """An event before the oldest month still kept can no longer be stored (`expired`)."""
    if retention_floor is None:
        return False
    return occurred_at.astimezone(UTC).date() < retention_floor
