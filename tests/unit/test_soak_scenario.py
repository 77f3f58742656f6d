from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.soak.scenario import (
    EventFactory,
    Scenario,
    build_scenario,
    choose_month_end,
    encode,
    reserialised,
)

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def scenario(seed: int = 5) -> Scenario:
    return build_scenario(seed=seed, rate=2000, seconds=180, real_start=1_000.0, now=NOW)


def test_the_month_end_is_safely_in_the_past() -> None:
    assert choose_month_end(NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert choose_month_end(datetime(2026, 11, 1, 12, tzinfo=UTC)) == datetime(
        2026, 10, 1, tzinfo=UTC
    )
    assert choose_month_end(datetime(2026, 1, 2, tzinfo=UTC)) == datetime(2025, 12, 1, tzinfo=UTC)


def test_a_seed_builds_the_same_scenario_and_the_clock_crosses_the_month_end() -> None:
    assert scenario(5) == scenario(5)
    assert scenario(5).policies != scenario(6).policies
    clock = scenario().clock
    assert clock.real_time_of(scenario().month_end) == 1_030.0


def test_policies_have_exact_limits_and_the_lowered_one_starts_unreachable() -> None:
    built = scenario()
    for policy in built.policies:
        for limit in (policy.daily_limit_usd, policy.monthly_limit_usd):
            assert limit is None or (isinstance(limit, Decimal) and limit > 0)
    lowered = [p for p in built.policies if p.scope_id == built.lowered.deployment_id]
    assert [p.monthly_limit_usd for p in lowered] == [Decimal(1_000_000_000)]


def test_late_events_fall_on_the_last_day_before_the_clock_started() -> None:
    built = scenario()
    factory = EventFactory(built)
    for _ in range(200):
        moment = factory.late_moment()
        assert built.month_end - timedelta(days=1) <= moment < built.clock.start


def test_the_lowered_scope_gets_events_only_after_the_turn_and_never_late() -> None:
    built = scenario()
    factory = EventFactory(built)
    before = built.month_end - timedelta(minutes=1)
    after = built.month_end + timedelta(minutes=1)
    deployments_before = {factory.event(occurred_at=before)["deployment_id"] for _ in range(2000)}
    deployments_late = {
        factory.event(occurred_at=after, late=True)["deployment_id"] for _ in range(2000)
    }
    deployments_after = {factory.event(occurred_at=after)["deployment_id"] for _ in range(4000)}
    assert built.lowered.deployment_id not in deployments_before | deployments_late
    assert built.lowered.deployment_id in deployments_after


def test_every_malformed_record_gets_the_reason_the_real_decoder_gives() -> None:
    factory = EventFactory(scenario())
    reasons: Counter[str] = Counter()
    for _ in range(300):
        value, reason = factory.malformed()
        decoded = decode_usage_event(value, now=NOW)
        assert isinstance(decoded, Rejection), value[:200]
        assert decoded.reason == reason, (value[:200], decoded)
        reasons[reason] += 1
    assert set(reasons) == {"invalid_json", "schema_violation", "too_large"}


@pytest.mark.parametrize("seed", range(5))
def test_a_reserialised_duplicate_decodes_to_the_same_event_from_other_bytes(seed: int) -> None:
    built = scenario(seed)
    event = EventFactory(built).event(occurred_at=built.month_end)
    original, again = encode(event), reserialised(event)
    assert original != again
    assert isinstance(json.loads(again)["customer_charge_usd"], float)  # a JSON number now
    assert decode_usage_event(original, now=NOW) == decode_usage_event(again, now=NOW)
