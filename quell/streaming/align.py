"""Where the far-end reference reappears in the microphone: bulk echo delay by GCC-PHAT, tracked over time.

Devices put 20-500 ms between what an app plays and when its echo reaches the microphone, and that delay
changes (a new output device, a buffer underrun). `DelayEstimator` keeps the last `window` seconds of both
signals, and every `update` seconds cross-correlates them with the phase transform (GCC-PHAT: every frequency
weighted alike, so the peak is sharp whatever the spectrum of speech or music); the cross-power spectrum is
averaged over updates, which is sound because both segments advance together. A new delay is adopted only
when it is distinct (its peak well above every other lag) on `confirm` updates in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DelayEstimate:
    """The delay of the echo behind the reference, in seconds, and how sure the estimator is (0..1)."""

    delay: float
    confidence: float


class DelayEstimator:
    """Streaming bulk-delay estimation between a reference (far end, played) and a microphone (its echo).

    `push(mic, reference)` takes equal-length chunks of any size; `estimate` is the delay currently adopted
    (None until one is confirmed) and `candidate` the latest raw measurement.
    """

    def __init__(
        self, sample_rate: int, max_delay: float = 0.5, window: float = 1.0, update: float = 0.25,
        smoothing: float = 0.6, min_confidence: float = 0.3, confirm: int = 2,
    ):
        if max_delay <= 0 or window <= 0 or update <= 0:
            raise ValueError("max_delay, window and update must be positive")
        self.sample_rate = sample_rate
        self.max_lag = int(round(max_delay * sample_rate))
        self.window = int(round(window * sample_rate))
        self.update_every = int(round(update * sample_rate))
        self.smoothing, self.min_confidence, self.confirm = smoothing, min_confidence, confirm
        self.fft_size = 1 << int(np.ceil(np.log2(2 * self.window + self.max_lag)))
        history = self.window + self.max_lag
        self._mic = np.zeros(history, np.float32)
        self._reference = np.zeros(history, np.float32)
        self._since_update = 0
        self._filled = 0
        self._cross = np.zeros(self.fft_size // 2 + 1, np.complex128)
        self._streak: list[int] = []
        self.estimate: DelayEstimate | None = None
        self.candidate: DelayEstimate | None = None

    def push(self, mic: np.ndarray, reference: np.ndarray) -> DelayEstimate | None:
        """Add equal-length chunks of both signals; returns the adopted estimate (None while unknown)."""
        mic = np.asarray(mic, np.float32).reshape(-1)
        reference = np.asarray(reference, np.float32).reshape(-1)
        if mic.shape != reference.shape:
            raise ValueError(f"mic and reference chunks differ in length: {mic.size} and {reference.size}")
        position = 0
        while position < mic.size:  # in pieces, so that no update is skipped inside a long chunk
            take = min(self.update_every - self._since_update, mic.size - position)
            self._append(mic[position : position + take], reference[position : position + take])
            position += take
            if self._since_update >= self.update_every:
                self._since_update = 0
                if self._filled >= self.window + self.max_lag:
                    self._measure()
        return self.estimate

    def reset(self) -> None:
        self._mic.fill(0.0)
        self._reference.fill(0.0)
        self._cross.fill(0.0)
        self._since_update = self._filled = 0
        self._streak.clear()
        self.estimate = self.candidate = None

    def _append(self, mic: np.ndarray, reference: np.ndarray) -> None:
        n = mic.size
        for history, new in ((self._mic, mic), (self._reference, reference)):
            history[:-n] = history[n:]
            history[-n:] = new
        self._since_update += n
        self._filled = min(self._filled + n, self._mic.size)

    def _measure(self) -> None:
        mic = self._mic[-self.window :]  # the last `window` of the mic ...
        reference = self._reference  # ... against the reference reaching back a further max_lag
        if float(np.dot(reference, reference)) < 1e-9 * reference.size:  # far end silent: nothing to learn
            return
        spectrum_mic = np.fft.rfft(mic, self.fft_size)
        spectrum_ref = np.fft.rfft(reference, self.fft_size)
        cross = np.conj(spectrum_mic) * spectrum_ref
        self._cross = self.smoothing * self._cross + (1 - self.smoothing) * cross
        phat = self._cross / (np.abs(self._cross) + 1e-12)
        # correlation[k] = sum_i mic[i] * reference[i + k]; an echo `d` samples late peaks at k = max_lag - d
        correlation = np.fft.irfft(phat, self.fft_size)[: self.max_lag + 1]
        peak = int(np.argmax(correlation))
        height = correlation[peak]
        guard = max(1, self.sample_rate // 500)  # 2 ms either side belong to the peak itself
        others = np.concatenate([correlation[: max(peak - guard, 0)], correlation[peak + guard + 1 :]])
        second = float(others.max()) if others.size else 0.0
        confidence = float(np.clip(1.0 - max(second, 0.0) / height, 0.0, 1.0)) if height > 0 else 0.0
        offset = _parabolic_offset(correlation, peak)
        lag = self.max_lag - (peak + offset)
        self.candidate = DelayEstimate(lag / self.sample_rate, confidence)
        if confidence < self.min_confidence:
            self._streak.clear()
            return
        self._streak = [*self._streak, peak][-self.confirm :]
        if len(self._streak) == self.confirm and max(self._streak) - min(self._streak) <= guard:
            self.estimate = self.candidate


def _parabolic_offset(values: np.ndarray, index: int) -> float:
    """Sub-sample offset of a peak from the parabola through it and its neighbours (0 at the ends)."""
    if index <= 0 or index >= len(values) - 1:
        return 0.0
    left, centre, right = values[index - 1], values[index], values[index + 1]
    denominator = left - 2 * centre + right
    return float(0.5 * (left - right) / denominator) if denominator != 0 else 0.0
