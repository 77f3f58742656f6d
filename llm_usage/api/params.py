"""Parameters the routes parse themselves, and the 422 that names the one at fault."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Any, Final

from fastapi.exceptions import RequestValidationError

from llm_usage.domain.periods import start_of_month

MAX_RANGE_DAYS: Final = 366
# A range's instants are at most the last day's midnight: a report reads whole UTC days, and
# the day after 9999-12-31 cannot be written.
LATEST: Final = datetime.combine(date.max, time(0), UTC)

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<clock>[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,9}))?(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def invalid(location: tuple[str, ...], message: str, value: Any = None) -> RequestValidationError:
    """A 422 naming the parameter at `location`, e.g. ("query", "from"), as FastAPI's own are."""
    return RequestValidationError(
        [{"type": "value_error", "loc": location, "msg": message, "input": value}]
    )


def parse_instant(text: str) -> datetime:
    """An instant from RFC 3339 with an offset (`2026-11-01T09:00:00Z`) or a date (`2026-11-01`,
    which is 00:00 UTC that day); ValueError otherwise."""
    if _DATE.fullmatch(text):
        return datetime.combine(date.fromisoformat(text), time(0), UTC)
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(
            "must be an RFC 3339 time with an offset (2026-11-01T00:00:00Z) or a date (2026-11-01)"
        )
    fraction = (match["fraction"] or "").ljust(6, "0")[:6]  # microseconds: what PostgreSQL keeps
    offset = "+00:00" if match["offset"] in ("Z", "z") else match["offset"]
    parsed = datetime.fromisoformat(f"{match['date']}T{match['clock']}.{fraction}{offset}")
    return parsed.astimezone(UTC)


def query_instant(name: str, text: str | None, default: datetime) -> datetime:
    if text is None:
        return default
    try:
        return parse_instant(text)
    except (ValueError, OverflowError) as error:
        raise invalid(("query", name), str(error), text) from None


def time_range(
    from_text: str | None, to_text: str | None, *, now: datetime
) -> tuple[datetime, datetime]:
    """[from, to) from the query: `from` defaults to the start of this UTC month, `to` to now;
    from <= to, at most MAX_RANGE_DAYS apart, neither after LATEST."""
    utc_now = now.astimezone(UTC)
    start = query_instant("from", from_text, start_of_month(utc_now))
    end = query_instant("to", to_text, utc_now)
    for name, moment, text in (("from", start, from_text), ("to", end, to_text)):
        if moment > LATEST:
            raise invalid(("query", name), f"must not be after {rfc3339(LATEST)}", text)
    if end < start:
        name = "to" if to_text is not None else "from"
        raise invalid(("query", name), "`to` must not be before `from`", to_text or from_text)
    if (end - start).total_seconds() > MAX_RANGE_DAYS * 86400:
        name = "from" if from_text is not None else "to"
        raise invalid(
            ("query", name),
            f"the range from `from` to `to` is at most {MAX_RANGE_DAYS} days",
            from_text if name == "from" else to_text,
        )
    return start, end


def rfc3339(moment: datetime) -> str:
    """UTC with `Z`: `2026-11-01T00:00:00Z`, with microseconds only when there are some."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
