"""The checked-in OpenAPI document is the app's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_usage.api import openapi
from llm_usage.api.openapi import OPENAPI_PATH, openapi_document, render_openapi


def test_the_committed_openapi_document_matches_the_routes() -> None:
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_openapi(), (
        "schemas/openapi.json is stale: run `python -m llm_usage.api.openapi`"
    )


def test_main_writes_sorted_indented_json_with_a_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "openapi.json"
    monkeypatch.setattr(openapi, "OPENAPI_PATH", target)
    openapi.main()
    text = target.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_every_operation_requires_a_bearer_token() -> None:
    document = openapi_document()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    assert len(operations) == 19
    for path, method, operation in operations:
        assert path.startswith(("/v1/", "/ui/")), path
        assert operation.get("security") == [{"HTTPBearer": []}], f"{method} {path}"
        assert {"401", "403", "422"} <= set(operation["responses"]), f"{method} {path}"


def test_money_in_answers_is_a_string() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name in ("UsageSummaryAnswer", "BreakdownItemAnswer", "DailyItemAnswer"):
        assert schemas[name]["properties"]["customer_charge_usd"]["type"] == "string", name
    for field in ("customer_charge_usd", "upstream_cost_usd"):
        assert "string" in json.dumps(schemas["UsageEventAnswer"]["properties"][field]), field
        assert "number" not in json.dumps(schemas["UsageEventAnswer"]["properties"][field]), field
    for field in ("spend_usd", "limit_usd", "percent"):
        assert schemas["BudgetAnswer"]["properties"][field]["type"] == "string", field
    for field in ("input", "cached_input", "output", "reasoning", "request_fee_usd"):
        assert schemas["PriceAnswer"]["properties"][field]["type"] == "string", field
