"""The streaming runtime: chunking, any rate, latency, channels, robustness (a pure-delay model times it)."""

from __future__ import annotations

import numpy as np
import pytest

from quell.streaming.denoiser import Denoiser
from quell.streaming.resample import StreamingResampler


def _tones(seconds: float, rate: int, start: float = 0.0) -> np.ndarray:
    """A sum of tones below 3.5 kHz (inside every rate's band), evaluated at times t - start."""
    t = np.arange(round(seconds * rate)) / rate - start
    freqs, amps = (180.0, 523.0, 1210.0, 3300.0), (0.3, 0.2, 0.1, 0.05)
    return sum(a * np.sin(2 * np.pi * f * t) for f, a in zip(freqs, amps, strict=True)).astype(np.float32)


def _run(denoiser: Denoiser, signal: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([denoiser.process(signal[i : i + chunk]) for i in range(0, len(signal), chunk)])


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_any_rate_keeps_length_and_reports_its_latency(delay_card, rate):
    denoiser = Denoiser(delay_card, sample_rate=rate)
    signal = _tones(1.0, rate)
    out = _run(denoiser, signal, 441)
    assert out.shape == signal.shape
    expected = _tones(1.0, rate, start=denoiser.latency)  # the same tones, `latency` seconds later
    settled = slice(int(0.1 * rate), None)
    assert np.abs(out[settled] - expected[settled]).max() < 2e-3
    # half a sample off would already fail: the reported latency is exact
    off = _tones(1.0, rate, start=denoiser.latency + 0.5 / rate)
    assert np.abs(out[settled] - off[settled]).max() > 1e-2


def test_latency_at_the_model_rate_is_delay_plus_hop_buffering(delay_card):
    denoiser = Denoiser(delay_card, sample_rate=16000)
    assert denoiser.latency_samples == pytest.approx(384 + 127)
    impulse = np.zeros(2000, np.float32)
    impulse[100] = 1.0
    out = _run(denoiser, impulse, 37)
    assert int(np.argmax(out)) == 100 + 384 + 127


@pytest.mark.parametrize("rate", [16000, 48000])
def test_output_does_not_depend_on_chunk_size(delay_card, tiny_dtln_card, rate):
    signal = (np.random.default_rng(1).standard_normal(rate) * 0.1).astype(np.float32)
    for card in (delay_card, tiny_dtln_card):
        outputs = [_run(Denoiser(card, sample_rate=rate), signal, chunk) for chunk in (1, 37, 128, 160, 480, 4096)]
        for out in outputs[1:]:
            np.testing.assert_allclose(out, outputs[0], atol=1e-6)


def test_channels_are_independent_streams(tiny_dtln_card):
    rng = np.random.default_rng(2)
    stereo = (rng.standard_normal((16000, 2)) * 0.1).astype(np.float32)
    both = _run(Denoiser(tiny_dtln_card, sample_rate=16000, channels=2), stereo, 480)
    for c in range(2):
        alone = _run(Denoiser(tiny_dtln_card, sample_rate=16000), stereo[:, c].copy(), 480)
        np.testing.assert_allclose(both[:, c], alone, atol=1e-6)


def test_flush_returns_the_delayed_end_and_reset_starts_over(delay_card):
    denoiser = Denoiser(delay_card, sample_rate=16000)
    signal = _tones(0.5, 16000)
    out = np.concatenate([_run(denoiser, signal, 160), denoiser.flush()])
    lag = round(denoiser.latency_samples)
    np.testing.assert_array_equal(out[lag : lag + len(signal)], signal)
    denoiser.reset()
    np.testing.assert_array_equal(_run(denoiser, signal, 160), out[: len(signal)])


def test_nan_and_inf_do_not_poison_the_stream(tiny_dtln_card):
    denoiser = Denoiser(tiny_dtln_card, sample_rate=16000)
    signal = (np.random.default_rng(3).standard_normal(8000) * 0.1).astype(np.float32)
    signal[100:110] = np.nan
    signal[200] = np.inf
    out = _run(denoiser, signal, 160)
    assert np.isfinite(out).all()
    assert denoiser.invalid_samples == 11


def test_wrong_shape_is_a_clear_error(delay_card):
    with pytest.raises(ValueError, match=r"expected \[n\] or \[n, 2\]"):
        Denoiser(delay_card, sample_rate=16000, channels=2).process(np.zeros(160, np.float32))


@pytest.mark.parametrize("rates", [(48000, 16000), (16000, 44100), (8000, 16000), (192000, 16000)])
def test_resampler_is_accurate_and_chunk_invariant(rates):
    rate_in, rate_out = rates
    signal = _tones(0.5, rate_in)
    whole = StreamingResampler(rate_in, rate_out).process(signal)
    resampler = StreamingResampler(rate_in, rate_out)
    pieces = np.concatenate([resampler.process(signal[i : i + 97]) for i in range(0, len(signal), 97)])
    np.testing.assert_array_equal(pieces, whole)
    assert len(whole) == len(signal) * rate_out // rate_in + 1
    expected = _tones(len(whole) / rate_out, rate_out, start=resampler.delay)
    settled = slice(int(0.05 * rate_out), None)
    assert np.abs(whole[settled] - expected[settled]).max() < 1e-3


@pytest.mark.parametrize("rate", [16000, 48000])
def test_bypass_passes_the_input_through_at_the_same_latency(tiny_dtln_card, rate):
    denoiser = Denoiser(tiny_dtln_card, sample_rate=rate)
    denoiser.bypass = True
    signal = _tones(1.0, rate)
    out = _run(denoiser, signal, 480)
    expected = _tones(1.0, rate, start=denoiser.latency)
    settled = slice(int(0.1 * rate), None)
    assert np.abs(out[settled] - expected[settled]).max() < 2e-3


def test_attenuation_limit_mixes_in_the_delayed_input(tiny_dtln_card):
    signal = (np.random.default_rng(5).standard_normal(16000) * 0.1).astype(np.float32)
    full = _run(Denoiser(tiny_dtln_card, sample_rate=16000), signal, 160)
    bypassed = Denoiser(tiny_dtln_card, sample_rate=16000)
    bypassed.bypass = True
    dry = _run(bypassed, signal, 160)
    limited = _run(Denoiser(tiny_dtln_card, sample_rate=16000, attenuation_limit_db=12.0), signal, 160)
    gain = 10 ** (-12 / 20)
    np.testing.assert_allclose(limited, (1 - gain) * full + gain * dry, atol=1e-6)


def test_the_runtime_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, quell; quell.Denoiser; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
