"""The consumers' garbage collector settings, checked in a fresh interpreter (this one is
pytest's, and must keep its own)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from llm_usage.runtime.process import tune_collector_for_batches
before = gc.get_threshold()
tune_collector_for_batches()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_start_up_objects_are_frozen_and_the_young_generation_collected_less_often() -> None:
    found = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
        ).stdout
    )
    assert found["after"][0] == 50_000 > found["before"][0]
    assert found["after"][1:] == found["before"][1:]
    assert found["frozen"] > 1_000  # the imported modules' objects at least
