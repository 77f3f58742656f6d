"""What the routes share about HTTP itself: the error answers they document and a bounded body."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request

from llm_usage.api.models import ErrorAnswer

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
