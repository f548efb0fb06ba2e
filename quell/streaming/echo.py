"""EchoCanceller: a Denoiser whose model also hears the far end, aligned to where its echo reaches the mic.

    canceller = EchoCanceller("aec", sample_rate=48000)
    out = canceller.process(mic_chunk, played_chunk)    # what the app captured and what it played

The reference goes through the same resampler as the mic, then a fractional delay line: `DelayEstimator`
finds the delay between the reference and its echo (up to `max_delay`, to a fraction of a sample) and the line
holds the reference back by that much, so the model sees each far-end frame together with its echo (less the
card's `reference_lead`: a model with a causal linear filter inside wants the echo's first arrival a little
late). The delay track also gives the clock drift between playback and capture (`DriftEstimator`); the line
then lets the delay grow (or shrink) by that many parts per million every sample, which resamples the reference
to the mic's clock. When the delay is first found, or jumps, the states the card names in `realign_states` (a
linear filter's: the echo path at the old alignment) start from zero.
Without a reference (None, or silence) the model works as a noise suppressor; a reference that never
correlates is never aligned (it reports low confidence).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from quell.streaming.align import DelayEstimate, DelayEstimator, DriftEstimator, FractionalDelayLine
from quell.streaming.card import ModelCard
from quell.streaming.denoiser import Denoiser
from quell.streaming.resample import StreamingResampler
from quell.streaming.ringbuffer import SampleFifo

_REALIGN = 0.002  # seconds: a delay that moves further is a new alignment (less is drift, followed smoothly)


class EchoCanceller(Denoiser):
    """Streaming echo cancellation and noise suppression; `process(mic, reference)` keeps the mic's length.

    `reference` is what was played (mono [n] or one column per channel), at the same rate and length as the
    mic chunk. `alignment` is the current delay estimate (None until one is confirmed) and `drift_ppm` the
    clock drift measured from how that delay moves (None until 8 s of confident estimates).
    """

    def __init__(
        self, model: str | Path | ModelCard = "aec", sample_rate: int = 48000, channels: int = 1,
        max_delay: float = 0.5, threads: int = 1, providers: list[str] | None = None,
        attenuation_limit_db: float | None = None, sessions: dict | None = None,
    ):
        super().__init__(model, sample_rate, channels, threads, providers, attenuation_limit_db, sessions)
        if not self.card.reference_input:
            raise ValueError(f"model {self.card.name!r} takes no far-end reference: it is not an echo canceller")
        rate, hop = self.card.sample_rate, self.card.hop
        self.max_delay = max_delay
        self._resample_reference = StreamingResampler(sample_rate, rate, channels) if sample_rate != rate else None
        self._pending_reference = SampleFifo(channels, 4 * hop)
        self._line_length = int(max_delay * rate) + hop
        self.estimator = DelayEstimator(rate, max_delay=max_delay)
        self._reset_alignment()

    @property
    def alignment(self) -> DelayEstimate | None:
        """The adopted delay of the echo behind the reference, with its confidence."""
        return self.estimator.estimate

    @property
    def drift_ppm(self) -> float | None:
        """Clock drift between playback and capture, parts per million (positive: the echo comes later)."""
        return self._drift.ppm

    def reset(self) -> None:
        """Start a new stream: the Denoiser's parts, the reference path and the alignment from scratch."""
        super().reset()
        if self._resample_reference is not None:  # it must stay in step with the mic's resampler
            self._resample_reference.reset()
        self._pending_reference.clear()
        self.estimator.reset()
        self._reset_alignment()

    def _reset_alignment(self) -> None:
        self._line = FractionalDelayLine(self._line_length, self.channels)
        self._drift = DriftEstimator()
        self._hops, self._anchor_time = 0, 0
        self._last_candidate: DelayEstimate | None = None
        self._anchor_estimate: DelayEstimate | None = None  # the estimate the delay track starts from

    def process(self, mic: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """Cancel the echo of `reference` in `mic`; returns mic's shape, delayed by `latency`."""
        mic = np.asarray(mic)
        n = mic.shape[0] if mic.ndim else 0
        if reference is None:
            reference = np.zeros((n, self.channels), np.float32)
        reference = np.asarray(reference, np.float32)
        if reference.shape[0] != n:
            raise ValueError(f"mic and reference chunks differ in length: {n} and {reference.shape[0]} samples")
        if reference.ndim == 1:
            reference = np.repeat(reference[:, None], self.channels, axis=1)
        reference = np.where(np.isfinite(reference), reference, np.float32(0.0))
        if self._resample_reference is not None:
            reference = self._resample_reference.process(self._as_frames(reference))
        self._pending_reference.push(self._as_frames(reference))
        return super().process(mic)

    def _reference_hop(self, block: np.ndarray) -> np.ndarray:
        hop, rate = self.card.hop, self.card.sample_rate
        far = self._pending_reference.pop(hop)
        self._line.push(far)
        self.estimator.push(block.mean(axis=1), far.mean(axis=1))
        self._hops += 1
        now = self._hops * hop  # samples so far, at the model rate
        candidate = self.estimator.candidate
        if candidate is not None and candidate is not self._last_candidate:  # a new measurement
            if candidate.confidence >= self.estimator.min_confidence:
                self._drift.add(now / rate, candidate.delay)
            self._last_candidate = candidate
        estimate = self.estimator.estimate
        if estimate is None:
            return self._line.read(np.zeros(hop))
        if estimate is not self._anchor_estimate:  # measured over the last window: it holds at its middle
            previous = self._anchor_estimate
            if self.card.realign_states and (previous is None or abs(estimate.delay - previous.delay) > _REALIGN):
                for model in self.models:  # the echo path at the old alignment is of no use at the new one
                    model.zero_states(self.card.realign_states)
            self._anchor_estimate, self._anchor_time = estimate, now - self.estimator.window // 2
        slope = (self.drift_ppm or 0.0) * 1e-6
        samples = now - hop + np.arange(hop)
        delay = estimate.delay * rate - self.card.reference_lead
        return self._line.read(delay + slope * (samples - self._anchor_time))


def aligned_output(
    canceller: EchoCanceller, chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], frames: int
) -> Iterator[np.ndarray]:
    """The output for (mic, reference) chunks in the mic's timing, `frames` samples in all (files and arrays).

    The stream's latency (`round(latency_samples)`) is dropped from the start and its tail flushed out at the
    end, so output sample i answers mic sample i. `chunks` is consumed lazily: it may read a file block by block.
    """
    to_drop, left = round(canceller.latency_samples), frames

    def outputs() -> Iterator[np.ndarray]:
        for mic, reference in chunks:
            yield canceller.process(mic, reference)
        yield canceller.flush()

    for out in outputs():
        dropped = min(to_drop, len(out))
        to_drop -= dropped
        out = out[dropped:][:left]
        left -= len(out)
        if len(out):
            yield out
