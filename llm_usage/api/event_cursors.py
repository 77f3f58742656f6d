"""The drill-down's query, shared by its route and its page: the filters, the range and the
opaque cursor that says where the next page starts.

A filter that no stored attribute can hold (NUL, a lone surrogate) is a 422 naming it, before
asyncpg would fail on it.

A cursor is the URL-safe base64 (unpadded) of the JSON `[occurred_at, gateway_request_id]` of the
last event of a page. It is bound to nothing else: the tenant always comes from the path (so a
cursor never reaches another tenant's events) and the filters from the query. Anything that does
not decode to that shape is a 422 naming `cursor`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Final

from llm_usage.api.params import invalid, parse_instant, rfc3339, time_range
from llm_usage.domain.ids import is_clean_id, is_storable_text
from llm_usage.storage.usage_event_pages import EventPageRequest, EventPosition

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_CURSOR_LENGTH: Final = 1000
_MAX_ID_LENGTH: Final = 200


def encode_cursor(position: EventPosition) -> str:
    text = json.dumps([rfc3339(position.occurred_at), position.gateway_request_id])
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, name: str = "cursor") -> EventPosition:
    """The position `cursor` names; a 422 at ("query", name) if it names none."""
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        padded = cursor + "=" * (-len(cursor) % 4)
        # validate=True: the lenient decoder would drop characters outside the alphabet.
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        decoded = json.loads(raw)
        if not isinstance(decoded, list) or len(decoded) != 2:
            raise ValueError("not a pair")
        moment, request_id = decoded
        if not isinstance(moment, str) or not isinstance(request_id, str):
            raise ValueError("not two strings")
        # A stored id is clean (the contract's rule): NUL or a lone surrogate would otherwise
        # reach asyncpg, which cannot send them.
        if not 1 <= len(request_id) <= _MAX_ID_LENGTH or not (
            is_clean_id(request_id) and is_storable_text(request_id)
        ):
            raise ValueError("not a request id")
        return EventPosition(parse_instant(moment), request_id)
    except (ValueError, UnicodeError, binascii.Error, RecursionError, OverflowError):
        raise invalid(
            ("query", name), "not a cursor this API gave: start again without it", cursor
        ) from None


def event_query(
    *,
    now: datetime,
    from_text: str | None,
    to_text: str | None,
    filters: dict[str, str | None],
    limit: int,
    cursor: str | None,
    before: str | None = None,
) -> EventPageRequest:
    """The page the query string asks for; a malformed parameter is a 422 naming it. `before`
    (the page's own way back to newer events) wins over `cursor`."""
    start, end = time_range(from_text, to_text, now=now)
    chosen = {column: value for column, value in filters.items() if value is not None}
    for column, value in chosen.items():
        # Only what no stored attribute can hold: a tab, say, may be in one (and found).
        if not is_storable_text(value):
            raise invalid(
                ("query", column),
                "must not contain NUL (\\u0000) or a lone surrogate: no event holds one",
                # Spelled out: the 422's JSON cannot encode a lone surrogate itself.
                value.encode("utf-8", "backslashreplace").decode("utf-8"),
            )
    if before is not None:
        return EventPageRequest(
            start, end, limit, before=decode_cursor(before, "before"), filters=chosen
        )
    after = None if cursor is None else decode_cursor(cursor)
    return EventPageRequest(start, end, limit, after=after, filters=chosen)
