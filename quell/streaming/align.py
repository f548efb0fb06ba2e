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
                # the first measurement as soon as the longest delay plus one update of signal is in: lags the
                # history cannot hold yet just find nothing (the full window took 1.5 s by default, the
                # canceller ran unaligned that long: on 46 echo clips the median lock came at 1.75 s, now 1.25 s)
                if self._filled >= self.max_lag + self.update_every:
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


class DriftEstimator:
    """Clock drift between playback and capture, from how the echo delay moves: the slope of delay vs time.

    Two clocks that differ by 100 ppm move the echo 0.1 ms later (or earlier) every second. The estimate is
    a least-squares line through the delays measured over the last `span` seconds, refitted without the
    points furthest from it (a wrong peak now and then must not tilt the line).
    """

    def __init__(self, span: float = 30.0, min_span: float = 8.0):
        self.span, self.min_span = span, min_span
        self._times: list[float] = []
        self._delays: list[float] = []

    def add(self, time: float, delay: float) -> None:
        """A delay (seconds) measured at `time` (seconds of capture)."""
        self._times.append(time)
        self._delays.append(delay)
        while self._times and self._times[0] < time - self.span:
            self._times.pop(0)
            self._delays.pop(0)

    @property
    def ppm(self) -> float | None:
        """Drift in parts per million (positive: the echo comes later and later), None until enough data."""
        if len(self._times) < 8 or self._times[-1] - self._times[0] < self.min_span:
            return None
        t, d = np.asarray(self._times), np.asarray(self._delays)
        slope, intercept = np.polyfit(t, d, 1)
        residual = np.abs(d - (slope * t + intercept))
        keep = residual <= max(np.percentile(residual, 80), 1e-6)
        slope, _ = np.polyfit(t[keep], d[keep], 1)
        return float(slope * 1e6)


class FractionalDelayLine:
    """The reference read at any fractional delay, sample by sample: alignment and drift in one place.

    `push` appends samples; `read(delays)` returns, for the last len(delays) samples pushed, the signal as
    it was delays[i] samples earlier, through a windowed sinc whose sub-sample phases come from a table
    (`phases` rows, linearly interpolated). A delay that grows by 100e-6 per sample undoes a 100 ppm clock
    drift; a sub-sample delay aligns finer than a sample. Delays below `half_taps` (1 ms at 16 kHz) are read
    as `half_taps`: the interpolator needs that many samples after the point it reads.
    """

    def __init__(self, max_delay: int, channels: int = 1, half_taps: int = 32, phases: int = 512, beta: float = 9.0):
        self.half, self.phases, self.max_delay = half_taps, phases, max_delay
        frac = np.arange(phases + 1)[:, None] / phases
        t = frac + half_taps - 1 - np.arange(2 * half_taps)[None, :]  # distance from each tap to the point read
        window = np.i0(beta * np.sqrt(np.clip(1 - (t / half_taps) ** 2, 0.0, None))) / np.i0(beta)
        self._table = (np.sinc(0.98 * t) * 0.98 * window).astype(np.float32)
        self._buffer = np.zeros((max_delay + 2 * half_taps + 1, channels), np.float32)

    def push(self, samples: np.ndarray) -> None:
        """Append [n, channels] samples (n at most the line's length)."""
        n = len(samples)
        self._buffer[:-n] = self._buffer[n:]
        self._buffer[-n:] = samples

    def read(self, delays: np.ndarray) -> np.ndarray:
        """[len(delays), channels]: sample i of the last len(delays) pushed, delayed by delays[i] samples."""
        count = len(delays)
        delays = np.clip(np.asarray(delays, np.float64), self.half, self.max_delay)
        newest = len(self._buffer) - 1
        position = newest - (count - 1) + np.arange(count) - delays  # where to read, in buffer indices
        base = np.floor(position).astype(np.int64)
        where = (position - base) * self.phases
        row = np.floor(where).astype(np.int64)
        blend = (where - row)[:, None].astype(np.float32)
        weights = (1 - blend) * self._table[row] + blend * self._table[np.minimum(row + 1, self.phases)]
        taps = base[:, None] - self.half + 1 + np.arange(2 * self.half)[None, :]
        return np.einsum("mk,mkc->mc", weights, self._buffer[taps])
