"""The events of the usage topic as JSON Schemas for gateway authors, generated from the models.

`python -m llm_usage.schemas.json_schema` rewrites `schemas/usage_event.v1.schema.json`,
`schemas/period_charge.v1.schema.json` and `schemas/usage_correction.v1.schema.json`; a unit
test fails when a committed file and its model disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llm_usage.schemas.period_charge import PeriodChargeEvent
from llm_usage.schemas.usage_correction import UsageCorrectionEvent
from llm_usage.schemas.usage_event import UsageEvent

SCHEMA_PATH = Path(__file__).with_name("usage_event.v1.schema.json")
PERIOD_CHARGE_SCHEMA_PATH = Path(__file__).with_name("period_charge.v1.schema.json")
CORRECTION_SCHEMA_PATH = Path(__file__).with_name("usage_correction.v1.schema.json")


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _render(schema: dict[str, Any]) -> str:
    """A schema file's exact text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def usage_event_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the usage events the usage consumer accepts.

    Some rules cannot be said in JSON Schema and are only in the model: the digit limits of a
    decimal written with an exponent, agreement of the two charges, and the 5-minute future bound.
    """
    return _json_schema(UsageEvent)


def render_usage_event_json_schema() -> str:
    return _render(usage_event_json_schema())


def period_charge_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the period charges the usage consumer accepts."""
    return _json_schema(PeriodChargeEvent)


def render_period_charge_json_schema() -> str:
    return _render(period_charge_json_schema())


def usage_correction_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the corrections the usage consumer accepts."""
    return _json_schema(UsageCorrectionEvent)


def render_usage_correction_json_schema() -> str:
    return _render(usage_correction_json_schema())


def main() -> None:
    """Write the schema files next to this module."""
    SCHEMA_PATH.write_text(render_usage_event_json_schema(), encoding="utf-8")
    PERIOD_CHARGE_SCHEMA_PATH.write_text(render_period_charge_json_schema(), encoding="utf-8")
    CORRECTION_SCHEMA_PATH.write_text(render_usage_correction_json_schema(), encoding="utf-8")


if __name__ == "__main__":
    main()
