"""The shipped echo canceller on generated signals: it takes a delayed, room-coloured, mildly distorted echo
out of a far-end-only mic, and the near-end talker survives double talk."""

from __future__ import annotations

import numpy as np
import pytest

from quell.dns.metrics import erle, si_sdr
from quell.streaming.catalog import ASSETS
from quell.streaming.echo import EchoCanceller, aligned_output

RATE = 16000
pytestmark = pytest.mark.skipif(not (ASSETS / "aec.json").is_file(), reason="no shipped aec model")


def _talker(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """Speech-like: syllables of random length and pitch (harmonics shaped by two random formants) and
    fricative noise bursts, with pauses between them; never periodic, so its delay is unambiguous."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * RATE))
    frequency = np.fft.rfftfreq(2048, 1 / RATE)
    position = 0
    while position < out.size:
        length = int(rng.uniform(0.08, 0.3) * RATE)
        t = np.arange(length) / RATE
        if rng.random() < 0.75:  # voiced
            f0 = pitch * rng.uniform(0.8, 1.25) * (1 + rng.uniform(-0.1, 0.1) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / RATE
            formants = rng.uniform([300, 900], [900, 2500])
            syllable = sum(np.sin(k * phase) * sum(np.exp(-(((k * pitch - f) / 250) ** 2)) + 0.05 for f in formants)
                           for k in range(1, int(7000 / pitch)))
        else:  # fricative: high-passed noise
            spectrum = np.fft.rfft(rng.standard_normal(2048)) * (frequency > rng.uniform(2500, 4500))
            syllable = np.resize(np.fft.irfft(spectrum), length)
        syllable *= np.hanning(length) / (np.abs(syllable).max() + 1e-9)
        stop = min(position + length, out.size)
        out[position:stop] = syllable[: stop - position] * rng.uniform(0.3, 1.0)
        position = stop + int(rng.uniform(0.03, 0.35) * RATE)
    return (0.1 * out / np.abs(out).max()).astype(np.float32)


def _echo(far: np.ndarray, delay: float, seed: int) -> np.ndarray:
    """The far end through a softly clipping loudspeaker and a small room (direct path 3 ms after the
    loudspeaker, then a 30 ms decaying tail), `delay` seconds late, at -6 dB."""
    rng = np.random.default_rng(seed)
    peak = np.abs(far).max()
    played = np.tanh(2.5 * far / peak) * peak
    taps = int(0.3 * RATE)
    room = 0.2 * rng.standard_normal(taps) * np.exp(-np.arange(taps) / (0.03 * RATE))
    room[:48] = 0.0
    room[48] = 1.0
    wet = np.convolve(played, room / np.sqrt(np.sum(room**2)))[: far.size]
    lag = int(delay * RATE)
    return (0.5 * np.concatenate([np.zeros(lag), wet[: far.size - lag]])).astype(np.float32)


def _cancel(mic: np.ndarray, far: np.ndarray) -> np.ndarray:
    canceller = EchoCanceller("aec", sample_rate=RATE)
    chunks = ((mic[i : i + 160], far[i : i + 160]) for i in range(0, mic.size, 160))
    return np.concatenate(list(aligned_output(canceller, chunks, mic.size)))


def test_far_end_single_talk_loses_at_least_20_db_of_echo():
    far = _talker(12.0, 120.0, 1)
    echo = _echo(far, 0.18, 2)
    noise = (1e-4 * np.random.default_rng(3).standard_normal(far.size)).astype(np.float32)
    out = _cancel(echo + noise, far)
    settled = slice(6 * RATE, None)  # the delay is found and the filter has converged
    assert erle(echo[settled] + noise[settled], out[settled]) >= 20.0


def test_the_near_end_survives_double_talk():
    far = _talker(12.0, 120.0, 4)
    echo = _echo(far, 0.12, 5)
    near = np.zeros_like(far)
    talk = slice(6 * RATE, 10 * RATE)  # after the canceller has settled on the far end alone
    near[talk] = 2.0 * _talker(4.0, 210.0, 6)
    mic = near + echo
    out = _cancel(mic, far)
    improvement = si_sdr(out[talk], near[talk]) - si_sdr(mic[talk], near[talk])
    assert improvement > 0.0
