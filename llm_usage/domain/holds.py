"""Holds a budget check places (issue 23): which counters a check holds on, the answer it gives,
and `HoldLedger`, the pure model of the invariant the storage is tested against.

Pure values and functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Final

from llm_usage.domain.budgets import SCOPE_FIELDS, BudgetWindow, SpendKey, scopes_of
from llm_usage.domain.money import EXACT_CONTEXT, canonical_decimal
from llm_usage.domain.periods import month_start, utc_day

ALLOW: Final = "allow"
DENY: Final = "deny"

# How a hold ended (and the budget consumer's `holds_ended_total{how}` label).
SETTLED: Final = "settled"
EXPIRED: Final = "expired"
SETTLED_LATE: Final = "settled_late"

_SCOPE_RANK: Final[dict[str, int]] = {
    scope_type.value: rank for rank, (scope_type, _) in enumerate(SCOPE_FIELDS)
}
_WINDOW_RANK: Final[dict[str, int]] = {BudgetWindow.DAILY.value: 0, BudgetWindow.MONTHLY.value: 1}


@dataclass(frozen=True)
class _Attributions:
    """What `scopes_of` reads: an event's tenant and attributions."""

    tenant_id: str
    deployment_id: str | None
    user_id: str | None
    agent_id: str | None


def hold_counters(
    tenant_id: str,
    deployment_id: str | None,
    user_id: str | None,
    agent_id: str | None,
    day: date,
) -> list[SpendKey]:
    """Every counter an event with these attributions on `day` counts toward (the tenant always,
    each attribution sent; the daily period is `day`, the monthly one the first of its month),
    sorted in lock order."""
    scopes = scopes_of(_Attributions(tenant_id, deployment_id, user_id, agent_id))
    return sorted(
        (tenant_id, scope_type.value, scope_id, window.value, start)
        for scope_type, scope_id in scopes
        for window, start in ((BudgetWindow.DAILY, day), (BudgetWindow.MONTHLY, month_start(day)))
    )


@dataclass(frozen=True)
class DeniedLimit:
    """One blocking limit a check would have broken, with what it saw."""

    scope_type: str
    scope_id: str
    window: str
    limit_usd: Decimal
    spend_usd: Decimal
    held_usd: Decimal

    def to_json(self) -> dict[str, str]:
        return {
            "scope_type": self.scope_type,
            "scope_id": self.scope_id,
            "window": self.window,
            "limit_usd": canonical_decimal(self.limit_usd),
            "spend_usd": canonical_decimal(self.spend_usd),
            "held_usd": canonical_decimal(self.held_usd),
        }

    def order(self) -> tuple[int, int]:
        """The answer's order: scope type as the contract lists them, then daily before monthly."""
        return (_SCOPE_RANK[self.scope_type], _WINDOW_RANK[self.window])


@dataclass(frozen=True)
class CheckOutcome:
    """A check's answer. `answer` says where it came from: decided now ("new"), the first
    answer of this id ("repeat"), or allowed because the event is already counted ("counted")."""

    decision: str
    denied_by: tuple[DeniedLimit, ...]
    hold_expires_at: datetime | None
    estimated_charge_usd: Decimal
    answer: str


def _add(a: Decimal, b: Decimal) -> Decimal:
    return EXACT_CONTEXT.add(a, b)


@dataclass
class _Hold:
    request_id: str
    day: date
    counters: tuple[SpendKey, ...]
    amount: Decimal
    expires_at: datetime
    outcome: CheckOutcome
    state: str  # "open" | "settled" | "expired" | "denied"
    ended_times: int = 0


