"""Preallocated FIFOs for audio samples."""

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
