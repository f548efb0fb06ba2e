"""Objective speech-quality metrics on numpy signals: SI-SDR, SNR, PESQ (wide/narrow band), STOI/ESTOI.

PESQ and STOI come from the well-kept `pesq` and `pystoi` packages (extra `eval`), imported when used.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-10


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scale-invariant SDR in dB over the last axis (vectorised over leading axes)."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    estimate = estimate - estimate.mean(-1, keepdims=True)
    reference = reference - reference.mean(-1, keepdims=True)
    scale = (estimate * reference).sum(-1, keepdims=True) / ((reference**2).sum(-1, keepdims=True) + _EPS)
    target = scale * reference
    residual = estimate - target
    return 10 * np.log10(((target**2).sum(-1) + _EPS) / ((residual**2).sum(-1) + _EPS))


def snr(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Plain SNR in dB of `estimate` against `reference` over the last axis."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    noise = estimate - reference
    return 10 * np.log10(((reference**2).sum(-1) + _EPS) / ((noise**2).sum(-1) + _EPS))


def pesq(estimate: np.ndarray, reference: np.ndarray, sample_rate: int = 16000, mode: str = "wb") -> float:
    """PESQ (ITU-T P.862.2 wide band "wb" at 16 kHz, P.862 narrow band "nb" at 8 or 16 kHz); NaN if undefined."""
    from pesq import PesqError
    from pesq import pesq as _pesq

    try:
        return float(_pesq(sample_rate, np.asarray(reference, np.float32), np.asarray(estimate, np.float32), mode))
    except PesqError:  # e.g. no utterance detected in the reference
        return float("nan")


def stoi(estimate: np.ndarray, reference: np.ndarray, sample_rate: int = 16000, extended: bool = False) -> float:
    """STOI (or ESTOI with extended=True) of `estimate` against `reference`."""
    from pystoi import stoi as _stoi

    return float(_stoi(np.asarray(reference, np.float64), np.asarray(estimate, np.float64), sample_rate, extended))


def erle(mic: np.ndarray, enhanced: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Echo return loss enhancement in dB: how much weaker the output is than the mic, over `mask`.

    Meaningful over far-end single talk (the mic holds echo and noise only): pass that region as a boolean
    mask, or whole far-end single-talk clips without one.
    """
    mic = np.asarray(mic, np.float64)
    enhanced = np.asarray(enhanced, np.float64)
    if mask is not None:
        mic, enhanced = mic[mask], enhanced[mask]
    return float(10 * np.log10((np.dot(mic, mic) + _EPS) / (np.dot(enhanced, enhanced) + _EPS)))
