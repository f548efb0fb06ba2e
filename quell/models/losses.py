"""Training losses on time-domain signals ([batch, samples])."""

from __future__ import annotations

import functools
import inspect

import torch


def snr_db(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Signal-to-noise ratio of `estimate` against `target` in dB, per batch item."""
    noise = target - estimate
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def si_sdr_db(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-distortion ratio in dB, per batch item."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    scale = (estimate * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = scale * target
    return 10 * torch.log10((projection.pow(2).sum(-1) + eps) / ((estimate - projection).pow(2).sum(-1) + eps))


def negative_snr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The DTLN loss: minus the SNR in dB, averaged over the batch."""
    return -snr_db(estimate, target).mean()


def negative_si_sdr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the SI-SDR in dB, averaged over the batch."""
    return -si_sdr_db(estimate, target).mean()


def _spectra(
    signals: tuple[torch.Tensor, ...], n_fft: int, hop: int, bins: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hann-window STFTs of the signals (their first `bins` bins, all without) and their magnitudes (floored, so
    that they can divide)."""
    window = torch.hann_window(n_fft, device=signals[0].device)
    spectra = [torch.stft(x, n_fft, hop, window=window, return_complex=True)[..., :bins, :] for x in signals]
    return spectra, [s.abs().clamp_min(1e-8) for s in spectra]


def compressed_spectral(estimate: torch.Tensor, target: torch.Tensor, power: float = 0.3, n_fft: int = 512,
                        hop: int = 128, magnitude_weight: float = 0.7, bins: int | None = None) -> torch.Tensor:
    """Distance of power-law compressed spectra (magnitude and complex), as AEC-challenge systems train;
    `bins`: over the lowest `bins` DFT bins only.

    Unlike an SNR it is defined when the target is silent (far-end single talk: every echo left counts).
    """
    spectra, magnitudes = _spectra((estimate, target), n_fft, hop, bins)
    compressed = [m**power for m in magnitudes]
    phases = [s / m for s, m in zip(spectra, magnitudes, strict=True)]
    magnitude_term = (compressed[0] - compressed[1]).pow(2).mean()
    complex_term = (compressed[0] * phases[0] - compressed[1] * phases[1]).abs().pow(2).mean()
    return magnitude_weight * magnitude_term + (1 - magnitude_weight) * complex_term


def snr_and_spectral(estimate: torch.Tensor, target: torch.Tensor, spectral_weight: float = 100.0) -> torch.Tensor:
    """Minus the SNR plus a weighted compressed-spectral distance.

    The SNR term keeps the waveform right where the speech is loud; the compressed spectra weigh the quiet
    time-frequency bins too, so residual noise between words and in weak bands is not free (perceptual scores,
    DNSMOS BAK above all, hear it). With the default weight both terms move by a few units from noisy to enhanced.
    """
    return negative_snr(estimate, target) + spectral_weight * compressed_spectral(estimate, target)


def compressed_excess(estimate: torch.Tensor, target: torch.Tensor, power: float = 0.3, n_fft: int = 512,
                      hop: int = 128, bins: int | None = None) -> torch.Tensor:
    """How far the compressed magnitude spectrum of `estimate` rises above the target's, squared and averaged
    (`bins`: over the lowest `bins` DFT bins only).

    One-sided: with (output, clean) it charges only what the clean signal lacks (residual noise or echo,
    musical tones); with (clean, output) only what the output lost of it (suppressed speech). Next to a
    symmetric term it makes one kind of error dearer than the other.
    """
    _, (estimate_mag, target_mag) = _spectra((estimate, target), n_fft, hop, bins)
    return torch.relu(estimate_mag**power - target_mag**power).pow(2).mean()


def snr_spectral_residual(estimate: torch.Tensor, target: torch.Tensor, spectral_weight: float = 100.0,
                          residual_weight: float = 200.0) -> torch.Tensor:
    """`snr_and_spectral` plus a weighted `compressed_excess` of the output over the target: it trades a little
    detail for quiet pauses (DNSMOS BAK); DTLN's third stage trains with it."""
    return snr_and_spectral(estimate, target, spectral_weight) + residual_weight * compressed_excess(estimate, target)


def snr_spectral_low(estimate: torch.Tensor, target: torch.Tensor, spectral_weight: float = 100.0,
                     low_weight: float = 1000.0, low_bins: int = 33, low_excess_only: bool = False) -> torch.Tensor:
    """`snr_and_spectral` plus a weighted compressed distance over the lowest `low_bins` bins (33 of a 512-point
    DFT: up to 1 kHz at 16 kHz), or only the output's excess there (`low_excess_only`). Below 1 kHz is where
    DTLN's output loses most of its DNSMOS to RNNoise's (recipes/dtln/README.md)."""
    if low_excess_only:
        low = compressed_excess(estimate, target, bins=low_bins)
    else:
        low = compressed_spectral(estimate, target, bins=low_bins)
    return snr_and_spectral(estimate, target, spectral_weight) + low_weight * low


def dnsmos_crops(estimate: torch.Tensor, items: int = 8, seconds: float = 2.0,
                 sample_rate: int = 16000) -> torch.Tensor:
    """Random crops of `seconds` from the first `items` clips of `estimate` (whole clips when shorter), at
    offsets from torch's generator (seeded by the training run): what the DNSMOS term scores."""
    estimate = estimate[:items]
    samples = int(seconds * sample_rate)
    if estimate.shape[-1] <= samples:
        return estimate
    starts = torch.randint(0, estimate.shape[-1] - samples + 1, (len(estimate),)).tolist()
    return torch.stack([clip[s : s + samples] for clip, s in zip(estimate, starts, strict=True)])


def snr_spectral_dnsmos(estimate: torch.Tensor, target: torch.Tensor, spectral_weight: float = 100.0,
                        dnsmos_weight: float = 10.0, dnsmos_items: int = 8,
                        dnsmos_seconds: float = 2.0) -> torch.Tensor:
    """`snr_and_spectral` minus a weighted DNSMOS OVRL of the output, predicted by the P.835 network itself
    (`quell.models.dnsmos`, bfloat16) on random crops of a few clips (`dnsmos_crops`).

    A quality predictor as a loss, as MetricGAN uses PESQ. Beware: a network's rating is easy to please without
    sounding better. Fine-tuning DTLN with it raised the predicted OVRL while PESQ, STOI and DNSMOS P.808 fell
    (recipes/dtln/README.md); judge it on scores it does not see, never on OVRL.
    """
    from quell.models.dnsmos import dnsmos_ovrl

    with torch.autocast(estimate.device.type, dtype=torch.bfloat16):
        ovrl = dnsmos_ovrl(dnsmos_crops(estimate, dnsmos_items, dnsmos_seconds)).float().mean()
    return snr_and_spectral(estimate, target, spectral_weight) - dnsmos_weight * ovrl


def _first(loss):
    """A loss of (estimate, target) as a loss of (outputs, targets): the first of each."""

    def first(outputs, targets, **kwargs):
        return loss(outputs[0], targets[0], **kwargs)

    first.loss = loss  # its keyword arguments, for `loss_with_args`
    return first


def echo_loss(outputs, targets, echo_mask_weight: float = 0.5) -> torch.Tensor:
    """The near-end estimate against the near end, plus the echo-free estimate against the mic minus echo."""
    near = compressed_spectral(outputs[0], targets[0])
    return near + echo_mask_weight * compressed_spectral(outputs[1], targets[1])


def echo_preserving_loss(outputs, targets, speech_loss_weight: float = 2.0) -> torch.Tensor:
    """`echo_loss` plus a weighted `compressed_excess` of the near end over its estimate: near-end speech the
    model removes (in double talk above all) costs more than echo or noise it leaves."""
    return echo_loss(outputs, targets) + speech_loss_weight * compressed_excess(targets[0], outputs[0])


def taught_and_clean(outputs, targets, teacher_weight: float = 0.5, spectral_weight: float = 100.0) -> torch.Tensor:
    """Distillation with the truth kept in view: `snr_and_spectral` against the teacher's output (targets[0],
    from `train.teacher`) weighted `teacher_weight`, and against the clean signal (targets[1]) for the rest."""
    taught = snr_and_spectral(outputs[0], targets[0], spectral_weight)
    clean = snr_and_spectral(outputs[0], targets[1], spectral_weight)
    return teacher_weight * taught + (1 - teacher_weight) * clean


# losses of (outputs, targets), tuples of [batch, samples] tensors
LOSSES = {"neg_snr": _first(negative_snr), "neg_si_sdr": _first(negative_si_sdr),
          "snr_spectral": _first(snr_and_spectral),
          "snr_spectral_residual": _first(snr_spectral_residual), "snr_spectral_low": _first(snr_spectral_low),
          "snr_spectral_dnsmos": _first(snr_spectral_dnsmos),
          "taught_and_clean": taught_and_clean, "echo": echo_loss,
          "echo_preserving": echo_preserving_loss}


def loss_with_args(name: str, args: dict[str, float] | None = None):
    """The loss of (outputs, targets) called `name` in LOSSES, with keyword `args` (a recipe's `loss_args`);
    ValueError for a name or an argument it does not know."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
    loss = LOSSES[name]
    try:
        inspect.signature(getattr(loss, "loss", loss)).bind_partial(None, None, **(args or {}))
    except TypeError as error:
        raise ValueError(f"loss {name!r} does not take loss_args {sorted(args or {})}: {error}") from None
    return functools.partial(loss, **(args or {}))
