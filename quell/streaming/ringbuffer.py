"""Preallocated FIFOs for audio samples.

- `SampleFifo`: one thread pushes and pops (inside `Denoiser`); grows while chunk sizes grow.
- `RingBuffer`: one thread writes, another reads (an audio callback and a worker); fixed size, no lock.
"""

from __future__ import annotations

import numpy as np


class SampleFifo:
    """A first-in first-out queue of [n, channels] float32 samples in one preallocated array.

    Single-threaded: the caller pushes and pops from the same thread. Capacity doubles when a push would
    overflow it, which happens only while the stream's chunk sizes are still growing.
    """

    def __init__(self, channels: int, capacity: int = 4096):
        self._data = np.zeros((capacity, channels), np.float32)
        self._start = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, samples: np.ndarray) -> None:
        """Append [n, channels] samples."""
        n = len(samples)
        if self._start + self._size + n > len(self._data):
            self._compact(self._size + n)
        self._data[self._start + self._size : self._start + self._size + n] = samples
        self._size += n

    def pop(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Remove and return the oldest n samples (a copy, or written into `out`)."""
        if n > self._size:
            raise ValueError(f"pop({n}) from a FIFO holding {self._size} samples")
        view = self._data[self._start : self._start + n]
        if out is None:
            out = view.copy()
        else:
            out[:n] = view
        self._start += n
        self._size -= n
        return out

    def clear(self) -> None:
        self._start = self._size = 0

    def _compact(self, needed: int) -> None:
        if needed > len(self._data):
            grown = np.zeros((max(needed, 2 * len(self._data)), self._data.shape[1]), np.float32)
            grown[: self._size] = self._data[self._start : self._start + self._size]
            self._data = grown
        else:
            self._data[: self._size] = self._data[self._start : self._start + self._size]
        self._start = 0


class RingBuffer:
    """A single-producer/single-consumer ring of [n, channels] float32 samples between two threads.

    One thread calls `write`; one other thread calls `read` and `skip`. Neither takes a lock, waits, or
    allocates an array: samples are copied between preallocated arrays. A write that does not fit keeps what
    fits and drops the rest; a read that finds too few samples fills the rest with silence. Both are counted
    (`overflows`/`dropped`, `underflows`/`missing`), never an error, because an audio callback must return.

    Each position counter is written by one side only (`_written` by the producer, `_read` by the consumer) and
    is advanced after the samples are copied, so the other side never sees samples that are not there yet.
    The counters only grow (Python integers do not wrap); the array index is the counter modulo the capacity.
    """

    def __init__(self, capacity: int, channels: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 sample, got {capacity}")
        self.capacity, self.channels = capacity, channels
        self._data = np.zeros((capacity, channels), np.float32)
        self._written = 0  # samples ever written: the producer's counter
        self._read = 0  # samples ever read or skipped: the consumer's counter
        self.overflows = 0  # writes that did not fit (producer side)
        self.dropped = 0  # samples those writes dropped
        self.underflows = 0  # reads that found too few samples (consumer side)
        self.missing = 0  # samples those reads filled with silence

    @property
    def written(self) -> int:
        """Samples written since the start (dropped ones not included)."""
        return self._written

    @property
    def available(self) -> int:
        """Samples waiting to be read."""
        return self._written - self._read

    @property
    def free(self) -> int:
        """Samples that a write can take now."""
        return self.capacity - (self._written - self._read)

    def write(self, samples: np.ndarray) -> int:
        """Producer: append [n, channels] samples; returns how many fit (the rest is dropped and counted)."""
        n = len(samples)
        room = self.capacity - (self._written - self._read)
        if n > room:
            self.overflows += 1
            self.dropped += n - room
            n = room
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._data[start : start + first] = samples[:first]
        self._data[: n - first] = samples[first:n]
        self._written += n  # publish: the samples are in place
        return n

    def read(self, out: np.ndarray) -> int:
        """Consumer: fill [n, channels] `out` with the oldest samples; returns how many were there.

        When fewer than n are waiting, the rest of `out` is silence (counted in `underflows` and `missing`).
        """
        n = len(out)
        ready = min(n, self._written - self._read)
        start = self._read % self.capacity
        first = min(ready, self.capacity - start)
        out[:first] = self._data[start : start + first]
        out[first:ready] = self._data[: ready - first]
        if ready < n:
            out[ready:] = 0.0
            self.underflows += 1
            self.missing += n - ready
        self._read += ready  # publish: the space is free again
        return ready

    def skip(self, n: int) -> int:
        """Consumer: discard up to n of the oldest samples; returns how many were discarded."""
        n = min(n, self._written - self._read)
        self._read += n
        return n
