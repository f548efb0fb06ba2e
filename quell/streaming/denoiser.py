"""Denoiser: chunks of any length and rate in, the same number of enhanced samples out, at a fixed delay.

    denoiser = Denoiser("dtln", sample_rate=48000)
    out = denoiser.process(chunk)      # len(out) == len(chunk); out lags by denoiser.latency seconds

Inside: rate in -> StreamingResampler -> model rate -> hops through the StreamingModel (one per channel) ->
StreamingResampler -> rate out -> a FIFO primed with just enough silence that a call never waits for a hop.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from quell.streaming.card import ModelCard
from quell.streaming.catalog import find_model
from quell.streaming.engine import StreamingModel, make_session
from quell.streaming.resample import StreamingResampler
from quell.streaming.ringbuffer import SampleFifo


class Denoiser:
    """Streaming noise suppression for `channels` channels at `sample_rate` Hz (each channel its own stream).

    `process` takes [n] (mono) or [n, channels] float samples in [-1, 1] and returns as many enhanced samples,
    delayed by `latency` seconds. NaN and Inf input samples are replaced by zeros (and counted in
    `invalid_samples`) so that they cannot poison the model's states.

    `attenuation_limit_db` bounds how much noise is removed (None: no bound): the output is the enhanced
    signal mixed with the equally delayed input at `10 ** (-limit / 20)`, so residual noise sits at most that
    far down. `bypass = True` passes the input through at the same latency while the model keeps running,
    so switching either way is seamless.
    """

    def __init__(
        self, model: str | Path | ModelCard = "dtln", sample_rate: int = 48000, channels: int = 1,
        threads: int = 1, providers: list[str] | None = None, attenuation_limit_db: float | None = None,
        sessions: dict | None = None,
    ):
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.card = find_model(model)
        self.sample_rate, self.channels = sample_rate, channels
        # `sessions`: an already loaded {"step": InferenceSession} of this card, to share between streams
        sessions = sessions or {"step": make_session(self.card.graph_path("step"), threads, providers)}
        self.models = [StreamingModel(self.card, sessions=sessions) for _ in range(channels)]
        model_rate, hop = self.card.sample_rate, self.card.hop
        self._resample_in = self._resample_out = None
        resampler_delay = 0.0
        if sample_rate != model_rate:
            self._resample_in = StreamingResampler(sample_rate, model_rate, channels)
            self._resample_out = StreamingResampler(model_rate, sample_rate, channels)
            resampler_delay = self._resample_in.delay + self._resample_out.delay
        # At most hop - 1 model-rate samples wait for a full hop: that much silence (at the output rate) primes
        # the output so that every call can return as many samples as it was given.
        self._priming = math.ceil((hop - 1) * sample_rate / model_rate)
        self.latency = self._priming / sample_rate + self.card.delay / model_rate + resampler_delay
        self._pending = SampleFifo(channels, 4 * hop)  # model-rate samples short of a hop
        self._output = SampleFifo(channels, 4 * self._priming + 4096)
        self._hop_out = np.zeros((hop, channels), np.float32)
        self._dry = SampleFifo(channels, self.card.delay + 2 * hop)  # the input, delayed like the model output
        self.invalid_samples = 0
        self.bypass = False
        self.attenuation_limit_db = attenuation_limit_db
        Denoiser.reset(self)  # not self.reset(): a subclass resets its own parts once they exist

    @property
    def latency_samples(self) -> float:
        """The latency in samples at the stream's rate (fractional when resampling makes it so)."""
        return self.latency * self.sample_rate

    def reset(self) -> None:
        """Start a new stream: states, buffers and resamplers back to silence."""
        for model in self.models:
            model.reset()
        for resampler in (self._resample_in, self._resample_out):
            if resampler is not None:
                resampler.reset()
        self._pending.clear()
        self._output.clear()
        self._output.push(np.zeros((self._priming, self.channels), np.float32))
        self._dry.clear()
        self._dry.push(np.zeros((self.card.delay, self.channels), np.float32))

    @property
    def dry_gain(self) -> float:
        """The share of delayed input in the output: 1 in bypass, 10^(-limit/20) with a limit, else 0."""
        if self.bypass:
            return 1.0
        if self.attenuation_limit_db is None:
            return 0.0
        return float(10 ** (-max(self.attenuation_limit_db, 0.0) / 20))

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Enhance a chunk of any length; returns the same shape, delayed by `latency`."""
        samples = self._as_frames(chunk)
        if self._resample_in is not None:
            samples = self._resample_in.process(samples)
        self._pending.push(samples)
        hop = self.card.hop
        while len(self._pending) >= hop:
            block = self._pending.pop(hop)
            reference = self._reference_hop(block)
            for channel, model in enumerate(self.models):
                self._hop_out[:, channel] = model.step(
                    block[:, channel], None if reference is None else reference[:, channel])
            self._dry.push(block)
            dry, gain = self._dry.pop(hop), self.dry_gain
            if gain > 0.0:
                self._hop_out *= 1.0 - gain
                self._hop_out += gain * dry
            out = self._hop_out if self._resample_out is None else self._resample_out.process(self._hop_out)
            self._output.push(out)
        result = self._output.pop(len(chunk))
        return result[:, 0] if np.ndim(chunk) == 1 else result

    def _reference_hop(self, block: np.ndarray) -> np.ndarray | None:
        """The far-end reference for this hop of mic samples ([hop, channels]); a denoiser has none."""
        return None

    def flush(self) -> np.ndarray:
        """The enhanced end of the stream: `ceil(latency_samples)` more samples, as if silence followed."""
        tail = math.ceil(self.latency_samples)
        silence = np.zeros(tail if self.channels == 1 else (tail, self.channels), np.float32)
        return self.process(silence)

    def _as_frames(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk)
        if chunk.ndim == 1 and self.channels == 1:
            chunk = chunk[:, None]
        if chunk.ndim != 2 or chunk.shape[1] != self.channels:
            raise ValueError(f"expected [n] or [n, {self.channels}] samples, got shape {chunk.shape}")
        chunk = chunk.astype(np.float32, copy=False)
        invalid = ~np.isfinite(chunk)
        if invalid.any():
            self.invalid_samples += int(invalid.sum())
            chunk = np.where(invalid, np.float32(0.0), chunk)
        return chunk
