"""RingBuffer: the single-producer/single-consumer ring between an audio callback and the worker."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from quell.streaming.ringbuffer import RingBuffer
from tests.allocation import peak_allocation


def _ramp(start: int, n: int, channels: int = 1) -> np.ndarray:
    """Samples start, start + 1, ... (exact in float32 up to 2**24), the same in every channel."""
    return np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], channels, axis=1)


def test_wraps_around_and_keeps_order():
    ring = RingBuffer(10, channels=2)
    out = np.empty((4, 2), np.float32)
    written = read = 0
    for _ in range(50):  # 50 x 4 samples through 10 slots: the indices wrap around many times
        assert ring.write(_ramp(written, 4, 2)) == 4
        written += 4
        assert ring.read(out) == 4
        np.testing.assert_array_equal(out, _ramp(read, 4, 2))
        read += 4
    assert ring.available == 0 and ring.free == 10
    assert ring.overflows == ring.underflows == 0


def test_overflow_keeps_what_fits_and_counts_the_rest():
    ring = RingBuffer(8)
    assert ring.write(_ramp(0, 5)) == 5
    assert ring.write(_ramp(5, 5)) == 3
    assert (ring.overflows, ring.dropped, ring.available, ring.free) == (1, 2, 8, 0)
    out = np.empty((8, 1), np.float32)
    ring.read(out)
    np.testing.assert_array_equal(out, _ramp(0, 8))


def test_underflow_fills_silence_and_counts_it():
    ring = RingBuffer(8)
    ring.write(_ramp(1, 3))
    out = np.full((5, 1), 9.0, np.float32)
    assert ring.read(out) == 3
    np.testing.assert_array_equal(out[:, 0], [1, 2, 3, 0, 0])
    assert (ring.underflows, ring.missing) == (1, 2)


def test_skip_discards_the_oldest():
    ring = RingBuffer(8)
    ring.write(_ramp(0, 6))
    assert ring.skip(4) == 4
    assert ring.skip(10) == 2  # only what is there
    ring.write(_ramp(6, 2))
    out = np.empty((2, 1), np.float32)
    ring.read(out)
    np.testing.assert_array_equal(out[:, 0], [6, 7])


@pytest.fixture
def fine_thread_switching():
    """Switch threads every 10 us instead of every 5 ms, so that the two sides interleave inside calls."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def _hammer(ring: RingBuffer, total: int, wait_for_room: bool) -> tuple[np.ndarray, int]:
    """A producer thread writes a ramp of `total` samples in random blocks while this thread reads random blocks.

    Returns what was read and how many samples the producer offered.
    """
    rng_w, rng_r = np.random.default_rng(1), np.random.default_rng(2)
    offered = [0]

    def produce():
        position = 0
        while position < total:
            n = min(int(rng_w.integers(1, 97)), total - position)
            if wait_for_room and ring.free < n:
                time.sleep(0)  # let the reader run
                continue
            ring.write(_ramp(position, n, ring.channels))
            position += n
        offered[0] = position

    producer = threading.Thread(target=produce)
    producer.start()
    received, out = [], np.empty((128, ring.channels), np.float32)
    while producer.is_alive() or ring.available:
        n = min(int(rng_r.integers(1, 129)), ring.available)
        if n:
            assert ring.read(out[:n]) == n
            received.append(out[:n].copy())
    producer.join()
    return np.concatenate(received), offered[0]


def test_two_threads_hammering_lose_and_duplicate_nothing(fine_thread_switching):
    ring = RingBuffer(257, channels=2)  # odd size: blocks straddle the end in every possible way
    received, offered = _hammer(ring, 100_000, wait_for_room=True)
    np.testing.assert_array_equal(received, _ramp(0, offered, 2))
    assert ring.overflows == ring.underflows == 0


def test_two_threads_hammering_a_full_ring_only_drop_whole_tails(fine_thread_switching):
    ring = RingBuffer(100)
    received, offered = _hammer(ring, 100_000, wait_for_room=False)
    values = received[:, 0]
    assert ring.dropped > 0  # the reader is slower than the writer here
    assert len(values) + ring.dropped == offered  # every sample either arrived or was counted as dropped
    assert np.all(np.diff(values) > 0)  # in order, none twice
    assert values[0] == 0


def test_write_and_read_allocate_no_arrays():
    ring = RingBuffer(1000, channels=2)
    block, out = np.ones((480, 2), np.float32), np.empty((480, 2), np.float32)

    def step() -> None:
        ring.write(block)
        ring.read(out)
        ring.skip(0)

    peak = peak_allocation(step, 200)
    assert peak < block.nbytes / 2, f"{peak} bytes allocated at peak: a block is {block.nbytes}"