@dataclass
class HoldLedger:
    """The pure model of design §7: checks, holds, counted events and the sweeper, on one
    instant `now`. Limits are the blocking limits per (scope_type, scope_id, window).

    `spend` is committed spend per counter; `unheld` the part of it that never held on that
    counter (U(K)); `overshoot` Σ max(0, actual - estimate) of settled holds per counter."""

    limits: dict[tuple[str, str, str], Decimal]
    now: datetime
    hold_seconds: int
    spend: dict[SpendKey, Decimal] = field(default_factory=dict)
    placed: dict[SpendKey, Decimal] = field(default_factory=dict)
    ended: dict[SpendKey, Decimal] = field(default_factory=dict)
    unheld: dict[SpendKey, Decimal] = field(default_factory=dict)
    overshoot: dict[SpendKey, Decimal] = field(default_factory=dict)
    holds: dict[tuple[str, str], _Hold] = field(default_factory=dict)
    counted: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    def held(self, key: SpendKey) -> Decimal:
        return self.placed.get(key, Decimal(0)) - self.ended.get(key, Decimal(0))

    def check(
        self,
        tenant_id: str,
        request_id: str,
        attributions: tuple[str | None, str | None, str | None],
        amount: Decimal,
    ) -> CheckOutcome:
        """What the route answers: counted → allow with no hold; else `budget_check`."""
        if (tenant_id, request_id) in self.counted:
            return CheckOutcome(ALLOW, (), None, amount, "counted")
        first = self.holds.get((tenant_id, request_id))
        if first is not None:
            return CheckOutcome(
                first.outcome.decision,
                first.outcome.denied_by,
                first.outcome.hold_expires_at,
                first.outcome.estimated_charge_usd,
                "repeat",
            )
        day = utc_day(self.now)
        counters = tuple(hold_counters(tenant_id, *attributions, day))
        denied = sorted(
            (
                DeniedLimit(
                    key[1], key[2], key[3], limit, self.spend.get(key, Decimal(0)), self.held(key)
                )
                for key in counters
                if (limit := self.limits.get((key[1], key[2], key[3]))) is not None
                and _add(_add(self.spend.get(key, Decimal(0)), self.held(key)), amount) > limit
            ),
            key=DeniedLimit.order,
        )
        expires_at = self.now + timedelta(seconds=self.hold_seconds)
        if denied:
            outcome = CheckOutcome(DENY, tuple(denied), None, amount, "new")
            self.holds[(tenant_id, request_id)] = _Hold(
                request_id, day, counters, amount, expires_at, outcome, "denied"
            )
            return outcome
        outcome = CheckOutcome(ALLOW, (), expires_at, amount, "new")
        self.holds[(tenant_id, request_id)] = _Hold(
            request_id, day, counters, amount, expires_at, outcome, "open"
        )
        for key in counters:
            self.placed[key] = _add(self.placed.get(key, Decimal(0)), amount)
        return outcome

    def count_event(
        self,
        tenant_id: str,
        request_id: str,
        attributions: tuple[str | None, str | None, str | None],
        actual: Decimal,
        day: date,
        *,
        sees_hold: bool = True,
    ) -> str | None:
        """The budget consumer counts an event (first copy only) and settles its open hold in
        the same transaction; returns "settled" when it ended one. With `sees_hold` False the
        batch raced the check (design §5.1): it counts, and the hold stays open for the sweeper."""
        if (tenant_id, request_id) in self.counted:
            return None
        self.counted[(tenant_id, request_id)] = actual
        counters = hold_counters(tenant_id, *attributions, day)
        hold = self.holds.get((tenant_id, request_id))
        held_on: set[SpendKey] = set()
        if sees_hold and hold is not None and hold.state == "open":
            self._end(hold, SETTLED)
            held_on = set(hold.counters)
            for key in hold.counters:
                excess = max(Decimal(0), actual - hold.amount)
                self.overshoot[key] = _add(self.overshoot.get(key, Decimal(0)), excess)
        for key in counters:
            self.spend[key] = _add(self.spend.get(key, Decimal(0)), actual)
            if key not in held_on:
                self.unheld[key] = _add(self.unheld.get(key, Decimal(0)), actual)
        return SETTLED if hold is not None and held_on else None

    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    def sweep(self) -> list[tuple[str, str]]:
        """End every open hold that expired (`settled_late` when its event is counted, else
        `expired`) and forget ended rows past expires_at + hold_seconds; returns (id, how)."""
        ended: list[tuple[str, str]] = []
        for key, hold in sorted(self.holds.items()):
            if hold.state == "open" and hold.expires_at <= self.now:
                how = SETTLED_LATE if key in self.counted else EXPIRED
                self._end(hold, how)
                ended.append((hold.request_id, how))
        horizon = self.now - timedelta(seconds=self.hold_seconds)
        for key in [
            k for k, h in self.holds.items() if h.state != "open" and h.expires_at < horizon
        ]:
            del self.holds[key]
        return ended

    def _end(self, hold: _Hold, how: str) -> None:
        hold.state = SETTLED if how in (SETTLED, SETTLED_LATE) else EXPIRED
        hold.ended_times += 1
        for key in hold.counters:
            self.ended[key] = _add(self.ended.get(key, Decimal(0)), hold.amount)

    def open_amounts(self) -> dict[SpendKey, Decimal]:
        """Σ amount of open holds per counter (what `held` must equal)."""
        sums: dict[SpendKey, Decimal] = {}
        for hold in self.holds.values():
            if hold.state == "open":
                for key in hold.counters:
                    sums[key] = _add(sums.get(key, Decimal(0)), hold.amount)
        return sums

    def bound(self, key: SpendKey) -> Decimal | None:
        """The invariant's right side for `key`, None when it has no blocking limit."""
        limit = self.limits.get((key[1], key[2], key[3]))
        if limit is None:
            return None
        slack = _add(self.overshoot.get(key, Decimal(0)), self.unheld.get(key, Decimal(0)))
        return _add(limit, slack)

    def counters(self) -> Iterable[SpendKey]:
        return set(self.spend) | set(self.placed)
