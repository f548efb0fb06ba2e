"""quell: real-time speech enhancement.

    import quell
    denoiser = quell.Denoiser("dtln", sample_rate=48000)
    clean_chunk = denoiser.process(noisy_chunk)        # any chunk length; same length out
    quell.enhance_file("noisy.wav", "clean.wav")        # offline, time-aligned
    engine = quell.LiveEngine("dtln", sample_rate=48000, block=480)  # inside an app's own audio callback
"""

from __future__ import annotations

from pathlib import Path

from quell.streaming.card import ModelCard
from quell.streaming.catalog import list_models
from quell.streaming.denoiser import Denoiser
from quell.streaming.echo import EchoCanceller
from quell.streaming.files import FileEnhancer
from quell.streaming.live import LiveEngine

__all__ = ["Denoiser", "EchoCanceller", "LiveEngine", "ModelCard", "enhance_file", "list_models"]


def enhance_file(
    src: str | Path, dst: str | Path, model: str | Path = "dtln", overwrite: bool = False, subtype: str | None = None
) -> float:
    """Enhance one audio file into `dst` (time-aligned, same rate, channels and, by default, sample format).

    Returns the duration in seconds; raises `quell.streaming.files.FileError` with a one-line reason.
    """
    return FileEnhancer(model).enhance(src, dst, overwrite=overwrite, subtype=subtype)
