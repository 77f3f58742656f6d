"""What the soak's gateway sends: tenants, their policies, the simulated clock and the event mix.

Pure and seeded: the same seed builds the same scenario and the same sequence of events.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from llm_usage.core.clock import SimulatedClock
from llm_usage.domain.money import usd_to_cents
from llm_usage.domain.policies import BudgetPolicy

MEAN_CHARGE_USD = Decimal("0.0100005")  # charges are uniform in [0.000001, 0.02]
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class SoakTenant:
    tenant_id: str
    deployments: tuple[str, ...]
    users: tuple[str, ...]
    agents: tuple[str, ...]


@dataclass(frozen=True)
class LoweredPolicy:
    """A monthly deployment policy whose limit the run lowers below the spend it has recorded.

    It starts unreachable; its deployment gets events only once the month has turned, and no
    late ones, so that the only alerts it may give are those of its lowered limit."""

    tenant_id: str
    deployment_id: str
    initial_monthly_limit_usd: Decimal


@dataclass(frozen=True)
class EventMix:
    """Shares of the records sent, besides plain events."""

    duplicate: float = 0.08
    reserialised_duplicate: float = 0.03
    late: float = 0.03
    conflicting: float = 0.003
    malformed: float = 0.005
    transactional: float = 0.15
    aborted_transactions: float = 0.25


@dataclass(frozen=True)
class Scenario:
    seed: int
    rate: int
    seconds: float
    clock: SimulatedClock
    month_end: datetime
    tenants: tuple[SoakTenant, ...]
    policies: tuple[BudgetPolicy, ...]
    lowered: LoweredPolicy
    mix: EventMix = EventMix()


def choose_month_end(now: datetime) -> datetime:
    """A month boundary safely in the past: this month's start once it is 2 days behind, else
    last month's (a whole simulated run then stays in the past, as events must)."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if now - start >= timedelta(days=2):
        return start
    return (start - timedelta(days=1)).replace(day=1)


def build_scenario(
    *,
    seed: int,
    rate: int,
    seconds: float,
    real_start: float,
    now: datetime,
    clock_rate: float = 60.0,
    lead: timedelta = timedelta(minutes=30),
    tenants: int = 20,
) -> Scenario:
    rng = random.Random(f"soak-scenario-{seed}")
    month_end = choose_month_end(now)
    clock = SimulatedClock(start=month_end - lead, real_start=real_start, rate=clock_rate)
    soak_tenants = tuple(
        SoakTenant(
            tenant_id=f"t{index:02d}",
            deployments=tuple(f"dep-{d}" for d in range(1, 4)),
            users=tuple(f"user-{u}" for u in range(1, 6)),
            agents=("agent-1", "agent-2"),
        )
        for index in range(tenants)
    )
    # The spend one tenant sees over the whole run, most of it on the first day after the turn.
    run_spend = Decimal(rate) * Decimal(str(seconds)) * MEAN_CHARGE_USD / tenants
    policies: list[BudgetPolicy] = []
    for tenant in soak_tenants:
        policies.append(
            BudgetPolicy(
                tenant_id=tenant.tenant_id,
                scope_type="tenant",  # type: ignore[arg-type]
                scope_id=tenant.tenant_id,
                daily_limit_usd=_limit(rng, run_spend),
                monthly_limit_usd=_limit(rng, run_spend),
                warn_threshold_pct=rng.randint(50, 90),
            )
        )
        for deployment in tenant.deployments[:2]:
            policies.append(
                BudgetPolicy(
                    tenant_id=tenant.tenant_id,
                    scope_type="deployment",  # type: ignore[arg-type]
                    scope_id=deployment,
                    daily_limit_usd=_limit(rng, run_spend / 4) if rng.random() < 0.5 else None,
                    monthly_limit_usd=_limit(rng, run_spend / 4),
                    warn_threshold_pct=rng.randint(50, 90),
                )
            )
    lowered = LoweredPolicy(
        tenant_id=soak_tenants[0].tenant_id,
        deployment_id="dep-lowered",
        initial_monthly_limit_usd=Decimal("1000000000"),
    )
    policies.append(
        BudgetPolicy(
            tenant_id=lowered.tenant_id,
            scope_type="deployment",  # type: ignore[arg-type]
            scope_id=lowered.deployment_id,
            monthly_limit_usd=lowered.initial_monthly_limit_usd,
        )
    )
    return Scenario(
        seed=seed,
        rate=rate,
        seconds=seconds,
        clock=clock,
        month_end=month_end,
        tenants=soak_tenants,
        policies=tuple(policies),
        lowered=lowered,
    )


