"""The corrections `bench ingest|budget --corrections N` mix into a backlog: every one valid, in
the design's proportions, keyed and placed as a gateway's would be."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from llm_usage.bench.support import with_corrections
from llm_usage.domain.corrections import Correction
from llm_usage.local.sample_events import sample_stream
from llm_usage.schemas.decoding import decode_usage_topic_record
from llm_usage.schemas.usage_event import UsageRow

NOW = datetime(2026, 11, 14, 9, 0, tzinfo=UTC)


def _stream() -> list[tuple[bytes, bytes, dict[str, object]]]:
    return sample_stream(random.Random(7), count=3000, dup_rate=0.1, id_prefix="b", now=NOW)


def test_the_mix_is_valid_in_proportion_and_after_its_events_but_one_in_a_hundred() -> None:
    stream = _stream()
    mixed = with_corrections(stream, 1000, random.Random(1), now=NOW)
    assert len(mixed) == len(stream) + 1000
    # The events keep their order; the corrections are added around them.
    assert [r for r in mixed if r[2].get("event_type") != "llm_usage_corrected"] == stream
    seen: set[str] = set()
    corrections: list[Correction] = []
    before_event = 0
    corrected: Counter[str] = Counter()
    for key, value, _ in mixed:
        decoded = decode_usage_topic_record(value, now=NOW)
        if isinstance(decoded, Correction):
            assert key == decoded.tenant_id.encode()
            before_event += decoded.gateway_request_id not in seen
            corrected[decoded.gateway_request_id] += 1
            corrections.append(decoded)
        else:
            assert isinstance(decoded, UsageRow), decoded
            seen.add(decoded.gateway_request_id)
    assert len(corrections) == 1000
    assert Counter(c.action for c in corrections) == {"void": 400, "amend": 600}
    assert sorted(Counter(corrected.values()).items()) == [(1, 800), (2, 100)]
    assert before_event == 10
    assert len({c.key for c in corrections}) == 1000


def test_a_second_correction_comes_after_the_first_and_wins() -> None:
    mixed = with_corrections(_stream(), 200, random.Random(2), now=NOW)
    first: dict[str, Correction] = {}
    for _, value, _ in mixed:
        decoded = decode_usage_topic_record(value, now=NOW)
        if isinstance(decoded, Correction):
            earlier = first.setdefault(decoded.gateway_request_id, decoded)
            if earlier is not decoded:
                assert decoded.occurred_at > earlier.occurred_at
                assert decoded.action == "amend"


def test_more_corrections_than_events_is_refused() -> None:
    with pytest.raises(ValueError, match="distinct events"):
        with_corrections(_stream()[:10], 100, random.Random(3), now=NOW)
