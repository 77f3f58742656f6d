"""From a Kafka record's bytes to a `UsageEvent`, or to why it goes to the dead-letter topic."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from llm_usage.domain.corrections import Correction
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.fast_decoding import fast_decode, fast_decode_correction
from llm_usage.schemas.period_charge import (
    PERIOD_CHARGE_EVENT_TYPE,
    PeriodChargeEvent,
    period_charge_row,
)
from llm_usage.schemas.usage_correction import (
    CORRECTION_EVENT_TYPE,
    UsageCorrectionEvent,
    correction_row,
)
from llm_usage.schemas.usage_event import (
    NO_NUL_PATTERN,
    UnpricedEvent,
    UsageEvent,
    UsageRow,
    json_kind,
    usage_row,
)

MAX_EVENT_BYTES = 64 * 1024
MAX_DETAIL_CHARS = 500

# pydantic's own wording, said the way a gateway author reads the contract. Errors the model
# raises itself are already worded so, and pass through unchanged.
_EXPLANATIONS = {
    "missing": "is required",
    "string_type": "must be a string",
    "string_too_short": "must have at least {min_length} character",
    "string_too_long": "at most {max_length} characters",
    "string_unicode": "must be valid Unicode text (no lone surrogate such as \\ud800)",
    "int_type": "must be a whole number (not a boolean, a fraction or a string)",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be {expected}",
    "extra_forbidden": "is not a field a correction can change",
}


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


class DuplicateNameError(ValueError):
    """A JSON object names a field twice: parsers disagree on which copy wins."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise DuplicateNameError(name)
            seen.add(name)
    return found


# One decoder for every call: `json.loads(text, parse_float=...)` would build a new one each time.
_JSON = json.JSONDecoder(
    parse_float=Decimal,
    parse_constant=_refuse_constant,
    object_pairs_hook=_object_without_duplicates,
)


def _explain(error: ErrorDetails) -> str:
    """One error as `field: why`; errors between fields name their fields themselves."""
    kind = error["type"]
    context = error.get("ctx", {})
    if kind == "string_pattern_mismatch" and context.get("pattern") == NO_NUL_PATTERN:
        why = "must not contain the NUL character (\\u0000)"
    elif kind in _EXPLANATIONS:
        why = _EXPLANATIONS[kind].format(**context)
    else:
        why = error["msg"]
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {why}" if field else why


def describe_validation_error(error: ValidationError) -> str:
    """Every broken rule as `field: why`, joined with `; `, at most `MAX_DETAIL_CHARS` long."""
    detail = "; ".join(_explain(each) for each in error.errors(include_url=False))
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
    return detail


def _json_object(value: bytes | None) -> dict[str, object] | Rejection:
    """The JSON object in `value`, or why there is none."""
    if value is None:
        return Rejection(
            DeadLetterReason.INVALID_JSON,
            "the record has no value (a tombstone); a usage event is a JSON object",
        )
    if len(value) > MAX_EVENT_BYTES:
        return Rejection(
            DeadLetterReason.TOO_LARGE,
            f"the value is {len(value)} bytes; at most {MAX_EVENT_BYTES} are accepted",
        )
    data = parse_exact_json(value)
    if isinstance(data, dict | Rejection):
        return data
    return Rejection(
        DeadLetterReason.SCHEMA_VIOLATION,
        f"the JSON value is {json_kind(data)}; a usage event is a JSON object",
    )


def parse_exact_json(value: bytes) -> object:
    """The JSON value in UTF-8 `value`, or a `Rejection` (`invalid_json`) saying why it is not."""
    try:
        return _JSON.decode(value.decode())
    except DuplicateNameError as error:
        return Rejection(
            DeadLetterReason.SCHEMA_VIOLATION,
            f"{error.name}: is named twice in one object; a field may appear only once",
        )
    except UnicodeDecodeError as error:
        return Rejection(
            DeadLetterReason.INVALID_JSON, f"not UTF-8: {error.reason} at byte {error.start}"
        )
    except ValueError as error:  # JSONDecodeError, NaN / Infinity, an int of over 4300 digits
        return Rejection(DeadLetterReason.INVALID_JSON, f"not JSON: {error}")
    except RecursionError:
        return Rejection(DeadLetterReason.INVALID_JSON, "not JSON: nested too deeply to read")


