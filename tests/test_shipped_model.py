"""The shipped DTLNs (float32 and int8) on generated signals: they remove noise and keep a voiced (harmonic)
signal."""

from __future__ import annotations

import numpy as np
import pytest

from quell.streaming.catalog import ASSETS
from quell.streaming.denoiser import Denoiser

RATE = 16000


@pytest.fixture(params=["dtln", "dtln-int8"])
def model(request) -> str:
    if not (ASSETS / f"{request.param}.json").is_file():
        pytest.skip(f"no shipped {request.param} model")
    return request.param


def _level_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def _pink_noise(seconds: float, level_db: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    frequency = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[frequency < 50] = 0.0  # as from a microphone: no sub-audio drift dominating the level
    spectrum[frequency >= 50] /= np.sqrt(frequency[frequency >= 50])
    noise = np.fft.irfft(spectrum, n)
    return (noise * 10 ** ((level_db - _level_db(noise)) / 20)).astype(np.float32)


def _voiced(seconds: float, level_db: float) -> np.ndarray:
    """Harmonics of a gliding 110-170 Hz pitch with 1/k amplitudes, in 4 Hz syllable-like bursts."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    signal = sum(np.sin(k * phase) / k for k in range(1, 26))
    envelope = np.clip(np.sin(2 * np.pi * 2 * t), 0, None) ** 0.5
    signal = signal * envelope
    return (signal * 10 ** ((level_db - _level_db(signal)) / 20)).astype(np.float32)


def _enhance(model: str, x: np.ndarray, rate: int = RATE) -> np.ndarray:
    denoiser = Denoiser(model, sample_rate=rate)
    lag = round(denoiser.latency_samples)
    out = np.concatenate([denoiser.process(x), denoiser.flush()])
    return out[lag : lag + len(x)]


@pytest.mark.parametrize("level_db", [-45.0, -30.0])
def test_noise_only_is_lowered_by_at_least_10_db(model, level_db):
    noise = _pink_noise(3.0, level_db)
    out = _enhance(model, noise)
    settled = slice(RATE, None)  # after one second
    assert _level_db(noise[settled]) - _level_db(out[settled]) >= 10.0


def test_voiced_signal_keeps_its_level_within_3_db(model):
    voiced = _voiced(3.0, -25.0)
    out = _enhance(model, voiced)
    settled = slice(RATE // 2, None)
    assert abs(_level_db(out[settled]) - _level_db(voiced[settled])) <= 3.0


@pytest.mark.parametrize("rate", [16000, 48000])
def test_voiced_signal_in_noise_gets_cleaner_at_any_rate(model, rate):
    import soxr

    from quell.dns.metrics import si_sdr

    voiced, noise = _voiced(3.0, -25.0), _pink_noise(3.0, -25.0, seed=1)  # 0 dB SNR
    noisy = soxr.resample(voiced + noise, RATE, rate).astype(np.float32)
    out = soxr.resample(_enhance(model, noisy, rate), rate, RATE)[: len(voiced)]
    back = soxr.resample(noisy, rate, RATE)[: len(voiced)]
    settled = slice(RATE // 2, len(voiced) - RATE // 10)
    assert si_sdr(out[settled], voiced[settled]) > si_sdr(back[settled], voiced[settled]) + 3.0
