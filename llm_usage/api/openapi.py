"""The API's OpenAPI document, checked in as `schemas/openapi.json` for portal and gateway
authors. `python -m llm_usage.api.openapi` rewrites it; a unit test fails when the file and the
routes disagree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_usage.api.app import create_app

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The document the app serves at /openapi.json (it needs no database or key to build)."""
    return create_app(None).openapi()


def render_openapi() -> str:
    """The checked-in file's exact text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    OPENAPI_PATH.write_text(render_openapi(), encoding="utf-8")


if __name__ == "__main__":
    main()
