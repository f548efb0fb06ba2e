"""Measuring what a piece of real-time code allocates."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_allocation(step: Callable[[], None], repeats: int) -> int:
    """Bytes allocated at the peak while `step` runs `repeats` times (after one warm-up call)."""
    step()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(repeats):
            step()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
