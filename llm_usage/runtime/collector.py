"""The garbage collector tuned for a process that works in batches."""

from __future__ import annotations

import gc

# Collect the youngest generation after this many net allocations instead of Python's 700.
YOUNG_GENERATION_THRESHOLD = 50_000


def tune_collector_for_batches() -> None:
    """A consumer allocates a few dozen objects per event and frees them all once the batch
    has landed. With Python's defaults the youngest generation is collected every ~30 events,
    so a batch in hand survives into the older generations, and their collections rescan every
    object start-up built (modules, clients). Start-up's objects are frozen out of every future
    collection, and the youngest generation is collected a thousand times less often; cycles
    are still collected, only later, and reference counting frees everything else at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
