"""The budget consumer applies corrections (design §6): it follows the usage consumer's verdict,
moves the counters by the exact difference the correction makes, and alerts the levels a move up
crosses — once, as the outbox's alert key guarantees; a move down alerts nothing and retracts
nothing.

The caller holds the corrections' bucket locks (`lock_correction_buckets`) from the start of its
transaction, so two replicas never apply the same correction, or two corrections of one event,
at the same time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import structlog

from llm_usage.consumers.budget.counting import correction_moves
from llm_usage.consumers.budget.spend import add_and_alert
from llm_usage.domain.corrections import (
    Correction,
    Effective,
    Verdict,
    effective_after,
    original,
    same_correction,
    winner,
)
from llm_usage.runtime.handler import BatchResult, Record
from llm_usage.storage.budget_corrections import (
    WindowEvent,
    applied_to_events,
    record_applied,
    window_events,
)
from llm_usage.storage.budget_spend import ChargeMove
from llm_usage.storage.corrections import (
    CorrectionKey,
    EventKey,
    FoundEvents,
    find_events,
    judged,
)
from llm_usage.storage.flavour import citus_installed
from llm_usage.storage.pool import Connection

log = structlog.get_logger(__name__)

BUDGET: Final = "budget"  # the consumer, as correction_waits and the metrics name it

# What became of a correction: the `result` label of llm_usage_corrections_total.
APPLIED: Final = "applied"  # it won: the counters moved to its values
SUPERSEDED: Final = "superseded"  # applied, but a later correction of its event still wins
DUPLICATE: Final = "duplicate"  # applied before (or an earlier copy in the batch decides)
CONFLICT: Final = "conflict"  # its id was judged with other content: ignored, as by usage
DEFERRED: Final = "deferred"  # waits for the usage consumer's verdict or its event's count
UNKNOWN: Final = "unknown"  # the usage consumer found no event for it: dropped

# The batch's own count of a record (the events metric's `result`).
BATCH_RESULTS: Final[Mapping[str, BatchResult]] = {
    APPLIED: BatchResult.RECORDED,
    SUPERSEDED: BatchResult.RECORDED,
    DUPLICATE: BatchResult.DUPLICATE,
    CONFLICT: BatchResult.REJECTED,
    DEFERRED: BatchResult.DEFERRED,
    UNKNOWN: BatchResult.REJECTED,
}


@dataclass(frozen=True)
class Received:
    """A correction, and the record that brought it (None when it comes back from its wait)."""

    correction: Correction
    record: Record | None = None


@dataclass
class PlannedCorrections:
    """What became of a batch's corrections, and what the applied ones move."""

    results: list[str]  # `APPLIED`, `DEFERRED`, ... in the corrections' order
    moves: list[ChargeMove]  # the signed charges of the applied ones, in their order
    applied: list[tuple[str, str, str]]  # (tenant_id, correction_id, gateway_request_id)


async def apply_corrections(
    connection: Connection,
    received: Sequence[Received],
    *,
    now: datetime,
    citus: bool | None = None,
) -> list[str]:
    """Apply the corrections the usage consumer applied and whose events are counted, in order:
    move the counters, alert what the moves cross, remember them as applied. Return what became
    of each (`APPLIED`, `DEFERRED`, ...), in `received`'s order. `citus`: the database is a
    Citus coordinator (None: asked when an event is looked up)."""
    planned = await plan_corrections(connection, received, citus=citus)
    await add_and_alert(connection, [], planned.moves, now=now)
    await record_applied(connection, planned.applied, now=now)
    return planned.results


