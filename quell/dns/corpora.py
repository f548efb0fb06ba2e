"""Readers for speech, noise and room-impulse-response folders, including the DNS-Challenge layout.

A corpus is held in memory as a list of mono float32 clips at one sample rate: the shared training data
(70 min of speech, 25 min of noise) is ~400 MB at 16 kHz, and random access to clips in memory is what
makes on-the-fly mixture synthesis fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au"})

# Sub-folder names of the DNS-Challenge repositories (wideband `datasets/`, fullband `datasets_fullband/`).
_DNS_FOLDER_NAMES = {
    "speech": ("clean", "clean_fullband"),
    "noise": ("noise", "noise_fullband"),
    "rir": ("impulse_responses",),
}
_DNS_PARENTS = ("", "datasets", "datasets_fullband")


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read an audio file as mono float32 at `sample_rate` (channels averaged, resampled with soxr)."""
    data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


@dataclass
class Corpus:
    """Clips of one kind (speech, noise, music, RIRs), all mono float32 at `sample_rate`."""

    name: str
    sample_rate: int
    clips: list[np.ndarray] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.clips)

    def total_seconds(self) -> float:
        """Duration of all loaded clips together, in seconds."""
        return sum(len(clip) for clip in self.clips) / self.sample_rate


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def _why_unusable(clip: np.ndarray, min_samples: int) -> str | None:
    if clip.size == 0:
        return "empty"
    if not np.all(np.isfinite(clip)):
        return "contains NaN or Inf"
    if not np.any(clip):
        return "all zeros"
    if clip.size < min_samples:
        return f"shorter than {min_samples} samples"
    return None


def load_corpus(
    folders: str | Path | Iterable[str | Path],
    sample_rate: int,
    name: str,
    min_seconds: float = 0.0,
    max_files: int | None = None,
) -> Corpus:
    """Load every audio file under one or more folders (recursively, in sorted order) into memory.

    Files that cannot be decoded, are empty, silent or non-finite, or are shorter than `min_seconds` are
    skipped; they are listed in `Corpus.skipped` and summarised in one warning. At most `max_files` clips
    are kept. Raises ValueError when a folder does not exist or nothing usable was found.
    """
    folder_list = [Path(folders)] if isinstance(folders, str | Path) else [Path(f) for f in folders]
    for folder in folder_list:
        if not folder.is_dir():
            raise ValueError(f"{name} corpus: folder {folder} does not exist")

    corpus = Corpus(name=name, sample_rate=sample_rate)
    min_samples = int(round(min_seconds * sample_rate))
    for path in (p for folder in folder_list for p in _audio_files(folder)):
        if max_files is not None and len(corpus.clips) >= max_files:
            break
        try:
            clip = load_audio(path, sample_rate)
        except Exception as error:  # any decoder failure means "skip this file": never crash a long load
            corpus.skipped.append((str(path), f"unreadable: {error}".splitlines()[0]))
            continue
        reason = _why_unusable(clip, min_samples)
        if reason is not None:
            corpus.skipped.append((str(path), reason))
            continue
        corpus.clips.append(clip)
        corpus.paths.append(str(path))

    if corpus.skipped:
        examples = "; ".join(f"{path} ({reason})" for path, reason in corpus.skipped[:3])
        logger.warning("%s corpus: skipped %d file(s), e.g. %s", name, len(corpus.skipped), examples)
    if not corpus.clips:
        where = ", ".join(str(f) for f in folder_list)
        raise ValueError(f"{name} corpus: no usable audio clip in {where}")
    return corpus


def dns_layout(root: str | Path) -> dict[str, Path]:
    """Find the DNS-Challenge folders under `root`: keys `speech`, `noise`, `rir` for those that exist.

    Accepts `root/clean`, `root/datasets/clean` and `root/datasets_fullband/clean_fullband` (and the same
    for `noise` and `impulse_responses`); the first match in that order wins.
    """
    root = Path(root)
    layout: dict[str, Path] = {}
    for key, names in _DNS_FOLDER_NAMES.items():
        for parent in _DNS_PARENTS:
            found = next((root / parent / n for n in names if (root / parent / n).is_dir()), None)
            if found is not None:
                layout[key] = found
                break
    return layout
