"""Stimuli a P.808 test adds to the clips under test: spoken messages, headphone check, gold and training clips.

Speech is synthesised by espeak-ng (Debian's `espeak-ng`), called as a program: nothing is downloaded.
Every generated clip is level-matched to the clip it comes from by its active speech level (RMS over the frames
within 30 dB of the loudest), so that no message or degradation stands out by loudness.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from quell.dns.corpora import _why_unusable
from quell.dns.p808.design import P808Error
from quell.dns.synth import generate_noise

TRAP_MESSAGE = "This is an interruption. Please select the answer {answer} to confirm your attention now."
TRAP_MESSAGE_P835 = "This is an interruption. Please select the answer {answer} for every question to confirm " \
                    "your attention now."
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FRAME_SECONDS = 0.02
_ACTIVE_RANGE_DB = 30.0
_GAP_SECONDS = 0.3
_PEAK = 0.99  # generated clips are scaled down to this peak rather than clipped by the 16-bit writer


def read_clip(path: Path) -> tuple[np.ndarray, int]:
    """A clip as mono float64 (channels averaged: P.808 rates mono speech) and its sample rate."""
    try:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise P808Error(f"{path}: not readable audio ({error})") from None
    clip = data.mean(axis=1)
    problem = _why_unusable(clip, 1)
    if problem:
        raise P808Error(f"{path}: {problem}")
    return clip, rate


def write_clip(path: Path, clip: np.ndarray, rate: int) -> None:
    """16-bit WAV (mono, or [frames, 2] for the headphone check), parent folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), clip, rate, subtype="PCM_16")


def active_rms(clip: np.ndarray, rate: int) -> float:
    """RMS over the 20 ms frames within 30 dB of the loudest one: the level of the speech, not of its pauses."""
    frame = round(_FRAME_SECONDS * rate)
    if len(clip) < 2 * frame:
        return float(np.sqrt(np.mean(clip**2)))
    n = len(clip) // frame
    energies = np.mean(np.reshape(clip[: n * frame], (n, frame)) ** 2, axis=1)
    active = energies[energies >= energies.max() * 10 ** (-_ACTIVE_RANGE_DB / 10)]
    return float(np.sqrt(active.mean()))


def _within_peak(clip: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(clip)))
    return clip * (_PEAK / peak) if peak > _PEAK else clip


def _match_level(clip: np.ndarray, rate: int, target_rms: float) -> np.ndarray:
    return clip * (target_rms / max(active_rms(clip, rate), 1e-9))


class Speaker:
    """Speaks short English texts through espeak-ng, trimmed of leading and trailing silence; cached by text."""

    def __init__(self) -> None:
        self.program = shutil.which("espeak-ng")
        if self.program is None:
            raise P808Error("espeak-ng is not installed (Debian: apt-get install espeak-ng); it speaks the "
                            "trapping messages and the headphone-check digits")
        self._cache: dict[str, tuple[np.ndarray, int]] = {}

    def say(self, text: str, rate: int) -> np.ndarray:
        """`text` spoken at sample rate `rate`, mono float64."""
        if text not in self._cache:
            with tempfile.TemporaryDirectory() as folder:
                wav = Path(folder) / "speech.wav"
                done = subprocess.run([self.program, "-v", "en-us", "-w", str(wav), text], capture_output=True,
                                      text=True, timeout=60)
                if done.returncode != 0 or not wav.exists():
                    raise P808Error(f"espeak-ng failed: {done.stderr.strip() or done.returncode}")
                speech, speech_rate = sf.read(str(wav), dtype="float64")
            loud = np.flatnonzero(np.abs(speech) > 1e-3 * np.max(np.abs(speech)))
            self._cache[text] = (speech[loud[0] : loud[-1] + 1], speech_rate)
        speech, speech_rate = self._cache[text]
        return speech if speech_rate == rate else soxr.resample(speech, speech_rate, rate)


def trapping_clip(clip: np.ndarray, rate: int, message: np.ndarray) -> np.ndarray:
    """The start of `clip`, then `message` at the clip's speech level; as long as the clip where it can be.

    Like the toolkit's `keep_original_duration`: at least one second of the clip plays first, so the trap
    sounds like any other clip until the voice interrupts it.
    """
    gap = round(_GAP_SECONDS * rate)
    lead = min(len(clip), max(rate, len(clip) - len(message) - gap))
    head = clip[:lead].copy()
    fade = min(len(head), round(0.02 * rate))
    head[len(head) - fade :] *= np.linspace(1.0, 0.0, fade)
    spoken = _match_level(message, rate, active_rms(clip, rate))
    return _within_peak(np.concatenate([head, np.zeros(gap), spoken]))


def headphone_clip(left: np.ndarray, right: np.ndarray, rate: int, left_first: bool, level: float) -> np.ndarray:
    """Stereo [frames, 2]: one digit in the left channel only, then (or before) another in the right only.

    Each digit gets the active speech level `level` (that of the volume sample), so the check plays as loud as
    the test.
    """
    gap = np.zeros(round(0.5 * rate))
    first, second = (left, right) if left_first else (right, left)
    stereo = np.zeros((len(first) + len(second) + 3 * len(gap), 2))
    channel = 0 if left_first else 1
    stereo[len(gap) : len(gap) + len(first), channel] = _match_level(first, rate, level)
    start = len(first) + 2 * len(gap)
    stereo[start : start + len(second), 1 - channel] = _match_level(second, rate, level)
    return _within_peak(stereo)


def degrade(clean: np.ndarray, rate: int, snr_db: float, rng: np.random.Generator, severe: bool = False) -> np.ndarray:
    """`clean` with pink noise at `snr_db`; `severe` also band-limits it to 300-2500 Hz and clips it hard.

    Severe is the "answer 1" gold clip and the bottom of the training range. The result keeps the clean clip's
    speech level.
    """
    noise = generate_noise("pink", len(clean), rng, rate).astype(np.float64)
    level = active_rms(clean, rate)
    noisy = clean + noise * level * 10 ** (-snr_db / 20)
    if severe:
        spectrum = np.fft.rfft(noisy)
        frequencies = np.fft.rfftfreq(len(noisy), 1.0 / rate)
        spectrum[(frequencies < 300) | (frequencies > 2500)] = 0
        noisy = np.fft.irfft(spectrum, len(noisy))
        limit = 0.1 * float(np.max(np.abs(noisy)))
        noisy = np.clip(noisy, -limit, limit)
    return _within_peak(_match_level(noisy, rate, level))