async def plan_corrections(
    connection: Connection, received: Sequence[Received], *, citus: bool | None = None
) -> PlannedCorrections:
    """Judge the corrections against the usage consumer's verdicts and this consumer's records,
    and plan the moves of those it may apply now; the caller adds the moves to the counters and
    then records `applied` (`record_applied`). `citus`: the database is a Citus coordinator
    (None: asked when an event is looked up)."""
    done = await applied_to_events(connection, {item.correction.event for item in received})
    keys = {item.correction.key for item in received}
    verdicts = await judged(connection, sorted(keys | done))
    results: list[str] = []
    first: dict[CorrectionKey, Correction] = {}
    ready: dict[int, Correction] = {}  # position -> the usage consumer's copy of it
    for position, item in enumerate(received):
        correction = item.correction
        key = correction.key
        if key in first:  # an earlier copy in this batch decides
            same = same_correction(first[key], correction)
            results.append(DUPLICATE if same else CONFLICT)
            continue
        first[key] = correction
        verdict = verdicts.get(key)
        if verdict is not None and not same_correction(verdict.correction, correction):
            results.append(CONFLICT)
        elif key in done:
            results.append(DUPLICATE)
        elif verdict is None:
            results.append(DEFERRED)
        elif verdict.verdict is not Verdict.APPLIED:
            results.append(UNKNOWN)
        else:
            ready[position] = verdict.correction
            results.append(APPLIED)  # unless its event is not counted, or no longer stored
    planned = PlannedCorrections(results, [], [])
    if ready:
        history: dict[EventKey, list[Correction]] = {}
        for key in done:
            if key in verdicts:
                applied = verdicts[key].correction
                history.setdefault(applied.event, []).append(applied)
        await _plan_ready(connection, ready, history, planned, citus=citus)
    return planned


async def _plan_ready(
    connection: Connection,
    ready: dict[int, Correction],
    history: dict[EventKey, list[Correction]],
    planned: PlannedCorrections,
    *,
    citus: bool | None,
) -> None:
    """Plan the counters' moves for the corrections the usage consumer applied; a correction
    whose event is not counted yet waits (a move before the count it corrects could go below 0)."""
    results = planned.results
    if citus is None:
        citus = await citus_installed(connection)
    window = await window_events(connection, {c.event for c in ready.values()}, citus=citus)
    for position, correction in list(ready.items()):
        row = window.get(correction.event)  # none: older than the window, so counted
        if row is not None and not row.counted:
            results[position] = DEFERRED
            del ready[position]
    if not ready:
        return
    # The window's row has what the moves read of an event, unless written before it kept the
    # whole attribution; then the stored event does (one probe of its key).
    unattributed = [c for c in ready.values() if not _attributed(window.get(c.event))]
    found = (
        await find_events(connection, unattributed, citus=citus)
        if unattributed
        else FoundEvents({})
    )
    for position, correction in ready.items():
        row = window.get(correction.event)
        if row is not None and row.attributed:
            figures, occurred_at = _counted_figures(row), row.occurred_at
        elif (stored := found.rows.get(correction.event)) is not None:
            figures, occurred_at = original(stored), stored.occurred_at
        else:  # its month left the database since the usage consumer applied it
            log.warning(
                "A correction's event is no longer stored; it moves no counter.",
                tenant_id=correction.tenant_id,
                correction_id=correction.correction_id,
                gateway_request_id=correction.gateway_request_id,
            )
            results[position] = UNKNOWN
            continue
        applied = history.setdefault(correction.event, [])
        before = effective_after(figures, winner(applied))
        applied.append(correction)
        last = winner(applied)
        after = effective_after(figures, last)
        planned.moves.extend(
            correction_moves(
                correction.gateway_request_id, correction.tenant_id, occurred_at, before, after
            )
        )
        won = last is not None and last.key == correction.key
        results[position] = APPLIED if won else SUPERSEDED
        planned.applied.append((*correction.key, correction.gateway_request_id))


def _attributed(row: WindowEvent | None) -> bool:
    return row is not None and row.attributed


def _counted_figures(row: WindowEvent) -> Effective:
    """The event as the counters counted it, from its window row: its attribution and charge,
    all that `correction_moves` reads of the effective values. The row holds no cents and no
    estimate flag, and the counters no token counts: those read as none."""
    return Effective(
        deployment_id=row.deployment_id,
        user_id=row.user_id,
        agent_id=row.agent_id,
        input_tokens=0,
        output_tokens=0,
        cached_input_tokens=0,
        reasoning_tokens=0,
        total_tokens=0,
        customer_charge_usd=row.customer_charge_usd,
        customer_charge_cents=None,
        charge_estimated=False,
    )
