"""The Citus distribution plan (llm_usage/storage/distribution.py) is consistent as data."""

from __future__ import annotations

from llm_usage.storage.distribution import DISTRIBUTED, LOCAL, REFERENCE


def test_each_table_has_one_place_in_the_plan() -> None:
    tables = [p.table for p in DISTRIBUTED] + [r.table for r in REFERENCE] + list(LOCAL)
    assert len(tables) == len(set(tables))


def test_a_co_located_table_follows_an_earlier_table_of_its_column() -> None:
    seen: dict[str, str] = {}
    for plan in DISTRIBUTED:
        if plan.colocate_with == "none":
            assert plan.shard_count is not None, f"{plan.table} starts a group: say its shards"
        else:
            assert plan.shard_count is None, f"{plan.table} follows {plan.colocate_with}'s shards"
            assert seen.get(plan.colocate_with) == plan.column, plan.table
        seen[plan.table] = plan.column


def test_events_and_tenant_tables_share_a_group_and_the_id_window_has_its_own() -> None:
    by_table = {plan.table: plan for plan in DISTRIBUTED}
    assert by_table["llm_usage_events"].column == "tenant_id"
    for table in (
        "usage_daily_totals",
        "usage_daily_dimensions",
        "budget_spend",
        "budget_policies",
        "usage_late_marks",
        "budget_holds",
        "budget_held",
        "usage_corrections",
        "usage_event_effective",
        "correction_waits",
        "budget_corrections",
    ):
        assert by_table[table].colocate_with == "llm_usage_events"
    assert by_table["usage_event_ids"].column == "gateway_request_id"
    assert by_table["usage_event_ids"].colocate_with == "none"
