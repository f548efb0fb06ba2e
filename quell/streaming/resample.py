"""Resampling around the model rate.

Two resamplers, for two jobs:
- `StreamingResampler` for live streams: a polyphase windowed-sinc filter with a fixed, known delay of about
  1 ms and at most one sample of hold-back. soxr's streaming mode holds back 20-36 ms in bursts (measured: up
  to 585 samples at 48 -> 16 kHz, 1757 at 16 -> 48 kHz with quality HQ), which a live call cannot afford.
- `soxr` (in `files.py`) for files, where latency is free and its speed and quality are the best on offer.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

_MAX_PHASES = 4096  # beyond this many sub-sample phases (odd rate pairs), phases are rounded to the nearest


class StreamingResampler:
    """Any rate to any rate, chunk by chunk, multichannel; output sample j is the input at time j/rate_out - delay.

    Kaiser-windowed sinc with `zero_crossings` zero crossings each side of the lower rate's Nyquist frequency
    times `rolloff`. After n input samples, exactly `floor(n * rate_out / rate_in)` (+1 at most) outputs exist.
    """

    def __init__(
        self, rate_in: int, rate_out: int, channels: int = 1, zero_crossings: int = 16,
        rolloff: float = 0.94, beta: float = 8.6,
    ):
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        ratio = Fraction(rate_out, rate_in)
        self.rate_in, self.rate_out, self.channels = rate_in, rate_out, channels
        self.up, self.down = ratio.numerator, ratio.denominator  # output j sits at input time j * down / up
        cutoff = 0.5 * min(1.0, rate_out / rate_in) * rolloff  # cycles per input sample
        half = int(np.ceil(zero_crossings / (2 * cutoff)))
        self.taps = 2 * half
        self.delay_in_samples = half  # in input samples
        self.phases = min(self.up, _MAX_PHASES)
        # weights[p, k] multiplies input n - taps + k for an output whose time sits p/phases before input n
        frac = np.arange(self.phases + 1)[:, None] / self.phases
        t = half - np.arange(self.taps)[None, :] - frac
        window = np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0.0, None))) / np.i0(beta)
        self.weights = (2 * cutoff * np.sinc(2 * cutoff * t) * window).astype(np.float32)
        self._history = np.zeros((self.taps, channels), np.float32)
        self._received = 0  # input samples so far
        self._produced = 0  # output samples so far

    @property
    def delay(self) -> float:
        """Delay in seconds between input and output."""
        return self.delay_in_samples / self.rate_in

    def reset(self) -> None:
        self._history.fill(0.0)
        self._received = self._produced = 0

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample [n] or [n, channels] float32 samples; returns [m] or [m, channels] (m may be 0)."""
        mono = chunk.ndim == 1
        chunk = chunk.reshape(len(chunk), self.channels).astype(np.float32, copy=False)
        buffer = np.concatenate([self._history, chunk])  # buffer[i] is input index start + i
        start = self._received - self.taps
        self._received += len(chunk)
        # output j is computable once input index ceil(j * down / up) - 1 has arrived
        j = np.arange(self._produced, (self._received * self.up) // self.down + 1, dtype=np.int64)
        self._produced += j.size
        self._history = buffer[-self.taps :].copy()
        if j.size == 0:
            out = np.zeros((0, self.channels), np.float32)
            return out[:, 0] if mono else out
        newest = -((-j * self.down) // self.up)  # ceil(j * down / up): one past the newest input used
        phase = np.rint(((newest * self.up - j * self.down) / self.up) * self.phases).astype(np.int64)
        index = (newest - self.taps - start)[:, None] + np.arange(self.taps)[None, :]
        out = np.einsum("mk,mkc->mc", self.weights[phase], buffer[index])
        return out[:, 0] if mono else out