def _limit(rng: random.Random, expected: Decimal) -> Decimal:
    return max((expected * Decimal(str(rng.uniform(0.2, 1.5)))).quantize(_CENT), _CENT)


class EventFactory:
    """Builds the events of a scenario in order: plain, late, conflicting, malformed."""

    def __init__(self, scenario: Scenario) -> None:
        self._scenario = scenario
        self._rng = random.Random(f"soak-events-{scenario.seed}")
        self._count = 0

    def next_id(self) -> str:
        self._count += 1
        return f"soak{self._scenario.seed}-{self._count}"

    def event(self, *, occurred_at: datetime, late: bool = False) -> dict[str, Any]:
        rng, scenario = self._rng, self._scenario
        tenant = rng.choice(scenario.tenants)
        deployments: list[str | None] = [*tenant.deployments, None]
        turned = occurred_at >= scenario.month_end
        if tenant.tenant_id == scenario.lowered.tenant_id and turned and not late:
            deployments.append(scenario.lowered.deployment_id)
        charge = Decimal(rng.randint(1, 20_000)) / Decimal(1_000_000)
        input_tokens, output_tokens = rng.randint(10, 4000), rng.randint(1, 1500)
        return {
            "event_type": "llm_usage_recorded",
            "schema_version": 1,
            "gateway_request_id": self.next_id(),
            "tenant_id": tenant.tenant_id,
            "deployment_id": rng.choice(deployments),
            "user_id": rng.choice([*tenant.users, None]),
            "agent_id": rng.choice([*tenant.agents, None, None]),
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "customer_charge_usd": str(charge),
            "customer_charge_cents": usd_to_cents(charge),
            "occurred_at": occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        }

    def late_moment(self) -> datetime:
        """A moment on the last day of the month that ended, before the clock started."""
        start = self._scenario.month_end - timedelta(days=1)
        span = (self._scenario.clock.start - start).total_seconds()
        return start + timedelta(seconds=self._rng.uniform(0, max(span - 1, 0)))

    def conflicting(self, original: dict[str, Any]) -> dict[str, Any]:
        """Same id and tenant, another charge: the first stays, this one is dead-lettered."""
        charge = Decimal(original["customer_charge_usd"]) + Decimal("0.001")
        return original | {
            "customer_charge_usd": str(charge),
            "customer_charge_cents": usd_to_cents(charge),
        }

    def malformed(self) -> tuple[bytes, str]:  # noqa: PLR0911 - a return per kind
        """A record a gateway should not send, and the DLQ reason it deserves."""
        base = self.event(occurred_at=self._scenario.clock.now())
        base["gateway_request_id"] = f"bad-{base['gateway_request_id']}"
        kind = self._rng.randrange(9)
        if kind == 0:
            return encode(base)[:-7], "invalid_json"
        if kind == 1:
            return b"\xff\xfe" + encode(base), "invalid_json"
        if kind == 2:
            return json.dumps([base]).encode(), "schema_violation"
        if kind == 3:
            return encode(base | {"input_tokens": -1}), "schema_violation"
        if kind == 4:
            naive = base["occurred_at"].removesuffix("Z")
            return encode(base | {"occurred_at": naive}), "schema_violation"
        if kind == 5:
            return encode(base | {"tenant_id": f" {base['tenant_id']} "}), "schema_violation"
        if kind == 6:
            text = encode(base).decode()
            return (text[:-1] + f', "tenant_id": "other-{self._count}"}}').encode(), (
                "schema_violation"
            )
        if kind == 7:
            cents = int(base["customer_charge_cents"]) + 5
            return encode(base | {"customer_charge_cents": cents}), "schema_violation"
        return encode(base | {"padding": "x" * 70_000}), "too_large"


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def reserialised(event: dict[str, Any]) -> bytes:
    """The same values in other bytes: keys reversed, spaces, the charge as a JSON number."""
    charge = event["customer_charge_usd"]
    fields = {key: event[key] for key in reversed(list(event))}
    text = json.dumps(fields | {"customer_charge_usd": "__CHARGE__"}, indent=1)
    return text.replace('"__CHARGE__"', charge).encode()
