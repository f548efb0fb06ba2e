"""The linear echo filter in front of the echo model: it converges, survives double talk, and tracks a change."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quell.models.adaptive import AdaptiveEchoFilter  # noqa: E402

RATE, HOP = 16000, 160
# every behaviour holds for the fixed NLMS step and for the variable one (the step from the residual echo's share
# of the error)
STEPS = pytest.mark.parametrize("variable_step", [False, True], ids=["fixed-step", "variable-step"])


def _far_end(seconds: float, seed: int) -> np.ndarray:
    """Coloured noise with syllable-like bursts: speech-like in spectrum and in its pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    noise = np.convolve(rng.standard_normal(n), [1.0, 0.9, 0.5, 0.2], mode="same")
    envelope = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 2.5 * np.arange(n) / RATE))
    return (0.1 * noise * envelope).astype(np.float32)


def _echo_path(seed: int, taps: int = 960) -> np.ndarray:
    """A room: 2 ms of flight, then an exponentially decaying random tail (60 ms long)."""
    rng = np.random.default_rng(seed)
    path = rng.standard_normal(taps) * np.exp(-np.arange(taps) / (0.012 * RATE))
    path[:32] = 0.0
    path[32] = 2.0
    return path / np.abs(path).sum() * 3


def _run(mic: np.ndarray, reference: np.ndarray, partitions: int = 8, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    model = AdaptiveEchoFilter(HOP, partitions=partitions, **kwargs)
    residual, estimate = model(torch.from_numpy(mic)[None], torch.from_numpy(reference)[None])
    return residual[0].numpy(), estimate[0].numpy()


def _erle(echo: np.ndarray, left: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(echo**2) / np.sum(left**2)))


@STEPS
def test_it_cancels_a_linear_echo_and_its_estimate_is_the_echo(variable_step):
    reference = _far_end(6, 0)
    echo = np.convolve(reference, _echo_path(1))[: reference.size].astype(np.float32)
    residual, estimate = _run(echo, reference, variable_step=variable_step)
    late = slice(3 * RATE, None)
    assert _erle(echo[late], residual[late]) >= 40.0  # measured 96 / 89 dB: the path fits the filter, no noise
    np.testing.assert_allclose(residual, echo - estimate, atol=1e-6)


@STEPS
def test_double_talk_passes_the_near_end_and_does_not_undo_the_convergence(variable_step):
    reference = _far_end(9, 2)
    echo = np.convolve(reference, _echo_path(3))[: reference.size].astype(np.float32)
    near = np.zeros_like(echo)
    talk = slice(4 * RATE, 6 * RATE)
    near[talk] = 2 * _far_end(2, 4)  # a near-end talker louder than the echo
    residual, _ = _run(echo + near, reference, variable_step=variable_step)
    left = residual - near
    before, during, after = slice(3 * RATE, 4 * RATE), talk, slice(7 * RATE, None)
    assert _erle(echo[before], left[before]) >= 40.0
    assert _erle(echo[during], left[during]) >= 30.0  # held on (one filter alone: -13 dB, it diverges)
    assert _erle(echo[after], left[after]) >= 40.0
    assert np.sum((residual[talk] - near[talk]) ** 2) < 0.01 * np.sum(near[talk] ** 2)


@STEPS
def test_it_follows_an_echo_path_change(variable_step):
    reference = _far_end(10, 5)
    first = np.convolve(reference, _echo_path(6))[: reference.size]
    second = np.convolve(reference, _echo_path(7))[: reference.size]
    echo = np.concatenate([first[: 5 * RATE], second[5 * RATE :]]).astype(np.float32)
    residual, _ = _run(echo, reference, variable_step=variable_step)
    just_after, settled = slice(5 * RATE, int(5.5 * RATE)), slice(8 * RATE, None)
    assert _erle(echo[just_after], residual[just_after]) < 10.0  # it did change
    assert _erle(echo[settled], residual[settled]) >= 40.0


@STEPS
def test_a_silent_reference_leaves_the_mic_alone(variable_step):
    mic = _far_end(1, 8)
    residual, estimate = _run(mic, np.zeros_like(mic), variable_step=variable_step)
    np.testing.assert_array_equal(residual, mic)
    assert not estimate.any()


def _voiced_with_pauses(seconds: float) -> np.ndarray:
    """Harmonics of a gliding 120 Hz pitch in bursts with silences: little energy between the harmonics."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(120 * (1 + 0.15 * np.sin(2 * np.pi * 0.6 * t))) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 58))
    return (0.05 * voiced * np.clip(np.sin(2 * np.pi * 1.7 * t), 0, None) ** 0.5).astype(np.float32)


@STEPS
def test_pauses_in_a_voiced_far_end_do_not_make_a_long_filter_diverge(variable_step):
    """A loud word still in the filter's memory must not meet a step size made for the silence after it (with
    the step normalised by the current hop's power alone, this filter went to -98 dB ERLE: it exploded)."""
    reference = _voiced_with_pauses(12)
    echo = np.convolve(reference, _echo_path(10))[: reference.size].astype(np.float32)
    residual, _ = _run(echo, reference, partitions=20, variable_step=variable_step)
    for second in range(4, 12, 2):
        window = slice(second * RATE, (second + 2) * RATE)
        assert _erle(echo[window], residual[window]) >= 10.0  # measured 15-17 dB (variable step: 21-23)
