"""The body and answers of `/v1/usage-events/{gateway_request_id}` and its corrections (beside
`api/event_models.py`, whose conventions they follow)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_usage.api.event_models import EffectiveAnswer, StoredEventAnswer, TimeText
from llm_usage.api.models import _Answer


class CorrectionBody(BaseModel):
    """The body of `POST /v1/usage-events/{gateway_request_id}/corrections`."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["void", "amend"]
    fields: dict[str, Any] | None = Field(
        default=None,
        description="amend: the fields to change (at least one) among input_tokens, "
        "output_tokens, cached_input_tokens, reasoning_tokens, total_tokens, "
        "customer_charge_usd (exact decimal string), customer_charge_cents, deployment_id, "
        "user_id, agent_id (null: none); every other field keeps its current effective value. "
        "void: absent, null or {}",
    )
    reason: str = Field(description="why, for the audit: 1-1000 characters")
    tenant_id: str | None = Field(
        default=None,
        description="the event's tenant; may be left out while the id is in the id window",
    )
    correction_id: str | None = Field(
        default=None,
        description="the correction's id (sending it again is harmless); absent: a new UUID",
    )
    occurred_at: str | None = Field(
        default=None,
        description="RFC 3339: the correction's own time, which decides the last one; absent: now",
    )
    event_occurred_at: str | None = Field(
        default=None,
        description="RFC 3339: the event's occurred_at, to find an event older than the id "
        "window quickly",
    )


class CorrectionEntryAnswer(_Answer):
    correction_id: str
    action: Literal["void", "amend"]
    fields: dict[str, Any] = Field(description="as sent; money as exact decimal strings")
    reason: str
    actor: str
    occurred_at: TimeText = Field(description="RFC 3339, UTC: the correction's own time")
    received_at: TimeText = Field(description="RFC 3339, UTC: when the pipeline judged it")
    verdict: Literal["applied", "unknown"] = Field(
        description="applied; unknown: its event was not found in time (dead-lettered)"
    )
    won: bool = Field(description="it was the last correction (so it decided) when applied")


class EventHistoryAnswer(_Answer):
    event: StoredEventAnswer
    effective: EffectiveAnswer
    voided: bool
    corrections: list[CorrectionEntryAnswer] = Field(
        description="oldest first, by their own occurred_at, then correction_id"
    )
    waiting: bool = Field(description="a correction of it is published but not applied yet")


class NotStoredAnswer(BaseModel):
    detail: str
    waiting: bool = Field(description="a correction of this id waits for its event")


class CorrectionAnswer(_Answer):
    correction_id: str
    event: dict[str, Any] = Field(
        description="the `llm_usage_corrected` event as published; the consumers apply it "
        "shortly (GET /v1/usage-events/{gateway_request_id} shows it then)"
    )
