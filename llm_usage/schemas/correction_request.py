"""A correction as our own publishers write it (`POST /v1/usage-events/{id}/corrections` and
`llm-usage events void|amend`): filled, encoded, and checked as the usage consumer will judge it.

An amend is published complete: every corrigible field, the ones asked for over the event's
current effective values (`domain.corrections.complete_amend`). "Last wins" replaces the stored
values by the winner's fields, so a complete amend means what its author saw and asked for,
whatever correction came before it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from pydantic import ValidationError

from llm_usage.domain.corrections import (
    CHARGE_FIELDS,
    TOKEN_FIELDS,
    Action,
    Effective,
    complete_amend,
)
from llm_usage.domain.money import canonical_decimal
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.schemas.usage_correction import CORRECTION_EVENT_TYPE, AmendFields

_FIELD_PATH: Final = re.compile(r"[a-z_]+(\.[a-z_]+)?")


class InvalidCorrectionError(ValueError):
    """A correction that cannot be published. `field` names what is at fault, as the request
    spells it (`fields.input_tokens`, `reason`; None: the correction as a whole)."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class CorrectionAsked:
    """What a person asks: `changes` are the fields an amend sets, as JSON values (money as a
    decimal string, null for no deployment, user or agent)."""

    action: str
    changes: Mapping[str, Any]
    reason: str
    actor: str
    occurred_at: datetime
    correction_id: str


@dataclass(frozen=True, slots=True)
class EventKey:
    """The stored event a correction is of."""

    tenant_id: str
    gateway_request_id: str
    occurred_at: datetime


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_value(value: object) -> object:
    return canonical_decimal(value) if isinstance(value, Decimal) else value


def _amend_fields(current: Effective, changes: Mapping[str, Any]) -> dict[str, object]:
    if not changes:
        raise InvalidCorrectionError("fields", "an amend changes at least one field")
    try:
        asked = AmendFields.model_validate(dict(changes))
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        place = ".".join(str(part) for part in ("fields", *first["loc"]))
        raise InvalidCorrectionError(place, first["msg"]) from None
    sent = asked.sent()
    for name in (*TOKEN_FIELDS, *CHARGE_FIELDS):
        if name in sent and sent[name] is None:
            raise InvalidCorrectionError(
                f"fields.{name}", "must not be null (only attribution may)"
            )
    return {name: _json_value(value) for name, value in complete_amend(current, sent).items()}


def correction_event(
    asked: CorrectionAsked, *, event: EventKey, current: Effective, now: datetime
) -> tuple[dict[str, Any], bytes]:
    """The `llm_usage_corrected` event to publish (keyed by its tenant) and its bytes, checked
    with the consumers' own decoder; InvalidCorrectionError says what is wrong."""
    if asked.action not in tuple(Action):
        raise InvalidCorrectionError("action", "must be void or amend")
    if asked.action == Action.VOID and asked.changes:
        raise InvalidCorrectionError("fields", "a void changes no field: leave fields out")
    published: dict[str, Any] = {
        "event_type": CORRECTION_EVENT_TYPE,
        "schema_version": 1,
        "correction_id": asked.correction_id,
        "gateway_request_id": event.gateway_request_id,
        "tenant_id": event.tenant_id,
        "action": asked.action,
    }
    if asked.action == Action.AMEND:
        published["fields"] = _amend_fields(current, asked.changes)
    published |= {
        "reason": asked.reason,
        "actor": asked.actor,
        "occurred_at": _utc(asked.occurred_at),
        "event_occurred_at": _utc(event.occurred_at),
    }
    value = json.dumps(published).encode()
    judged = decode_usage_topic_record(value, now=now)
    if isinstance(judged, Rejection):
        # The decoder's detail is `field: why` (the first broken rule first).
        name, colon, problem = judged.detail.partition(": ")
        if colon and _FIELD_PATH.fullmatch(name):
            raise InvalidCorrectionError(name, problem)
        raise InvalidCorrectionError(None, judged.detail)
    return published, value
