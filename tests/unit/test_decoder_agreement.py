"""The compiled fast path and the reference model agree on every input.

The fast path may only say "valid, with these values"; whatever it is not sure of goes to the
reference. So on any input: when the fast path accepts, the reference accepts with exactly the
same values; and `decode_usage_event` answers exactly what the reference answers (the same
event, or the same DLQ reason and detail).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_usage.local.sample_events import sample_stream
from llm_usage.schemas import fast_decoding
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import decode_usage_event, decode_usage_event_reference
from llm_usage.schemas.fast_decoding import fast_decode
from llm_usage.schemas.usage_event import (
    EVENT_FIELD_COUNT,
    EVENT_TYPE,
    SCHEMA_VERSION,
    UnpricedEvent,
    UsageEvent,
    UsageRow,
    usage_row,
)
from llm_usage.storage.usage_events import USAGE_EVENT_COLUMNS
from tests.unit.test_decoding import NOW, event_json


@dataclass(frozen=True)
class Literal:
    """A JSON number written exactly as given (json.dumps would go through a float)."""

    text: str


ID_VALUES = [
    *("r-1", "r" * 200, "r" * 201, "", " r", "r ", "r\t", "a\x07b", "a\x85b", "a\u00a0"),
    *("\u2028a", "a b", "ünï", "a\x00b", "a\ud800", 7, None, True),
]
IDS = st.sampled_from(ID_VALUES)
TEXT_VALUES = [None, "", "x" * 200, "x" * 201, "a\x00b", "tab\there", " pad ", "ünï", "a\ud800", 5]
TEXTS = st.sampled_from(TEXT_VALUES)
COUNT_VALUES = [0, 1, -1, 2**63 - 1, 2**63, True, 1.0, "1", None, Literal("5"), Literal("5.0")]
COUNTS = st.sampled_from(COUNT_VALUES) | st.integers(min_value=-5, max_value=10**20)
DECIMAL_TEXTS = [
    "0.5",
    "0.50",
    "0.0054",
    "0.015",  # 2 cents: agrees with the valid event's 1 cent
    "0.025",  # 3 cents: does not
    "0.0249",
    "123456789012",
    "1234567890123",
    "123456789012.123456789012345678",
    "0." + "1" * 18,
    "0." + "1" * 19,
    "1.0000000000000000000",
    "1e-7",
    "1.5E-7",
    "1E+2",
    "-0",
    "-0.0",
    "-1",
    "NaN",
    "Infinity",
    "",
    " 1",
    "+1",
    "00.5",
    "1_000",
]
DECIMAL_OTHERS: list[Any] = [
    *(Literal(t) for t in ("0.5", "1.5E-7", "12345678901234567890.5", "-0.0", "1e400")),
    *(None, True, 7, 0, [], {}),
]
DECIMALS: st.SearchStrategy[Any] = (
    st.sampled_from(DECIMAL_TEXTS)
    | st.sampled_from(DECIMAL_OTHERS)
    | st.decimals(allow_nan=False, allow_infinity=False, places=6).map(str)
)
# The valid event charges 0.0054 USD: 0 and 2 cents agree with it, 3 does not.
CENT_VALUES = [None, 0, 1, 2, 3, 50, -1, True, 2**63, Literal("1.0")]
CENTS = st.sampled_from(CENT_VALUES)
TIME_VALUES = [
    "2026-11-14T09:00:00Z",
    "2026-11-14T09:00:00.123456Z",
    "2026-11-14T09:00:00.1234567Z",
    "2026-11-14t09:00:00z",
    "2026-11-14 09:00:00Z",
    "2026-11-14T09:00:00+05:30",
    "2026-11-14T09:00:00-00:00",
    "2026-11-14T09:00:00",
    "2026-11-23T12:05:00Z",  # exactly 5 minutes after NOW: allowed
    "2026-11-23T12:05:00.000001Z",
    "2026-11-23T13:05:00+01:00",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00.000001Z",
    "0001-01-01T00:30:00+01:00",
    "9999-12-31T23:59:59.999998Z",
    "9999-12-31T23:59:59.999999Z",
    "2026-02-29T00:00:00Z",
    "2026-11-14T24:00:00Z",
    "2026-11-14T09:00:60Z",
    "2026-11-14T09:00:00+24:00",
    "2026-11-14T09:00:00+23:59",
    "2026-11-14T09:00:00+05:75",
    1700000000,
    None,
]
TIMES = st.sampled_from(TIME_VALUES)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_type": st.sampled_from(["llm_usage_recorded", "llm_budget_alert", None, 1]),
    "schema_version": st.sampled_from([1, 2, 1.0, True, "1", None, Literal("1.0")]),
    "gateway_request_id": IDS,
    "tenant_id": IDS,
    **{
        name: TEXTS
        for name in (
            "deployment_id",
            "user_id",
            "agent_id",
            "channel",
            "feature",
            "provider",
            "model",
            "request_kind",
        )
    },
    **{
        name: COUNTS
        for name in (
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "reasoning_tokens",
            "total_tokens",
        )
    },
    "upstream_cost_usd": DECIMALS,
    "customer_charge_usd": DECIMALS,
    "customer_charge_cents": CENTS,
    "markup_mode": st.sampled_from(
        [None, "flat_percent", "plan_inclusive", "percent", "k" * 200, "k" * 201, "\x00", 1]
    ),
    "occurred_at": TIMES,
}
VALID = json.loads(event_json(customer_charge_cents=1))


def render(value: Any) -> str:
    if isinstance(value, Literal):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@st.composite
def raw_events(draw: st.DrawFn) -> bytes:
    """A valid event with one or two fields moved to a rule's boundary (or left out), in the
    spellings real serialisers use, sometimes with a name given twice or a nested unknown."""
    odd = set(draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=0, max_size=2)))
    pairs: list[tuple[str, Any]] = []
    for name, values in FIELDS.items():
        if name not in odd:
            if name in VALID:
                pairs.append((name, VALID[name]))
        elif draw(st.integers(0, 4)) > 0:  # else: absent
            pairs.append((name, draw(values)))
    if draw(st.booleans()):
        pairs.append(("unknown", draw(st.sampled_from([1, {"a": [1, {"b": 2}]}, '":', [{}]]))))
    if pairs and draw(st.integers(0, 5)) == 0:
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((name, draw(FIELDS.get(name, st.just(1)))))
    draw(st.randoms()).shuffle(pairs)
    separator = draw(st.sampled_from([": ", ":", " : ", "\n:\t"]))
    body = ", ".join(f"{json.dumps(k)}{separator}{render(v)}" for k, v in pairs)
    return ("{" + body + "}").encode("utf-8", "surrogatepass")


def assert_same_event(decoded: UsageRow | UnpricedEvent, reference: UsageEvent) -> None:
    """`decoded` holds exactly the values the reference model stores (both unpriced alike
    when the event sent no charge)."""
    expected_decoded = usage_row(reference)
    assert type(decoded) is type(expected_decoded)
    row = decoded.row if isinstance(decoded, UnpricedEvent) else decoded
    expected = (
        expected_decoded.row if isinstance(expected_decoded, UnpricedEvent) else expected_decoded
    )
    assert row == expected
    # Equal values may still differ in type (1 and True) or spelling (0.5 and 0.50, which is
    # stored too).
    assert [(type(v), str(v)) for v in row] == [(type(v), str(v)) for v in expected]
    assert row.occurred_at.tzinfo == reference.occurred_at.tzinfo == UTC


def assert_agree(raw: bytes) -> UsageRow | UnpricedEvent | None:
    reference = decode_usage_event_reference(raw, now=NOW)
    fast = fast_decode(raw, now=NOW)
    if fast is not None:
        assert isinstance(reference, UsageEvent), (raw, reference)
        assert_same_event(fast, reference)
    answer = decode_usage_event(raw, now=NOW)
    if isinstance(reference, Rejection):
        assert answer == reference
    else:
        assert isinstance(answer, UsageRow | UnpricedEvent)
        assert_same_event(answer, reference)
    return fast


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_events())
def test_the_fast_path_accepts_only_what_the_reference_accepts_with_the_same_values(
    raw: bytes,
) -> None:
    assert_agree(raw)


def _single_field_boundaries() -> list[tuple[str, Any]]:
    values: dict[str, list[Any]] = {
        "gateway_request_id": ID_VALUES,
        "tenant_id": ID_VALUES,
        "deployment_id": TEXT_VALUES,
        "model": TEXT_VALUES,
        "input_tokens": COUNT_VALUES,
        "total_tokens": COUNT_VALUES,
        "customer_charge_usd": [*DECIMAL_TEXTS, *DECIMAL_OTHERS],
        "upstream_cost_usd": [*DECIMAL_TEXTS, *DECIMAL_OTHERS],
        "customer_charge_cents": CENT_VALUES,
        "occurred_at": TIME_VALUES,
    }
    return [(name, value) for name, found in values.items() for value in found]


@pytest.mark.parametrize(("name", "value"), _single_field_boundaries())
def test_every_boundary_of_every_field_alone_gets_the_same_answer(name: str, value: Any) -> None:
    pairs = {**VALID, name: value}
    raw = ("{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in pairs.items()) + "}").encode(
        "utf-8", "surrogatepass"
    )
    assert_agree(raw)


@given(st.binary(max_size=300))
def test_any_bytes_get_the_reference_answer(raw: bytes) -> None:
    assert_agree(raw)


def test_the_fast_path_takes_every_event_a_gateway_usually_sends() -> None:
    now = datetime.now(UTC)
    stream = sample_stream(random.Random(7), count=2000, dup_rate=0, id_prefix="g", now=now)
    for _, raw, _ in stream:
        fast = fast_decode(raw, now=now)
        assert fast is not None, raw
        reference = decode_usage_event_reference(raw, now=now)
        assert isinstance(reference, UsageEvent)
        assert_same_event(fast, reference)


@pytest.mark.parametrize(
    "raw",
    [
        event_json(),
        event_json(upstream_cost_usd=None, deployment_id=None, markup_mode=None),
        event_json(upstream_cost_usd="0.001", customer_charge_usd=5, customer_charge_cents=500),
        b'{"gateway_request_id": "r", "tenant_id": "t", "customer_charge_cents": 250, '
        b'"occurred_at": "2026-11-14T09:00:00+05:30"}',
        b'{"gateway_request_id":"r","tenant_id":"t","customer_charge_usd":1.5E-7,'
        b'"occurred_at":"2026-11-14T09:00:00.5Z","input_tokens":3,"output_tokens":4}',
    ],
)
def test_plain_valid_events_take_the_fast_path(raw: bytes) -> None:
    assert assert_agree(raw) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"gateway_request_id": "r", "tenant_id": "t", "customer_charge_usd": "0.5", '
        b'"occurred_at": "2026-11-14T09:00:00Z", "extra": {"nested": [1, {"deep": true}]}}',
        event_json(trace_id="abc"),
        event_json(occurred_at="2026-11-14t09:00:00z"),
        event_json(occurred_at="2026-11-14 09:00:00Z"),
        event_json(tenant_id="a\u00a0b"),  # valid (no control character), but not printable
    ],
)
def test_rare_valid_spellings_are_accepted_by_the_reference_not_the_fast_path(raw: bytes) -> None:
    assert assert_agree(raw) is None
    assert isinstance(decode_usage_event(raw, now=NOW), UsageRow)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"gateway_request_id": "r", "tenant_id": "a", "tenant_id": "b", '
        b'"customer_charge_usd": "1", "occurred_at": "2026-11-14T09:00:00Z"}',
        b'{"gateway_request_id": "r", "tenant_id" : "a", "tenant_id":"b", '
        b'"customer_charge_usd": "1", "occurred_at": "2026-11-14T09:00:00Z"}',
        b'{"gateway_request_id": "r", "tenant_id": "a", "x": {"k": 1, "k": 2}, '
        b'"customer_charge_usd": "1", "occurred_at": "2026-11-14T09:00:00Z"}',
        b'{"gateway_request_id": "r", "tenant_id": "a\\":", "customer_charge_usd": "1", '
        b'"occurred_at": "2026-11-14T09:00:00Z"}',
        event_json(gateway_request_id=" r"),
        event_json(tenant_id="acme\n"),
        event_json(tenant_id="ac\x7fme"),
    ],
)
def test_names_given_twice_unclean_ids_and_key_like_text_never_take_the_fast_path(
    raw: bytes,
) -> None:
    assert fast_decode(raw, now=NOW) is None
    assert_agree(raw)


def test_the_struct_the_row_and_the_table_list_the_columns_in_one_order() -> None:
    # The fast path builds a row by position from the struct's values, and COPY writes a row
    # by position into USAGE_EVENT_COLUMNS.
    row_length = EVENT_FIELD_COUNT
    assert fast_decoding._Event.__struct_fields__[:row_length] == UsageRow._fields[:row_length]
    assert UsageRow._fields[row_length:] == ("charge_estimated", "price_effective_from")
    assert tuple(USAGE_EVENT_COLUMNS) == UsageRow._fields
    assert set(fast_decoding._Event.__struct_fields__) == set(UsageEvent.model_fields)
    # Its fixed values are the model's.
    explicit = event_json(event_type=EVENT_TYPE, schema_version=SCHEMA_VERSION)
    assert fast_decode(explicit, now=NOW) is not None
