"""Budget alert v1: its published JSON Schema, exact amounts, stable ids and UTC periods."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import ValidationError

from llm_usage.domain.budgets import AlertLevel, BudgetWindow, ScopeType, alert_id_for, period_start
from llm_usage.schemas import budget_alert_schema
from llm_usage.schemas.budget_alert import BudgetAlert
from llm_usage.schemas.budget_alert_schema import (
    SCHEMA_PATH,
    budget_alert_json_schema,
    render_budget_alert_json_schema,
)

EMITTED_AT = datetime(2026, 11, 14, 9, 12, 3, 120000, tzinfo=UTC)


def alert(**fields: Any) -> BudgetAlert:
    """A valid alert (the contract's example) whose id is derived from its own key."""
    values: dict[str, Any] = {
        "tenant_id": "t1",
        "scope_type": ScopeType.DEPLOYMENT,
        "scope_id": "dep-7",
        "window": BudgetWindow.MONTHLY,
        "period_start": date(2026, 11, 1),
        "level": AlertLevel.WARNING,
        "spend_usd": Decimal("81.20"),
        "limit_usd": Decimal("100"),
        "threshold_pct": 80,
        "triggered_by": "req-1",
        "emitted_at": EMITTED_AT,
    }
    values.update(fields)
    if "alert_id" not in values:
        values["alert_id"] = alert_id_for(
            tenant_id=values["tenant_id"],
            scope_type=ScopeType(values["scope_type"]),
            scope_id=values["scope_id"],
            window=BudgetWindow(values["window"]),
            period_start=values["period_start"],
            level=AlertLevel(values["level"]),
            limit_usd=values["limit_usd"],
        )
    return BudgetAlert(**values)


def committed_schema_validator() -> Draft202012Validator:
    """A validator for the checked-in file (what the notification team reads), not the model."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def schema_errors(value: object) -> list[str]:
    return [error.message for error in committed_schema_validator().iter_errors(value)]


# --- The JSON Schema file ---


def test_the_committed_schema_file_matches_the_model() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_budget_alert_json_schema(), (
        "schemas/budget_alert.v1.schema.json is stale: "
        "run `python -m llm_usage.schemas.budget_alert_schema`"
    )


def test_main_writes_sorted_indented_json_with_a_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "budget_alert.v1.schema.json"
    monkeypatch.setattr(budget_alert_schema, "SCHEMA_PATH", target)
    budget_alert_schema.main()
    text = target.read_text(encoding="utf-8")
    assert text == render_budget_alert_json_schema()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_schema_file_ships_inside_the_schemas_package() -> None:
    # pyproject ships "llm_usage.schemas" = ["*.json"]: the file must sit beside the module.
    assert SCHEMA_PATH.parent == Path(budget_alert_schema.__file__).parent
    assert SCHEMA_PATH.name.endswith(".json")
    assert SCHEMA_PATH.is_file()


def test_every_field_is_required_and_no_other_is_allowed() -> None:
    schema = budget_alert_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == list(BudgetAlert.model_fields)
    assert set(schema["properties"]) == set(BudgetAlert.model_fields)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("spend_usd", {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}),
        ("limit_usd", {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}),
        ("emitted_at", {"type": "string", "format": "date-time"}),
        ("period_start", {"type": "string", "format": "date"}),
        ("threshold_pct", {"type": "integer", "minimum": 1, "maximum": 100}),
        ("event_type", {"const": "llm_budget_alert"}),
        ("schema_version", {"const": 1}),
    ],
)
def test_the_schema_describes_the_values_on_the_topic(field: str, expected: dict[str, Any]) -> None:
    described = budget_alert_json_schema()["properties"][field]
    assert {key: described.get(key) for key in expected} == expected


def test_triggered_by_is_a_string_or_null() -> None:
    described = budget_alert_json_schema()["properties"]["triggered_by"]
    assert described["anyOf"] == [{"type": "string"}, {"type": "null"}]


# --- encode() against the checked-in schema ---


@pytest.mark.parametrize(
    "sample",
    [
        alert(),
        alert(level=AlertLevel.EXCEEDED, threshold_pct=100, spend_usd=Decimal("100.000001")),
        alert(triggered_by=None, window=BudgetWindow.DAILY, period_start=date(2026, 11, 14)),
        alert(scope_type=ScopeType.TENANT, scope_id="t1", spend_usd=Decimal("1E+3")),
        alert(
            spend_usd=Decimal("98765432.109876543219"), limit_usd=Decimal("0.000000000000000001")
        ),
        alert(tenant_id="租户-ü", scope_type=ScopeType.AGENT, scope_id="agent;1"),
    ],
    ids=["warning", "exceeded", "policy-change", "tenant-exponent", "extreme-amounts", "unicode"],
)
def test_encoded_alerts_validate_against_the_committed_schema(sample: BudgetAlert) -> None:
    on_the_topic = json.loads(sample.encode())
    assert schema_errors(on_the_topic) == []
    assert set(on_the_topic) == set(BudgetAlert.model_fields)
    # jsonschema checks "date-time" only with an optional package; check it here.
    assert datetime.fromisoformat(on_the_topic["emitted_at"]) == sample.emitted_at


def test_encode_writes_the_contract_example() -> None:
    assert json.loads(alert(triggered_by=None).encode()) == {
        "event_type": "llm_budget_alert",
        "schema_version": 1,
        "alert_id": alert().alert_id,
        "tenant_id": "t1",
        "scope_type": "deployment",
        "scope_id": "dep-7",
        "window": "monthly",
        "period_start": "2026-11-01",
        "level": "warning",
        "spend_usd": "81.2",
        "limit_usd": "100",
        "threshold_pct": 80,
        "triggered_by": None,
        "emitted_at": "2026-11-14T09:12:03.120Z",
    }


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"spend_usd": 81.2}, "is not of type 'string'"),
        ({"limit_usd": "1e2"}, "does not match"),
        ({"period_start": "2026-11-31"}, "is not a 'date'"),
        ({"level": "critical"}, "is not one of"),
        ({"threshold_pct": 0}, "less than the minimum"),
        ({"schema_version": 2}, "1 was expected"),
        ({"extra": 1}, "Additional properties"),
    ],
)
def test_the_committed_schema_refuses_what_is_not_an_alert(
    change: dict[str, Any], complaint: str
) -> None:
    value = {**json.loads(alert().encode()), **change}
    assert any(complaint in message for message in schema_errors(value)), schema_errors(value)


@pytest.mark.parametrize("missing", list(BudgetAlert.model_fields))
def test_the_committed_schema_requires_every_field(missing: str) -> None:
    value = json.loads(alert().encode())
    del value[missing]
    assert schema_errors(value) == [f"'{missing}' is a required property"]


DOC = Path(__file__).parents[2] / "docs" / "consuming-budget-alerts.md"


def test_the_payload_in_the_notification_teams_doc_is_a_real_alert() -> None:
    [payload] = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    value = json.loads(payload)
    assert schema_errors(value) == []
    published = BudgetAlert.model_validate(value)
    assert published.encode() == json.dumps(value, separators=(",", ":")).encode()
    assert published.alert_id == alert_id_for(
        tenant_id=published.tenant_id,
        scope_type=published.scope_type,
        scope_id=published.scope_id,
        window=published.window,
        period_start=published.period_start,
        level=published.level,
        limit_usd=published.limit_usd,
    )


# --- Exact amounts ---


def test_a_twenty_digit_spend_survives_encode_and_decode_exactly() -> None:
    spend = Decimal("98765432.109876543219")  # 20 significant digits; a float keeps ~17
    assert Decimal(float(spend)) != spend
    value = json.loads(alert(spend_usd=spend).encode())
    assert value["spend_usd"] == "98765432.109876543219"
    assert Decimal(value["spend_usd"]) == spend
    assert BudgetAlert.model_validate_json(alert(spend_usd=spend).encode()).spend_usd == spend


@pytest.mark.parametrize(
    ("amount", "written"),
    [
        (Decimal("81.20"), "81.2"),
        (Decimal("100.00"), "100"),
        (Decimal("1E+2"), "100"),
        (Decimal("0.000"), "0"),
        (Decimal("12.5E-3"), "0.0125"),
    ],
)
def test_amounts_are_written_in_one_canonical_spelling(amount: Decimal, written: str) -> None:
    assert json.loads(alert(spend_usd=amount).encode())["spend_usd"] == written


@pytest.mark.parametrize("field", ["spend_usd", "limit_usd"])
def test_a_float_amount_is_refused(field: str) -> None:
    with pytest.raises((TypeError, ValueError), match="never a binary float"):
        alert(alert_id="a1", **{field: 81.2})


@pytest.mark.parametrize("field", ["spend_usd", "limit_usd"])
def test_a_json_number_amount_is_refused_when_reading_an_alert(field: str) -> None:
    value = {**json.loads(alert().encode()), field: 81.2}
    with pytest.raises((TypeError, ValueError), match="never a binary float"):
        BudgetAlert.model_validate_json(json.dumps(value))


def test_an_alert_reads_back_equal_to_itself() -> None:
    sample = alert(spend_usd=Decimal("98765432.109876543219"), triggered_by=None)
    assert BudgetAlert.model_validate_json(sample.encode()) == sample


def test_an_alert_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        BudgetAlert.model_validate({**json.loads(alert().encode()), "extra": 1})


# --- Stable alert ids ---

KEY: dict[str, Any] = {
    "tenant_id": "t1",
    "scope_type": ScopeType.DEPLOYMENT,
    "scope_id": "dep-7",
    "window": BudgetWindow.MONTHLY,
    "period_start": date(2026, 11, 1),
    "level": AlertLevel.WARNING,
    "limit_usd": Decimal("100"),
}


def test_the_alert_id_is_the_documented_hash_of_the_key() -> None:
    # Changing this formula re-arms every alert ever sent: it must never change by accident.
    material = "2:t1;10:deployment;5:dep-7;7:monthly;10:2026-11-01;7:warning;3:100;"
    expected = hashlib.sha256(material.encode()).hexdigest()[:32]
    assert alert_id_for(**KEY) == expected
    assert len(expected) == 32
    assert int(expected, 16) >= 0


def test_the_same_key_gives_the_same_id() -> None:
    assert alert_id_for(**KEY) == alert_id_for(**dict(KEY))
    assert alert_id_for(**KEY) == alert_id_for(
        **{**KEY, "scope_type": ScopeType("deployment"), "period_start": date(2026, 11, 1)}
    )


@pytest.mark.parametrize(
    "limit", ["100", "100.00", "1E+2", "100.000000000000000000", "0.1E+3", "10000E-2"]
)
def test_equal_limits_give_the_same_id(limit: str) -> None:
    assert alert_id_for(**{**KEY, "limit_usd": Decimal(limit)}) == alert_id_for(**KEY)


@pytest.mark.parametrize(
    ("part", "other"),
    [
        ("tenant_id", "t2"),
        ("tenant_id", "T1"),
        ("scope_type", ScopeType.USER),
        ("scope_id", "dep-8"),
        ("scope_id", "dep-7 "),
        ("window", BudgetWindow.DAILY),
        ("period_start", date(2026, 12, 1)),
        ("level", AlertLevel.EXCEEDED),
        ("limit_usd", Decimal("100.01")),
        ("limit_usd", Decimal("10")),
    ],
)
def test_any_change_of_any_part_gives_another_id(part: str, other: object) -> None:
    assert alert_id_for(**{**KEY, part: other}) != alert_id_for(**KEY)


def test_every_part_of_the_key_is_in_the_id() -> None:
    ids = {alert_id_for(**KEY)}
    for part, other in [
        ("tenant_id", "x"),
        ("scope_type", ScopeType.AGENT),
        ("scope_id", "x"),
        ("window", BudgetWindow.DAILY),
        ("period_start", date(2026, 10, 1)),
        ("level", AlertLevel.EXCEEDED),
        ("limit_usd", Decimal(7)),
    ]:
        ids.add(alert_id_for(**{**KEY, part: other}))
    assert len(ids) == 8


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            {"tenant_id": "a;tenant;b", "scope_type": ScopeType.TENANT, "scope_id": "c"},
            {"tenant_id": "a", "scope_type": ScopeType.TENANT, "scope_id": "b;tenant;c"},
        ),
        (
            {"tenant_id": "a;b;deployment;c", "scope_id": "d"},
            {"tenant_id": "a;b", "scope_id": "c;deployment;d"},
        ),
    ],
)
def test_characters_shifted_between_parts_never_collide(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    def joined(key: dict[str, Any]) -> str:
        return ";".join(str(getattr(part, "value", part)) for part in {**KEY, **key}.values())

    # Joined with a separator alone, these two keys would be one id.
    assert joined(first) == joined(second)
    assert alert_id_for(**{**KEY, **first}) != alert_id_for(**{**KEY, **second})


def test_a_separator_inside_the_tenant_cannot_pose_as_the_scope() -> None:
    # "a;b" with scope "c" against "a" with scope "b;c" (same scope type): a plain join of
    # tenant and scope would give "a;b;c" for both; the length prefixes keep them apart.
    shifted = {"tenant_id": "a", "scope_id": "b;c"}
    original = {"tenant_id": "a;b", "scope_id": "c"}
    assert alert_id_for(**{**KEY, **original}) != alert_id_for(**{**KEY, **shifted})


# --- UTC periods ---


@pytest.mark.parametrize(
    ("moment", "daily", "monthly"),
    [
        ("2026-11-30T23:30:00-01:00", date(2026, 12, 1), date(2026, 12, 1)),
        ("2026-12-01T00:30:00+01:00", date(2026, 11, 30), date(2026, 11, 1)),
        ("2026-12-01T13:59:59.999999+14:00", date(2026, 11, 30), date(2026, 11, 1)),
        ("2026-12-01T14:00:00+14:00", date(2026, 12, 1), date(2026, 12, 1)),
        ("2026-12-31T11:59:59.999999-12:00", date(2026, 12, 31), date(2026, 12, 1)),
        ("2026-12-31T12:00:00-12:00", date(2027, 1, 1), date(2027, 1, 1)),
        ("2028-02-28T23:30:00-01:00", date(2028, 2, 29), date(2028, 2, 1)),
        ("2028-02-29T23:30:00-01:00", date(2028, 3, 1), date(2028, 3, 1)),
        ("2026-11-01T00:00:00Z", date(2026, 11, 1), date(2026, 11, 1)),
        ("2026-10-31T23:59:59.999999Z", date(2026, 10, 31), date(2026, 10, 1)),
    ],
)
def test_periods_are_utc_days_and_months(moment: str, daily: date, monthly: date) -> None:
    at = datetime.fromisoformat(moment)
    assert period_start(BudgetWindow.DAILY, at) == daily
    assert period_start(BudgetWindow.MONTHLY, at) == monthly


def test_a_naive_time_has_no_period() -> None:
    with pytest.raises(ValueError, match="aware"):
        period_start(BudgetWindow.DAILY, datetime(2026, 11, 30, 23, 30))  # noqa: DTZ001
