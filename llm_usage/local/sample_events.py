"""Realistic usage events for the demo and the benchmark (seeded, so runs are repeatable)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from llm_usage.domain.money import round_half_up, usd_to_cents

# (provider, model, USD per million input tokens, per million output tokens)
_MODELS = [
    ("openai", "gpt-4o-mini", Decimal("0.15"), Decimal("0.60")),
    ("openai", "gpt-4o", Decimal("2.50"), Decimal("10.00")),
    ("anthropic", "claude-3-5-sonnet", Decimal("3.00"), Decimal("15.00")),
    ("anthropic", "claude-3-5-haiku", Decimal("0.80"), Decimal("4.00")),
    ("google", "gemini-1.5-flash", Decimal("0.075"), Decimal("0.30")),
]
_MARKUP = Decimal("1.20")  # flat 20 % over the provider's price
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class SampleTenant:
    tenant_id: str
    deployments: tuple[str | None, ...]


DEMO_TENANTS = (
    SampleTenant("acme", ("support-bot", "search", None)),
    SampleTenant("globex", ("copilot", "summarizer")),
    SampleTenant("initech", ("tps-reports",)),
)


def sample_event(
    rng: random.Random,
    *,
    gateway_request_id: str,
    tenant: SampleTenant,
    occurred_at: datetime,
) -> dict[str, Any]:
    """One priced event as a gateway would publish it (charge as an exact decimal string)."""
    provider, model, input_price, output_price = rng.choice(_MODELS)
    input_tokens = rng.randint(50, 6000)
    output_tokens = rng.randint(10, 1500)
    upstream = (input_tokens * input_price + output_tokens * output_price) / _MILLION
    charge = round_half_up(upstream * _MARKUP, 10)
    return {
        "event_type": "llm_usage_recorded",
        "schema_version": 1,
        "gateway_request_id": gateway_request_id,
        "tenant_id": tenant.tenant_id,
        "deployment_id": rng.choice(tenant.deployments),
        "user_id": f"user-{rng.randint(1, 40)}",
        "agent_id": None,
        "channel": rng.choice(["web", "api", "slack"]),
        "feature": rng.choice(["chat", "summarize", "classify"]),
        "provider": provider,
        "model": model,
        "request_kind": "chat.completions",
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": rng.randint(0, input_tokens // 4),
        "reasoning_tokens": 0,
        "upstream_cost_usd": str(upstream),
        "customer_charge_usd": str(charge),
        "customer_charge_cents": usd_to_cents(charge),
        "markup_mode": "flat_percent",
        "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
    }


def sample_price_rows() -> list[tuple[str, str, Decimal, Decimal]]:
    """The sample models' list prices: (provider, model, USD per million input tokens, per
    million output tokens), the rates the events' `upstream_cost_usd` was computed with."""
    return [(provider, model, inp, out) for provider, model, inp, out in _MODELS]


def without_charge(value: bytes) -> bytes:
    """An event's bytes with both charge fields left out: for the price table to price."""
    event = json.loads(value)
    del event["customer_charge_usd"], event["customer_charge_cents"]
    return json.dumps(event).encode()


def sample_stream(
    rng: random.Random,
    *,
    count: int,
    dup_rate: float,
    id_prefix: str,
    now: datetime,
    tenants: tuple[SampleTenant, ...] = DEMO_TENANTS,
    spread_seconds: int = 3600,
) -> list[tuple[bytes, bytes, dict[str, Any]]]:
    """`count` records as (key, value, event) that occurred up to `spread_seconds` before `now`;
    about `dup_rate` of them re-send an earlier event."""
    records: list[tuple[bytes, bytes, dict[str, Any]]] = []
    for index in range(count):
        if records and rng.random() < dup_rate:
            records.append(rng.choice(records))
            continue
        tenant = rng.choice(tenants)
        event = sample_event(
            rng,
            gateway_request_id=f"{id_prefix}-{index:08d}",
            tenant=tenant,
            occurred_at=now - timedelta(seconds=rng.randint(0, spread_seconds)),
        )
        records.append((tenant.tenant_id.encode(), json.dumps(event).encode(), event))
    return records
