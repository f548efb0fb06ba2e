"""Bulk echo delay: planted delays of 0-500 ms found within 1 ms, a jump followed, nonsense rejected."""

from __future__ import annotations

import numpy as np
import pytest

from quell.streaming.align import DelayEstimator

RATE = 16000


def _talker(seconds: float, seed: int) -> np.ndarray:
    """Speech-like: gliding harmonics in syllables, with noisy consonant bursts between them."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(100, 200) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)), 0, None)
    bursts = rng.standard_normal(t.size) * (syllables < 0.05) * 0.3
    return (0.1 * (voiced * syllables + bursts)).astype(np.float32)


def _echo(far: np.ndarray, delay_samples: int, seed: int) -> np.ndarray:
    """The far end through a short decaying room response, `delay_samples` late."""
    rng = np.random.default_rng(seed)
    room = rng.standard_normal(400) * np.exp(-np.arange(400) / 60.0)
    room[0] = 1.0
    echo = np.convolve(far, room)[: far.size] * 0.3
    return np.concatenate([np.zeros(delay_samples), echo])[: far.size].astype(np.float32)


def _run(estimator: DelayEstimator, mic: np.ndarray, far: np.ndarray, chunk: int = 160) -> list:
    return [estimator.push(mic[i : i + chunk], far[i : i + chunk]) for i in range(0, mic.size, chunk)]


@pytest.mark.parametrize("delay_ms", [0.0, 20.0, 137.5, 260.0, 499.0])
def test_planted_delay_is_found_within_1_ms_in_double_talk(delay_ms):
    far, near = _talker(6.0, 1), _talker(6.0, 2)
    noise = 0.002 * np.random.default_rng(3).standard_normal(far.size).astype(np.float32)
    mic = _echo(far, round(delay_ms * RATE / 1000), seed=4) + 0.5 * near + noise
    estimator = DelayEstimator(RATE, max_delay=0.5)
    _run(estimator, mic, far, chunk=441)
    assert estimator.estimate is not None
    assert abs(estimator.estimate.delay * 1000 - delay_ms) <= 1.0


@pytest.mark.parametrize("delay_ms", [30.0, 480.0])
def test_the_first_estimate_comes_within_1_25_s_and_is_right(delay_ms):
    """The canceller runs unaligned until the first estimate: it must not wait for the full window."""
    rng = np.random.default_rng(7)  # a far end without pitch (noise in syllables): its correlation has one peak
    syllables = np.clip(np.sin(2 * np.pi * 3 * np.arange(3 * RATE) / RATE), 0, None)
    far = (0.1 * rng.standard_normal(3 * RATE) * syllables).astype(np.float32)
    delay = round(delay_ms * RATE / 1000)
    mic = 0.3 * np.concatenate([np.zeros(delay, np.float32), far[: far.size - delay]])
    mic += 0.002 * rng.standard_normal(far.size).astype(np.float32)
    estimates = _run(DelayEstimator(RATE, max_delay=0.5), mic, far)
    first = next(i for i, e in enumerate(estimates) if e is not None)
    assert (first + 1) * 160 / RATE <= 1.25
    assert abs(estimates[first].delay * 1000 - delay_ms) <= 1.0


def test_a_jump_in_delay_is_followed_within_two_seconds():
    far = _talker(12.0, 5)
    before, after = _echo(far, int(0.1 * RATE), seed=6), _echo(far, int(0.3 * RATE), seed=6)
    switch = 6 * RATE
    mic = np.concatenate([before[:switch], after[switch:]])
    estimator = DelayEstimator(RATE)
    estimates = _run(estimator, mic, far)
    hop_time = 160 / RATE
    assert abs(estimates[int(5.9 / hop_time)].delay - 0.1) < 0.001
    settled = [e.delay for e in estimates[int(8.0 / hop_time) :]]
    assert all(abs(d - 0.3) < 0.001 for d in settled)


def test_a_reference_that_never_correlates_is_not_believed():
    far, mic = _talker(6.0, 7), _talker(6.0, 8)
    estimator = DelayEstimator(RATE)
    _run(estimator, mic, far)
    assert estimator.estimate is None
    assert estimator.candidate is not None and estimator.candidate.confidence < 0.3


def test_a_silent_reference_gives_no_estimate():
    estimator = DelayEstimator(RATE)
    _run(estimator, _talker(4.0, 9), np.zeros(4 * RATE, np.float32))
    assert estimator.estimate is None and estimator.candidate is None


def test_chunks_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        DelayEstimator(RATE).push(np.zeros(160), np.zeros(161))


def _drift_ppm(mic: np.ndarray, far: np.ndarray) -> float | None:
    from quell.streaming.align import DriftEstimator

    estimator, drift = DelayEstimator(RATE), DriftEstimator(span=60.0)
    for i in range(0, mic.size, 1600):
        estimator.push(mic[i : i + 1600], far[i : i + 1600])
        if estimator.candidate is not None and estimator.candidate.confidence > 0.3:
            drift.add(i / RATE, estimator.candidate.delay)
    return drift.ppm


def test_drift_of_100_ppm_is_measured():
    import soxr

    far = _talker(40.0, 10)
    # the loudspeaker's clock runs 100 ppm slow against the mic's: each second the echo comes 0.1 ms later
    played = soxr.resample(far, RATE, RATE * (1 + 100e-6)).astype(np.float32)[: far.size]
    mic = _echo(played, int(0.12 * RATE), seed=11)
    ppm = _drift_ppm(mic, far)
    assert ppm is not None and abs(ppm - 100) < 10
    assert abs(_drift_ppm(_echo(far, int(0.12 * RATE), seed=11), far)) < 10  # no drift, none measured


@pytest.mark.parametrize("delay", [32.0, 100.25, 3200.7])
def test_fractional_delay_line_reads_any_delay(delay):
    from quell.streaming.align import FractionalDelayLine

    n = np.arange(RATE)

    def tones(shift: float) -> np.ndarray:  # well inside the band: the interpolator rolls off above 0.98 x Nyquist
        return 0.3 * np.sin(2 * np.pi * 310 * (n - shift) / RATE) + 0.2 * np.sin(2 * np.pi * 5100 * (n - shift) / RATE)

    line, signal, out = FractionalDelayLine(4000), tones(0.0).astype(np.float32), []
    for i in range(0, RATE, 160):
        line.push(signal[i : i + 160, None])
        out.append(line.read(np.full(160, delay))[:, 0])
    settled = slice(4000, None)
    np.testing.assert_allclose(np.concatenate(out)[settled], tones(delay)[settled], atol=1e-4)
