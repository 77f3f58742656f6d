"""The corrections' fast path and their reference model agree on every input.

As for usage events (test_decoder_agreement.py): when `fast_decode_correction` accepts, the
reference (`UsageCorrectionEvent`) accepts with exactly the same values; and
`decode_usage_topic_record` answers what the reference answers (the same correction, or the same
DLQ reason and detail).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_usage.bench.support import with_corrections
from llm_usage.domain.corrections import Correction
from llm_usage.local.sample_events import sample_stream
from llm_usage.schemas.dead_letter import Rejection
from llm_usage.schemas.decoding import (
    _json_object,
    _other_event,
    decode_usage_topic_record,
)
from llm_usage.schemas.fast_decoding import fast_decode_correction
from llm_usage.schemas.usage_correction import AmendFields
from tests.unit.test_decoder_agreement import COUNTS, DECIMALS, IDS, TEXTS, TIMES, render
from tests.unit.test_decoding import NOW

VALID: dict[str, Any] = {
    "event_type": "llm_usage_corrected",
    "schema_version": 1,
    "correction_id": "c-1",
    "gateway_request_id": "req-1",
    "tenant_id": "acme",
    "action": "amend",
    "fields": {"input_tokens": 10, "customer_charge_usd": "0.0054", "user_id": "u-1"},
    "reason": "a refund",
    "actor": "ops@example.com",
    "occurred_at": "2026-11-20T09:00:00Z",
    "event_occurred_at": "2026-11-14T09:00:00Z",
}
REASONS = st.sampled_from(["", "r", "r" * 1000, "r" * 1001, " pad ", "a\x00b", "ünï", 5, None])
# The amended fields, from AmendFields (every one optional), and one it does not know.
AMEND: dict[str, st.SearchStrategy[Any]] = {
    name: COUNTS if name.endswith(("_tokens", "_cents")) else TEXTS
    for name in AmendFields.model_fields
} | {"customer_charge_usd": DECIMALS, "model": TEXTS}
TOP: dict[str, st.SearchStrategy[Any]] = {
    "event_type": st.sampled_from(["llm_usage_corrected", "llm_usage_recorded", None, 1]),
    "schema_version": st.sampled_from([1, 2, 1.0, True, "1", None]),
    "correction_id": IDS,
    "gateway_request_id": IDS,
    "tenant_id": IDS,
    "action": st.sampled_from(["void", "amend", "Void", "", None]),
    "fields": st.sampled_from([None, {}, [], 1]),
    "reason": REASONS,
    "actor": REASONS,
    "occurred_at": TIMES,
    "event_occurred_at": TIMES,
}


@st.composite
def raw_corrections(draw: st.DrawFn) -> bytes:
    """A valid correction with a field or two moved to a rule's boundary (or left out), its
    amended fields drawn, sometimes a name given twice or an unknown field."""
    odd = set(draw(st.lists(st.sampled_from(sorted(TOP)), min_size=0, max_size=2)))
    pairs: list[tuple[str, Any]] = []
    for name, values in TOP.items():
        if name not in odd:
            pairs.append((name, VALID[name]))
        elif draw(st.integers(0, 4)) > 0:  # else: absent
            pairs.append((name, draw(values)))
    if "fields" not in odd and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(sorted(AMEND)), max_size=4, unique=True))
        amended = {name: draw(AMEND[name]) for name in names}
        pairs = [(n, amended if n == "fields" else v) for n, v in pairs]
    if draw(st.integers(0, 4)) == 0:
        pairs.append(("unknown", draw(st.sampled_from([1, {"a": [1]}, '":']))))
    if draw(st.integers(0, 5)) == 0:
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((name, draw(TOP.get(name, st.just(1)))))
    draw(st.randoms()).shuffle(pairs)
    separator = draw(st.sampled_from([": ", ":", " : "]))
    body = ", ".join(f"{json.dumps(k)}{separator}{render(v)}" for k, v in pairs)
    return ("{" + body + "}").encode("utf-8", "surrogatepass")


def reference(raw: bytes, now: datetime = NOW) -> Correction | Rejection | None:
    data = _json_object(raw)
    if isinstance(data, Rejection):
        return data
    found = _other_event(data, now)
    assert not isinstance(found, tuple)  # no period charge here
    return found  # type: ignore[return-value]


def assert_agree(raw: bytes, now: datetime = NOW) -> Correction | None:
    expected = reference(raw, now)
    fast = fast_decode_correction(raw, now=now)
    if fast is not None:
        assert isinstance(expected, Correction), (raw, expected)
        assert fast == expected
        # Equal values may still differ in type (1 and True) or spelling (0.5 and 0.50).
        assert {k: (type(v), str(v)) for k, v in fast.fields.items()} == {
            k: (type(v), str(v)) for k, v in expected.fields.items()
        }
        assert fast.occurred_at.tzinfo == UTC
    if isinstance(expected, Correction | Rejection):  # the topic's decoder answers the same
        assert decode_usage_topic_record(raw, now=now) == expected
    return fast


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_corrections())
def test_a_correction_takes_the_fast_path_only_with_the_reference_values(raw: bytes) -> None:
    assert_agree(raw)


def _with(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        _with(),
        _with(action="void", fields=None),
        _with(action="void", fields={}),
        json.dumps({k: v for k, v in VALID.items() if k != "fields"} | {"action": "void"}).encode(),
        _with(fields={"user_id": None}),
        _with(fields={"customer_charge_usd": 0.5}, event_occurred_at=None),
        _with(occurred_at="2026-11-20T09:00:00.5+05:30"),
    ],
)
def test_plain_valid_corrections_take_the_fast_path(raw: bytes) -> None:
    assert assert_agree(raw) is not None


@pytest.mark.parametrize(
    "raw",
    [
        _with(trace_id="abc"),  # ignored by the reference: left to it
        _with(reason='a "quoted" reason'),  # an escape
        _with(fields={"customer_charge_usd": "0.015", "customer_charge_cents": 2}),
        _with(occurred_at="2026-11-20t09:00:00z"),
        _with(tenant_id="a\u00a0b"),  # valid (no control character), but not printable
    ],
)
def test_rare_valid_corrections_are_accepted_by_the_reference_not_the_fast_path(
    raw: bytes,
) -> None:
    assert assert_agree(raw) is None
    assert isinstance(decode_usage_topic_record(raw, now=NOW), Correction)


@pytest.mark.parametrize(
    "raw",
    [
        _with(action="void"),  # a void with fields
        _with(fields={}),  # an amend without
        _with(fields={"input_tokens": None}),
        _with(fields={"customer_charge_usd": None}),
        _with(fields={"model": "m"}),
        _with(tenant_id=" acme"),
        _with(occurred_at="2026-11-23T12:05:00.000001Z"),  # after NOW's allowed skew
        b'{"event_type": "llm_usage_corrected", "tenant_id": "a", "tenant_id": "b", '
        + json.dumps({k: v for k, v in VALID.items() if k not in ("event_type", "tenant_id")})[
            1:
        ].encode(),
    ],
)
def test_broken_corrections_get_the_reference_answer(raw: bytes) -> None:
    assert fast_decode_correction(raw, now=NOW) is None
    assert isinstance(decode_usage_topic_record(raw, now=NOW), Rejection)


def test_the_fast_path_takes_the_corrections_the_bench_sends() -> None:
    now = datetime.now(UTC)
    stream = sample_stream(random.Random(7), count=2000, dup_rate=0, id_prefix="g", now=now)
    mixed = with_corrections(stream, 200, random.Random(8), now=now + timedelta(seconds=1))
    corrections = [raw for _, raw, body in mixed if body.get("event_type") == VALID["event_type"]]
    assert len(corrections) == 200
    for raw in corrections:
        assert assert_agree(raw, now) is not None, raw
