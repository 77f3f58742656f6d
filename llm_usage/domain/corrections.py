"""Corrections of stored usage (`llm_usage_corrected`): which one wins, and what an event
contributes once corrected.

An event's effective values are its original row with the winning correction's fields laid
over it; the winner is the correction with the greatest (`occurred_at`, `correction_id`). That
rule depends only on the set of corrections applied, never on the order they arrived in, so
replicas and replays all end in the same state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Final, Protocol

from llm_usage.domain.money import cents_to_usd


class Action(StrEnum):
    VOID = "void"
    AMEND = "amend"


class Verdict(StrEnum):
    """What the usage consumer decided about a correction."""

    APPLIED = "applied"  # its event was stored: it is part of the event's history
    UNKNOWN = "unknown"  # no event was stored within the wait: dead-lettered `unknown_event`


# Every field a correction may change, named as on the stored event.
ATTRIBUTION_FIELDS: Final = ("deployment_id", "user_id", "agent_id")
TOKEN_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
CHARGE_FIELDS: Final = ("customer_charge_usd", "customer_charge_cents")
CORRIGIBLE_FIELDS: Final = ATTRIBUTION_FIELDS + TOKEN_FIELDS + CHARGE_FIELDS


@dataclass(frozen=True, slots=True)
class Correction:
    """One correction as the usage consumer stores it: `fields` holds only the keys sent, typed
    (counts `int`, the charge `Decimal`, attribution `str` or None)."""

    tenant_id: str
    correction_id: str
    gateway_request_id: str
    action: Action
    fields: Mapping[str, object]
    reason: str
    actor: str
    occurred_at: datetime
    event_occurred_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Its idempotency key: (tenant_id, correction_id)."""
        return (self.tenant_id, self.correction_id)

    @property
    def event(self) -> tuple[str, str]:
        """The event it corrects: (tenant_id, gateway_request_id)."""
        return (self.tenant_id, self.gateway_request_id)

    def fields_json(self) -> dict[str, object]:
        """`fields` as JSON values: the charge as an exact string, never a float."""
        return {
            name: str(value) if isinstance(value, Decimal) else value
            for name, value in self.fields.items()
        }


@dataclass(frozen=True, slots=True)
class Effective:
    """What an event contributes now. A voided event keeps its figures (for display) but
    contributes nothing anywhere."""

    deployment_id: str | None
    user_id: str | None
    agent_id: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    customer_charge_usd: Decimal
    customer_charge_cents: int | None
    charge_estimated: bool
    voided: bool = False

    def row_fields(self) -> dict[str, object]:
        """Every field but `voided`, named as the stored event's: `row._replace(**fields)` is
        the effective row."""
        return {name: getattr(self, name) for name in (*CORRIGIBLE_FIELDS, "charge_estimated")}


class EventFigures(Protocol):
    """A stored event's corrigible values (a `UsageRow`, or a database row read as one)."""

    @property
    def deployment_id(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def customer_charge_usd(self) -> Decimal: ...
    @property
    def customer_charge_cents(self) -> int | None: ...
    @property
    def charge_estimated(self) -> bool: ...


def original(row: EventFigures) -> Effective:
    """The event as it was stored, before any correction."""
    return Effective(
        deployment_id=row.deployment_id,
        user_id=row.user_id,
        agent_id=row.agent_id,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_input_tokens=row.cached_input_tokens,
        reasoning_tokens=row.reasoning_tokens,
        total_tokens=row.total_tokens,
        customer_charge_usd=row.customer_charge_usd,
        customer_charge_cents=row.customer_charge_cents,
        charge_estimated=row.charge_estimated,
    )


def rank(correction: Correction) -> tuple[datetime, str]:
    """The order "last wins" means: `occurred_at`, then `correction_id` by code point (as
    PostgreSQL's `COLLATE "C"` orders it)."""
    return (correction.occurred_at, correction.correction_id)


def winner(corrections: Iterable[Correction]) -> Correction | None:
    """The correction whose values count, or None when there is none."""
    return max(corrections, key=rank, default=None)


def effective_after(first: Effective, win: Correction | None) -> Effective:
    """The event's effective values when `win` is its winning correction: the original with the
    winner's fields laid over it (a void keeps the figures and marks the event voided)."""
    if win is None:
        return first
    if win.action is Action.VOID:
        return replace(first, voided=True)
    fields = dict(win.fields)
    if "customer_charge_usd" not in fields and "customer_charge_cents" in fields:
        cents = fields["customer_charge_cents"]
        assert isinstance(cents, int)
        fields["customer_charge_usd"] = cents_to_usd(cents)
    elif "customer_charge_usd" in fields and "customer_charge_cents" not in fields:
        # The original's cents described the original charge, not this one.
        fields["customer_charge_cents"] = None
    if (
        "customer_charge_usd" in fields
        and fields["customer_charge_usd"] != first.customer_charge_usd
    ):
        # A person stated this charge. A complete amend repeating the original charge (it
        # corrected something else) leaves the price table's estimate an estimate.
        fields["charge_estimated"] = False
    if "total_tokens" not in fields and ("input_tokens" in fields or "output_tokens" in fields):
        input_tokens = fields.get("input_tokens", first.input_tokens)
        output_tokens = fields.get("output_tokens", first.output_tokens)
        assert isinstance(input_tokens, int)
        assert isinstance(output_tokens, int)
        fields["total_tokens"] = input_tokens + output_tokens
    return replace(first, voided=False, **fields)  # type: ignore[arg-type]


def differing_fields(a: Correction, b: Correction) -> list[str]:
    """The names of what differs between two corrections with the same id (the event's time
    hint is a look-up aid, not part of the correction)."""
    names = ["gateway_request_id", "action", "fields", "reason", "actor", "occurred_at"]
    return [name for name in names if getattr(a, name) != getattr(b, name)]


def same_correction(a: Correction, b: Correction) -> bool:
    """Whether `b` repeats `a` (harmless) rather than re-using its id for something else."""
    return not differing_fields(a, b)


def complete_amend(current: Effective, changes: Mapping[str, object]) -> dict[str, object]:
    """Every corrigible field of an amend: the current effective values with `changes` laid
    over them. Publishers send complete amends, so "last wins" never resurrects a value the
    person correcting did not see."""
    unknown = sorted(set(changes) - set(CORRIGIBLE_FIELDS))
    if unknown:
        raise ValueError(f"these fields cannot be corrected: {', '.join(unknown)}")
    fields: dict[str, object] = {name: getattr(current, name) for name in CORRIGIBLE_FIELDS}
    fields.update(changes)
    if "customer_charge_usd" in changes and "customer_charge_cents" not in changes:
        fields["customer_charge_cents"] = None
    elif "customer_charge_cents" in changes and "customer_charge_usd" not in changes:
        cents = changes["customer_charge_cents"]
        assert isinstance(cents, int)
        fields["customer_charge_usd"] = cents_to_usd(cents)
    if "total_tokens" not in changes and ("input_tokens" in changes or "output_tokens" in changes):
        input_tokens, output_tokens = fields["input_tokens"], fields["output_tokens"]
        assert isinstance(input_tokens, int)
        assert isinstance(output_tokens, int)
        fields["total_tokens"] = input_tokens + output_tokens
    if fields["customer_charge_cents"] is None:
        del fields["customer_charge_cents"]
    return fields
