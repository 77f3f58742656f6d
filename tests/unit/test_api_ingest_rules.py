"""Splitting a posted body into events without changing what the consumer will read."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from llm_usage.api.ingest import (
    MAX_EVENTS,
    MalformedBodyError,
    check_events,
    encode_event,
    split_events,
)

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)


def _event(**fields: object) -> dict[str, object]:
    return {
        "gateway_request_id": "r1",
        "tenant_id": "t1",
        "customer_charge_usd": "0.5",
        "occurred_at": "2026-11-24T11:00:00Z",
        **fields,
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1.50,"b":1E-7,"c":-0,"d":12345678901234567890123}',
        '{"a":"x","a":"y"}',
        '{"s":"\\ud800 \\u00e9 \\"q\\""}',
        '{"n":null,"t":true,"f":false,"l":[1,{"x":[]}],"o":{}}',
    ],
)
def test_events_are_written_back_meaning_exactly_what_was_sent(text: str) -> None:
    [event] = split_events(f"[{text}]".encode())
    assert encode_event(event).decode() == text.replace("é", "\\u00e9")


def test_one_object_is_one_event_and_an_array_its_elements() -> None:
    assert len(split_events(json.dumps(_event()).encode())) == 1
    assert len(split_events(json.dumps([_event(), _event()]).encode())) == 2
    assert split_events(b"[]") == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "not UTF-8"),
        (b"[{", "not JSON"),
        (b'{"a": NaN}', "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (json.dumps([{}] * (MAX_EVENTS + 1)).encode(), "at most 1000"),
    ],
)
def test_a_body_that_is_not_events_says_why(body: bytes, message: str) -> None:
    with pytest.raises(MalformedBodyError, match=message):
        split_events(body)


def test_each_event_is_judged_as_the_consumer_judges_it() -> None:
    events = split_events(
        json.dumps(
            [
                _event(),
                _event(gateway_request_id="r2", customer_charge_usd=0.5),
                _event(gateway_request_id="r3", occurred_at="2026-11-24T11:00:00"),
                _event(gateway_request_id=7),
                [1],
                _event(gateway_request_id="r4", padding="x" * 70_000),
            ]
        ).encode()
    )
    checked = check_events(events, now=NOW)
    assert [(c.gateway_request_id, c.accepted) for c in checked] == [
        ("r1", True),
        ("r2", True),
        ("r3", False),
        (None, False),
        (None, False),
        ("r4", False),
    ]
    assert checked[0].key == b"t1"
    assert checked[2].reason == "schema_violation"
    assert "occurred_at" in str(checked[2].detail)
    assert checked[5].reason == "too_large"
