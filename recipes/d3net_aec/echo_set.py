"""What the recipe's experiments read from an echo set (`quell synth --echo`): its clips and, per clip, the far
end held back by the clip's true delay (the alignment a perfect delay estimator would give)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf


def clips(echo_set: Path) -> dict[str, dict[str, str]]:
    """The set's metadata rows by file name, in the file's order."""
    with open(echo_set / "metadata.csv") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def fit(signal: np.ndarray, n: int) -> np.ndarray:
    """`signal` cut or zero-padded to `n` samples."""
    return np.pad(signal, (0, max(0, n - len(signal))))[:n]


def aligned_far_end(echo_set: Path, row: dict[str, str], n: int, lead: int = 0,
                    dtype: str = "float32") -> np.ndarray:
    """The clip's far end delayed by its true delay less `lead` samples (not below 0), `n` samples long."""
    far, rate = sf.read(echo_set / "far_end" / row["file"], dtype=dtype)
    delay = max(round(float(row["delay"]) * rate) - lead, 0)
    return fit(np.concatenate([np.zeros(delay, far.dtype), far]), n)
