"""The usage consumer's period charges: stored once per (tenant, id) in the batch's transaction,
every copy settled against what is stored (a duplicate, or a conflict for the dead-letter topic)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from llm_usage.domain.period_charges import PeriodCharge, differing_fields
from llm_usage.runtime.handler import BatchOutcome, BatchResult, DeadLetter, Record
from llm_usage.schemas.dead_letter import DeadLetterReason
from llm_usage.storage.period_charges import (
    PeriodChargeKey,
    insert_new_period_charges,
    stored_period_charges,
)
from llm_usage.storage.pool import Connection


def _key(charge: PeriodCharge) -> PeriodChargeKey:
    return (charge.tenant_id, charge.period_charge_id)


def first_copies(copies: Sequence[tuple[Record, PeriodCharge]]) -> list[PeriodCharge]:
    """One charge per (tenant, id), the first seen: the one to try to insert."""
    firsts: dict[PeriodChargeKey, PeriodCharge] = {}
    for _, charge in copies:
        firsts.setdefault(_key(charge), charge)
    return list(firsts.values())


def settle_period_charges(
    copies: Sequence[tuple[Record, PeriodCharge]],
    stored: Mapping[PeriodChargeKey, PeriodCharge],
    *,
    inserted: set[PeriodChargeKey],
) -> BatchOutcome:
    """Classify every copy once the database has answered: the first copy of an inserted key is
    recorded; a copy equal to what its key holds is a duplicate; any other is a conflicting
    duplicate (dead-lettered, never written)."""
    counts: Counter[BatchResult] = Counter()
    dead_letters: list[DeadLetter] = []
    truths = dict(stored)
    for record, charge in copies:
        key = _key(charge)
        truth = truths.get(key)
        if truth is None and key in inserted:
            truths[key] = charge
            counts[BatchResult.RECORDED] += 1
            continue
        assert truth is not None, "a key neither inserted nor stored"
        differing = differing_fields(truth, charge)
        if not differing:
            counts[BatchResult.DUPLICATE] += 1
            continue
        counts[BatchResult.CONFLICT] += 1
        detail = (
            f"period_charge_id {charge.period_charge_id!r} of tenant {charge.tenant_id!r} is "
            "already known with a different " + ", ".join(differing)
        )
        dead_letters.append(DeadLetter(record, DeadLetterReason.CONFLICTING_DUPLICATE, detail))
    return BatchOutcome(counts, dead_letters)


async def record_period_charges(
    connection: Connection, copies: Sequence[tuple[Record, PeriodCharge]]
) -> BatchOutcome:
    """Store the batch's new period charges in the caller's transaction; settle every copy."""
    if not copies:
        return BatchOutcome()
    inserted = await insert_new_period_charges(connection, first_copies(copies))
    known = [key for key in dict.fromkeys(_key(c) for _, c in copies) if key not in inserted]
    stored = await stored_period_charges(connection, known)
    return settle_period_charges(copies, stored, inserted=inserted)
