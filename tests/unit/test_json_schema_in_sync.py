"""The published JSON Schema is the model's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_usage.schemas import json_schema
from llm_usage.schemas.json_schema import (
    CORRECTION_SCHEMA_PATH,
    PERIOD_CHARGE_SCHEMA_PATH,
    SCHEMA_PATH,
    period_charge_json_schema,
    render_period_charge_json_schema,
    render_usage_correction_json_schema,
    render_usage_event_json_schema,
    usage_event_json_schema,
)
from llm_usage.schemas.usage_event import UsageEvent


def test_the_committed_schema_file_matches_the_model() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_usage_event_json_schema(), (
        "schemas/usage_event.v1.schema.json is stale: run `python -m llm_usage.schemas.json_schema`"
    )


def test_main_writes_sorted_indented_json_with_a_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "usage_event.v1.schema.json"
    monkeypatch.setattr(json_schema, "SCHEMA_PATH", target)
    monkeypatch.setattr(json_schema, "PERIOD_CHARGE_SCHEMA_PATH", tmp_path / "period.json")
    monkeypatch.setattr(json_schema, "CORRECTION_SCHEMA_PATH", tmp_path / "correction.json")
    json_schema.main()
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_schema_describes_every_field_and_what_is_required() -> None:
    schema = usage_event_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == set(UsageEvent.model_fields)
    assert schema["required"] == ["gateway_request_id", "tenant_id", "occurred_at"]
    # Neither charge is required: without both, the price table prices the event.
    assert "anyOf" not in schema
    assert "prices the event" in schema["description"]


@pytest.mark.parametrize(
    ("field", "constraint", "value"),
    [
        ("gateway_request_id", "maxLength", 200),
        ("tenant_id", "minLength", 1),
        ("input_tokens", "minimum", 0),
        ("total_tokens", "maximum", 2**63 - 1),
        ("schema_version", "const", 1),
        ("event_type", "const", "llm_usage_recorded"),
        ("occurred_at", "format", "date-time"),
    ],
)
def test_the_schema_states_the_contract_constraints(
    field: str, constraint: str, value: object
) -> None:
    assert usage_event_json_schema()["properties"][field][constraint] == value


@pytest.mark.parametrize("field", ["total_tokens", "customer_charge_usd"])
def test_fields_derived_when_absent_claim_no_default(field: str) -> None:
    assert "default" not in usage_event_json_schema()["properties"][field]


def test_the_committed_period_charge_schema_file_matches_the_model() -> None:
    committed = PERIOD_CHARGE_SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == render_period_charge_json_schema(), (
        "schemas/period_charge.v1.schema.json is stale: "
        "run `python -m llm_usage.schemas.json_schema`"
    )


def test_the_period_charge_schema_requires_its_type_and_reads_the_charge_exactly() -> None:
    schema = period_charge_json_schema()
    assert schema["required"] == [
        "event_type",
        "period_charge_id",
        "tenant_id",
        "period",
        "period_charge_usd",
        "occurred_at",
    ]
    assert schema["properties"]["event_type"]["const"] == "llm_period_charge_recorded"
    assert schema["properties"]["period"]["pattern"] == "^[0-9]{4}-(0[1-9]|1[0-2])$"
    assert schema["properties"]["period_charge_usd"]["anyOf"][0]["type"] == "string"


def test_the_committed_correction_schema_file_matches_the_model() -> None:
    committed = CORRECTION_SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == render_usage_correction_json_schema(), (
        "schemas/usage_correction.v1.schema.json is stale: "
        "run `python -m llm_usage.schemas.json_schema`"
    )


def test_the_correction_schema_refuses_unknown_corrected_fields() -> None:
    schema = json.loads(render_usage_correction_json_schema())
    fields = schema["$defs"]["AmendFields"]
    assert fields["additionalProperties"] is False
    assert schema["required"] == [
        "event_type",
        "correction_id",
        "gateway_request_id",
        "tenant_id",
        "action",
        "reason",
        "actor",
        "occurred_at",
    ]
