"""The budget alert v1 as a JSON Schema for the notification team, generated from the model.

`python -m llm_usage.schemas.budget_alert_schema` rewrites `schemas/budget_alert.v1.schema.json`;
a unit test fails when the committed file and the model disagree.

The schema describes what is on the alerts topic, so it is the model's *serialization* schema:
amounts are strings, `period_start` a date string, `emitted_at` a date-time string, and every field
is required, because `BudgetAlert.encode()` writes every field, defaults included.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from llm_usage.schemas.budget_alert import BudgetAlert

SCHEMA_PATH = Path(__file__).with_name("budget_alert.v1.schema.json")


class _AsPublished(GenerateJsonSchema):
    """Pydantic's generator, with every field required: a consumer may rely on each one."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        return True


def budget_alert_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one record value on the alerts topic."""
    schema = BudgetAlert.model_json_schema(mode="serialization", schema_generator=_AsPublished)
    # A datetime written by its own serializer is described by the serializer's return type
    # (`str`) alone; say which strings they are.
    for name, field in BudgetAlert.model_fields.items():
        if field.annotation is datetime:
            schema["properties"][name]["format"] = "date-time"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render_budget_alert_json_schema() -> str:
    """The schema file's exact text: sorted keys, two-space indent, a trailing newline."""
    text = json.dumps(budget_alert_json_schema(), indent=2, sort_keys=True, ensure_ascii=False)
    return text + "\n"


def main() -> None:
    """Write the schema file next to this module."""
    SCHEMA_PATH.write_text(render_budget_alert_json_schema(), encoding="utf-8")


if __name__ == "__main__":
    main()
