"""The usage correction v1 (`llm_usage_corrected`): void or amend a stored event without editing
it (docs/contract.md, "Corrections").

It shares the usage event's rules for what it has in common: ids, counts, the exact decimal read
from its literal digits, and `occurred_at`. Validate with
`UsageCorrectionEvent.model_validate(data, context={"now": now})`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llm_usage.domain.corrections import Action, Correction
from llm_usage.schemas.usage_event import (
    NO_NUL_PATTERN,
    SCHEMA_VERSION,
    Count,
    ExactUsd,
    Id,
    OccurredAt,
    SchemaVersion,
    Text,
    clean_id,
    in_utc_and_not_in_the_future,
    require_agreement,
)

CORRECTION_EVENT_TYPE: Final = "llm_usage_corrected"
MAX_REASON_LENGTH = 1000

Reason = Annotated[
    str, Field(strict=True, min_length=1, max_length=MAX_REASON_LENGTH, pattern=NO_NUL_PATTERN)
]
Actor = Annotated[str, Field(strict=True, min_length=1, max_length=200, pattern=NO_NUL_PATTERN)]


def _publisher_view_of_json_schema(schema: dict[str, Any]) -> None:
    schema["description"] = (
        "A correction of a stored llm_usage_recorded event, keyed like it (tenant_id). A void "
        "makes the event count for nothing; an amend replaces the fields it sends. Of all the "
        "corrections of one event, the last by occurred_at, then correction_id, wins. Unknown "
        "top-level fields are ignored; unknown keys inside fields are refused."
    )


class AmendFields(BaseModel):
    """The corrected values of an amend: only these keys, each optional."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True
    )

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cached_input_tokens: Count | None = None
    reasoning_tokens: Count | None = None
    total_tokens: Count | None = None
    """Absent while input or output tokens are sent: their effective sum."""
    customer_charge_usd: ExactUsd | None = None
    """The exact corrected charge, a decimal >= 0 (a string is preferred)."""
    customer_charge_cents: Count | None = None
    """Within 1 cent of customer_charge_usd when both are sent; alone, the charge is cents / 100."""
    deployment_id: Text | None = None
    user_id: Text | None = None
    agent_id: Text | None = None

    def sent(self) -> dict[str, object]:
        """The keys the publisher sent, with their values (an attribution may be sent as null)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class UsageCorrectionEvent(BaseModel):
    """One correction as its publisher sent it, validated; `occurred_at` is in UTC."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        strict=True,
        use_attribute_docstrings=True,
        title="Usage correction v1 (llm_usage_corrected)",
        json_schema_extra=_publisher_view_of_json_schema,
    )

    event_type: Literal["llm_usage_corrected"]
    """Required: it is what tells a correction from a usage event on the usage topic."""
    schema_version: SchemaVersion = SCHEMA_VERSION
    """Optional, default 1; any other value is rejected."""
    correction_id: Id
    """The idempotency key within the tenant: a repeat is a duplicate, another body a conflict."""
    gateway_request_id: Id
    """The event it corrects."""
    tenant_id: Id
    """The event's tenant, and the record's key."""
    action: Literal["void", "amend"]
    fields: AmendFields | None = None
    """amend: the corrected fields (at least one); void: absent, null or {}."""
    reason: Reason
    actor: Actor
    """Who asked for it: a person or a system."""
    occurred_at: OccurredAt
    """When it was decided, RFC 3339 with an offset; decides which correction is the last."""
    event_occurred_at: OccurredAt | None = None
    """Optional: the corrected event's occurred_at, which finds it past the 8-day id window."""

    _clean_id = field_validator("correction_id", "gateway_request_id", "tenant_id")(clean_id)
    _in_utc_and_not_in_the_future = field_validator("occurred_at")(in_utc_and_not_in_the_future)

    @field_validator("event_occurred_at")
    @classmethod
    def _event_time_in_utc(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        return None if value is None else in_utc_and_not_in_the_future(value, info)

    @model_validator(mode="after")
    def _fields_fit_the_action(self) -> Self:
        sent = {} if self.fields is None else self.fields.sent()
        if self.action == "void" and sent:
            raise PydanticCustomError(
                "void_with_fields", "fields: a void changes no field; send none (or {})"
            )
        if self.action == "amend" and not sent:
            raise PydanticCustomError(
                "amend_without_fields", "fields: an amend must send at least one corrected field"
            )
        usd, cents = sent.get("customer_charge_usd"), sent.get("customer_charge_cents")
        if "customer_charge_usd" in sent and usd is None:
            raise PydanticCustomError(
                "charge_null", "fields.customer_charge_usd: must be a decimal >= 0, not null"
            )
        for name in ("input_tokens", "output_tokens", "cached_input_tokens",
                     "reasoning_tokens", "total_tokens", "customer_charge_cents"):  # fmt: skip
            if name in sent and sent[name] is None:
                raise PydanticCustomError(
                    "count_null",
                    "fields.{name}: must be a whole number >= 0, not null",
                    {"name": name},
                )
        if usd is not None and cents is not None:
            require_agreement(usd, cents)  # type: ignore[arg-type]
        return self


def correction_row(event: UsageCorrectionEvent) -> Correction:
    """The stored values of a validated `event`."""
    return Correction(
        tenant_id=event.tenant_id,
        correction_id=event.correction_id,
        gateway_request_id=event.gateway_request_id,
        action=Action(event.action),
        fields={} if event.fields is None else event.fields.sent(),
        reason=event.reason,
        actor=event.actor,
        occurred_at=event.occurred_at,
        event_occurred_at=event.event_occurred_at,
    )
