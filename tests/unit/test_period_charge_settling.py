"""How the usage consumer settles a batch's period charges once the database has answered."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from llm_usage.consumers.usage.period_charges import first_copies, settle_period_charges
from llm_usage.domain.period_charges import PeriodCharge
from llm_usage.runtime.handler import BatchResult
from llm_usage.schemas.dead_letter import DeadLetterReason
from tests.records import consumer_record

CHARGE = PeriodCharge(
    "t1", "pc-1", "dep-1", "2026-10", Decimal("50"), datetime(2026, 11, 1, tzinfo=UTC)
)


def test_within_a_batch_the_first_copy_is_stored_and_the_others_judged_against_it() -> None:
    other_tenant = replace(CHARGE, tenant_id="t2")  # same id, another tenant: its own key
    conflicting = replace(CHARGE, period_charge_usd=Decimal("51"))
    copies = [
        (consumer_record(b"a", offset=0), CHARGE),
        (consumer_record(b"b", offset=1), replace(CHARGE, period_charge_usd=Decimal("50.00"))),
        (consumer_record(b"c", offset=2), conflicting),
        (consumer_record(b"d", offset=3), other_tenant),
    ]
    assert first_copies(copies) == [CHARGE, other_tenant]
    outcome = settle_period_charges(copies, {}, inserted={("t1", "pc-1"), ("t2", "pc-1")})
    assert outcome.counts == Counter(
        {BatchResult.RECORDED: 2, BatchResult.DUPLICATE: 1, BatchResult.CONFLICT: 1}
    )
    [dead] = outcome.dead_letters
    assert dead.record.value == b"c"
    assert dead.reason is DeadLetterReason.CONFLICTING_DUPLICATE
    assert dead.detail == (
        "period_charge_id 'pc-1' of tenant 't1' is already known with a different period_charge_usd"
    )


def test_a_copy_of_a_stored_charge_is_judged_against_the_stored_row() -> None:
    moved = replace(CHARGE, deployment_id=None, period="2026-09")
    copies = [(consumer_record(b"a", offset=0), CHARGE), (consumer_record(b"b", offset=1), moved)]
    outcome = settle_period_charges(copies, {("t1", "pc-1"): CHARGE}, inserted=set())
    assert outcome.counts == Counter({BatchResult.DUPLICATE: 1, BatchResult.CONFLICT: 1})
    assert outcome.dead_letters[0].detail.endswith("a different deployment_id, period")
