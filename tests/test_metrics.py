"""Metrics against known values."""

from __future__ import annotations

import numpy as np
import pytest

from quell.dns import metrics

RATE = 16000


def _speechlike(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Gliding harmonics in syllable bursts, plus a little breath noise: enough 'speech' for PESQ's VAD."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 130 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30)) * np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None)
    return (0.1 * voiced / np.abs(voiced).max() + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def test_si_sdr_of_a_scaled_copy_is_very_large_and_snr_is_not():
    s = _speechlike()
    assert metrics.si_sdr(0.5 * s, s) > 80
    assert metrics.snr(0.5 * s, s) == pytest.approx(20 * np.log10(1 / 0.5), abs=1e-3)


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_si_sdr_of_signal_plus_noise_is_the_snr(snr_db):
    rng = np.random.default_rng(1)
    s = rng.standard_normal(RATE * 10)
    n = rng.standard_normal(RATE * 10)
    n -= (n @ s) / (s @ s) * s  # orthogonal to s, so SI-SDR is exactly the SNR
    n *= np.sqrt((s @ s) / (n @ n)) * 10 ** (-snr_db / 20)
    assert metrics.si_sdr(s + n, s) == pytest.approx(snr_db, abs=1e-3)  # (means removed: not exact)
    assert metrics.snr(s + n, s) == pytest.approx(snr_db, abs=1e-6)


def test_si_sdr_is_vectorised_over_leading_axes():
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((3, 4, 1000))
    ref = rng.standard_normal((3, 4, 1000))
    out = metrics.si_sdr(batch, ref)
    assert out.shape == (3, 4)
    assert out[1, 2] == pytest.approx(metrics.si_sdr(batch[1, 2], ref[1, 2]))


def test_pesq_and_stoi_are_best_for_the_clean_signal_and_drop_with_noise():
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    s = _speechlike()
    noisy = s + 0.05 * np.random.default_rng(3).standard_normal(s.size).astype(np.float32)
    assert metrics.pesq(s, s, RATE, "wb") == pytest.approx(4.64, abs=0.01)
    assert metrics.pesq(noisy, s, RATE, "wb") < 2.0
    assert metrics.pesq(noisy, s, RATE, "nb") < metrics.pesq(s, s, RATE, "nb")
    assert metrics.stoi(s, s, RATE) == pytest.approx(1.0, abs=1e-6)
    assert metrics.stoi(noisy, s, RATE) < 0.9
    assert metrics.stoi(noisy, s, RATE, extended=True) < metrics.stoi(s, s, RATE, extended=True)


def test_dnsmos_rates_noise_worse_than_clean():
    pytest.importorskip("speechmos")
    from quell.dns.mos import dnsmos

    s = _speechlike(10.0)
    noisy = s + 0.03 * np.random.default_rng(4).standard_normal(s.size).astype(np.float32)
    clean_scores, noisy_scores = dnsmos(s), dnsmos(noisy)
    assert set(clean_scores) == {"sig", "bak", "ovrl", "p808"}
    assert noisy_scores["bak"] < clean_scores["bak"] - 0.5
    assert noisy_scores["ovrl"] < clean_scores["ovrl"]
    assert all(1.0 <= v <= 5.0 for v in clean_scores.values())


def test_dnsmos_features_match_librosa():
    librosa = pytest.importorskip("librosa")
    from quell.dns.mos import _log_mel

    s = _speechlike(2.0)
    aecmos_mel = librosa.feature.melspectrogram(y=s, sr=RATE, n_fft=513, hop_length=256, n_mels=160)
    np.testing.assert_allclose(_log_mel(s, 513, 256, 160), ((librosa.power_to_db(aecmos_mel, ref=np.max) + 40) / 40).T,
                               atol=1e-4)
    mel = librosa.feature.melspectrogram(y=s, sr=RATE, n_fft=321, hop_length=160, n_mels=120)
    expected = ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T
    np.testing.assert_allclose(_log_mel(s), expected, atol=1e-4)


def test_erle_is_the_level_drop_over_the_mask():
    mic = np.random.default_rng(5).standard_normal(16000)
    assert metrics.erle(mic, 0.1 * mic) == pytest.approx(20.0, abs=1e-6)
    out = np.concatenate([0.01 * mic[:8000], mic[8000:]])  # echo removed only in the first half
    mask = np.arange(16000) < 8000
    assert metrics.erle(mic, out, mask) == pytest.approx(40.0, abs=1e-6)


def test_aecmos_rates_a_removed_echo_better_than_the_mic():
    pytest.importorskip("speechmos")
    from quell.dns.mos import aecmos

    far, near = _speechlike(6.0, seed=6), _speechlike(6.0, seed=7)
    echo = 0.5 * np.concatenate([np.zeros(1600, np.float32), far])[: far.size]
    noise = 0.001 * np.random.default_rng(8).standard_normal(far.size).astype(np.float32)
    mic = echo + noise
    kept, removed = aecmos(far, mic, mic, "far_end"), aecmos(far, mic, noise, "far_end")
    assert removed["echo"] > kept["echo"] + 0.5
    double = aecmos(far, mic + near, near + noise, "double_talk")
    assert set(double) == {"echo", "degradation"} and all(1.0 <= v <= 5.5 for v in double.values())
    with pytest.raises(ValueError, match="unknown scenario"):
        aecmos(far, mic, mic, "both")
