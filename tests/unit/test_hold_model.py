"""The invariant of budget checks on the pure model (domain/holds.py `HoldLedger`, design §7):
whatever the order of checks, counted events, repeats, races and sweeps, after every step

    S(K) + H(K) <= L + Σ max(0, actual - estimate) of holds settled on K + U(K)

for every counter K with a blocking limit L, H(K) is the sum of K's open holds, each hold ends
at most once, a repeat answers the first answer, and a denied check changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llm_usage.domain.holds import CheckOutcome, HoldLedger
from llm_usage.domain.periods import utc_day

TENANT = "t"
HOLD_SECONDS = 300
# The model's own clock: a few minutes before a UTC midnight at a month's end, so that advancing
# crosses days and months (checks and events then land in other periods).
START = datetime(2027, 1, 31, 23, 50, tzinfo=UTC)
LIMITS = {
    ("tenant", TENANT, "daily"): Decimal(10),
    ("tenant", TENANT, "monthly"): Decimal(25),
    ("user", "u1", "daily"): Decimal(4),
    ("deployment", "d1", "monthly"): Decimal(6),
}

request_ids = st.sampled_from([f"r{n}" for n in range(12)])
attributions = st.tuples(
    st.sampled_from([None, "d1", "d2"]),
    st.sampled_from([None, "u1", "u2"]),
    st.sampled_from([None, "a1"]),
)
amounts = st.sampled_from([Decimal(0), Decimal("0.5"), Decimal(1), Decimal("2.25"), Decimal(5)])


class HoldMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = HoldLedger(limits=dict(LIMITS), now=START, hold_seconds=HOLD_SECONDS)
        self.first: dict[str, CheckOutcome] = {}
        self.attributions: dict[str, tuple[str | None, str | None, str | None]] = {}
        self.spend_added = Decimal(0)

    def _remembered(self, request_id: str) -> bool:
        return (TENANT, request_id) in self.ledger.holds

    @rule(request_id=request_ids, attribution=attributions, amount=amounts)
    def check(
        self,
        request_id: str,
        attribution: tuple[str | None, str | None, str | None],
        amount: Decimal,
    ) -> None:
        placed = dict(self.ledger.placed)
        remembered = self._remembered(request_id)
        counted = (TENANT, request_id) in self.ledger.counted
        outcome = self.ledger.check(TENANT, request_id, attribution, amount)
        if counted:
            assert outcome == CheckOutcome("allow", (), None, amount, "counted")
        elif remembered:
            assert outcome.answer == "repeat"
            first = self.first[request_id]
            assert (outcome.decision, outcome.denied_by, outcome.hold_expires_at) == (
                first.decision,
                first.denied_by,
                first.hold_expires_at,
            )
        else:
            assert outcome.answer == "new"
            self.first[request_id] = outcome
            self.attributions[request_id] = attribution
        if outcome.decision == "deny" or outcome.answer != "new":
            assert self.ledger.placed == placed  # nothing more is held
        if outcome.decision == "deny" and outcome.answer == "new":
            assert outcome.denied_by
            for denied in outcome.denied_by:
                assert denied.spend_usd + denied.held_usd + amount > denied.limit_usd

    @rule(request_id=request_ids, actual=amounts, in_the_check_s_day=st.booleans())
    def count_event(self, request_id: str, actual: Decimal, in_the_check_s_day: bool) -> None:
        attribution = self.attributions.get(request_id, (None, "u1", None))
        hold = self.ledger.holds.get((TENANT, request_id))
        day = hold.day if hold is not None and in_the_check_s_day else utc_day(self.ledger.now)
        if self.ledger.count_event(TENANT, request_id, attribution, actual, day) is not None:
            assert hold is not None
            assert hold.state == "settled"

    @rule(request_id=request_ids, attribution=attributions, amount=amounts, actual=amounts)
    def check_racing_the_batch_that_counts_it(
        self,
        request_id: str,
        attribution: tuple[str | None, str | None, str | None],
        amount: Decimal,
        actual: Decimal,
    ) -> None:
        """The check reads `counted` before the batch commits; the batch's release cannot see the
        check's hold, which stays open until the sweeper ends it."""
        if (TENANT, request_id) in self.ledger.counted or self._remembered(request_id):
            return
        self.check(request_id, attribution, amount)
        self.ledger.count_event(
            TENANT, request_id, attribution, actual, utc_day(self.ledger.now), sees_hold=False
        )

    @rule(request_id=request_ids)
    def repeat_check(self, request_id: str) -> None:
        remembered = request_id in self.first and self._remembered(request_id)
        if remembered and (TENANT, request_id) not in self.ledger.counted:
            self.check(request_id, self.attributions[request_id], Decimal(7))

    @precondition(lambda self: bool(self.ledger.counted))
    @rule(data=st.data())
    def check_after_counted(self, data: st.DataObject) -> None:
        _, request_id = data.draw(st.sampled_from(sorted(self.ledger.counted)))
        placed = dict(self.ledger.placed)
        outcome = self.ledger.check(TENANT, request_id, (None, None, None), Decimal(3))
        assert outcome == CheckOutcome("allow", (), None, Decimal(3), "counted")
        assert self.ledger.placed == placed

    @rule(seconds=st.sampled_from([1, 30, 120, HOLD_SECONDS, 2 * HOLD_SECONDS + 1]))
    def advance_and_sweep(self, seconds: int) -> None:
        self.ledger.advance(seconds)
        ended = self.ledger.sweep()
        for request_id, how in ended:
            assert how == (
                "settled_late" if (TENANT, request_id) in self.ledger.counted else "expired"
            )

    @invariant()
    def spend_and_holds_stay_within_the_limits(self) -> None:
        for key in self.ledger.counters():
            bound = self.ledger.bound(key)
            if bound is not None:
                total = self.ledger.spend.get(key, Decimal(0)) + self.ledger.held(key)
                assert total <= bound, (key, total, bound)

    @invariant()
    def held_is_the_sum_of_open_holds(self) -> None:
        open_amounts = self.ledger.open_amounts()
        for key in self.ledger.counters():
            assert self.ledger.held(key) == open_amounts.get(key, Decimal(0)), key

    @invariant()
    def each_hold_ends_at_most_once(self) -> None:
        for hold in self.ledger.holds.values():
            assert hold.ended_times == (0 if hold.state in ("open", "denied") else 1)

    @invariant()
    def spend_is_what_was_counted(self) -> None:
        # The tenant's counters of every day and month add up to Σ actual of counted events.
        tenant_daily = sum(
            (v for k, v in self.ledger.spend.items() if k[1] == "tenant" and k[3] == "daily"),
            Decimal(0),
        )
        assert tenant_daily == sum(self.ledger.counted.values(), Decimal(0))


HoldMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestHoldModel = HoldMachine.TestCase
