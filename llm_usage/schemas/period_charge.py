"""The period charge v1 (`llm_period_charge_recorded`): the gateway's authoritative charge for a
plan-inclusive tenant's month (docs/contract.md, "Other events on the usage topic").

It shares the usage event's rules for what it has in common: ids, the exact decimal read from its
literal digits, and `occurred_at`. Validate with
`PeriodChargeEvent.model_validate(data, context={"now": now})`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.schemas.usage_event import (
    SCHEMA_VERSION,
    ExactUsd,
    Id,
    OccurredAt,
    SchemaVersion,
    Text,
    clean_id,
    in_utc_and_not_in_the_future,
)

PERIOD_CHARGE_EVENT_TYPE: Final = "llm_period_charge_recorded"
PERIOD_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"

Period = Annotated[str, Field(strict=True, pattern=PERIOD_PATTERN)]


def _publisher_view_of_json_schema(schema: dict[str, Any]) -> None:
    schema["description"] = (
        "The gateway's authoritative charge for a tenant's (and deployment's) month on a "
        "plan-inclusive plan. A later one for the same tenant, deployment and period (by "
        "occurred_at, then period_charge_id) supersedes an earlier one. Unknown fields are "
        "ignored; period_charge_usd is exact (a string is preferred), at most 12 digits before "
        "the point and 18 after."
    )


class PeriodChargeEvent(BaseModel):
    """One period charge as the gateway published it, validated; `occurred_at` is in UTC."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        strict=True,
        use_attribute_docstrings=True,
        title="Period charge v1 (llm_period_charge_recorded)",
        json_schema_extra=_publisher_view_of_json_schema,
    )

    event_type: Literal["llm_period_charge_recorded"]
    """Required: it is what tells a period charge from a usage event on the usage topic."""
    schema_version: SchemaVersion = SCHEMA_VERSION
    """Optional, default 1; any other value is rejected."""
    period_charge_id: Id
    """The idempotency key: a repeat of a stored id is a duplicate, never a second charge."""
    tenant_id: Id
    deployment_id: Text | None = None
    """The invoice line it trues up; null is its own group. At most 200 characters."""
    period: Period
    """The UTC month it is the charge for, YYYY-MM."""
    period_charge_usd: ExactUsd
    """The month's exact charge, a decimal >= 0 (a string is preferred)."""
    occurred_at: OccurredAt
    """RFC 3339 with an offset, stored as UTC; at most 5 minutes after now."""

    _clean_id = field_validator("period_charge_id", "tenant_id")(clean_id)
    _in_utc_and_not_in_the_future = field_validator("occurred_at")(in_utc_and_not_in_the_future)


def period_charge_row(event: PeriodChargeEvent) -> PeriodCharge:
    """The stored values of a validated `event`."""
    return PeriodCharge(
        tenant_id=event.tenant_id,
        period_charge_id=event.period_charge_id,
        deployment_id=event.deployment_id,
        period=event.period,
        period_charge_usd=event.period_charge_usd,
        occurred_at=event.occurred_at,
    )
