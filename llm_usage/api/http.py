"""What the routes share about HTTP itself: the error answers they document and a bounded body."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from llm_usage.api.models import ErrorAnswer
from llm_usage.api.params import invalid

Body = TypeVar("Body", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "no token, or an invalid one"},
    403: {"model": ErrorAnswer, "description": "a valid token without access to this"},
    422: {"description": "a malformed parameter; `detail[].loc` names it"},
    503: {"model": ErrorAnswer, "description": "the database (or Kafka) cannot be reached"},
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def body_model(raw: bytes, model: type[Body]) -> Body:
    """A JSON object body as `model` (strictly: no coercion); anything else is a 422 naming
    the field at fault (`("body", field, ...)`)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise invalid(("body",), f"not a JSON object: {error}") from None
    if not isinstance(data, dict):
        raise invalid(("body",), "must be a JSON object", data)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**each, "loc": ("body", *each["loc"])}
                for each in error.errors(include_url=False, include_context=False)
            ]
        ) from None
