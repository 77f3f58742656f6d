"""The usage event v1 as a JSON Schema for gateway authors, generated from the model.

`python -m llm_usage.schemas.json_schema` rewrites `schemas/usage_event.v1.schema.json`; a unit
test fails when the committed file and the model disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_usage.schemas.usage_event import UsageEvent

SCHEMA_PATH = Path(__file__).with_name("usage_event.v1.schema.json")


def usage_event_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of what the usage consumer accepts.

    Some rules cannot be said in JSON Schema and are only in the model: the digit limits of a
    decimal written with an exponent, agreement of the two charges, and the 5-minute future bound.
    """
    schema = UsageEvent.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render_usage_event_json_schema() -> str:
    """The schema file's exact text: sorted keys, two-space indent, a trailing newline."""
    text = json.dumps(usage_event_json_schema(), indent=2, sort_keys=True, ensure_ascii=False)
    return text + "\n"


def main() -> None:
    """Write the schema file next to this module."""
    SCHEMA_PATH.write_text(render_usage_event_json_schema(), encoding="utf-8")


if __name__ == "__main__":
    main()
