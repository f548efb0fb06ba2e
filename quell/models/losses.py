"""Training losses on time-domain signals ([batch, samples])."""

from __future__ import annotations

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


LOSSES = {"neg_snr": negative_snr, "neg_si_sdr": negative_si_sdr}