def decode_usage_event(
    value: bytes | None, *, now: datetime
) -> UsageRow | UnpricedEvent | Rejection:
    """The stored values of the event in `value`, validated against `now`, or the `Rejection`
    saying why it is refused. An event that sent no charge is an `UnpricedEvent`: the price
    table (runtime/pricing.py) decides its charge or its `unpriced` dead letter.

    A plainly valid event takes the compiled fast path; anything else is decided and worded by
    the reference (`decode_usage_event_reference`), so the answer is the reference's either way.
    """
    if value is not None and len(value) <= MAX_EVENT_BYTES:
        row = fast_decode(value, now=now)
        if row is not None:
            return row
    event = decode_usage_event_reference(value, now=now)
    return event if isinstance(event, Rejection) else usage_row(event)


def decode_usage_topic_record(
    value: bytes | None, *, now: datetime
) -> UsageRow | UnpricedEvent | PeriodCharge | Correction | Rejection:
    """What a record of the usage topic holds: a usage event's stored values (unpriced when it
    sent no charge), a period charge (`event_type` `llm_period_charge_recorded`), a correction
    (`llm_usage_corrected`), or the `Rejection` saying why it is refused.

    A usage event costs what `decode_usage_event` costs: the fast path refuses every other event
    type, and only then does a plain correction take its own fast path, then the reference look
    at `event_type`.
    """
    if value is not None and len(value) <= MAX_EVENT_BYTES:
        row = fast_decode(value, now=now)
        if row is not None:
            return row
        correction = fast_decode_correction(value, now=now)
        if correction is not None:
            return correction
    data = _json_object(value)
    if isinstance(data, Rejection):
        return data
    other = _other_event(data, now)
    if other is not None:
        return other
    event = _validated_usage_event(data, now)
    return event if isinstance(event, Rejection) else usage_row(event)


def _other_event(
    data: dict[str, object], now: datetime
) -> PeriodCharge | Correction | Rejection | None:
    """A period charge or a correction, by `event_type`; None for anything else."""
    model: type[PeriodChargeEvent | UsageCorrectionEvent]
    event_type = data.get("event_type")
    if event_type == PERIOD_CHARGE_EVENT_TYPE:
        model = PeriodChargeEvent
    elif event_type == CORRECTION_EVENT_TYPE:
        model = UsageCorrectionEvent
    else:
        return None
    try:
        event = model.model_validate(data, context={"now": now})
    except ValidationError as error:
        return Rejection(DeadLetterReason.SCHEMA_VIOLATION, describe_validation_error(error))
    if isinstance(event, PeriodChargeEvent):
        return period_charge_row(event)
    return correction_row(event)


def decode_usage_event_reference(value: bytes | None, *, now: datetime) -> UsageEvent | Rejection:
    """The event in `value` as the pydantic model that states the contract reads it.

    Never raises for bad input. JSON numbers are read from their literal digits into `Decimal`
    (never through a binary float), and NaN / Infinity, which Python's `json` accepts, are not
    JSON. A tombstone (no value) is `invalid_json`.
    """
    data = _json_object(value)
    if isinstance(data, Rejection):
        return data
    return _validated_usage_event(data, now)


def _validated_usage_event(data: dict[str, object], now: datetime) -> UsageEvent | Rejection:
    try:
        return UsageEvent.model_validate(data, context={"now": now})
    except ValidationError as error:
        return Rejection(DeadLetterReason.SCHEMA_VIOLATION, describe_validation_error(error))
