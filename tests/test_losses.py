"""Training losses: the one-sided spectral term charges only the side it is meant to."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quell.models.losses import LOSSES, compressed_excess, loss_with_args  # noqa: E402

RATE = 16000


def _speech_like(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = sum(np.sin(2 * np.pi * k * 150 * t) / k for k in range(1, 15)) * np.clip(np.sin(2 * np.pi * 2 * t), 0, 1)
    return torch.from_numpy(0.05 * voiced + 1e-4 * rng.standard_normal(t.size)).float()[None]


def test_compressed_excess_charges_what_the_target_lacks_and_nothing_else():
    clean = _speech_like()
    noise = 0.01 * torch.randn_like(clean)
    assert compressed_excess(clean + noise, clean) > 100 * compressed_excess(0.5 * clean, clean)  # residual noise
    assert compressed_excess(clean, clean + noise) < compressed_excess(clean, 0.5 * clean + noise)  # lost speech
    assert compressed_excess(clean, clean) == 0


def test_the_residual_loss_prefers_suppressed_noise_to_left_noise_where_the_snr_loss_does_not_care():
    clean = _speech_like()
    noise = 0.003 * torch.randn_like(clean)
    left, removed_with_speech = clean + noise, 0.97 * clean
    plain, residual = LOSSES["snr_spectral"], LOSSES["snr_spectral_residual"]
    gap_plain = plain((left,), (clean,)) - plain((removed_with_speech,), (clean,))
    gap_residual = residual((left,), (clean,)) - residual((removed_with_speech,), (clean,))
    assert gap_residual > gap_plain + 1.0


def test_the_low_band_loss_charges_noise_below_1khz_and_not_above():
    clean = _speech_like()
    t = torch.arange(clean.shape[-1]) / RATE
    low, high = (0.005 * torch.sin(2 * torch.pi * hz * t)[None] for hz in (310.0, 4100.0))
    plain = LOSSES["snr_spectral"]
    for excess_only in (False, True):
        loss = loss_with_args("snr_spectral_low", {"low_excess_only": excess_only})
        extra = {name: loss((clean + tone,), (clean,)) - plain((clean + tone,), (clean,))
                 for name, tone in (("low", low), ("high", high))}
        assert extra["low"] > 1.0  # the term sees a hum under the speech ...
        assert abs(extra["high"]) < 1e-3 * extra["low"]  # ... and nothing of the same tone at 4.1 kHz
    lost = (0.5 * clean,)  # speech taken out is excess of nothing: only the two-sided term charges it
    assert LOSSES["snr_spectral_low"](lost, (clean,)) - plain(lost, (clean,)) > 0.1
    assert loss_with_args("snr_spectral_low", {"low_excess_only": True})(lost, (clean,)) == plain(lost, (clean,))


def test_the_echo_preserving_loss_charges_a_removed_near_end_more_than_the_echo_loss():
    near = _speech_like(seed=1)
    echo = 0.3 * _speech_like(seed=2).roll(3000, -1)
    targets = (near, near)
    kept_echo = (near + 0.1 * echo, near + 0.1 * echo)
    lost_near = (0.5 * near, 0.5 * near)
    ratio_plain = LOSSES["echo"](lost_near, targets) / LOSSES["echo"](kept_echo, targets)
    ratio_preserving = LOSSES["echo_preserving"](lost_near, targets) / LOSSES["echo_preserving"](kept_echo, targets)
    assert ratio_preserving > 1.5 * ratio_plain


def test_recipe_loss_args_reach_the_loss_and_unknown_ones_are_refused():
    near = _speech_like(seed=1)
    lost_near, targets = (0.5 * near, 0.5 * near), (near, near)
    default = loss_with_args("echo_preserving")(lost_near, targets)
    heavier = loss_with_args("echo_preserving", {"speech_loss_weight": 4.0})(lost_near, targets)
    assert torch.isclose(default, LOSSES["echo_preserving"](lost_near, targets))
    assert heavier > 1.2 * default
    spectral = loss_with_args("snr_spectral", {"spectral_weight": 0.0})((0.5 * near,), (near,))
    assert torch.isclose(spectral, LOSSES["neg_snr"]((0.5 * near,), (near,)))
    with pytest.raises(ValueError, match="does not take"):
        loss_with_args("echo_preserving", {"speech_weight": 4.0})
    with pytest.raises(ValueError, match="unknown loss"):
        loss_with_args("l1")


def test_the_taught_and_clean_loss_weighs_the_teacher_against_the_truth():
    rng = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4000, generator=rng)
    teacher = clean + 0.3 * torch.randn(2, 4000, generator=rng)
    like_teacher, like_clean = teacher.clone(), clean.clone()
    only_teacher = loss_with_args("taught_and_clean", {"teacher_weight": 1.0})
    only_clean = loss_with_args("taught_and_clean", {"teacher_weight": 0.0})
    half = loss_with_args("taught_and_clean")
    assert only_teacher((like_teacher,), (teacher, clean)) < only_teacher((like_clean,), (teacher, clean))
    assert only_clean((like_clean,), (teacher, clean)) < only_clean((like_teacher,), (teacher, clean))
    expected = (only_teacher((like_teacher,), (teacher, clean)) + only_clean((like_teacher,), (teacher, clean))) / 2
    torch.testing.assert_close(half((like_teacher,), (teacher, clean)), expected)
